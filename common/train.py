"""Local training at one site: one readable loop.

Order per epoch: train steps (forward, loss [+ FedProx term], backward, clip,
step), a check that the adapter is still finite (``TrainingDiverged`` if
not), then validation, LR schedule on validation loss, best checkpoint on
validation Dice, early stop. Only parameters with ``requires_grad`` reach the
optimizer, so the frozen base can never move.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from common.config import TrainConfig, autocast_dtype, plain_workers, resolve_device
from common.data.dataset import collate_fn
from common import fast
from common.evaluate import evaluate, make_loss
from common.model import AdaptedCLIPSeg


class TrainingDiverged(ValueError):
    """The adapter's weights became NaN/Inf during training (too high a learning rate, bad data)."""


@dataclass
class FitResult:
    num_examples: int
    epochs_run: int
    steps: int
    train_loss: float  # mean over the last epoch
    best_val_dice: float | None
    best_epoch: int | None
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    # How the steps ran: {"fast": False} (plain loop), or the fast path's FastEpochs.describe()
    # (compile mode; with CUDA graphs, graphs captured, replays, and why a capture failed).
    path: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    if _no_accelerator():
        # All torch.manual_seed does for a CPU-only process: it also asks every
        # accelerator kind to seed lazily, and each such request formats the
        # caller's stack (0.1 ms here, 0.6 ms deep in a federated round).
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def _no_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator is not None and not accelerator.is_available()


