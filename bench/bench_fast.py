"""Plain vs fast local training and inference, on one card, in one call (run by bench/gpu.sh).

Parts (PART=..., each a separate process so a slow compile cannot sink the others):

- ``eager``: dense-vl step plain (as bench_train_step.py: fp32 frozen
  weights under autocast, MONAI DiceCE, foreach AdamW, a host sync per step
  as the plain loop has) and fast (common/fast.py, no compile; also with the
  stock attention and MLPs instead of the fused q/k/v and folded ones), their losses
  at the same weights (bf16 tolerance), a whole fast epoch with data loading
  from a real site cache (workers, pinned memory), shallow-vlc plain step vs
  epochs on cached activations, inference plain vs fast.
- ``real``: ``common.api.train_site`` (the user's path: fit with validation) on the demo base,
  plain vs fast vs fast + CUDA graphs: validation Dice of each, same data and seed.
- ``profile``: the fast eager dense-vl step under torch.profiler (wall vs GPU kernel time per step).
- ``shallow-compiled``: shallow-vlc epochs on cached activations, the cached step under CUDA graphs.
- ``cuda-graph``: TrainConfig.compile='cuda-graph' (the whole eager step, backward and AdamW
  included, captured with torch.cuda.graph): dense step, dense epoch, shallow cached epochs, host syncs.
- ``compile-default`` / ``compile-reduce-overhead``: the fast dense-vl step
  under torch.compile (mode default / CUDA graphs); ``...-eager-decoder``:
  the same with the decoder left out of the graph (a fallback measurement).
- ``--table``: merges $OUT/fast-*.json with $OUT/anchor.json (the shared
  anchor, run in the same call), prints the table (ratios to the anchor's
  reference style), writes $OUT/gpu-<card>-fast.json.

TINY=1 runs every part on arch:tiny with small batches on CPU (a dry run of
the script's Python; the numbers mean nothing).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

TINY = os.environ.get("TINY") == "1"
OUT = Path(os.environ.get("OUT") or Path(__file__).parent / "results")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, n: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / n


class Synthetic:
    """An in-memory SegDataset stand-in: fixed uint8 images/masks, prompts, keys (for pure step timing)."""

    def __init__(self, n: int, size: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g).numpy()
        self.masks = (torch.rand(n, size, size, generator=g) > 0.5).to(torch.uint8).numpy()
        self.cache_dir = None
        # A batch pads to its longest prompt's bucket: the last one takes it to the 32-token bucket, as
        # the epoch site's prompts (common.data.synth, p0..p9) do, so step and epoch do the same text work.
        self.prompts = ["a small bright round lesion located in the left of the image", "a polyp",
                        "one medium dark oval lesion which is a dark spot with a soft boundary",
                        "one medium dark oval lesion which is a dark spot with a soft boundary in the upper left "
                        "part of the image"]

    def __len__(self) -> int:
        return len(self.images)

    def arrays(self, i: int):
        return self.images[i], self.masks[i], self.masks[i]

    def prompt_for(self, i: int) -> str:
        return self.prompts[i % len(self.prompts)]

    def cache_key(self, i: int) -> str:
        return f"synthetic-{i}"

    def set_epoch(self, epoch: int) -> None:
        """The training loop calls this each epoch; synthetic items have no prompt draws to reseed."""


def setup():
    from common.bases import load_base
    from common.config import resolve_device

    device = resolve_device("cpu" if TINY else "cuda")  # "auto" would fall back to the CPU and time that
    base = load_base("arch:tiny" if TINY else "arch:clipseg-rd64-refined")
    batch = int(os.environ.get("B", "4" if TINY else "32"))
    n, warmup = (2, 1) if TINY else (10, 3)
    return device, base, batch, n, warmup


def runner_for(base, variant, ds, cfg, device):
    from common import fast
    from common.config import autocast_dtype
    from common.model import build_model

    torch.manual_seed(0)
    model = build_model(base, variant)
    model.to(device)
    params = model.trainable_parameters()
    opt = fast.make_optimizer(params, 1e-4, cfg.weight_decay, device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(cfg.amp, device) == torch.float16)
    r = fast.FastEpochs(model, ds, base.tokenizer, cfg, device, opt, scaler, params,
                        torch.Generator().manual_seed(0), None)
    return model, r


def synthetic_step(base, device, batch, cfg):
    """The fast dense-vl step (forward, loss, backward, update) on one fixed device-resident batch."""
    ds = Synthetic(batch, base.image_size)
    _, r = runner_for(base, "dense-vl", ds, cfg, device)
    images = torch.from_numpy(ds.images).to(device)
    masks = torch.from_numpy(ds.masks).to(device)
    ids = r.tokens([ds.prompt_for(i) for i in range(batch)]).to(device)

    def step() -> torch.Tensor:
        loss, _ = r.train_step(images, masks, ids)
        return loss

    step.runner = r
    step.prompt_tokens = int(ids.shape[1])
    return step


def fast_step_bench(base, device, batch, n, warmup, compile_mode: str, eager_decoder: bool = False) -> dict:
    """Pure fast dense-vl step on device-resident tensors (what the epoch loop calls per batch).

    `eager_decoder`: the decoder stays out of the compiled graph (a graph break
    around it), a fallback to measure if compiling the whole step fails on a card.
    """
    from common.config import TrainConfig

    if eager_decoder:
        base.model.decoder.forward = torch.compiler.disable(base.model.decoder.forward)
    one_step = synthetic_step(base, device, batch, TrainConfig(fast="on", compile=compile_mode,
                                                               activation_cache="off"))
    total = torch.zeros((), device=device)

    def step():
        nonlocal total
        total = total + one_step().detach()  # read before the next step (CUDA-graph outputs are reused)

    t0 = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - t0  # includes compilation when compiled
    dt = timed(step, n, warmup, device)
    row = {"img_per_s": batch / dt, "s_per_step": dt, "first_step_s": first, "compile": compile_mode,
           "prompt_tokens": one_step.prompt_tokens}
    return {**row, **graph_stats(one_step.runner)}


def graph_stats(r) -> dict:
    """compile='cuda-graph': graphs captured, replays, and why a capture failed (that shape ran eagerly)."""
    g = r.graphed
    if g is None:
        return {}
    return {"graphs": len(g.graphs), "replays": g.replays, "capture_failures": list(g.failures.values())}


def epoch_site(tmp: str, base, cache_dir: Path | None):
    """A synthetic site's training set as SegDataset (EPOCH_IMAGES images before the split)."""
    from common.data import SegDataset, load_items, synthesize

    per_site = int(os.environ.get("EPOCH_IMAGES", "12" if TINY else "460"))
    site = synthesize(Path(tmp) / "d", sites=1, per_site=per_site, seed=0, image_size=64 if TINY else 160)[0]
    return SegDataset(load_items(site, "train"), base.image_size, train=True, seed=0, cache_dir=cache_dir)


