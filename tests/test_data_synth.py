"""Synthetic multi-site data: deterministic, valid, and really different per site."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data import check_dataset, load_items, synthesize


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return synthesize(tmp_path_factory.mktemp("synth") / "fed", sites=3, per_site=24, seed=7, image_size=64)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_by_seed(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a", sites=2, per_site=8, seed=5, image_size=48)
    synthesize(tmp_path / "b", sites=2, per_site=8, seed=5, image_size=48)
    synthesize(tmp_path / "c", sites=2, per_site=8, seed=6, image_size=48)
    assert [p.name for p in a] == ["site-0", "site-1"]
    files_a, files_b, files_c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert files_a == files_b
    assert files_a.keys() == files_c.keys()
    images = [k for k in files_a if k.startswith("site-0/images/")]
    assert all(files_a[k] != files_c[k] for k in images)


def test_layout_splits_and_check_clean(fed: list[Path]) -> None:
    root = fed[0].parent
    meta = json.loads((root / "sites.json").read_text())
    assert [s["name"] for s in meta["sites"]] == ["site-0", "site-1", "site-2"]
    assert "site-1" in (root / "README.txt").read_text()
    for site in fed:
        assert check_dataset(site) == []
        counts = {s: len(load_items(site, s)) for s in ("train", "val", "test")}
        assert counts == {"train": 17, "val": 4, "test": 3}
        ids = [i.id for s in ("train", "val", "test") for i in load_items(site, s)]
        assert len(set(ids)) == 24


def _site_stats(site: Path) -> dict[str, float]:
    items = load_items(site, "train")
    images = [np.asarray(Image.open(i.image), dtype=np.float64) for i in items]
    masks = [np.asarray(Image.open(i.mask)) > 0 for i in items]
    inside = np.mean([im[m].mean() for im, m in zip(images, masks)])
    outside = np.mean([im[~m].mean() for im, m in zip(images, masks)])
    return {
        "size": images[0].shape[0],
        "mean_r": np.mean([im[..., 0].mean() for im in images]),
        "mean_g": np.mean([im[..., 1].mean() for im in images]),
        "contrast": inside - outside,  # > 0: bright lesions
        "area": np.mean([m.mean() for m in masks]),
        "noise": np.mean([np.abs(np.diff(im[..., 1], axis=1)).mean() for im in images]),
    }


def test_sites_differ_in_domain(fed: list[Path]) -> None:
    s0, s1, s2 = (_site_stats(p) for p in fed)
    assert (s0["size"], s1["size"], s2["size"]) == (64, 80, 56)  # native sizes differ
    assert s0["contrast"] < -40 and s1["contrast"] > 40 and s2["contrast"] < -40  # lesion polarity flips
    assert abs(s0["mean_r"] - s0["mean_g"]) < 3 < s1["mean_r"] - s1["mean_g"]  # grey vs colour cast
    assert abs(s1["mean_g"] - s2["mean_g"]) > 30
    assert s2["area"] > 1.5 * s1["area"]  # larger lesions at the dermoscopy-like site
    assert s0["noise"] > 1.5 * s1["noise"]  # speckle vs clean endoscopy


def test_extra_sites_are_perturbed_not_copies(tmp_path: Path) -> None:
    sites = synthesize(tmp_path / "f", sites=4, per_site=6, seed=1, image_size=48)
    meta = json.loads((tmp_path / "f" / "sites.json").read_text())["sites"]
    assert meta[3]["style"]["texture"] == meta[0]["style"]["texture"]
    assert meta[3]["style"]["background"] != meta[0]["style"]["background"]
    assert check_dataset(sites[3]) == []


_POS = re.compile(r"located in the (.+) of the image")


def test_prompts_grow_in_detail_and_match_the_mask(fed: list[Path]) -> None:
    checked = 0
    for site in fed:
        for item in load_items(site, "train"):
            p = item.prompts
            assert len(p) == 10 and p[0] == "" and p[1] == "lesion"
            assert all(isinstance(x, str) and x for x in p[1:7])
            assert all(isinstance(x, list) and len(x) >= 2 for x in p[7:])
            assert p[5] in (f"one {p[4]}", f"two {p[4]}s") and p[6].startswith(p[5] + ", located in")
            assert all(v.startswith(p[5]) for v in p[8]) and all(v.endswith(" of the image") for v in p[9])
            mask = np.asarray(Image.open(item.mask)) > 0
            area = mask.mean()
            size_word = p[4].split()[0]
            assert size_word == ("small" if area < 0.04 else "medium" if area < 0.12 else "large")
            if p[5].startswith("one"):
                (where,) = _POS.search(p[6]).groups()
                ys, xs = np.nonzero(mask)
                h, w = mask.shape
                assert ("left" in where) == (xs.mean() < w / 3)
                assert ("right" in where) == (xs.mean() >= 2 * w / 3)
                assert ("top" in where) == (ys.mean() < h / 3)
                checked += 1
    assert checked > 20
    tones = {load_items(s, "val")[0].prompts[3].split()[0] for s in fed}
    assert tones == {"dark", "bright"}


def test_refuses_to_overwrite_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        synthesize(tmp_path, sites=1, per_site=3)
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):
        synthesize(tmp_path, sites=1, per_site=3, overwrite=True)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    out = tmp_path / "s"
    synthesize(out, sites=2, per_site=3)
    synthesize(out, sites=1, per_site=4, overwrite=True)
    assert not (out / "site-1").exists() and len(list((out / "site-0" / "images").iterdir())) == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [({"sites": 0}, "sites"), ({"per_site": 2}, "per_site"), ({"splits": (0.5, 0.5, 0.0)}, "splits"), ({"image_size": 8}, "image_size")],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        synthesize(tmp_path / "x", **kwargs)


@pytest.mark.parametrize("argv, said", [
    (["--seed", "-1"], "--seed: must be in [0, 4294967295], got -1"),  # was numpy's words, no option named
    (["--sites", "100000000000"], "--sites: must be in [1, 10000]"),  # wrote on until the disk was full
    (["--per-site", "2"], "--per-site: must be in [3, 1000000], got 2"),
    (["--image-size", "8"], "--image-size: must be in [32, 512], got 8"),
])
def test_the_synth_command_names_the_option_it_refuses(argv, said, tmp_path: Path, capsys) -> None:
    from common.cli import main

    assert main(["data", "synth", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedvlsm data synth: ") and said in err
    assert not (tmp_path / "out").exists()  # refused before anything was written
