"""Throughput of one local training step of fedvlsm's own model, per adapter variant.

Full CLIPSeg rd64-refined architecture (random weights, `arch:`), 352x352,
our forward (vision tail skipped, adapters inside the towers), DiceCE loss,
AdamW, grad clip: what a site's training loop does per batch. Prints a table
and writes JSON (to $OUT/bench_train_step.json when OUT is set, else to
bench/results/). Run it beside ../shared/bench/anchor_clipseg_gpu.py in the
same call and compare ratios, not absolute numbers from different runs.

    python bench/bench_train_step.py            # GPU: batch 32; CPU: batch 2
    B=96 VARIANTS=dense-vl,shallow-vlc python bench/bench_train_step.py
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from common.bases import load_base
from common.config import TrainConfig, autocast_dtype, resolve_device
from common.evaluate import make_loss
from common.model import build_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, n: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(n):
        step()
    _sync(device)
    return (time.perf_counter() - t) / n


def main() -> None:
    device = resolve_device(os.environ.get("DEVICE", "auto"))
    gpu = device.type == "cuda"
    batch = int(os.environ.get("B", "32" if gpu else "2"))
    n, warmup = (10, 3) if gpu else (2, 1)
    variants = os.environ.get("VARIANTS", "dense-vl,shallow-vlc,decoder,lora,full").split(",")
    torch.manual_seed(0)
    if not gpu:
        torch.set_num_threads(os.cpu_count() or 1)
    base = load_base("arch:clipseg-rd64-refined")
    cfg = TrainConfig()
    amp = autocast_dtype(cfg.amp, device)
    size = base.image_size
    px = torch.randn(batch, 3, size, size, device=device)
    tok = base.tokenizer(["a small bright round lesion located in the left of the image"] * batch,
                         padding="max_length", max_length=77, return_tensors="pt")
    ids, am = tok["input_ids"].to(device), tok["attention_mask"]  # mask stays on the CPU, as in training
    y = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()
    loss_fn = make_loss(cfg)
    results = {
        "device": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
        "torch": torch.__version__, "batch": batch, "image_size": size,
        "amp": str(amp).removeprefix("torch.") if amp else "fp32", "variants": {},
    }
    for variant in variants:
        model = build_model(base, variant).to(device)
        model.train()
        params = model.trainable_parameters()
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-3)

        def step():
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(px, ids, am)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            opt.step()

        if gpu:
            torch.cuda.reset_peak_memory_stats()
        dt = time_steps(step, n, warmup, device)
        row = {"trainable": sum(p.numel() for p in params), "s_per_step": dt, "img_per_s": batch / dt}
        if gpu:
            row["max_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        results["variants"][variant] = row
        print(f"{variant:<12} trainable {row['trainable']:>11,}  {row['img_per_s']:8.1f} img/s  "
              f"{dt * 1000:8.1f} ms/step", flush=True)
        model = opt = step = None  # free this variant before the next one is built
        if gpu:
            torch.cuda.empty_cache()

    # Inference (the frozen base, as evaluation and prediction run it).
    model = build_model(base, "none").to(device).eval()

    def infer():
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            model(px, ids, am)

    dt = time_steps(infer, n, warmup, device)
    results["inference"] = {"img_per_s": batch / dt}
    print(f"{'inference':<12} {'':>21}  {batch / dt:8.1f} img/s", flush=True)

    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_train_step.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