def record_syncs(res: dict, key: str, r, sds, epoch: int, device: torch.device) -> None:
    """On CUDA, res[key] = the host syncs of runner `r`'s epoch `epoch` (the final read of the sums
    should be the only one)."""
    if device.type != "cuda":
        return
    sds.set_epoch(epoch)
    res[key] = epoch_syncs(r)
    print(f"host syncs in one epoch ({key}): {res[key]}", flush=True)


def epoch_syncs(r) -> dict:
    """Host syncs in one epoch of runner `r`, from CUDA's sync debug mode: count and call sites."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            r.run_epoch(lambda it: it)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    return {"count": len(sites), "sites": sorted(set(sites))}


def cached_epochs(r, sds, device, epochs: int) -> tuple[float, list[float], int]:
    """(first epoch's seconds: the trunks run once per item, and any compile; the next `epochs`
    epochs' seconds; steps per epoch) of a shallow runner on cached activations."""
    t = time.perf_counter()
    r.run_epoch(lambda it: it)
    _sync(device)
    first = time.perf_counter() - t
    times = []
    for e in range(1, epochs + 1):
        sds.set_epoch(e)
        t = time.perf_counter()
        _, _, steps = r.run_epoch(lambda it: it)
        _sync(device)
        times.append(time.perf_counter() - t)
    return first, times, steps


class Rows(dict):
    """A part's results, rewritten to $OUT/fast-<part>.json at every row: a part cut by its
    timeout still hands back the rows it measured (the device run is one shot)."""

    def __init__(self, part: str, meta: dict) -> None:
        super().__init__()
        self.path, self.meta = OUT / f"fast-{part}.json", meta

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        OUT.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self, **self.meta}, indent=1))
        tmp.replace(self.path)


