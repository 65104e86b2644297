"""Peak memory of one sample-level DP-SGD step (CPU, fp32), in a fresh process.

    python bench/dp_memory.py --base arch:clipseg-rd64-refined --adapter dense-vl --batch 32 [--chunk 32] [--plain]

Peak resident set size (ru_maxrss) after loading the model, and after one
step (forward, backward with Opacus' per-sample hooks, clip, noise, AdamW
step) on a random batch; --plain runs the same step without DP for comparison.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="arch:clipseg-rd64-refined")
    ap.add_argument("--adapter", default="dense-vl")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=0, help="physical chunk (0: the whole batch)")
    ap.add_argument("--plain", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from common.bases import load_base
    from common.config import TrainConfig
    from common.data.dataset import collate_fn
    from common.evaluate import make_loss
    from common.model import build_model
    from common.privacy import DPSettings, dp_step, make_private_step, reached_parameters
    from common.train import batch_loss

    base = load_base(args.base)
    model = build_model(base, args.adapter)
    s = base.image_size
    g = torch.Generator().manual_seed(0)
    items = [{"pixel_values": torch.randn(3, s, s, generator=g), "mask": (torch.rand(1, s, s, generator=g) > 0.5).float(),
              "orig_mask": torch.zeros(s, s, dtype=torch.uint8), "prompt": "a round lesion", "id": str(i)}
             for i in range(args.batch)]
    chunk = args.chunk or args.batch
    batches = [collate_fn(base.tokenizer)(items[i:i + chunk]) for i in range(0, args.batch, chunk)]
    device = torch.device("cpu")
    loss_fn = make_loss(TrainConfig())
    params = reached_parameters(model, base.tokenizer, device)
    opt = torch.optim.AdamW(params, lr=1e-3)
    before = rss_mb()
    t = time.perf_counter()
    if args.plain:
        model.train()
        for b in batches:
            loss, _, _ = batch_loss(model, b, loss_fn, device)
            loss.backward()
        opt.step()
    else:
        gsm, dpo = make_private_step(model, opt, DPSettings(mode="sample"), 1.0, args.batch)
        gsm.train()
        dp_step(gsm, dpo, batches, loss_fn, device)
    out = {"base": args.base, "adapter": args.adapter, "batch": args.batch, "chunk": chunk, "dp": not args.plain,
           "image_size": s, "trainable": sum(p.numel() for p in params), "rss_mb_before_step": round(before),
           "peak_rss_mb": round(rss_mb()), "step_seconds": round(time.perf_counter() - t, 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
