"""What `fedvlsm train/eval/predict` do with their output paths: nothing the user had is lost.

An adapter is saved as a whole new folder swapped in for the old one, so
`train --out` into a folder holding anything else deleted it (the dataset
itself with `--out <data folder>`), turned an existing file into a folder,
and failed after the whole training for `--out .`.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
from PIL import Image

from common.cli import main

TRAIN = ["--base", "arch:tiny", "--adapter", "shallow-v", "--epochs", "1", "--batch-size", "4", "--quiet"]


def test_the_documented_train_command_refuses_a_folder_with_other_files_and_keeps_them(tmp_path, synth_sites):
    out = tmp_path / "results"
    (out / "other_run").mkdir(parents=True)
    (out / "notes.txt").write_text("precious")
    (out / "other_run" / "a.txt").write_text("x")
    proc = subprocess.run(["fedvlsm", "train", str(synth_sites[0]), "--out", str(out), *TRAIN],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert f"{out}: holds 2 entries that are not an adapter's (e.g. 'notes.txt')" in proc.stderr
    assert (out / "notes.txt").read_text() == "precious" and (out / "other_run" / "a.txt").read_text() == "x"
    assert not (out / "adapter_model.safetensors").exists()


def test_train_out_set_to_the_data_folder_is_refused_and_the_data_kept(tmp_path, synth_sites, capsys):
    site = tmp_path / "site"
    shutil.copytree(synth_sites[0], site)
    before = sorted(p.relative_to(site) for p in site.rglob("*"))
    assert main(["train", str(site), "--out", str(site), *TRAIN]) == 2
    assert "that are not an adapter's" in capsys.readouterr().err
    assert sorted(p.relative_to(site) for p in site.rglob("*")) == before


def test_train_out_an_existing_file_or_the_current_folder_is_refused(tmp_path, synth_sites, capsys, monkeypatch):
    target = tmp_path / "file_out"
    target.write_text("important")
    assert main(["train", str(synth_sites[0]), "--out", str(target), *TRAIN]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert target.read_text() == "important"

    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["train", str(synth_sites[0]), "--out", ".", *TRAIN]) == 2
    assert "is the current folder" in capsys.readouterr().err


def test_train_again_into_an_adapter_folder_replaces_it(tmp_path, synth_sites, capsys):
    out = tmp_path / "adapter"
    for seed in ("1", "2"):
        assert main(["train", str(synth_sites[0]), "--out", str(out), "--seed", seed, *TRAIN]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "training.json"]
    assert '"seed": 2' in (out / "training.json").read_text()
    # The new folder takes the umask's mode, not mkdtemp's 0700.
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_eval_and_predict_refuse_unusable_output_paths_before_working(tmp_path, synth_sites, capsys):
    out = tmp_path / "adapter"
    assert main(["train", str(synth_sites[0]), "--out", str(out), *TRAIN]) == 0
    capsys.readouterr()
    folder = tmp_path / "evalout"
    folder.mkdir()
    assert main(["eval", str(synth_sites[0]), "--adapter-dir", str(out), "--out", str(folder)]) == 2
    assert f"--out {folder}: is a folder" in capsys.readouterr().err

    image = sorted((synth_sites[0] / "images").iterdir())[0]
    a_file = tmp_path / "ns.png"
    a_file.write_bytes(b"x")
    assert main(["predict", "--adapter-dir", str(out), "--image", str(image), "--prompt", "round lesion",
                 "--out", str(a_file)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err and a_file.read_bytes() == b"x"

    # Predicting again into one folder replaces the earlier prediction's files; no temporary file is left.
    pred = tmp_path / "pred"
    for _ in range(2):
        assert main(["predict", "--adapter-dir", str(out), "--image", str(image), "--prompt", "round lesion",
                     "--out", str(pred)]) == 0
    assert sorted(p.name for p in pred.iterdir()) == ["mask.png", "overlay.png", "prediction.json"]
    assert set(np.unique(np.asarray(Image.open(pred / "mask.png")))) <= {0, 255}