def dense_epochs(res: dict, key: str, base, sds, cfg, device: torch.device) -> None:
    """res[key + "_loader"]: epoch 2 of a fast dense-vl fit whose pixels are not kept on the device
    (each epoch through the loader: workers, pinned memory, non-blocking copies; the site's npz cache
    built in epoch 1); res[key + "_resident"]: epoch 2 of one that keeps them (the default when they
    fit the budget: no loading after epoch 1). Epoch 1 (cache build, warm-up, any capture) is not timed."""
    from common import resident_pixels

    for mode in ("loader", "resident"):
        resident_pixels.clear()
        saved = os.environ.get("FEDVLSM_RESIDENT_PIXELS_GB")
        if mode == "loader":
            os.environ["FEDVLSM_RESIDENT_PIXELS_GB"] = "0"
        try:
            model, r = runner_for(base, "dense-vl", sds, cfg, device)
        finally:
            if saved is None:
                os.environ.pop("FEDVLSM_RESIDENT_PIXELS_GB", None)
            else:
                os.environ["FEDVLSM_RESIDENT_PIXELS_GB"] = saved
        assert (r.pixels is not None) == (mode == "resident"), f"{mode}: the store is {'on' if r.pixels else 'off'}"
        sds.set_epoch(0)
        t = time.perf_counter()
        r.run_epoch(lambda it: it)
        _sync(device)
        first = time.perf_counter() - t
        sds.set_epoch(1)
        t = time.perf_counter()
        _, _, steps = r.run_epoch(lambda it: it)
        _sync(device)
        dt = time.perf_counter() - t
        items = steps * cfg.batch_size if r.drop_last else len(sds)
        row = res[f"{key}_{mode}"] = {"img_per_s": items / dt, "items": items, "steps": steps, "workers": r.workers,
                                      "first_epoch_s": first, **graph_stats(r)}
        print(f"{key}_{mode}: {row['img_per_s']:9.1f} img/s ({items} items, {r.workers} workers; "
              f"first epoch {first:.1f} s)", flush=True)
        record_syncs(res, f"{key}_{mode}_syncs", r, sds, 2, device)
        r.close()
        del model, r
        _free(device)


