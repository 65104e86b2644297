"""Evaluation (Dice, IoU, HD95 at the original image resolution) and prediction.

Logits come out at the model's input resolution; each item's probability
map is resized back to its original size before thresholding at 0.5, so the
figures are comparable with the paper's and with other models.

Empty masks (the convention, per item; tests/test_metrics_empty.py):

    prediction   target      Dice  IoU   HD95
    empty        empty       1.0   1.0   NaN (undefined)
    empty        non-empty   0.0   0.0   NaN (undefined)
    non-empty    empty       0.0   0.0   NaN (undefined)
    non-empty    non-empty   MONAI's values

Dice and IoU are therefore always defined and every item counts in their
means (correctly predicting "nothing here" is a success, missing or
hallucinating a whole object a failure). HD95 is a distance between two
boundaries and is undefined when either is missing: such items are left
out of the HD95 mean and counted in ``EvalResult.hd95_undefined``; when no
item has one, the mean HD95 is NaN. JSON outputs (``fedvlsm eval --json``
/ ``--out``) write an undefined HD95 as ``null``.

A NaN/Inf logit is refused (``ValueError`` naming the items) by ``evaluate``
and ``predict``: thresholded, NaN reads as "no foreground" and would score
Dice 1.0 on every empty mask and write an empty predicted mask.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.metrics import compute_hausdorff_distance, compute_iou, compute_dice
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from common.atomic import json_safe  # noqa: F401 - re-exported: common.evaluate.json_safe was its home
from common.config import TrainConfig, autocast_dtype, plain_workers, resolve_device
from common.data.dataset import IMAGENET_MEAN, IMAGENET_STD, collate_fn
from common.model import AdaptedCLIPSeg


def make_loss(cfg: TrainConfig) -> DiceCELoss:
    # Dice + BCE on logits; sigmoid applied once, inside the loss.
    return DiceCELoss(sigmoid=True, lambda_dice=cfg.lambda_dice, lambda_ce=cfg.lambda_ce)


def item_metrics(prob: torch.Tensor, target: torch.Tensor, hd95: bool = True) -> dict[str, float]:
    """Dice, IoU, HD95 of one (H, W) probability map against an (H, W) binary mask.

    `hd95=False` skips the distance transform (the costliest metric by far)
    and records NaN: for callers that read Dice only, like a federation's
    per-round validation.

    Empty masks follow the module docstring's table; those cases are decided
    here, not left to MONAI's ``ignore_empty`` semantics (which may change).
    """
    pred = (prob > 0.5).float()[None, None]
    gt = (target > 0).float()[None, None]
    pred_empty, gt_empty = not bool(pred.any()), not bool(gt.any())
    if pred_empty or gt_empty:
        agree = 1.0 if pred_empty and gt_empty else 0.0
        return {"dice": agree, "iou": agree, "hd95": math.nan}
    dice = compute_dice(pred, gt, include_background=True, ignore_empty=False).item()
    iou = compute_iou(pred, gt, include_background=True, ignore_empty=False).item()
    if not hd95:
        return {"dice": dice, "iou": iou, "hd95": math.nan}
    with warnings.catch_warnings():  # MONAI deprecation noise from inside its own helper
        warnings.simplefilter("ignore", FutureWarning)
        distance = compute_hausdorff_distance(pred, gt, include_background=True, percentile=95).item()
    return {"dice": dice, "iou": iou, "hd95": distance}


def to_original(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, H', W') logits -> (H, W) probabilities at the original resolution."""
    up = F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)
    return torch.sigmoid(up)[0, 0]


@dataclass
class EvalResult:
    dice: float
    iou: float
    hd95: float
    loss: float
    n: int
    hd95_undefined: int
    per_item: list[dict[str, Any]]

    def summary(self) -> dict[str, float]:
        """The means (HD95 may be NaN: see the module docstring; ``json_safe`` makes that null)."""
        return {
            "dice": self.dice, "iou": self.iou, "hd95": self.hd95, "loss": self.loss,
            "n": self.n, "hd95_undefined": self.hd95_undefined,
        }


