"""The metrics are what their names say: threshold, HD95 (not HD), means, loss weighting, upsampling.

Each test pins one definition that a plausible slip (found by mutating common/evaluate.py) changed
while every other test passed.
"""

from __future__ import annotations

import math

import pytest
import torch
from monai.metrics import compute_hausdorff_distance

from common.evaluate import aggregate, item_metrics, to_original

BLOB = torch.zeros(16, 16)
BLOB[4:10, 4:10] = 1.0


def test_the_threshold_is_a_probability_of_one_half():
    assert item_metrics(BLOB * 0.55, BLOB)["dice"] == 1.0
    assert item_metrics(BLOB * 0.45, BLOB)["dice"] == 0.0  # nothing above 0.5: an empty prediction


def test_hd95_is_the_95th_percentile_not_the_largest_distance():
    pred = BLOB.clone()
    pred[15, 15] = 1.0  # one stray pixel far from the object
    got = item_metrics(pred, BLOB)["hd95"]
    p, g = pred[None, None], BLOB[None, None]
    hd95 = compute_hausdorff_distance(p, g, include_background=True, percentile=95).item()
    hd = compute_hausdorff_distance(p, g, include_background=True).item()
    assert got == pytest.approx(hd95) and hd > 2 * got  # the stray pixel alone decides HD, not HD95


def test_the_hd95_mean_is_over_items_where_it_is_defined():
    rows = [{"id": "a", "dice": 1.0, "iou": 1.0, "hd95": 2.0}, {"id": "b", "dice": 0.0, "iou": 0.0, "hd95": math.nan}]
    result = aggregate(rows, losses=[0.5], weights=[2])
    assert result.hd95 == 2.0 and result.hd95_undefined == 1


def test_the_loss_is_weighted_by_batch_size():
    rows = [{"id": str(i), "dice": 1.0, "iou": 1.0, "hd95": 0.0} for i in range(4)]
    assert aggregate(rows, losses=[1.0, 0.0], weights=[3, 1]).loss == pytest.approx(0.75)  # a mean per image


def test_predictions_are_upsampled_bilinearly_with_half_pixel_centres():
    logits = torch.tensor([[[-4.0, 4.0]]])  # (1, 1, 2)
    prob = to_original(logits, (1, 4))
    # sample positions -0.25, 0.25, 0.75, 1.25 in the source (clamped at the edges)
    expected = torch.sigmoid(torch.tensor([[-4.0, -2.0, 2.0, 4.0]]))
    assert torch.allclose(prob, expected, atol=1e-6)
