"""Operators the host dispatches per fast training step, and the step's host time, on the CPU.

On an H200 the fast dense-vl step was host-bound (README, Benchmarks: about
116 ms of host time per step for 29 ms of GPU kernels), so what it costs
there is, to first order, the operators the host dispatches. Their number
does not depend on the card, the batch or the image size, so it is counted
here exactly: every ATen operator below autograd (forward and loss,
backward, gradient clipping and the update), with a TorchDispatchMode, on
the given base's architecture with tiny tensors (BASE, default the
full-size ``arch:clipseg-rd64-refined``; frozen weights in bf16 and the
step under the CPU's bf16 autocast, as the fast path runs on CUDA: the
CPU's autocast policy is close to CUDA's, not equal). "Compute" operators are those
that run a kernel; the rest only make views (view, t, transpose, ...).

Two steps: dense-vl's (pixels in), and shallow-vlc's on cached activations
(the frozen trunks' outputs in: what an epoch after the first runs).
Each count is taken with the fused q/k/v attention (common/fast_attention.py)
and the folded MLPs (common/fast_mlp.py), and with the stock modules'
forwards instead (``stock_modules``: what the fast path ran before them). The host time of a step is then
measured on ``arch:tiny`` in fp32 with one thread, where the kernels are
tiny and the host's work shows: the two modes alternate in blocks in one
process (this VM's speed drifts), and the table gives the median block.
The CPU's AdamW is the foreach one (a host ``.item()`` per parameter); on
CUDA the fast path uses fused AdamW, so the update's count here is not
the GPU's.

    python bench/host_step.py            # writes bench/results/cpu-<host>-host_step.json
    BASE=arch:tiny BLOCKS=2 OUT=/tmp/x python bench/host_step.py
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

BASE = os.environ.get("BASE", "arch:clipseg-rd64-refined")
BLOCKS = int(os.environ.get("BLOCKS", "10"))
STEPS = int(os.environ.get("STEPS", "20"))
OUT = Path(os.environ.get("OUT", ROOT / "bench" / "results"))
VIEWS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "slice", "select",
         "unbind", "split", "split_with_sizes", "alias", "detach", "as_strided", "_reshape_alias", "lift_fresh"}


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def stock_modules(on: bool):
    """Within: the fast path's attention and MLPs run the stock modules' forward (q, k, v as three
    matmuls; QuickGELU as three kernels), as before common/fast_attention.py and common/fast_mlp.py."""
    from common import fast_attention, fast_mlp

    saved = fast_attention.qkv, fast_mlp.folded
    if on:
        fast_attention.qkv = fast_mlp.folded = lambda module: None
    try:
        yield
    finally:
        fast_attention.qkv, fast_mlp.folded = saved


class _Len:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def runner(base, amp: str, batch: int, size: int, variant: str = "dense-vl"):
    """A FastEpochs for `variant` on `base` (CPU) and one fixed batch: pixels, or for shallow-* the
    frozen trunks' outputs (what an epoch on cached activations feeds its step)."""
    from common import fast
    from common.config import TrainConfig
    from common.model import build_model

    torch.manual_seed(0)
    model = build_model(base, variant)
    params = model.trainable_parameters()
    opt = fast.make_optimizer(params, 1e-4, 1e-4, torch.device("cpu"))
    cfg = TrainConfig(batch_size=batch, progress=False, fast="on", amp=amp, prompt_buckets=(16,),
                      activation_cache="off")
    r = fast.FastEpochs(model, _Len(batch), base.tokenizer, cfg, torch.device("cpu"), opt,
                        torch.amp.GradScaler("cpu", enabled=False), params, torch.Generator(), None)
    if amp == "bf16":  # as on CUDA: frozen weights cast once, the step under bf16 autocast (the CPU's)
        fast.prepare_model(model, torch.device("cpu"), torch.bfloat16)
        r.amp = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g)
    masks = (torch.rand(batch, size, size, generator=g) > 0.5).to(torch.uint8)
    ids = r.tokens(["a small round polyp"] * batch)
    if model.spec.family != "shallow":
        return r, (images, masks, ids)
    with torch.no_grad(), torch.autocast("cpu", dtype=r.amp, enabled=r.amp is not None):
        acts = model.vision_trunk(fast.normalize(images))
        cond, taps = model.text_trunk(ids, None)
    r.step = r._step_cached  # the cached epoch's step: side adapters, decoder, loss
    return r, ([a.to(fast_dtype(r)) for a in acts], cond.to(fast_dtype(r)), [t.to(fast_dtype(r)) for t in taps],
               masks)


