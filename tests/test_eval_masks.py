"""Masks as evaluation and training read them: the stored levels become the right labels."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from common.data import SegDataset, check_dataset, load_items


def _circle(h: int = 64, w: int = 80) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (((yy - 30) ** 2 + (xx - 40) ** 2) < 15 ** 2).astype(np.uint8)


def test_a_jpeg_mask_with_levels_0_1_keeps_its_foreground(tmp_path):
    # JPEG noise takes a {0, 1} mask to {0, 1, 2}: the data check accepts it (no pixel in the
    # grey band), and a ">1 means {0, 255}" rule read every such mask as empty (Dice 1.0 for an
    # empty prediction, nothing to learn), silently.
    truth = _circle()
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image = np.zeros((*truth.shape, 3), np.uint8)
    image[truth > 0] = 200
    for name in ("a", "b"):
        Image.fromarray(image).save(tmp_path / "images" / f"{name}.png")
    Image.fromarray(truth * 255).save(tmp_path / "masks" / "a.png")  # a usual mask beside it: no
    Image.fromarray(truth).save(tmp_path / "masks" / "b.jpg", quality=90)  # all-empty-masks problem
    (tmp_path / "prompts.json").write_text(json.dumps({"a.png": "round lesion", "b.png": "round lesion"}))
    (tmp_path / "splits.json").write_text(json.dumps({"train": [], "val": [], "test": ["a.png", "b.png"]}))
    stored = np.asarray(Image.open(tmp_path / "masks" / "b.jpg"))
    assert stored.max() == 2  # what this test is about: noise above the level 1

    assert check_dataset(tmp_path, splits=["test"]) == []  # accepted, as before
    ds = SegDataset(load_items(tmp_path, "test"), 32, train=False)
    assert ds.items[1].id == "b"
    orig = ds[1]["orig_mask"].numpy()
    dice = 2 * float((orig & truth).sum()) / float(orig.sum() + truth.sum())
    assert dice > 0.95  # the circle, up to JPEG's edge noise
