"""check_dataset reports every kind of bad input at once; ensure_valid and the CLI refuse it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data import DataError, Problem, SegDataset, check_dataset, ensure_valid, load_items
from common.data.check import mask_level_error
from common.data.cli import add_data_commands
from helpers import make_medvlsm_dataset, medvlsm_record, square_pair, write_medvlsm, write_png


def _broken_medvlsm(root: Path) -> dict[str, str]:
    """A medvlsm dataset with exactly one instance of each problem; returns kind -> file named."""
    names = ["good.png", "garbage.png", "badmask.png", "nomask.png", "bigmask.png", "grey.png", "silent.png", "twice.png"]
    for i, name in enumerate(names):
        image, mask = square_pair(seed=i)
        write_png(root / "images" / name, image)
        write_png(root / "masks" / name, mask)
    (root / "images" / "garbage.png").write_bytes(b"\x89PNG but not really")
    (root / "masks" / "badmask.png").write_bytes(b"corrupt")
    (root / "masks" / "nomask.png").unlink()
    write_png(root / "masks" / "bigmask.png", np.zeros((40, 40), np.uint8))
    grey = square_pair()[1]
    grey[0, :3] = (7, 100, 180)
    write_png(root / "masks" / "grey.png", grey)

    silent = medvlsm_record("silent.png", prompts={"p0": "", "p1": "", "p2": ["", " "]})
    bad_prompt = medvlsm_record("good.png", prompts={"p0": "", "p1": 42})
    train = [
        medvlsm_record("good.png"),
        medvlsm_record("garbage.png"),
        medvlsm_record("badmask.png"),
        medvlsm_record("nomask.png"),
        medvlsm_record("bigmask.png"),
        medvlsm_record("grey.png"),
        silent,
        medvlsm_record("lost.png"),
        "not a record",
        bad_prompt,
        medvlsm_record("twice.png"),
    ]
    write_medvlsm(root, {"train": train, "val": [], "test": [medvlsm_record("twice.png")]})
    (root / "anns" / "extra.json").write_text('[{"img_name": "good.png",,}]')
    return {
        "unreadable-image": "garbage.png",
        "unreadable-mask": "badmask.png",
        "missing-mask": "nomask.png",
        "missing-image": "lost.png",
        "size-mismatch": "bigmask.png",
        "non-binary-mask": "grey.png",
        "no-prompt": "silent.png",
        "empty-split": "val.json",
        "malformed-annotation": "extra.json",
        "split-overlap": "twice.png",
    }


def test_clean_dataset_has_no_problems(tmp_path: Path) -> None:
    root = make_medvlsm_dataset(tmp_path)
    assert check_dataset(root) == []
    ensure_valid(root)  # does not raise


def test_every_kind_of_problem_is_reported_with_its_file(tmp_path: Path) -> None:
    expected = _broken_medvlsm(tmp_path)
    problems = check_dataset(tmp_path)
    assert all(isinstance(p, Problem) for p in problems)
    by_kind: dict[str, list[Problem]] = {}
    for p in problems:
        by_kind.setdefault(p.kind, []).append(p)
    for kind, name in expected.items():
        assert kind in by_kind, f"{kind} not reported; got {sorted(by_kind)}"
        assert any(name in p.message for p in by_kind[kind]), f"{kind} does not name {name}: {by_kind[kind]}"
    malformed = [p.message for p in by_kind["malformed-annotation"]]
    assert any("train.json record 8" in m and "expected an object" in m for m in malformed)  # the string record
    assert any("train.json record 9" in m and "'p1'" in m for m in malformed)  # the int prompt
    assert any("extra.json" in m and "invalid JSON at line 1" in m for m in malformed)
    assert any("record 7" in m and "lost.png" in m for m in (p.message for p in by_kind["missing-image"]))
    size = by_kind["size-mismatch"][0].message
    assert "40x40" in size and "24x32" in size and "bigmask.png" in size
    assert "7, 100, 180" in by_kind["non-binary-mask"][0].message
    # the good item itself is fine: nothing reports it beyond the malformed duplicate record
    assert not any(p.path.name == "good.png" for p in problems)


def test_ensure_valid_raises_with_the_same_messages(tmp_path: Path) -> None:
    _broken_medvlsm(tmp_path)
    problems = check_dataset(tmp_path, splits=["train"])
    with pytest.raises(DataError) as err:
        ensure_valid(tmp_path, splits=["train"])
    text = str(err.value)
    assert f"{len(problems)} problem(s)" in text
    for p in problems:
        assert p.message in text


def test_folder_format_problems(tmp_path: Path) -> None:
    image, mask = square_pair()
    for name in ("a.png", "b.png", "c.png"):
        write_png(tmp_path / "images" / name, image)
    write_png(tmp_path / "masks" / "a.png", mask)
    write_png(tmp_path / "masks" / "b.png", mask)
    (tmp_path / "prompts.json").write_text(json.dumps({"a.png": "lesion", "b.png": {"oops": 1}, "zzz.png": "x"}))
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["a.png", "b.png", "c.png", "nope.png"], "val": ["a.png"], "test": ["a.png"]}))
    problems = check_dataset(tmp_path, splits=["train"])
    text = "\n".join(str(p) for p in problems)
    assert "malformed-prompts" in text and "entry 'b.png'" in text and "prompts.json" in text
    assert any(p.kind == "missing-mask" and "c.png" in p.message for p in problems)
    assert any(p.kind == "no-prompt" and "c.png" in p.message for p in problems)
    assert any(p.kind == "missing-image" and "nope.png" in p.message and "splits.json" in p.message for p in problems)
    assert any(p.kind == "missing-image" and "zzz.png" in p.message for p in problems)


def test_malformed_csv_names_file_and_line(tmp_path: Path) -> None:
    image, mask = square_pair()
    write_png(tmp_path / "images" / "a.png", image)
    write_png(tmp_path / "masks" / "a.png", mask)
    (tmp_path / "prompts.csv").write_text("img,text\na.png,lesion\n")
    (problem,) = check_dataset(tmp_path, splits=["train"])
    assert problem.kind == "malformed-prompts" and "prompts.csv" in problem.message and "image, prompt" in problem.message
    (tmp_path / "prompts.csv").write_text("image,prompt\na.png,lesion\n,orphan\na.png,x,extra\n")
    messages = [p.message for p in check_dataset(tmp_path, splits=["train"]) if p.kind == "malformed-prompts"]
    assert any("line 3" in m and "empty 'image'" in m for m in messages)
    assert any("line 4" in m and "more fields" in m for m in messages)


def test_unknown_format_is_one_problem(tmp_path: Path) -> None:
    (problem,) = check_dataset(tmp_path)
    assert problem.kind == "unknown-format" and str(tmp_path) in problem.message


def test_jpeg_masks_are_accepted_when_near_binary() -> None:
    path = Path("m.jpg")
    noisy = np.zeros((50, 50), np.uint8)
    noisy[10:40, 10:40] = 250
    noisy[10, 10:20] = 128  # a few edge artefacts (<2%)
    assert mask_level_error(noisy, path) is None
    assert mask_level_error(noisy, Path("m.png")) is not None  # lossless masks must be exact
    soft = np.tile(np.arange(50, dtype=np.uint8) * 5, (50, 1))
    assert "not near-binary" in mask_level_error(soft, path)


def test_dataset_refuses_a_bad_mask_with_the_check_message(tmp_path: Path) -> None:
    root = make_medvlsm_dataset(tmp_path, n=4)
    grey = np.full((24, 32), 77, np.uint8)
    grey[0, 0] = 0
    Image.fromarray(grey).save(root / "masks" / "img0.png")
    ds = SegDataset(load_items(root, "train"), 16, train=False)
    with pytest.raises(DataError, match=r"non-binary-mask: .*img0.png"):
        ds[0]


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_check_exit_codes_and_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clean = make_medvlsm_dataset(tmp_path / "clean")
    assert _cli(["data", "check", str(clean)]) == 0
    assert "no problems" in capsys.readouterr().out

    broken = tmp_path / "broken"
    _broken_medvlsm(broken)
    assert _cli(["data", "check", str(broken)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    problems = check_dataset(broken)
    assert out[:-2] == [str(p) for p in problems]  # one line per problem
    # Then the note on the splits a deployed site would refuse (this dataset's are small).
    assert out[-2].startswith(f"{broken}: note: ") and "below --min-figure-images 5" in out[-2]
    assert out[-1].startswith(f"{broken}: {len(problems)} problem(s)") and "non-binary-mask" in out[-1]


def test_cli_synth_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fed"
    assert _cli(["data", "synth", str(out), "--sites", "2", "--per-site", "6", "--seed", "3", "--image-size", "48"]) == 0
    assert (out / "site-1" / "anns" / "train.json").is_file()
    assert _cli(["data", "synth", str(out), "--sites", "2", "--per-site", "6"]) == 2  # refuses to clobber
    assert "--overwrite" in capsys.readouterr().err
    assert _cli(["data", "check", str(out / "site-0")]) == 0
