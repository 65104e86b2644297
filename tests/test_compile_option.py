"""Choosing TrainConfig.compile where users choose it: `fedvlsm train --compile`, a site worker's
`--compile` (passed on by `fedvlsm site start`), and a refusal wherever the mode would be ignored.

Every mode acts on the fast path, which runs on CUDA; this machine has none, so what these tests
can show is that the choice arrives and that a choice that cannot be honoured is said, not ignored.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from client import handlers, launcher
from common.cli import build_parser, main
from common.config import COMPILE_MODES, TrainConfig
from common.data import SegDataset, load_items
from common.federation_config import FederationConfig
from common.model import build_model
from common.train import fit

ROOT = Path(__file__).resolve().parents[1]


def test_train_command_takes_the_mode_and_refuses_it_without_the_fast_path(tmp_path, synth_sites, capsys):
    rc = main(["train", str(synth_sites[0]), "--base", "arch:tiny", "--adapter", "dense-vl", "--out",
               str(tmp_path / "a"), "--epochs", "1", "--quiet", "--device", "cpu", "--compile", "cuda-graph"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "compile='cuda-graph'" in err and "fast='auto' on cpu" in err
    assert not (tmp_path / "a").exists()  # refused before training, nothing written


def test_fit_refuses_a_compile_mode_it_would_ignore(tiny_base, synth_sites):
    ds = SegDataset(load_items(synth_sites[0], "train"), tiny_base.image_size, train=True)
    model = build_model(tiny_base, "dense-vl")
    before = {k: v.clone() for k, v in model.adapter_state().items()}
    for mode in [m for m in COMPILE_MODES if m != "off"]:
        cfg = TrainConfig(epochs=1, device="cpu", fast="off", compile=mode, progress=False)
        with pytest.raises(ValueError, match=f"compile='{mode}'.*fast='off' on cpu"):
            fit(model, ds, None, tiny_base.tokenizer, cfg)
    after = model.adapter_state()
    assert all((after[k] == v).all() for k, v in before.items())  # nothing trained


def test_site_worker_refuses_a_mode_its_device_cannot_run(tmp_path):
    socket = tmp_path / "w.sock"
    proc = subprocess.run([sys.executable, "-m", "client.worker", "--socket", str(socket),
                           "--device", "cpu", "--compile", "cuda-graph"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--compile cuda-graph: needs a CUDA device" in proc.stderr and "cpu" in proc.stderr
    assert not socket.exists()  # refused before serving


def test_site_start_refuses_a_mode_its_device_cannot_run_before_starting_anything(tmp_path, capsys):
    home = tmp_path / "home"
    rc = main(["site", "start", "--superlink", "127.0.0.1:1", "--data", str(tmp_path), "--insecure",
               "--site-dir", str(home), "--device", "cpu", "--compile", "cuda-graph"])
    assert rc == 2
    assert "fedvlsm site start: --compile cuda-graph: needs a CUDA device" in capsys.readouterr().err
    assert not home.exists()  # no worker, no SuperNode, no site folder


def test_site_start_passes_the_mode_to_its_worker(tmp_path):
    # `fedvlsm site start`'s own parser, so a renamed option fails here
    args = build_parser().parse_args(["site", "start", "--superlink", "h:1", "--data", str(tmp_path), "--device",
                                      "cuda:1", "--compile", "cuda-graph", "--preload-base", "demo"])
    cmd = launcher.worker_command(args, tmp_path / "w.sock", tmp_path / "w.ready")
    assert cmd[1:3] == ["-m", "client.worker"]
    for option, value in (("--device", "cuda:1"), ("--compile", "cuda-graph"), ("--preload-base", "demo")):
        assert cmd[cmd.index(option) + 1] == value
    plain = launcher.worker_command(argparse.Namespace(device="", compile="", preload_base=""), tmp_path / "s",
                                    tmp_path / "r")
    assert "--compile" not in plain and "--device" not in plain


def test_the_worker_mode_reaches_local_training(monkeypatch):
    cfg = FederationConfig()
    assert handlers._train_config(cfg, 1, 0).compile == "off"
    monkeypatch.setenv("FEDVLSM_COMPILE", "cuda-graph")
    monkeypatch.setenv("FEDVLSM_DEVICE", "cuda")
    tc = handlers._train_config(cfg, 1, 0)
    assert (tc.compile, tc.device) == ("cuda-graph", "cuda")


def test_train_command_says_when_a_capture_failed(tmp_path, monkeypatch, capsys):
    """A capture that failed on the card (those steps ran eagerly) is printed, not only recorded."""
    import common.api
    from common.train import FitResult

    reason = "RuntimeError: CUDA error: operation not permitted when stream is capturing"
    done = FitResult(10, 2, 4, 0.5, 0.9, 2, 1.0, [], {"fast": True, "compile": "cuda-graph", "amp": "bfloat16",
                                                     "graphs": 0, "replays": 0, "capture_failures": [reason]})
    monkeypatch.setattr(common.api, "train_site", lambda *a, **k: done)
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "a"), "--compile", "cuda-graph", "--quiet"]) == 0
    assert f"note: a CUDA graph capture failed, those steps ran eagerly: {reason}" in capsys.readouterr().out