def reference_inference(base, device: torch.device, batch: int, n: int, warmup: int) -> dict:
    """Inference in the reference implementation's style, the anchor's `ref_fp16_eager_all12` without
    the backward: stock CLIPSeg with eager attention, fp16 autocast, all 12 vision layers, prompts
    padded to 77 tokens, dense adapters (r=64, layers 0-8 of both towers) as forward hooks like the
    anchor's. Random weights of the base's architecture (only the time matters)."""
    from torch import nn
    from transformers import CLIPSegForImageSegmentation

    model = CLIPSegForImageSegmentation._from_config(base.model.config, attn_implementation="eager")
    model = model.to(device).eval().requires_grad_(False)

    def adapter(d: int) -> nn.Module:
        return nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, d), nn.ReLU()).to(device)

    for enc in (model.clip.vision_model.encoder, model.clip.text_model.encoder):
        d = enc.layers[0].self_attn.embed_dim
        for layer in list(enc.layers)[:9]:
            a1, a2 = adapter(d), adapter(d)
            layer.self_attn.register_forward_hook(lambda mod, i, o, a=a1: (o[0] + a(o[0]),) + tuple(o[1:]))
            layer.mlp.register_forward_hook(lambda mod, i, o, a=a2: o + a(o))
    px = torch.randn(batch, 3, base.image_size, base.image_size, device=device)
    tok = base.tokenizer(["a polyp"] * batch, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt")
    ids, am = tok["input_ids"].to(device), tok["attention_mask"].to(device)
    amp = torch.float16 if device.type == "cuda" else None

    def infer():
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            model(input_ids=ids, pixel_values=px, attention_mask=am)

    dt = timed(infer, n, warmup, device)
    del model
    return {"img_per_s": batch / dt, "style": "fp16 autocast, eager attention, all 12 vision layers, 77 tokens"}


def part_eager(base, device, batch, n, warmup, res: dict) -> None:
    from common import activation_cache, fast
    from common.config import TrainConfig, autocast_dtype
    from common.evaluate import make_loss
    from common.model import build_model

    from common.bases import load_base

    amp = autocast_dtype("auto", device)
    # The plain rows run on their own fp32 copy of the base: the fast path
    # casts `base`'s frozen weights to bf16 in place (as sites sharing it do).
    plain_base = load_base(base.base_id)
    cfg = TrainConfig()
    ds = Synthetic(batch, base.image_size)
    px = fast.normalize(torch.from_numpy(ds.images).to(device))
    y = torch.from_numpy(ds.masks).to(device).unsqueeze(1).float()
    prompts = [ds.prompt_for(i) for i in range(batch)]
    tok = base.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    loss_fn = make_loss(cfg)

    # --- plain dense-vl step: the plain loop's work, incl. its per-step host syncs
    torch.manual_seed(0)
    model = build_model(plain_base, "dense-vl").to(device).train()
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-3)
    state0 = {k: v.clone() for k, v in model.adapter_state().items()}

    def plain_loss():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(px, tok["input_ids"].to(device), tok["attention_mask"])
        return loss_fn(logits.float(), y), logits

    def plain_step():
        loss, logits = plain_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        loss.item()
        float((((logits > 0).float() * y).sum() + 1) / 1)  # the batch Dice's sync

    with torch.no_grad():
        ref_loss = float(plain_loss()[0])
    dt = timed(plain_step, n, warmup, device)
    res["dense-vl_plain"] = {"img_per_s": batch / dt, "s_per_step": dt}
    print(f"dense-vl plain        {batch / dt:9.1f} img/s", flush=True)
    del model, opt
    _free(device)

    # --- fast dense-vl step (no compile) + loss at the same initial weights
    fcfg = TrainConfig(fast="on", activation_cache="off")
    model, r = runner_for(base, "dense-vl", ds, fcfg, device)
    model.load_adapter_state(state0)
    images, masks = torch.from_numpy(ds.images).to(device), torch.from_numpy(ds.masks).to(device)
    ids = r.tokens(prompts).to(device)
    with torch.no_grad():
        fast_loss = float(r.step(images, masks, ids)[0])
    res["loss_check"] = {"plain": ref_loss, "fast": fast_loss, "rel_diff": abs(fast_loss - ref_loss) / abs(ref_loss)}
    print(f"loss plain {ref_loss:.5f} fast {fast_loss:.5f} (rel {res['loss_check']['rel_diff']:.2e})", flush=True)
    del model, r
    _free(device)
    res["dense-vl_fast"] = fast_step_bench(base, device, batch, n, warmup, "off")
    print(f"dense-vl fast         {res['dense-vl_fast']['img_per_s']:9.1f} img/s", flush=True)
    _free(device)
    # The same step with the stock attention and MLPs (q, k, v as three matmuls, QuickGELU as three
    # kernels: the fast path before common/fast_attention.py and common/fast_mlp.py), in the same
    # call: what those give on this card.
    from host_step import stock_modules

    with stock_modules(True):
        res["dense-vl_fast_stock-modules"] = fast_step_bench(base, device, batch, n, warmup, "off")
    print(f"dense-vl fast, stock modules {res['dense-vl_fast_stock-modules']['img_per_s']:9.1f} img/s", flush=True)
    _free(device)

    # --- whole fast epochs from a real site cache: through the loader (workers, pinned memory; the
    # site's npz cache warm) and with the site's pixels resident on the device (common/resident_pixels.py)
    with tempfile.TemporaryDirectory() as tmp:
        sds = epoch_site(tmp, base, Path(tmp) / "c")
        dense_epochs(res, "dense-vl_fast_epoch", base, sds, TrainConfig(fast="on", batch_size=batch,
                                                                         activation_cache="off"), device)

        # --- shallow-vlc: plain step vs epochs on cached activations
        torch.manual_seed(0)
        model = build_model(plain_base, "shallow-vlc").to(device).train()
        params = model.trainable_parameters()
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-3)
        dt = timed(plain_step, n, warmup, device)
        res["shallow-vlc_plain"] = {"img_per_s": batch / dt}
        print(f"shallow-vlc plain     {batch / dt:9.1f} img/s", flush=True)
        del model, opt
        _free(device)
        activation_cache.clear_memory()
        sds.cache_dir = None  # memory only: the timing is the cached epoch itself
        model, r = runner_for(base, "shallow-vlc", sds, TrainConfig(fast="on", batch_size=batch), device)
        first, times, _ = cached_epochs(r, sds, device, 2)
        dt = min(times)
        res["shallow-vlc_cached_epoch"] = {"img_per_s": len(sds) / dt, "first_epoch_img_per_s": len(sds) / first,
                                           "items": len(sds), "stats": r.cache.stats}
        print(f"shallow-vlc cached    {len(sds) / dt:9.1f} img/s (epoch 1: {len(sds) / first:.1f})", flush=True)
        record_syncs(res, "shallow-vlc_cached_epoch_syncs", r, sds, 9, device)
        del model, r
        activation_cache.clear_memory()
        _free(device)

    # --- inference: plain (fp32 weights under autocast) vs fast (bf16 weights, cached positions)
    model = build_model(plain_base, "none").to(device).eval()

    def infer():
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            model(px, tok["input_ids"].to(device), tok["attention_mask"])

    dt = timed(infer, n, warmup, device)
    res["inference_plain"] = {"img_per_s": batch / dt}
    fast.prepare_model(model, device, amp)
    ids = fast.PromptTokens(base.tokenizer, (16, 32, 77))(prompts).to(device)

    def infer_fast():
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            model(px, ids, None)

    dt = timed(infer_fast, n, warmup, device)
    res["inference_fast"] = {"img_per_s": batch / dt}
    print(f"inference plain {res['inference_plain']['img_per_s']:.1f} fast {batch / dt:.1f} img/s", flush=True)
    del model
    _free(device)
    res["inference_reference-style"] = reference_inference(base, device, batch, n, warmup)
    print(f"inference, reference style {res['inference_reference-style']['img_per_s']:.1f} img/s", flush=True)


