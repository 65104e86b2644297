"""Data check findings that used to pass silently, multi-site roots, and the site-side summary."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import common.data.check as check_module
from common.data import DataError, SiteCheck, check_dataset, ensure_valid, site_data_check
from common.data.check import mask_level_error
from common.data.cli import add_data_commands
from common.data.formats import binarize_mask, read_mask
from helpers import make_medvlsm_dataset, medvlsm_record, square_pair, write_medvlsm, write_png


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_all_empty_masks_of_a_split_are_an_error(tmp_path: Path) -> None:
    root = make_medvlsm_dataset(tmp_path / "d", n=6)
    for record in json.loads((root / "anns" / "train.json").read_text()):
        write_png(root / "masks" / record["mask_name"], np.zeros((24, 32), np.uint8))
    problems = check_dataset(root)
    (empty,) = [p for p in problems if p.kind == "all-empty-masks"]
    assert empty.split == "train" and empty.count == 4 and "'train'" in empty.message and str(root) in empty.message
    assert not empty.is_warning
    with pytest.raises(DataError, match="all-empty-masks"):
        ensure_valid(root, splits=("train", "val"))
    ensure_valid(root, splits=("val", "test"))  # other splits still have foreground


def test_unused_images_are_a_counted_warning_that_does_not_stop_training(tmp_path: Path, capsys) -> None:
    root = make_medvlsm_dataset(tmp_path / "d", n=6)
    for name in ("spare1.png", "spare2.png"):
        write_png(root / "images" / name, square_pair()[0])
    (unused,) = check_dataset(root)
    assert unused.kind == "unused-images" and unused.is_warning and unused.count == 2
    assert "2 image(s) in no split" in unused.message and "spare1.png" in unused.message
    ensure_valid(root)  # a warning never refuses a valid dataset
    assert _cli(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "unused-images (warning)" in out and "1 warning(s)" in out


def test_an_image_a_split_lists_without_a_prompt_is_an_error_not_also_unused(tmp_path: Path) -> None:
    # It was reported twice, contradicting itself: no-prompt and "in no split".
    root = tmp_path / "d"
    for name in ("a.png", "b.png", "c.png", "d.png"):
        image, mask = square_pair()
        write_png(root / "images" / name, image)
        write_png(root / "masks" / name, mask)
    (root / "prompts.json").write_text(json.dumps({"a.png": "lesion", "b.png": "lesion", "d.png": "lesion"}))
    (root / "splits.json").write_text(json.dumps({"train": ["a.png", "c.png"], "val": ["b.png"], "test": ["d.png"]}))
    problems = check_dataset(root)
    assert [(p.kind, p.path.name) for p in problems] == [("no-prompt", "c.png")]


def test_16_bit_masks_with_levels_0_and_65535_are_binary(tmp_path: Path) -> None:
    root = make_medvlsm_dataset(tmp_path / "d", n=6)
    mask16 = (square_pair()[1].astype(np.uint16) // 255) * 65535
    write_png(root / "masks" / "img0.png", mask16)
    raw = read_mask(root / "masks" / "img0.png")
    assert raw.dtype == np.uint16 and set(np.unique(raw)) == {0, 65535}
    assert mask_level_error(raw, Path("m.png")) is None
    assert set(np.unique(binarize_mask(raw))) == {0, 1}
    assert check_dataset(root) == []
    assert mask_level_error(np.array([0, 300, 65535], np.uint16), Path("m.png")) is not None


def test_multi_site_root_is_checked_site_by_site(tmp_path: Path, capsys) -> None:
    fed = tmp_path / "fed"
    assert _cli(["data", "synth", str(fed), "--sites", "2", "--per-site", "6", "--image-size", "48"]) == 0
    capsys.readouterr()
    assert _cli(["data", "check", str(fed)]) == 0
    out = capsys.readouterr().out
    assert "== site site-0" in out and "== site site-1" in out and "all 2 site(s) OK" in out

    victim = sorted((fed / "site-1" / "images").iterdir())[0]
    victim.write_bytes(b"not an image")
    assert _cli(["data", "check", str(fed)]) == 1
    out = capsys.readouterr().out
    assert "unreadable-image" in out and victim.name in out and "1 of 2 site(s) have problems: site-1" in out

    # any folder of dataset folders, without sites.json, is a multi-site root too
    plain = tmp_path / "plain"
    make_medvlsm_dataset(plain / "hospital-a")
    make_medvlsm_dataset(plain / "hospital-b")
    assert _cli(["data", "check", str(plain)]) == 0
    assert "== site hospital-b" in capsys.readouterr().out
    (problem,) = check_dataset(plain)  # not one dataset: says what it is instead
    assert problem.kind == "unknown-format" and "multi-site root" in problem.message


def test_site_data_check_summary_has_counts_only_and_is_cached(tmp_path: Path, monkeypatch) -> None:
    root = make_medvlsm_dataset(tmp_path / "secret-hospital", n=6)
    (root / "images" / "img0.png").write_bytes(b"\x89PNG truncated")  # img0 is in train
    cache = root / "cache"  # inside the site folder, as the client keeps it: must not count as data
    result = site_data_check(root, cache)
    assert isinstance(result, SiteCheck) and result.ok is False
    assert result.counts == {"unreadable-image": {"train": 1}}
    assert result.summary == "data check: 1 unreadable-image in train"
    for secret in ("img0", "secret-hospital", str(tmp_path), "/", "PNG", "Error"):
        assert secret not in result.summary
    assert any("img0.png" in d for d in result.details)  # the full message stays at the site

    calls = []
    real = check_module.read_image
    monkeypatch.setattr(check_module, "read_image", lambda p: calls.append(p) or real(p))
    again = site_data_check(root, cache)
    assert again == result and calls == []  # served from the cache: nothing decoded

    image, _ = square_pair(seed=0)
    write_png(root / "images" / "img0.png", image)  # fixed: a data change invalidates the cache
    fixed = site_data_check(root, cache)
    assert calls and fixed.ok and fixed.summary == "data check: OK" and fixed.counts == {}


def test_site_data_check_warnings_keep_ok_and_other_split_names_are_hidden(tmp_path: Path) -> None:
    root = make_medvlsm_dataset(tmp_path / "d", n=6)
    write_png(root / "images" / "spare.png", square_pair()[0])
    records = json.loads((root / "anns" / "train.json").read_text())
    write_medvlsm(root, {"patient-smith-holdout": [records[0], medvlsm_record("gone.png")]})
    result = site_data_check(root, tmp_path / "cache")
    assert not result.ok
    assert result.counts["missing-image"] == {"other": 1}
    assert "smith" not in result.summary and "other" in result.summary
    os.remove(root / "anns" / "patient-smith-holdout.json")
    shutil.rmtree(tmp_path / "cache")
    result = site_data_check(root, tmp_path / "cache")
    assert result.ok and result.summary == "data check: OK; 1 unused-images (warning) in all"


def test_two_items_with_one_id_are_an_error_naming_both_images(tmp_path: Path) -> None:
    """Ids name per-item outputs and caches: two images under one id would overwrite each other's."""
    root = make_medvlsm_dataset(tmp_path / "d", n=6)
    records = json.loads((root / "anns" / "train.json").read_text())
    twin = {**records[1], "segment_id": records[0]["segment_id"]}  # another image, the first one's id
    write_medvlsm(root, {"train": [records[0], twin, *records[2:]]})
    dup = [p for p in check_dataset(root, ["train"]) if p.kind == "duplicate-id"]
    assert len(dup) == 1 and "img1.png" in dup[0].message and "img0.png" in dup[0].message, dup


def test_boolean_pixels_are_black_and_white_not_black_and_almost_black() -> None:
    from common.data.formats import to_uint8

    assert to_uint8(np.array([[True, False]])).tolist() == [[255, 0]]