def fast_dtype(r) -> torch.dtype:
    """The dtype the activation cache stores (the autocast dtype, else fp32)."""
    return r.amp or torch.float32


def count_step(r, inputs) -> dict:
    """Operators of one step by phase (after two warm-up steps, which fill the caches)."""
    for _ in range(2):
        r.train_step(*inputs)
    phases = {}
    with Count() as c:
        loss, _ = r.step(*inputs)
    phases["forward_loss"] = c.ops
    with Count() as c:
        r.optimizer.zero_grad(set_to_none=True)
        loss.backward()
    phases["backward"] = c.ops
    with Count() as c:
        torch.nn.utils.clip_grad_norm_(r.params, r.cfg.grad_clip)
        r.optimizer.step()
    phases["clip_update"] = c.ops
    out = {}
    for name, ops in phases.items():
        total = sum(ops.values())
        compute = sum(n for op, n in ops.items() if op not in VIEWS)
        out[name] = {"ops": total, "compute_ops": compute, "by_op": dict(ops.most_common())}
    out["forward_backward"] = {k: out["forward_loss"][k] + out["backward"][k] for k in ("ops", "compute_ops")}
    out["step"] = {k: sum(out[p][k] for p in phases) for k in ("ops", "compute_ops")}
    return out


def compare_counts(r, inputs) -> dict:
    """count_step of runner `r` with the stock modules' forwards ("stock") and the fast path's ("fused")."""
    counts = {}
    for mode in ("stock", "fused"):
        with stock_modules(mode == "stock"):
            counts[mode] = count_step(r, inputs)
    return counts


def host_times(r, inputs) -> dict:
    """Median seconds per step of each mode, blocks of STEPS steps alternating (fused first, then stock)."""
    blocks: dict[str, list[float]] = {"fused": [], "stock": []}
    for mode in ("fused", "stock"):  # warm both
        with stock_modules(mode == "stock"):
            for _ in range(3):
                r.train_step(*inputs)
    for _ in range(BLOCKS):
        for mode in ("fused", "stock"):
            with stock_modules(mode == "stock"):
                t = time.perf_counter()
                for _ in range(STEPS):
                    r.train_step(*inputs)
                blocks[mode].append((time.perf_counter() - t) / STEPS)
    return {m: {"median_s": statistics.median(v), "blocks_s": v} for m, v in blocks.items()}


def main() -> None:
    from common.bases import load_base

    torch.set_num_threads(1)
    res: dict = {"host": platform.node(), "torch": torch.__version__, "base": BASE}
    tiny = load_base("arch:tiny")
    for part, variant in (("dense-vl", "dense-vl"), ("shallow-vlc-cached", "shallow-vlc")):
        r, inputs = runner(load_base(BASE), "bf16", 2, 32, variant)  # its own base: the bf16 cast is in place
        res[part] = {"counts": compare_counts(r, inputs)}
        del r, inputs
        r, inputs = runner(tiny, "off", 2, 32, variant)
        res[part]["host_time_arch_tiny"] = host_times(r, inputs)
    res["blocks"], res["steps_per_block"] = BLOCKS, STEPS

    for part in ("dense-vl", "shallow-vlc-cached"):
        print(f"{BASE}, {part} fast step (bf16 autocast, CPU): dispatched operators (compute ones)")
        print(f"{'':18}{'stock modules':>18}{'fused/folded':>18}")
        for phase in ("forward_loss", "backward", "forward_backward", "clip_update", "step"):
            a, b = res[part]["counts"]["stock"][phase], res[part]["counts"]["fused"][phase]
            print(f"{phase:<18}{a['ops']:>10} ({a['compute_ops']:>4}){b['ops']:>11} ({b['compute_ops']:>4})")
        t = res[part]["host_time_arch_tiny"]
        s, f = t["stock"]["median_s"], t["fused"]["median_s"]
        print(f"  arch:tiny fp32 step, 1 thread, median of {BLOCKS} alternating blocks of {STEPS}: "
              f"stock {s * 1e3:.2f} ms, fused {f * 1e3:.2f} ms ({s / f:.2f}x)")
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"cpu-{platform.node() or 'host'}-host_step.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