def part_profile(base, device, batch, res: dict) -> None:
    """Where the fast dense-vl step's time goes (eager, no compile): wall per step against the GPU's
    kernel time per step (host-bound when the second is much smaller), launches per step, top kernels."""
    from torch.profiler import ProfilerActivity, profile

    from common.config import TrainConfig

    step = synthetic_step(base, device, batch, TrainConfig(fast="on", activation_cache="off"))
    steps = 2 if TINY else 5
    for _ in range(3):
        step()
    _sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        wall = (time.perf_counter() - t) / steps
    events = prof.key_averages()
    dev_attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    kernels = [e for e in events if getattr(e, dev_attr, 0) > 0 and e.device_type == torch.autograd.DeviceType.CUDA] \
        if device.type == "cuda" else []
    gpu_us = sum(getattr(e, dev_attr) for e in kernels) / steps
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                            "cuLaunchKernelEx")) / steps
    ops = sum(e.count for e in events if e.key.startswith("aten::")) / steps
    top = sorted(kernels, key=lambda e: -getattr(e, dev_attr))[:12]
    res["profile_fast_dense-vl"] = {
        "wall_ms_per_step_profiled": wall * 1e3, "gpu_kernel_ms_per_step": gpu_us / 1e3,
        "kernel_launches_per_step": launches, "aten_ops_per_step": ops,
        "top_kernels_ms_per_step": {e.key[:90]: getattr(e, dev_attr) / 1e3 / steps for e in top},
    }
    print(f"fast dense-vl step: wall {wall * 1e3:.1f} ms (profiled), GPU kernels {gpu_us / 1e3:.1f} ms, "
          f"{launches:.0f} launches, {ops:.0f} aten ops per step", flush=True)
    for e in top:
        print(f"  {getattr(e, dev_attr) / 1e3 / steps:7.2f} ms  {e.key[:100]}", flush=True)


