"""The `fedvlsm` command line end to end on a tiny random base and synthetic data."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_params_json_full_architecture(capsys):
    assert main(["params", "--base", "arch:clipseg-rd64-refined", "--adapter", "dense-vl", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["trainable"] == 2_974_464
    assert info["payload_bytes_fp32"] == 4 * info["trainable"]
    assert info["payload_bytes_fp16"] == 2 * info["trainable"]
    assert 150_000_000 < info["total"] - info["trainable"] < 151_000_000


def test_params_of_the_variant_that_trains_nothing(capsys):
    # README's table lists `none` (0 trainable); the command divided by its zero-byte update.
    assert main(["params", "--base", "demo", "--adapter", "none", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["trainable"] == 0 and info["payload_bytes_int8"] == 0
    assert info["int8_reduction_vs_full_model_fp32"] is None
    assert main(["params", "--base", "demo", "--adapter", "none"]) == 0
    assert "this variant sends nothing" in capsys.readouterr().out


def test_train_eval_predict(tmp_path, synth_sites, capsys):
    site = synth_sites[0]
    out = tmp_path / "adapter"
    assert main(["train", str(site), "--base", "arch:tiny", "--adapter", "dense-vl", "--out", str(out),
                 "--epochs", "2", "--quiet"]) == 0
    assert (out / "adapter_model.safetensors").exists() and (out / "training.json").exists()
    record = json.loads((out / "training.json").read_text())
    assert [h["epoch"] for h in record["history"]] == [1, 2]
    assert record["path"] == {"fast": False}  # the CPU default: the plain loop, recorded as such
    capsys.readouterr()

    assert main(["eval", str(site), "--adapter-dir", str(out), "--json", "--out", str(tmp_path / "m.json")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    from common.data import load_items

    assert metrics["n"] == len(load_items(site, "test"))  # the whole test split, nothing else
    rows = json.loads((tmp_path / "m.json").read_text())["items"]
    assert len(rows) == metrics["n"]
    assert metrics["dice"] == pytest.approx(np.mean([r["dice"] for r in rows]))  # the mean of its own rows
    assert main(["eval", str(site), "--adapter-dir", str(out)]) == 0
    table = capsys.readouterr().out
    test_row = next(line.split() for line in table.splitlines() if line.startswith("test"))
    assert test_row[1] == str(metrics["n"]) and test_row[2] == f"{metrics['dice']:.4f}"  # the same figures

    image = sorted((site / "images").iterdir())[0]
    assert main(["predict", "--adapter-dir", str(out), "--image", str(image), "--prompt", "round lesion",
                 "--out", str(tmp_path / "pred")]) == 0
    mask = np.asarray(Image.open(tmp_path / "pred" / "mask.png"))
    overlay = np.asarray(Image.open(tmp_path / "pred" / "overlay.png"))
    src = np.asarray(Image.open(image).convert("RGB"))
    assert mask.shape == src.shape[:2]  # at the original resolution
    assert set(np.unique(mask)) <= {0, 255}
    assert overlay.shape == src.shape


def test_train_with_a_seed_is_reproducible(tmp_path, synth_sites, capsys):
    """--seed covers the adapters' initial values too (they were drawn before fit seeded anything)."""
    from safetensors.torch import load_file

    def run(seed: int, name: str) -> dict:
        out = tmp_path / name
        assert main(["train", str(synth_sites[0]), "--base", "arch:tiny", "--adapter", "dense-vl", "--out", str(out),
                     "--epochs", "1", "--seed", str(seed), "--quiet"]) == 0
        history = json.loads((out / "training.json").read_text())["history"]
        return {"tensors": load_file(str(out / "adapter_model.safetensors")), "loss": history[0]["train_loss"]}

    a, b, c = run(3, "a"), run(3, "b"), run(4, "c")
    capsys.readouterr()
    assert a["loss"] == b["loss"] and a["tensors"].keys() == b["tensors"].keys()
    assert all(np.array_equal(a["tensors"][k].numpy(), b["tensors"][k].numpy()) for k in a["tensors"])
    assert c["loss"] != a["loss"]
    assert any(not np.array_equal(a["tensors"][k].numpy(), c["tensors"][k].numpy()) for k in a["tensors"])