def proximal_term(model: AdaptedCLIPSeg, reference: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """FedProx: sum of squared distances of the trainable tensors to the global ones."""
    params = dict(model.named_parameters())
    total = torch.zeros((), device=next(model.parameters()).device)
    for name, ref in reference.items():
        total = total + (params[name] - ref).pow(2).sum()
    return total


def batch_loss(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    amp: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, logits, mask) of one collated batch: forward, logits to mask size, DiceCE.

    Shared by `fit` and `common.privacy.fit_private` (where `model` is Opacus'
    GradSampleModule around the AdaptedCLIPSeg), so both train the same loss.
    """
    mask = batch["mask"].to(device)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        logits = model(batch["pixel_values"].to(device), batch["input_ids"].to(device), batch["attention_mask"])
    logits = logits.float()
    if logits.shape[-2:] != mask.shape[-2:]:
        logits = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
    return loss_fn(logits, mask), logits, mask


def fit(
    model: AdaptedCLIPSeg,
    train_ds: Dataset,
    val_ds: Dataset | None,
    tokenizer: Any,
    cfg: TrainConfig,
    *,
    prox_reference: Mapping[str, torch.Tensor] | None = None,
    out_dir: str | Path | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train `model`'s adapters on `train_ds`; validate on `val_ds` each epoch if given.

    With `out_dir`, the best adapter (by validation Dice) is saved there
    atomically after each improvement. With `cfg.select_best` the model ends
    with its best weights; otherwise with the last ones (federated rounds).
    """
    from common.adapter_io import save_adapter  # local import: adapter_io imports model, not train

    start = time.perf_counter()
    if len(train_ds) == 0:
        raise ValueError("cannot train on an empty dataset")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model.to_device(device)
    params = model.trainable_parameters()
    if not params:  # variant "none": nothing to train; report where the frozen base stands
        val = evaluate(model, val_ds, tokenizer, cfg, device) if val_ds is not None else None
        return FitResult(len(train_ds), 0, 0, math.nan, val.dice if val else None, 0 if val else None,
                         time.perf_counter() - start)

    lr = cfg.lr_for(model.spec.variant, model.spec.family)
    use_fast = fast.fast_enabled(cfg, device) and fast.supports(train_ds)
    if cfg.compile != "off" and not use_fast:  # it would be ignored: say so instead
        why = (f"fast='{cfg.fast}' on {device.type}" if not fast.fast_enabled(cfg, device)
               else f"the training set ({type(train_ds).__name__}) is not a SegDataset")
        raise ValueError(f"TrainConfig.compile='{cfg.compile}' applies to the fast path (on by default on CUDA), "
                         f"which this run does not take ({why})")
    if use_fast:
        optimizer = fast.make_optimizer(params, lr, cfg.weight_decay, device)
    else:
        fast.restore_fp32(model)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience
    )
    amp = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    loss_fn = make_loss(cfg)
    reference = {k: v.to(device) for k, v in prox_reference.items()} if prox_reference and cfg.prox_mu > 0 else None
    generator = torch.Generator().manual_seed(cfg.seed)
    if use_fast:  # common/fast.py: the same epochs without the plain loop's host work
        runner = fast.FastEpochs(model, train_ds, tokenizer, cfg, device, optimizer, scaler, params, generator,
                                 reference)
    else:
        runner = None
        loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, generator=generator,
                            collate_fn=collate_fn(tokenizer, model.max_prompt_tokens),
                            num_workers=plain_workers(cfg))

    history: list[dict[str, Any]] = []
    best_dice, best_epoch, best_state, stale, steps = -1.0, None, None, 0, 0
    train_loss = math.nan
    try:
        for epoch in range(cfg.epochs):
            if hasattr(train_ds, "set_epoch"):
                train_ds.set_epoch(epoch)  # a new prompt draw per item per epoch
            model.train()
            losses = []
            desc = f"epoch {epoch + 1}/{cfg.epochs}"
            if runner is not None:
                train_loss, train_dice, n = runner.run_epoch(
                    lambda it: tqdm(it, desc=desc, disable=not cfg.progress, leave=False))
                steps += n
                if cfg.progress:
                    tqdm.write(f"{desc}: train dice {train_dice:.3f}")
            bar = [] if runner is not None else tqdm(loader, desc=desc, disable=not cfg.progress, leave=False)
            for batch in bar:
                loss, logits, mask = batch_loss(model, batch, loss_fn, device, amp)
                if reference is not None:
                    loss = loss + 0.5 * cfg.prox_mu * proximal_term(model, reference)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                steps += 1
                losses.append(loss.item())
                with torch.no_grad():
                    dice = _batch_dice(logits, mask)
                bar.set_postfix(loss=f"{loss.item():.4f}", dice=f"{dice:.3f}")
            if runner is None:
                train_loss = float(np.mean(losses))
            # A NaN/Inf step poisons every weight it updates, and such an adapter predicts no
            # foreground: its validation Dice (0, or 1 on empty masks) could even win "best".
            # Checked on the weights, not the loss: fp16's GradScaler skips inf steps harmlessly.
            if not _all_finite(params):
                raise _diverged(epoch + 1, train_loss, lr, out_dir if best_epoch is not None else None, best_epoch)
            record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_loss,
                                      "lr": float(optimizer.param_groups[0]["lr"])}

            if val_ds is not None:
                val = evaluate(model, val_ds, tokenizer, cfg, device, fast=use_fast)
                scheduler.step(val.loss)
                record.update(val_loss=val.loss, val_dice=val.dice, val_iou=val.iou)
                if val.dice > best_dice:
                    best_dice, best_epoch, stale = val.dice, epoch + 1, 0
                    best_state = copy.deepcopy(model.adapter_state())
                    if out_dir is not None:
                        save_adapter(model, out_dir, extra={"epoch": epoch + 1, "val_dice": val.dice})
                else:
                    stale += 1
            history.append(record)
            if cfg.progress:
                tqdm.write(_format_record(record))
            if on_epoch is not None:
                on_epoch(record)
            if val_ds is not None and stale >= cfg.early_stop_patience:
                break
    finally:
        if runner is not None:  # graphs, compiled step, loader workers: freed now, not at a later gc
            runner.close()

    if cfg.select_best and best_state is not None:
        model.load_adapter_state(best_state)
    elif out_dir is not None and val_ds is None:
        save_adapter(model, out_dir, extra={"epoch": len(history)})
    return FitResult(
        num_examples=len(train_ds),
        epochs_run=len(history),
        steps=steps,
        train_loss=train_loss,
        best_val_dice=best_dice if best_epoch is not None else None,
        best_epoch=best_epoch,
        seconds=time.perf_counter() - start,
        history=history,
        path=runner.describe() if runner is not None else {"fast": False},
    )


def _all_finite(params: list[torch.Tensor]) -> bool:
    """Whether every value of `params` is finite (one host sync)."""
    with torch.no_grad():
        return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


def _diverged(epoch: int, train_loss: float, lr: float, saved: str | Path | None,
              best_epoch: int | None) -> TrainingDiverged:
    where = f"; the best adapter so far (epoch {best_epoch}) is in {saved}" if saved is not None else ""
    return TrainingDiverged(
        f"training diverged in epoch {epoch}: the adapter weights became NaN/Inf (mean train loss "
        f"{train_loss:.4g}); lower the learning rate (lr {lr:g}){where}")


def _batch_dice(logits: torch.Tensor, mask: torch.Tensor) -> float:
    pred = (logits > 0).float()  # sigmoid(x) > 0.5  <=>  x > 0
    inter = (pred * mask).sum(dim=(1, 2, 3))
    denom = pred.sum(dim=(1, 2, 3)) + mask.sum(dim=(1, 2, 3))
    return float(((2 * inter + 1e-6) / (denom + 1e-6)).mean())


def _format_record(r: dict[str, Any]) -> str:
    parts = [f"epoch {r['epoch']}", f"train_loss {r['train_loss']:.4f}"]
    if "val_dice" in r:
        parts += [f"val_loss {r['val_loss']:.4f}", f"val_dice {r['val_dice']:.4f}"]
    return " | ".join(parts)