def part_shallow_compiled(base, device, batch, res: dict) -> None:
    """shallow-vlc epochs on cached activations with the cached step compiled (CUDA graphs)."""
    from common import activation_cache
    from common.config import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        sds = epoch_site(tmp, base, None)
        activation_cache.clear_memory()
        mode = "default" if TINY else "reduce-overhead"
        model, r = runner_for(base, "shallow-vlc", sds, TrainConfig(fast="on", batch_size=batch, compile=mode), device)
        first, times, steps = cached_epochs(r, sds, device, 3)
        dt = min(times)
        items = steps * batch if r.drop_last else len(sds)
        res[f"shallow-vlc_cached_epoch_compile-{mode}"] = {
            "img_per_s": items / dt, "first_epoch_s": first, "items": items, "epoch_s": times}
        print(f"shallow-vlc cached, compiled ({mode}) {items / dt:9.1f} img/s (first epoch {first:.1f} s)", flush=True)


def part_cuda_graph(base, device, batch, n, warmup, res: dict) -> None:
    """TrainConfig.compile='cuda-graph' (common/graphed_step.py: the whole eager step captured with
    torch.cuda.graph): the dense-vl step, a whole dense epoch (resident pixels; epoch 2, after the
    capture), shallow-vlc epochs on cached activations, and the host syncs of one epoch of each.
    TINY (CPU): the same code with compile off (CUDA graphs need a GPU)."""
    from common import activation_cache, resident_pixels
    from common.config import TrainConfig

    mode = "off" if TINY else "cuda-graph"
    row = res[f"dense-vl_fast_{mode}"] = fast_step_bench(base, device, batch, n, warmup, mode)
    print(f"dense-vl fast {mode}: {row['img_per_s']:.1f} img/s (first step {row['first_step_s']:.1f} s) "
          f"{row.get('capture_failures') or ''}", flush=True)
    _free(device)
    with tempfile.TemporaryDirectory() as tmp:
        sds = epoch_site(tmp, base, Path(tmp) / "c")
        dense_epochs(res, f"dense-vl_fast_epoch_{mode}", base, sds,
                     TrainConfig(fast="on", batch_size=batch, compile=mode), device)
        resident_pixels.clear()
        activation_cache.clear_memory()
        model, r = runner_for(base, "shallow-vlc", sds, TrainConfig(fast="on", batch_size=batch, compile=mode), device)
        first, times, steps = cached_epochs(r, sds, device, 2)  # epoch 1: the trunks, warm-up, capture
        items = steps * batch if r.drop_last else len(sds)
        key = f"shallow-vlc_cached_epoch_{mode}"
        res[key] = {"img_per_s": items / min(times), "items": items, "first_epoch_s": first, "epoch_s": times,
                    **graph_stats(r)}
        print(f"{key}: {items / min(times):.1f} img/s (first epoch {first:.1f} s)", flush=True)
        record_syncs(res, f"{key}_syncs", r, sds, 7, device)
        r.close()
        del model, r
        _free(device)


