"""The `fedvlsm` command line end to end on a tiny random base and synthetic data."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from common.cli import main


def test_params_json_full_architecture(capsys):
    assert main(["params", "--base", "arch:clipseg-rd64-refined", "--adapter", "dense-vl", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["trainable"] == 2_974_464
    assert info["payload_bytes_fp32"] == 4 * info["trainable"]
    assert info["payload_bytes_fp16"] == 2 * info["trainable"]
    assert 150_000_000 < info["total"] - info["trainable"] < 151_000_000


def test_train_eval_predict(tmp_path, synth_sites, capsys):
    site = synth_sites[0]
    out = tmp_path / "adapter"
    assert main(["train", str(site), "--base", "arch:tiny", "--adapter", "dense-vl", "--out", str(out),
                 "--epochs", "2", "--quiet"]) == 0
    assert (out / "adapter_model.safetensors").exists() and (out / "training.json").exists()
    history = json.loads((out / "training.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    capsys.readouterr()

    assert main(["eval", str(site), "--adapter-dir", str(out), "--json", "--out", str(tmp_path / "m.json")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0.0 <= metrics["dice"] <= 1.0 and metrics["n"] > 0
    assert len(json.loads((tmp_path / "m.json").read_text())["items"]) == metrics["n"]
    assert main(["eval", str(site), "--adapter-dir", str(out)]) == 0
    table = capsys.readouterr().out
    assert "Dice" in table and "test" in table

    image = sorted((site / "images").iterdir())[0]
    assert main(["predict", "--adapter-dir", str(out), "--image", str(image), "--prompt", "round lesion",
                 "--out", str(tmp_path / "pred")]) == 0
    mask = np.asarray(Image.open(tmp_path / "pred" / "mask.png"))
    overlay = np.asarray(Image.open(tmp_path / "pred" / "overlay.png"))
    src = np.asarray(Image.open(image).convert("RGB"))
    assert mask.shape == src.shape[:2]  # at the original resolution
    assert set(np.unique(mask)) <= {0, 255}
    assert overlay.shape == src.shape


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
