"""Whole-task helpers on top of the building blocks: what the CLI and users' scripts call.

    from common import api
    result = api.train_site("data/site-0", base="demo", spec="dense-vl", out_dir="out")
    metrics = api.evaluate_adapter_dir("data/site-0", "out", split="test")
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.adapter_io import check_adapter_out, load_adapter, read_adapter_config, read_adapter_spec
from common.atomic import atomic_path, write_json_atomic, write_text_atomic
from common.adapters import AdapterSpec
from common.bases import Base, load_base
from common.config import TrainConfig, resolve_device
from common.data import SegDataset, ensure_valid, load_items
from common.data.formats import read_image
from common.evaluate import EvalResult, evaluate, predict
from common.model import AdaptedCLIPSeg, build_model
from common.train import FitResult, fit


def datasets(
    root: str | Path, base: Base, cfg: TrainConfig, cache_dir: str | Path | None = None
) -> tuple[SegDataset, SegDataset]:
    """Train and validation datasets of one site, after refusing bad data (every problem listed)."""
    ensure_valid(root, splits=("train", "val"))
    cache = Path(cache_dir) if cache_dir else None
    train = SegDataset(load_items(root, "train"), base.image_size, train=True, seed=cfg.seed, cache_dir=cache)
    val = SegDataset(load_items(root, "val"), base.image_size, train=False,
                     prompt_index=cfg.eval_prompt_index, cache_dir=cache)
    return train, val


def train_site(
    data: str | Path,
    base: str | Base = "demo",
    spec: str | AdapterSpec = "dense-vl",
    cfg: TrainConfig | None = None,
    out_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> FitResult:
    """Train adapters on one site's train split, early-stopped on its val split."""
    cfg = cfg or TrainConfig()
    if out_dir is not None:  # before any work: a folder saving would wipe is refused now, not after training
        check_adapter_out(out_dir)
    base = load_base(base) if isinstance(base, str) else base
    # The adapters' initial values come from cfg.seed too (fit seeds only what follows: shuffling,
    # prompt draws); the caller's RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(base, spec)
    train_ds, val_ds = datasets(data, base, cfg, cache_dir)
    result = fit(model, train_ds, val_ds, base.tokenizer, cfg, out_dir=out_dir)
    if out_dir is not None:
        if model.spec.variant == "none" or result.best_epoch is None:
            from common.adapter_io import save_adapter

            save_adapter(model, out_dir)
        write_json_atomic(Path(out_dir) / "training.json", {
            "data": str(Path(data).resolve()), "base": base.base_id, "adapter": model.spec.to_dict(),
            "config": cfg.to_dict(), "best_val_dice": result.best_val_dice, "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run, "seconds": result.seconds, "path": result.path,
            "history": result.history,
        })
    return result


def load_adapted(adapter_dir: str | Path, base: str | Base | None = None) -> tuple[AdaptedCLIPSeg, Base]:
    """The base recorded in (or given for) an adapter folder, with that adapter loaded."""
    cfg = read_adapter_config(adapter_dir)
    base = load_base(base or cfg["base"]) if not isinstance(base, Base) else base
    model = build_model(base, read_adapter_spec(adapter_dir))
    load_adapter(model, adapter_dir)
    return model, base


def evaluate_adapter_dir(
    data: str | Path, adapter_dir: str | Path, split: str = "test", cfg: TrainConfig | None = None,
    base: str | Base | None = None,
) -> EvalResult:
    cfg = cfg or TrainConfig()
    model, base = load_adapted(adapter_dir, base)
    ensure_valid(data, splits=(split,))
    ds = SegDataset(load_items(data, split), base.image_size, train=False, prompt_index=cfg.eval_prompt_index)
    return evaluate(model, ds, base.tokenizer, cfg)


def predict_to_files(
    adapter_dir: str | Path, image_path: str | Path, prompt: str, out_dir: str | Path,
    base: str | Base | None = None, device: str = "auto",
) -> tuple[Path, Path]:
    """Write `mask.png` (0/255) and `overlay.png` (mask in red over the image) to `out_dir`.

    Each file is written atomically; an earlier prediction's files in `out_dir` are replaced.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():  # before the model loads
        raise ValueError(f"{out}: exists and is not a folder; give a folder for mask.png and overlay.png")
    model, base = load_adapted(adapter_dir, base)
    image = read_image(image_path)
    prob = predict(model, base.tokenizer, image, prompt, resolve_device(device))
    mask = (prob > 0.5).astype(np.uint8) * 255
    out.mkdir(parents=True, exist_ok=True)
    overlay = image.astype(np.float32)
    sel = mask > 0
    overlay[sel] = 0.5 * overlay[sel] + 0.5 * np.array([255.0, 0.0, 0.0])
    mask_path, overlay_path = out / "mask.png", out / "overlay.png"
    for path, pixels in ((mask_path, mask), (overlay_path, overlay.astype(np.uint8))):
        with atomic_path(path) as tmp:
            Image.fromarray(pixels).save(tmp, format="PNG")
    write_text_atomic(out / "prediction.json", json.dumps({
        "image": str(Path(image_path).resolve()), "prompt": prompt, "adapter_dir": str(Path(adapter_dir).resolve()),
        "foreground_fraction": float(sel.mean()),
    }, indent=2))
    return mask_path, overlay_path