def part_real(device: torch.device, res: dict) -> None:
    """The user's path on the card: common.api.train_site (fit: validation, schedule, early stop) on the
    demo base and a synthetic site, plain vs fast (vs fast + whole-step CUDA graphs, vs fast +
    torch.compile with CUDA graphs), same data and seed. The
    demo base is small, so the times say little; the validation Dice says whether the fast path
    trains as well as the plain one on this card."""
    from common.api import train_site
    from common.config import TrainConfig
    from common.data import synthesize

    variants = [("dense-vl", "off", "off"), ("dense-vl", "on", "off"), ("shallow-vlc", "off", "off"),
                ("shallow-vlc", "on", "off")]
    if device.type == "cuda":
        variants += [("dense-vl", "on", "cuda-graph"), ("shallow-vlc", "on", "cuda-graph"),
                     ("dense-vl", "on", "reduce-overhead")]
    with tempfile.TemporaryDirectory() as tmp:
        site = synthesize(Path(tmp) / "d", sites=1, per_site=40 if TINY else 200, seed=3)[0]
        for spec, fast_mode, compile_mode in variants:
            cfg = TrainConfig(epochs=2 if TINY else 10, batch_size=8 if TINY else 16, device=device.type,
                              fast=fast_mode, compile=compile_mode, progress=False, seed=0)
            r = train_site(site, "demo", spec, cfg, cache_dir=Path(tmp) / "cache")
            key = f"real_{spec}_fast-{fast_mode}_compile-{compile_mode}"
            res[key] = {"best_val_dice": r.best_val_dice, "best_epoch": r.best_epoch, "seconds": r.seconds,
                        "path": r.path}
            print(f"{key:<45} best val Dice {r.best_val_dice:.4f} (epoch {r.best_epoch}) {r.seconds:6.1f} s "
                  f"{r.path}", flush=True)
            _free(device)


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def card(device: torch.device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or "cpu")


def run_part(part: str) -> None:
    device, base, batch, n, warmup = setup()
    torch.manual_seed(0)
    res = Rows(part, dict(device=card(device), torch=torch.__version__, batch=batch,
                          image_size=base.image_size, base=base.base_id))
    if part == "eager":
        part_eager(base, device, batch, n, warmup, res)
    elif part == "real":
        part_real(device, res)
    elif part == "profile":
        part_profile(base, device, batch, res)
    elif part == "shallow-compiled":
        part_shallow_compiled(base, device, batch, res)
    elif part == "cuda-graph":
        part_cuda_graph(base, device, batch, n, warmup, res)
    elif part.startswith("compile-"):
        mode = part.removeprefix("compile-")
        eager_decoder = mode.endswith("-eager-decoder")
        mode = mode.removesuffix("-eager-decoder")
        row = res[f"dense-vl_fast_{part}"] = fast_step_bench(base, device, batch, n, warmup, mode, eager_decoder)
        print(f"dense-vl fast {part}: {row['img_per_s']:.1f} img/s (first step {row['first_step_s']:.1f} s)",
              flush=True)
    else:
        raise SystemExit(f"unknown PART {part!r}")


def read_anchor(folder: Path) -> dict:
    """The anchor's results: its anchor.json, or, if it was cut before writing it, what its log
    printed (a line per style: `name {dict}`; the JSON-only rows, such as inference, are then missing)."""
    import ast

    if (folder / "anchor.json").is_file():
        return json.loads((folder / "anchor.json").read_text())
    out: dict = {}
    log = folder / "anchor.log"
    for line in log.read_text().splitlines() if log.is_file() else []:
        name, _, rest = line.partition(" ")
        if rest.startswith("{"):
            try:
                value = ast.literal_eval(rest)
            except (ValueError, SyntaxError):
                continue
            out["shallow_cached_step" if name == "shallow_cached" else name] = value
    if out:
        out["from_log"] = True
    return out


