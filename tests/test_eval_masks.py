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


def _nan_model(tiny_base):
    import torch

    from common.model import build_model

    model = build_model(tiny_base, "shallow-v")
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.fill_(float("nan"))
    return model


def test_nan_logits_are_refused_not_scored_as_an_empty_prediction(tmp_path, tiny_base):
    # NaN > 0.5 is False: a NaN map read as "no foreground" scored Dice 1.0 on an empty mask
    # (and 0.0 elsewhere, with only the loss NaN) and predict wrote an all-background mask.png.
    import pytest
    import torch

    from common.data.formats import Item
    from common.evaluate import evaluate, predict

    image = np.zeros((20, 30, 3), np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "m.png")
    ds = SegDataset([Item("empty-one", tmp_path / "a.png", tmp_path / "m.png", ["round lesion"])],
                    tiny_base.image_size, train=False)
    model = _nan_model(tiny_base)
    with pytest.raises(ValueError, match=r"NaN/Inf logits for 1 item\(s\) \(empty-one\)"):
        evaluate(model, ds, tiny_base.tokenizer, hd95=False)
    with pytest.raises(ValueError, match="NaN/Inf logits"):
        predict(model, tiny_base.tokenizer, image, "round lesion", torch.device("cpu"))


def _rgba(rgb_fg, rgb_bg, alpha_fg, alpha_bg):
    truth = _circle()
    a = np.zeros((*truth.shape, 4), np.uint8)
    a[truth > 0] = (*rgb_fg, alpha_fg)
    a[truth == 0] = (*rgb_bg, alpha_bg)
    return truth, a


def test_a_mask_that_marks_its_background_by_transparency_is_read_as_drawn(tmp_path):
    # Alpha was dropped: white on a transparent background read as all foreground, and a mask
    # drawn in alpha alone (black RGB) as empty; both passed the data check.
    from common.data.check import mask_level_error
    from common.data.formats import binarize_mask, read_mask

    cases = {
        "white-on-transparent": _rgba((255, 255, 255), (255, 255, 255), 255, 0),
        "alpha-only": _rgba((0, 0, 0), (0, 0, 0), 255, 0),
        "red-on-transparent": _rgba((255, 0, 0), (0, 0, 0), 255, 0),  # read right before, still right
        "opaque-rgba": _rgba((255, 255, 255), (0, 0, 0), 255, 255),
    }
    for name, (truth, pixels) in cases.items():
        path = tmp_path / f"{name}.png"
        Image.fromarray(pixels).save(path)
        raw = read_mask(path)
        assert mask_level_error(raw, path) is None, name
        assert (binarize_mask(raw) == truth).all(), name


def test_a_gray_plus_alpha_mask_reads_its_transparency_and_the_image_keeps_its_gray(tmp_path):
    # LA files kept only the gray: white on a transparent background read as all foreground.
    from common.data.formats import binarize_mask, read_image, read_mask

    truth, rgba = _rgba((255, 255, 255), (255, 255, 255), 255, 0)
    la = np.stack([rgba[..., 0], rgba[..., 3]], axis=-1)
    Image.fromarray(la, mode="LA").save(tmp_path / "m.png")
    assert (binarize_mask(read_mask(tmp_path / "m.png")) == truth).all()
    gray = np.arange(la.shape[0] * la.shape[1], dtype=np.uint8).reshape(la.shape[:2])
    Image.fromarray(np.stack([gray, la[..., 1]], axis=-1), mode="LA").save(tmp_path / "i.png")
    assert (read_image(tmp_path / "i.png") == gray[..., None]).all()  # gray replicated, alpha dropped
