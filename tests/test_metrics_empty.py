"""The metrics' convention for empty masks (common/evaluate.py docstring), and NaN-free JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch

from common.evaluate import aggregate, item_metrics, json_safe

EMPTY = torch.zeros(16, 16)
BLOB = torch.zeros(16, 16)
BLOB[4:10, 4:10] = 1.0
OTHER = torch.zeros(16, 16)
OTHER[6:12, 6:12] = 1.0


@pytest.mark.parametrize(
    "pred, target, dice",
    [(EMPTY, EMPTY, 1.0), (EMPTY, BLOB, 0.0), (BLOB, EMPTY, 0.0)],
    ids=["empty-vs-empty", "empty-vs-object", "object-vs-empty"],
)
def test_empty_masks_dice_iou_and_undefined_hd95(pred, target, dice):
    m = item_metrics(pred, target)  # pred is a probability map: > 0.5 is foreground
    assert m["dice"] == dice and m["iou"] == dice
    assert math.isnan(m["hd95"])


def test_non_empty_masks_use_the_usual_definitions():
    same = item_metrics(BLOB, BLOB)
    assert same == {"dice": 1.0, "iou": 1.0, "hd95": 0.0}
    shifted = item_metrics(OTHER, BLOB)
    assert shifted["dice"] == pytest.approx(2 * 16 / 72) and shifted["iou"] == pytest.approx(16 / 56)
    assert shifted["hd95"] > 0


def test_means_count_every_item_for_dice_and_only_defined_ones_for_hd95():
    rows = [
        {"id": "a", **item_metrics(EMPTY, EMPTY)},  # 1.0, HD95 undefined
        {"id": "b", **item_metrics(BLOB, BLOB)},  # 1.0, HD95 0
        {"id": "c", **item_metrics(EMPTY, BLOB)},  # 0.0, HD95 undefined
    ]
    result = aggregate(rows, losses=[0.5], weights=[3])
    assert result.dice == pytest.approx(2 / 3) and result.iou == pytest.approx(2 / 3)
    assert result.hd95 == 0.0 and result.hd95_undefined == 2 and result.n == 3
    none_defined = aggregate([rows[0], rows[2]], losses=[0.5], weights=[2])
    assert math.isnan(none_defined.hd95) and none_defined.hd95_undefined == 2


def test_json_outputs_write_undefined_hd95_as_null():
    result = aggregate([{"id": "a", **item_metrics(EMPTY, EMPTY)}], losses=[0.1], weights=[1])
    text = json.dumps(json_safe({**result.summary(), "items": result.per_item}))

    def no_constants(name):
        raise AssertionError(f"invalid JSON constant {name}")

    parsed = json.loads(text, parse_constant=no_constants)  # strict JSON: no NaN token
    assert parsed["hd95"] is None and parsed["items"][0]["hd95"] is None and parsed["dice"] == 1.0


def test_hd95_can_be_skipped_without_changing_dice_or_iou():
    import math

    import torch

    from common.evaluate import item_metrics

    prob = torch.zeros(16, 16)
    prob[4:10, 4:10] = 0.9
    target = torch.zeros(16, 16)
    target[5:11, 5:11] = 1
    full, quick = item_metrics(prob, target), item_metrics(prob, target, hd95=False)
    assert (quick["dice"], quick["iou"]) == (full["dice"], full["iou"])
    assert full["hd95"] > 0 and math.isnan(quick["hd95"])
