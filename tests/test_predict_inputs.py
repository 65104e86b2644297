"""`predict` (Python API) on images it cannot take: one clear ValueError, not an error from deep in PIL/numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.evaluate import predict
from common.model import build_model


@pytest.mark.parametrize("make", [
    lambda im: im / 255.0,                        # float in [0, 1]: PIL "Cannot handle this data type"
    lambda im: im[..., 0],                        # grayscale (H, W): numpy "axes don't match array"
    lambda im: np.dstack([im, im[..., :1]]),      # RGBA: a broadcast error
    lambda im: im.transpose(2, 0, 1).copy(),      # CHW, as torch keeps images
    lambda im: im.astype(np.uint16) * 257,        # 16-bit
    lambda im: torch.from_numpy(im),              # a tensor: AttributeError
], ids=["float", "gray", "rgba", "chw", "uint16", "tensor"])
def test_predict_refuses_an_image_that_is_not_uint8_rgb_saying_what_it_needs(tiny_base, make):
    model = build_model(tiny_base, "none")
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"predict needs a uint8 RGB image of shape \(H, W, 3\).*got a"):
        predict(model, tiny_base.tokenizer, make(image), "round lesion", torch.device("cpu"))


def test_predict_gives_a_map_the_size_of_a_non_square_image(tiny_base):
    model = build_model(tiny_base, "none")
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    prob = predict(model, tiny_base.tokenizer, image, "round lesion", torch.device("cpu"))
    assert prob.shape == (20, 30) and np.isfinite(prob).all()