def table() -> None:
    rows: dict = {}
    meta: dict = {}
    for path in sorted(OUT.glob("fast-*.json")):
        d = json.loads(path.read_text())
        for k in ("device", "torch", "batch", "image_size", "base"):
            meta[k] = d.pop(k, meta.get(k))
        rows.update(d)
    anchor = read_anchor(OUT)
    ref = anchor.get("ref_fp16_eager_all12", {}).get("img_per_s")
    name = (meta.get("device") or "unknown").replace(" ", "-")
    out = {"card": meta.get("device"), **meta, "anchor": anchor, "ours": rows}
    targets = {  # (row, anchor row, required ratio)
        "dense-vl_fast": 3.0, "dense-vl_fast_compile-default": 3.0, "dense-vl_fast_compile-reduce-overhead": 3.0,
        "dense-vl_fast_compile-reduce-overhead-eager-decoder": 3.0,
        "shallow-vlc_cached_epoch": 10.0, "shallow-vlc_cached_epoch_compile-reduce-overhead": 10.0,
        "dense-vl_fast_cuda-graph": 3.0, "shallow-vlc_cached_epoch_cuda-graph": 10.0,
    }
    # Inference rows are divided by inference in the reference style (a forward, measured in the eager
    # part), not by the anchor's training step: a forward costs about a third of a step, so that
    # ratio passed 2x whatever the forward did (bench/results/h200-gpu_sh-run1-table.txt printed 3.12x
    # for 0.80x the anchor's own bf16 inference).
    ref_inf = rows.get("inference_reference-style", {}).get("img_per_s")
    print(f"\n{meta.get('device')} | torch {meta.get('torch')} | batch {meta.get('batch')} at "
          f"{meta.get('image_size')} px | base {meta.get('base')}")
    print(f"anchor ref_fp16_eager_all12: {ref if ref else float('nan'):.1f} img/s "
          f"(bf16_sdpa_skip_tail {anchor.get('bf16_sdpa_skip_tail', {}).get('img_per_s', float('nan')):.1f}, "
          f"inference {anchor.get('inference_bf16', {}).get('img_per_s', float('nan')):.1f}, "
          f"shallow_cached {anchor.get('shallow_cached_step', {}).get('img_per_s', float('nan')):.1f})")
    print(f"{'ours':<52} {'img/s':>9} {'x ref':>7} {'target':>7}")
    for key, row in rows.items():
        if not isinstance(row, dict) or "img_per_s" not in row or key.startswith("inference_"):
            continue
        ratio = row["img_per_s"] / ref if ref else math.nan
        row["x_ref"] = ratio
        tgt = targets.get(key)
        print(f"{key:<52} {row['img_per_s']:>9.1f} {ratio:>7.2f} {('>= %.0fx' % tgt) if tgt else '':>7}")
    anchor_inf = anchor.get("inference_bf16", {}).get("img_per_s")
    for key in ("inference_plain", "inference_fast", "inference_reference-style"):
        row = rows.get(key)
        if row:
            row["x_ref_inference"] = row["img_per_s"] / ref_inf if ref_inf else math.nan
            print(f"{key:<52} {row['img_per_s']:>9.1f} {row['x_ref_inference']:>7.2f} "
                  f"{'>= 2x' if key == 'inference_fast' else '':>7}  (x reference-style inference; "
                  f"x the anchor's bf16 inference: {row['img_per_s'] / anchor_inf if anchor_inf else math.nan:.2f})")
    for suffix in ("", "_cuda-graph"):
        step = rows.get(f"dense-vl_fast{suffix}")
        for mode in ("loader", "resident"):
            epoch = rows.get(f"dense-vl_fast_epoch{suffix}_{mode}")
            if epoch and step:
                share = epoch["img_per_s"] / step["img_per_s"]
                out[f"epoch_vs_step{suffix}_{mode}"] = share
                print(f"fast epoch{suffix}, {mode} / fast step{suffix}: {share:.2f} (target >= 0.85)")
    for key, row in rows.items():
        if isinstance(row, dict) and row.get("capture_failures"):
            print(f"{key}: CUDA graph capture FAILED (ran eagerly): {'; '.join(row['capture_failures'])}")
    for key in [k for k in rows if k.endswith("_syncs")]:
        print(f"{key}: {rows[key]['count']} host syncs in one epoch at {', '.join(rows[key]['sites'])}")
    for key, row in rows.items():
        if key.startswith("real_"):
            print(f"{key:<45} best val Dice {row['best_val_dice']:.4f} (epoch {row['best_epoch']}), {row['seconds']:.1f} s")
    prof = rows.get("profile_fast_dense-vl")
    if prof:
        print(f"fast dense-vl step profiled: wall {prof['wall_ms_per_step_profiled']:.1f} ms, GPU kernels "
              f"{prof['gpu_kernel_ms_per_step']:.1f} ms, {prof['kernel_launches_per_step']:.0f} launches per step")
    if "loss_check" in rows:
        print(f"loss at the same weights: plain {rows['loss_check']['plain']:.5f}, fast {rows['loss_check']['fast']:.5f}"
              f" (relative difference {rows['loss_check']['rel_diff']:.1e})")
    path = OUT / f"gpu-{name}-fast.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    if "--table" in sys.argv:
        table()
    else:
        run_part(os.environ.get("PART", "eager"))