def test_train_refuses_bad_data(tmp_path, synth_sites, capsys):
    import shutil

    site = tmp_path / "site"
    shutil.copytree(synth_sites[1], site)
    victim = sorted((site / "masks").iterdir())[0]
    victim.unlink()
    rc = main(["train", str(site), "--base", "arch:tiny", "--out", str(tmp_path / "o"), "--epochs", "1", "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0
    assert victim.name in err
    assert not (tmp_path / "o").exists()


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "common.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for cmd in ("params", "train", "eval", "predict", "data"):
        assert cmd in proc.stdout


def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in _subparsers(sub))


def test_every_command_and_option_has_help_with_default():
    import argparse

    from common.cli import build_parser

    parser = build_parser()
    top = parser.format_help()
    commands = dict(_subparsers(parser))
    for name in ("params", "train", "eval", "predict", "data", "data synth", "data check"):
        assert name in commands
    for name in ("params", "train", "eval", "predict", "data"):
        line = next(li for li in top.splitlines() if li.strip().startswith(name + " "))
        assert len(line.split()) > 2, f"no help line for {name} in fedvlsm --help"
    for name, sub in commands.items():
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"fedvlsm {name}: {action.option_strings or action.dest} has no help"
            if action.option_strings and not action.required:
                shown = "%(default)" in action.help or "(default" in sub._get_formatter()._get_help_string(action)
                assert shown, f"fedvlsm {name} {action.option_strings[0]}: default not shown"
        # Once per option, and never empty: `site start` printed "(default: the data folder's name) (default: )".
        text = " ".join(sub.format_help().split())
        assert "(default: )" not in text, f"fedvlsm {name}: an empty default shown"
        assert not re.search(r"\(default[^()]*(\([^()]*\))?[^()]*\) \(default", text), f"fedvlsm {name}: a default shown twice"


def test_help_does_not_import_heavy_modules():
    # `fedvlsm --help` must answer at once: the parser is built without
    # torch, transformers or MONAI (each command imports what it needs).
    code = ("import sys, common, common.cli, common.data; common.cli.build_parser(); "
            "print([m for m in ('torch', 'transformers', 'monai') if m in sys.modules])")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    # and a refused simulate config is said at once (it imported torch & co. first: 6-8 s)
    for argv in (["--help"], ["train", "--help"], ["data", "check", "--help"],
                 ["simulate", "--run-config", "adaptr='dense-vl'"],
                 ["simulate", "--run-config", "resume=true run-name='nothing-here'"]):
        proc = subprocess.run(
            [sys.executable, "-c", "import sys, common.cli; sys.argv[1:] = %r\n"
             "try:\n    common.cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print([m for m in ('torch', 'transformers', 'monai') if m in sys.modules])" % (argv,)],
            capture_output=True, text=True, timeout=120, env=env)
        assert proc.stdout.strip().splitlines()[-1] == "[]", (argv, proc.stdout[-300:], proc.stderr[-300:])


def test_lazy_public_names_still_import():
    import common
    from common import AdapterSpec, evaluate, fit, load_base, save_adapter
    import common.evaluate  # noqa: F401 - importing the submodule must not replace the function

    from common import evaluate as again

    assert callable(load_base) and callable(fit) and callable(save_adapter)
    assert again is evaluate and not isinstance(again, type(common))
    assert AdapterSpec("dense-vl").variant == "dense-vl"
    assert set(common.__all__) <= set(dir(common))


@pytest.mark.parametrize("name", ["consortium.example.org:9092", "bad name", "", "https://consortium.org"])
def test_deploy_certs_refuses_a_server_name_no_certificate_can_use(tmp_path, capsys, name):
    # It wrote the CA, keys and a server certificate whose name matched nothing (or failed half-way,
    # cryptically, leaving an empty folder).
    out = tmp_path / "certs"
    assert main(["deploy", "certs", str(out), "--server-name", name, "--site", "hospital-a"]) == 2
    assert f"--server-name {name!r}: a DNS name" in capsys.readouterr().err
    assert not out.exists()


def test_deploy_certs_names_dns_names_and_ip_addresses(tmp_path, capsys):
    from cryptography import x509

    out = tmp_path / "certs"
    assert main(["deploy", "certs", str(out), "--server-name", "consortium.example.org",
                 "--server-name", "10.0.0.5", "--site", "hospital-a"]) == 0
    cert = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "consortium.example.org" in san.get_values_for_type(x509.DNSName)
    assert "10.0.0.5" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