@torch.no_grad()
def evaluate(
    model: AdaptedCLIPSeg,
    dataset: Dataset,
    tokenizer: Any,
    cfg: TrainConfig | None = None,
    device: torch.device | None = None,
    hd95: bool = True,
    *,
    fast: bool | None = None,
) -> EvalResult:
    """Mean Dice / IoU / HD95 over `dataset` at original resolution, plus the mean loss.

    `hd95=False`: HD95 not computed (NaN, every item counted as undefined).
    `fast`: whether to run the fast path (bf16 frozen weights on CUDA, see
    common/fast.py); None: as `cfg.fast` says for the device. `fit` passes
    the route its training takes, since the fast path's preparation changes
    the shared model in place (a plain epoch after it would run the fast
    forward on weights cast to bf16).
    """
    cfg = cfg or TrainConfig()
    device = device or resolve_device(cfg.device)
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False,
                        collate_fn=collate_fn(tokenizer, model.max_prompt_tokens), num_workers=plain_workers(cfg))
    loss_fn = make_loss(cfg)
    amp = autocast_dtype(cfg.amp, device)
    was_training = model.training
    model.eval().to_device(device)
    from common import fast as fast_path  # imports config only; local to keep this module's import light

    tokens = None
    if fast is None:
        fast = fast_path.fast_enabled(cfg, device)
    if fast:  # bf16 frozen weights, cached positions, bucketed prompts
        fast_path.prepare_model(model, device, amp)
        tokens = fast_path.PromptTokens(tokenizer, cfg.prompt_buckets, model.max_prompt_tokens)
    else:
        fast_path.restore_fp32(model)
    per_item, losses, weights = [], [], []
    for batch in loader:
        if tokens is not None:
            logits = fast_path.eval_forward(model, batch, device, amp, tokens)
        else:
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(batch["pixel_values"].to(device), batch["input_ids"].to(device),
                               batch["attention_mask"])
        logits = logits.float()
        _refuse_non_finite(logits, batch["ids"])
        mask = batch["mask"].to(device)
        if logits.shape[-2:] != mask.shape[-2:]:
            logits = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
        losses.append(loss_fn(logits, mask).item())
        weights.append(len(batch["ids"]))
        for i, orig in enumerate(batch["orig_masks"]):
            prob = to_original(logits[i].cpu(), tuple(orig.shape))
            per_item.append({"id": batch["ids"][i], "prompt": batch["prompts"][i], **item_metrics(prob, orig, hd95)})
    model.train(was_training)
    return aggregate(per_item, losses, weights)


def _refuse_non_finite(logits: torch.Tensor, ids: list[str]) -> None:
    """Raise when any logit is NaN/Inf: thresholding would score such a map as an empty prediction
    (NaN > 0.5 is False), i.e. Dice 1.0 on every empty mask, instead of saying the model is broken."""
    finite = torch.isfinite(logits).flatten(1).all(dim=1)
    if bool(finite.all()):
        return
    bad = [ids[i] for i in torch.nonzero(~finite).flatten().tolist()]
    raise ValueError(f"the model produced NaN/Inf logits for {len(bad)} item(s) ({', '.join(map(str, bad[:5]))}"
                     f"{', ...' if len(bad) > 5 else ''}): no metric is computed from them (NaN/Inf adapter "
                     "weights, or an overflow under fp16 autocast)")


def aggregate(per_item: list[dict[str, Any]], losses: list[float], weights: list[int]) -> EvalResult:
    """Means over items: Dice and IoU over all; HD95 over items where it is defined (module docstring)."""
    hd = [r["hd95"] for r in per_item if not math.isnan(r["hd95"])]
    return EvalResult(
        dice=float(np.mean([r["dice"] for r in per_item])),
        iou=float(np.mean([r["iou"] for r in per_item])),
        hd95=float(np.mean(hd)) if hd else math.nan,
        loss=float(np.average(losses, weights=weights)),
        n=len(per_item),
        hd95_undefined=len(per_item) - len(hd),
        per_item=per_item,
    )


def preprocess_image(image: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 (H, W, 3) -> normalised float (1, 3, S, S), as the datasets do."""
    resized = np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BILINEAR))
    x = resized.astype(np.float32).transpose(2, 0, 1) / 255.0
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
    return torch.from_numpy((x - mean) / std)[None]


@torch.no_grad()
def predict(
    model: AdaptedCLIPSeg, tokenizer: Any, image: np.ndarray, prompt: str, device: torch.device | None = None
) -> np.ndarray:
    """Probability map (H, W) in [0, 1] for `prompt` on a uint8 (H, W, 3) image, at its own size."""
    if not prompt.strip():
        raise ValueError("predict needs a non-empty prompt")
    # Checked here: a float [0, 1], grayscale, RGBA or CHW array failed deep in PIL or numpy
    # ("Cannot handle this data type", "axes don't match array") saying nothing of what to pass.
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3 and image.shape[0] > 0 and image.shape[1] > 0):
        got = (f"{image.dtype} array of shape {tuple(image.shape)}" if isinstance(image, np.ndarray)
               else type(image).__name__)
        raise ValueError(f"predict needs a uint8 RGB image of shape (H, W, 3), as common.data.formats.read_image "
                         f"returns, got a {got}")
    from common import fast

    device = device or resolve_device("auto")
    model.eval().to_device(device)
    amp = autocast_dtype("auto", device)  # bf16 on a GPU (fp16 where bf16 is missing), fp32 on CPU
    if fast.fast_enabled(TrainConfig(), device):
        fast.prepare_model(model, device, amp)
    else:
        fast.restore_fp32(model)
    x = preprocess_image(image, model.image_size).to(device)
    input_ids, attention_mask = collate_fn(tokenizer, model.max_prompt_tokens).tokens([prompt])
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        logits = model(x, input_ids.to(device), attention_mask)
    logits = logits.float()
    _refuse_non_finite(logits, [f"prompt {prompt!r}"])
    return to_original(logits[0].cpu(), image.shape[:2]).numpy()
