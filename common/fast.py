"""The fast path of local training and inference: the plain step minus its host work.

The plain step (common/train.py's loop) was measured host-bound on an H200:
~34 ms of GPU work in a ~127 ms step, ~5,000 dispatched operators per step
(bench/results/h200-diag-before-maskfix.log; README, Benchmarks). Each piece
here removes one measured cost, and none changes the maths:

- frozen weights of the towers' and decoder's matmuls (Linear, Conv2d,
  ConvTranspose2d) are cast to the autocast dtype once (``cast_frozen``),
  not re-cast by autocast on every forward (~318 casts per step, 38% of the
  kernel-launching ops: autocast caches casts only of tensors that require
  grad). Layer norms, embeddings and every trainable tensor stay fp32
  (adapters keep fp32 master weights and run under autocast);
- the layer-norm output is cast once for q, k and v (``FastForward.cast``),
  not three times, and q, k, v are one matmul over the frozen weights fused
  in place (common/fast_attention.py; towers and decoder);
- CLIP's QuickGELU as one SiLU kernel each way, its constant folded into
  copies of the frozen MLP weights (common/fast_mlp.py);
- the interpolated vision position table is computed once per image size
  (``FastForward.vision_embeddings``; 2.1 ms of GPU time per call measured);
- Dice + BCE in a few fused ops (``dice_ce``; the same value as MONAI's
  ``DiceCELoss(sigmoid=True)``, which adds many small ops);
- AdamW ``fused=True`` on CUDA (foreach AdamW made 288 host ``.item()``
  calls per step);
- no host sync inside an epoch: loss and Dice accumulate on the device and
  are read once at its end (plain: ``loss.item()`` and the batch Dice, 3
  syncs per step);
- prompts padded to a few fixed lengths (``TrainConfig.prompt_buckets``) on
  the right, and the "mask can be dropped" decision made in the collate, so
  shapes are static and the step has no graph break (``torch.compile``,
  CUDA graphs: ``TrainConfig.compile``);
- under ``torch.compile``, the decoder's transposed convolutions whose
  kernel equals their stride run as a matmul and a pixel shuffle
  (``PatchConvTranspose2d``: the same maths, and a backward that Inductor
  can take; see there);
- DataLoader workers that read the site cache's uint8 arrays (4x fewer
  bytes than float32), pinned memory, non-blocking copies, normalisation
  on the device.

Shallow-* variants add the frozen-activation cache (common/activation_cache.py):
after an item's first pass only the side adapters and the decoder run.

On CPU the fast path is off by default (``TrainConfig.fast = "auto"``); with
``fast="on"`` it runs in fp32 there, and tests/test_fast_path.py compares its
logits and losses with the plain path's.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.config import TrainConfig, autocast_dtype
from common.data.dataset import pad_token_id, prompt_ids
from common.graphed_step import GraphedStep, LrTensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MATMUL_MODULES = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)


# ----------------------------------------------------------------- switches
def fast_enabled(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.fast == "auto":
        return device.type == "cuda"
    return cfg.fast == "on"


def fast_workers(cfg: TrainConfig, device: torch.device) -> int:
    """Loader workers of the fast path: -1 (auto) is min(8, cores - 1) on CUDA, 0 elsewhere."""
    if cfg.num_workers >= 0:
        return cfg.num_workers
    if device.type != "cuda":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) - 1))


# ------------------------------------------------------------ model set-up
class FastForward:
    """What AdaptedCLIPSeg's forward does differently on the fast path (see model.py)."""

    def __init__(self, dtype: torch.dtype | None) -> None:
        self.dtype = dtype
        self._pos: dict[tuple, torch.Tensor] = {}
        self._by_size: dict[tuple[int, int], torch.Tensor] = {}  # the same table, for compiled steps

    @staticmethod
    def attention(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """A tower layer's self-attention, q/k/v in one matmul (common/fast_attention.py)."""
        from common.fast_attention import attention

        return attention(module, x, mask, causal)

    def cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype) if self.dtype is not None and torch.is_autocast_enabled(x.device.type) else x

    def vision_embeddings(self, emb: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIPSegVisionEmbeddings.forward (interpolated positions), the position table cached."""
        batch, _, height, width = pixel_values.shape
        patch = emb.patch_embedding(pixel_values.to(dtype=emb.patch_embedding.weight.dtype))
        patch = patch.flatten(2).transpose(1, 2)
        cls = emb.class_embedding.expand(batch, 1, -1)
        x = torch.cat([cls, patch], dim=1)
        if emb.position_embedding.weight.requires_grad:  # the "full" baseline trains it: nothing to cache
            return x + emb.interpolate_pos_encoding(x, height, width)
        if torch.compiler.is_compiling():
            # The eager key below reads data_ptr() and _version, which Dynamo cannot trace: it broke
            # the compiled step into 6 graphs. Compiled, the table cached for this size is a constant
            # (FastEpochs warms it before compiling); without one it is computed in the graph.
            pos = self._by_size.get((height, width))
            return x + (pos if pos is not None else self._table(emb, x, height, width))
        return x + self.positions(emb, x, height, width)

    def positions(self, emb: nn.Module, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The interpolated position table for `x` (B, N + 1, D) of an image `height` x `width`, cached."""
        table = emb.position_embedding.weight
        key = (height, width, table.device, table.data_ptr(), table._version)
        pos = self._pos.get(key)
        if pos is None:
            pos = self._table(emb, x, height, width)
            self._pos = {key: pos}  # one image size at a time
            self._by_size = {(height, width): pos}
        return pos

    def warm_positions(self, emb: nn.Module, size: int) -> None:
        """Cache the table of `size` x `size` images (before compiling: see vision_embeddings)."""
        table = emb.position_embedding.weight
        n = (size // emb.patch_size) ** 2 + 1
        self.positions(emb, table.new_zeros(1, n, table.shape[1]), size, size)

    @staticmethod
    def _table(emb: nn.Module, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        with torch.no_grad():
            return emb.interpolate_pos_encoding(x.detach(), height, width).detach()


class PatchConvTranspose2d(nn.ConvTranspose2d):
    """A ConvTranspose2d whose kernel equals its stride, as one matmul and a pixel shuffle.

    With kernel == stride (and no padding, dilation or groups) every input
    pixel writes its own k x k output patch: ``out[b, o, i*k+u, j*k+v] =
    bias[o] + sum_c x[b, c, i, j] * W[c, o, u, v]``. CLIPSeg's decoder ends in
    two such layers (k = 4). The same maths without cuDNN's transposed
    convolution: under ``torch.compile`` on an H200 (torch 2.11) the first
    backward failed because Inductor expected a channels-last input gradient
    from ``convolution_backward`` of the last one (32 -> 1 channels, whose
    weight's strides are ambiguous) and cuDNN returned a contiguous one
    (bench/results/h200-gpu_sh-run2-table.txt; turning Inductor's layout
    optimisation off did not help). Parameters and their names are the
    module's own (the class is swapped in place), so state dicts and the
    base fingerprint are unchanged.
    """

    @staticmethod
    def eligible(module: nn.Module) -> bool:
        return (isinstance(module, nn.ConvTranspose2d) and tuple(module.kernel_size) == tuple(module.stride)
                and tuple(module.padding) == (0, 0) and tuple(module.output_padding) == (0, 0)
                and tuple(module.dilation) == (1, 1) and module.groups == 1 and module.padding_mode == "zeros")

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        kh, kw = self.kernel_size
        o = self.out_channels
        y = torch.matmul(x.permute(0, 2, 3, 1), self.weight.reshape(c, o * kh * kw))  # (b, h, w, o*kh*kw)
        y = y.reshape(b, h, w, o, kh, kw).permute(0, 3, 1, 4, 2, 5).reshape(b, o, h * kh, w * kw)
        return y + self.bias.view(1, o, 1, 1).to(y.dtype) if self.bias is not None else y


def use_patch_transposed_convs(module: nn.Module, on: bool) -> int:
    """Swap `module`'s eligible ConvTranspose2d layers to (on) or back from (off) PatchConvTranspose2d.

    Records on `module` whether any is swapped, so that switching off an
    unswapped base (every plain evaluate and fit) skips the walk.
    """
    if not on and not getattr(module, "_fedvlsm_patched_convs", True):
        return 0
    n = 0
    for m in module.modules():
        if on and type(m) is nn.ConvTranspose2d and PatchConvTranspose2d.eligible(m):
            m.__class__ = PatchConvTranspose2d
            n += 1
        elif not on and type(m) is PatchConvTranspose2d:
            m.__class__ = nn.ConvTranspose2d
            n += 1
    module._fedvlsm_patched_convs = on and n > 0
    return n


# A module's frozen fp32 weights while cast_frozen has them narrower: {param name: tensor on the host}.
FP32_ORIGINALS = "_fedvlsm_fp32"


def cast_frozen(clipseg: nn.Module, dtype: torch.dtype) -> int:
    """Cast the frozen weights of `clipseg`'s matmul modules to `dtype` in place; returns how many tensors.

    In place on purpose: sites sharing a process share one frozen base, so
    they share one narrow copy. The base's fp32 fingerprint is pinned first
    (bases.base_fingerprint), so adapters stay tied to the same base. The
    fp32 values are kept on the host (the original tensors on a CPU, a copy
    from a GPU): a plain (fp32) fit, evaluate or DP-SGD round in the same
    process later gets the base back exactly, not rounded to bf16.
    """
    from common.bases import base_fingerprint, legacy_fingerprint

    base_fingerprint(clipseg)  # both pinned from the fp32 weights, before the cast
    legacy_fingerprint(clipseg)
    n = 0
    for module in clipseg.modules():
        if isinstance(module, _MATMUL_MODULES):
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                    kept = module.__dict__.setdefault(FP32_ORIGINALS, {})
                    if name not in kept and p.dtype == torch.float32:
                        kept[name] = p.data if p.device.type == "cpu" else p.data.to("cpu", copy=True)
                    p.data = p.data.to(dtype)
                    n += 1
    clipseg._fedvlsm_frozen_dtype = dtype
    return n


def restore_fp32(model: nn.Module) -> None:
    """Undo the fast path on `model` before a plain (fp32, maybe no autocast) forward."""
    from common.fast_attention import forget_fused, use_fused_attention
    from common.fast_mlp import use_folded_mlp

    model.fast = None
    clipseg = model.clipseg
    use_patch_transposed_convs(clipseg, False)
    use_fused_attention(clipseg.decoder, False)
    use_folded_mlp(clipseg, False)  # drops the folded copies too
    _frozen_to_fp32(clipseg)
    if clipseg.__dict__.pop("_fedvlsm_prepared", False):  # walked only after a prepare (see class_swap)
        forget_fused(clipseg)  # the q/k/v records are stale after the cast, and the plain forward reads none


def _frozen_to_fp32(clipseg: nn.Module) -> None:
    """The frozen weights back in fp32: the kept originals where cast_frozen kept them (exact)."""
    if getattr(clipseg, "_fedvlsm_frozen_dtype", None) in (None, torch.float32):
        return
    lossy = 0
    for module in clipseg.modules():
        if isinstance(module, _MATMUL_MODULES):
            kept = module.__dict__.pop(FP32_ORIGINALS, {})
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
                    if name in kept and kept[name].shape == p.shape:
                        p.data = kept[name].to(p.device)
                    else:
                        p.data = p.data.float()
                        lossy += 1
    if lossy:  # weights cast by something else than cast_frozen: nothing to restore them from
        warnings.warn(f"{lossy} frozen weight tensor(s) of the base were in "
                      f"{clipseg._fedvlsm_frozen_dtype} with no fp32 original kept; cast back to fp32 "
                      "(the lost mantissa bits do not come back)", stacklevel=2)
    clipseg._fedvlsm_frozen_dtype = torch.float32


def prepare_model(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> nn.Module:
    """Move `model` to `device` and switch on its fast forward; cast frozen weights to `dtype` if given."""
    model.to_device(device)
    if dtype is not None:
        cast_frozen(model.clipseg, dtype)
    else:
        _frozen_to_fp32(model.clipseg)  # fp32 maths without autocast needs fp32 weights
    from common.fast_attention import fuse_qkv, use_fused_attention
    from common.fast_mlp import use_folded_mlp

    model.clipseg.__dict__["_fedvlsm_prepared"] = True  # restore_fp32 then drops the fused records
    clip = model.clipseg.clip
    fuse_qkv([*clip.vision_model.encoder.layers, *clip.text_model.encoder.layers])  # after the cast: it rebinds
    use_fused_attention(model.clipseg.decoder, True)  # the decoder's layers run the stock code
    use_folded_mlp(model.clipseg, True)  # the QuickGELU MLPs: the towers (the decoder's are ReLU)
    # Kept when it already serves this dtype: fit's validation prepares the model between epochs,
    # and a training step captured as a CUDA graph reads this object's cached position table, so
    # a new object (the table freed, its memory reused) would feed later replays garbage.
    if not (isinstance(model.fast, FastForward) and model.fast.dtype == dtype):
        model.fast = FastForward(dtype)
    return model


# --------------------------------------------------------------------- loss
def dice_ce(logits: torch.Tensor, target: torch.Tensor, lambda_dice: float, lambda_ce: float) -> torch.Tensor:
    """MONAI's ``DiceCELoss(sigmoid=True)`` for one channel: per-(item, channel) soft Dice, mean BCE."""
    prob = torch.sigmoid(logits)
    dims = tuple(range(2, logits.ndim))
    inter = (prob * target).sum(dims)
    denom = prob.sum(dims) + target.sum(dims)
    dice = 1.0 - (2.0 * inter + 1e-5) / (denom + 1e-5)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    return lambda_dice * dice.mean() + lambda_ce * bce


def batch_dice_sum(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of the hard Dice (as train._batch_dice, which takes the mean), on the device."""
    pred = (logits > 0).float()
    inter = (pred * mask).sum(dim=(1, 2, 3))
    denom = pred.sum(dim=(1, 2, 3)) + mask.sum(dim=(1, 2, 3))
    return ((2 * inter + 1e-6) / (denom + 1e-6)).sum()


def make_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float, device: torch.device):
    """AdamW; fused on CUDA (no per-step host work; works with GradScaler without syncs)."""
    fused = device.type == "cuda" and all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


# ------------------------------------------------------------------ batches
class PromptTokens:
    """Prompt -> token ids, memoised; batches right-padded to a fixed bucket length.

    Right padding under the causal mask cannot change the end-of-text
    state (the only one read), so no attention mask is needed; a batch of
    bucket length L always has shape (B, L): few shapes, no graph break.
    """

    def __init__(self, tokenizer: Any, buckets: Sequence[int], max_length: int = 77) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.buckets = sorted({min(int(b), max_length) for b in buckets} | {max_length})
        self.pad_id = pad_token_id(tokenizer)

    def ids(self, prompt: str) -> torch.Tensor:
        return prompt_ids(self.tokenizer, prompt, self.max_length)  # one memo per tokenizer, the collate's too

    def bucket(self, length: int) -> int:
        return next(b for b in self.buckets if b >= length)

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        rows = [self.ids(p) for p in prompts]
        width = self.bucket(max(len(r) for r in rows))
        out = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out


class PixelItems(Dataset):
    """(index, uint8 image (S, S, 3), uint8 mask (S, S)) straight from the site cache; no prompt work.

    Prompts are drawn in the main process (``SegDataset.prompt_for`` is
    cheap), so persistent workers never hold a stale epoch's prompts.
    """

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        image, mask, _ = self.ds.arrays(index)
        return index, torch.tensor(image), torch.tensor(mask)  # copies: the arrays may be read-only


class _Range(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def index_batches(n: int, batch_size: int, generator: torch.Generator,
                  wrap: Callable[[Any], Any] = lambda it: it, drop_last: bool = False) -> list[list[int]]:
    """The batches ``wrap(DataLoader(shuffle=True, generator=generator))`` would draw.

    The same generator use as fit's plain loop, wrapper included: tqdm.auto
    makes an iterator of what it wraps when it is created (one more draw
    from the generator per epoch), so `fit` passes its progress wrapper.
    `drop_last` drops a last short batch (the permutation drawn is the same).
    """
    loader = DataLoader(_Range(n), batch_size=batch_size, shuffle=True, generator=generator, collate_fn=list,
                        drop_last=drop_last)
    return [list(b) for b in wrap(loader)]


def supports(ds: Any) -> bool:
    """The fast loop needs a SegDataset-like dataset (uint8 arrays and prompts by index)."""
    return all(hasattr(ds, a) for a in ("arrays", "prompt_for", "cache_key"))


_NORM: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def normalize(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> normalised float (B, 3, S, S), as SegDataset does on the host."""
    # mean/std made once per device: torch.tensor(..., device="cuda") is a blocking
    # host-to-device copy, i.e. two host syncs in every step (and illegal in a CUDA graph).
    if images_u8.device not in _NORM:
        _NORM[images_u8.device] = tuple(torch.tensor(v, device=images_u8.device, dtype=torch.float32).view(1, 3, 1, 1)
                                        for v in (IMAGENET_MEAN, IMAGENET_STD))
    mean, std = _NORM[images_u8.device]
    x = images_u8.permute(0, 3, 1, 2).float() / 255.0
    return (x - mean) / std


# Compiled configurations of the step one process may hold. Every fit compiles the same function
# (FastEpochs._step), so each adapter variant x prompt bucket x base x dtype a long-lived process
# meets (a site worker serving several runs) is one more recompile of it; past Dynamo's default
# limit (8) the step silently ran eagerly for the rest of the process, still recorded as compiled.
RECOMPILE_LIMIT = 64


def _within_recompile_limit(compiled: Callable) -> Callable:
    def call(*args: Any) -> Any:
        with torch._dynamo.config.patch(recompile_limit=max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)):
            return compiled(*args)

    return call


# ------------------------------------------------------------------- epochs
class FastEpochs:
    """Runs the training epochs of `fit` on the fast path; returns (mean batch loss, steps) per epoch.

    `fit` keeps the rest (validation, schedule, best state, early stop).
    """

    def __init__(self, model: nn.Module, train_ds: Any, tokenizer: Any, cfg: TrainConfig, device: torch.device,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list[nn.Parameter],
                 generator: torch.Generator, reference: Mapping[str, torch.Tensor] | None) -> None:
        self.model, self.ds, self.cfg, self.device = model, train_ds, cfg, device
        self.optimizer, self.scaler, self.params, self.generator = optimizer, scaler, params, generator
        self.reference = reference
        self.amp = autocast_dtype(cfg.amp, device)
        if cfg.compile == "cuda-graph":
            if device.type != "cuda":
                raise ValueError(f"TrainConfig.compile='cuda-graph' needs a CUDA device, got {device}")
            if self.amp == torch.float16:
                raise ValueError("TrainConfig.compile='cuda-graph' needs amp 'bf16' or 'off': fp16's GradScaler "
                                 "checks for infs on the host, which a CUDA graph cannot do")
        prepare_model(model, device, self.amp)
        self.tokens = PromptTokens(tokenizer, cfg.prompt_buckets, model.max_prompt_tokens)
        self.cuda = device.type == "cuda"
        self.workers = fast_workers(cfg, device)
        self.cache = None
        if model.spec.family == "shallow" and cfg.activation_cache in ("auto", "on"):
            from common.activation_cache import ShallowFeatures

            self.cache = ShallowFeatures.for_site(model, train_ds, self.tokens, device, self.amp)
        self.pixels = None  # dense (and uncached shallow) epochs: the site's pixels on the device if they fit
        if self.cache is None and hasattr(train_ds, "image_size"):
            from common.resident_pixels import ResidentPixels

            self.pixels = ResidentPixels.for_site(train_ds, device)
        self._loader: DataLoader | None = None
        step = self._step_cached if self.cache is not None else self._step
        if cfg.compile not in ("off", "cuda-graph"):
            # Only when compiling: eager, cuDNN's transposed convolution is fine, and the
            # matmul form's rounding differs slightly (see PatchConvTranspose2d). Once swapped, the
            # shared base keeps it (later eager fast fits use it too; restore_fp32 swaps it back):
            # swapping back after each compiled fit would make the next one compile again.
            use_patch_transposed_convs(model.clipseg, True)
            model.fast.warm_positions(model.clipseg.clip.vision_model.embeddings, model.image_size)
            # normalize's constants made now: made during the first trace, Dynamo guards on their
            # absence, and the second call compiled the whole step again.
            normalize(torch.zeros((1, 1, 1, 3), dtype=torch.uint8, device=device))
            step = _within_recompile_limit(torch.compile(step, mode=cfg.compile, dynamic=False))
        self._compiled = step
        # Compiled shapes are static: a last short batch would compile (and, with
        # CUDA graphs, record) the whole step again, so it is dropped; the
        # permutation, hence which items an epoch sees in expectation, is unchanged.
        self.drop_last = cfg.compile != "off" and len(train_ds) > cfg.batch_size
        self._graphs = cfg.compile == "reduce-overhead"
        self._autocast_cache = cfg.compile != "cuda-graph"  # a captured step may not keep autocast's casts
        self.graphed: GraphedStep | None = None
        self.lr: LrTensor | None = None
        if cfg.compile == "cuda-graph":
            self.lr = LrTensor(optimizer, device)
            self.graphed = GraphedStep(self.step, self._update, optimizer)
        # Held for the graphs' lifetime: they read its position table (see prepare_model).
        self.fast_state = model.fast
        self._summary: dict[str, Any] | None = None  # set by close

    def close(self) -> None:
        """Let go of what the epochs held: captured graphs (their memory pools and static buffers), the
        compiled step, the loader's persistent worker processes, the site's cache handles.

        Needed because the object is in reference cycles (its bound methods are held by its own
        `_compiled` and `graphed`): without this, all of it outlived `fit` until a full garbage
        collection. `describe` keeps working; training does not.
        """
        self._summary = self.describe()
        self._loader = None  # its iterator, freed with it, joins the persistent workers
        self.graphed = None
        self._compiled = None
        self.cache = None
        self.pixels = None
        self.fast_state = None

    def describe(self) -> dict[str, Any]:
        """How the steps ran, for the training record: a capture that failed must not pass unseen."""
        if self._summary is not None:  # closed: what it was when closed
            return dict(self._summary)
        amp = None if self.amp is None else str(self.amp).removeprefix("torch.")
        out: dict[str, Any] = {"fast": True, "compile": self.cfg.compile, "amp": amp}
        if self.graphed is not None:
            g = self.graphed
            out.update(graphs=len(g.graphs), replays=g.replays, capture_failures=sorted(set(g.failures.values())))
        return out

    def train_step(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step on a batch (forward, loss, backward, update): (loss, batch Dice sum).

        With compile='cuda-graph' both are the graph's static outputs: read them before the next step.
        """
        if self.graphed is not None:
            if self.model.fast is not self.fast_state:
                raise RuntimeError("the model's fast-path state was replaced during training (a prepare_model "
                                   "with another dtype, or restore_fp32); the captured CUDA graphs read the "
                                   "tensors of the old one, so training cannot go on with them")
            return self.graphed(*args)
        loss, dice = self.step(*args)
        self._update(loss)
        return loss, dice

    def step(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, batch Dice sum) of one batch; the backward and update are `_update`'s."""
        if self._compiled is None:
            raise RuntimeError("FastEpochs.step after close(): this object no longer trains")
        if self._graphs:  # a new training iteration: CUDA-graph outputs of the last one may be reused
            torch.compiler.cudagraph_mark_step_begin()
        return self._compiled(*args)

    # -- the differentiable part of one step (what torch.compile may take whole)
    def _loss(self, logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits.float()
        if logits.shape[-2:] != mask.shape[-2:]:
            logits = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
        loss = dice_ce(logits, mask, self.cfg.lambda_dice, self.cfg.lambda_ce)
        if self.reference is not None:
            from common.train import proximal_term

            loss = loss + 0.5 * self.cfg.prox_mu * proximal_term(self.model, self.reference)
        with torch.no_grad():
            dice = batch_dice_sum(logits.detach(), mask)
        return loss, dice

    def _step(self, images_u8: torch.Tensor, mask_u8: torch.Tensor, ids: torch.Tensor):
        mask = mask_u8.unsqueeze(1).float()
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None,
                            cache_enabled=self._autocast_cache):
            logits = self.model(normalize(images_u8), ids, None)
        return self._loss(logits, mask)

    def _step_cached(self, acts: list[torch.Tensor], cond: torch.Tensor, taps: list[torch.Tensor],
                     mask_u8: torch.Tensor):
        mask = mask_u8.unsqueeze(1).float()
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None,
                            cache_enabled=self._autocast_cache):
            logits = self.model.head([a.float() for a in acts], cond.float(), [t.float() for t in taps])
        return self._loss(logits, mask)

    def _update(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip, foreach=self.cuda or None)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def loader(self, batches: list[list[int]] | None = None) -> DataLoader:
        """Pixel loader: over `batches` (fixed order) or shuffled with fit's generator."""
        common = dict(num_workers=self.workers, pin_memory=self.cuda,
                      prefetch_factor=4 if self.workers else None)
        if batches is not None:
            return DataLoader(PixelItems(self.ds), batch_sampler=batches, **common)
        if self._loader is None:
            self._loader = DataLoader(PixelItems(self.ds), batch_size=self.cfg.batch_size, shuffle=True,
                                      generator=self.generator, persistent_workers=self.workers > 0,
                                      drop_last=self.drop_last, **common)
        return self._loader

    def run_epoch(self, bar: Callable[[Any], Any]) -> tuple[float, float, int]:
        """(mean batch loss, mean batch Dice, steps) of one epoch; one host sync, at the end."""
        total = torch.zeros(2, device=self.device)  # loss sum over batches, Dice sum over items
        steps = items = 0
        if self.lr is not None:
            self.lr.sync()  # a scheduler's new learning rate, into the tensor the graphs read
        if self.cache is None:
            for n, images, masks, ids in self._pixel_batches(bar):
                loss, dice = self.train_step(images, masks, ids)
                total += torch.stack([loss.detach(), dice])
                steps += 1
                items += n
        else:
            batches = index_batches(len(self.ds), self.cfg.batch_size, self.generator, bar, self.drop_last)
            self.cache.fill(batches, self.loader)
            prompts = [[self.ds.prompt_for(i) for i in batch] for batch in batches]
            self.cache.warm_text([p for batch in prompts for p in batch])
            for batch, batch_prompts in zip(batches, prompts):
                acts, cond, taps, masks = self.cache.batch(batch, batch_prompts)
                loss, dice = self.train_step(acts, cond, taps, masks)
                total += torch.stack([loss.detach(), dice])
                steps += 1
                items += len(batch)
        loss_sum, dice_sum = total.tolist()
        return (loss_sum / steps if steps else math.nan), (dice_sum / items if items else math.nan), steps

    def _ids(self, indices: Sequence[int]) -> torch.Tensor:
        ids = self.tokens([self.ds.prompt_for(int(i)) for i in indices])
        if self.cuda:  # from pageable memory a "non-blocking" copy may still wait for the stream
            return ids.pin_memory().to(self.device, non_blocking=True)
        return ids

    def _pixel_batches(self, bar: Callable[[Any], Any]):
        """(items, uint8 images, uint8 masks, prompt ids) on the device, per batch of the epoch.

        With resident pixels (common/resident_pixels.py) an epoch whose items
        are all held indexes them on the device; otherwise (the first epoch)
        it trains on the loader's batches and keeps them. Without (too big
        for the budget): the persistent loader's batches, copied over.
        """
        nb = self.cuda
        if self.pixels is None:
            for index, images, masks in bar(self.loader()):
                yield len(index), images.to(self.device, non_blocking=nb), masks.to(self.device, non_blocking=nb), \
                    self._ids(index)
            return
        batches = index_batches(len(self.ds), self.cfg.batch_size, self.generator, bar, self.drop_last)
        if self.pixels.holds(batches):
            order = self.pixels.order(batches)
            start = 0
            for batch in batches:
                images, masks = self.pixels.gather(order[start:start + len(batch)])
                start += len(batch)
                yield len(batch), images, masks, self._ids(batch)
            return
        for index, images, masks in self.loader(batches):
            images, masks = images.to(self.device, non_blocking=nb), masks.to(self.device, non_blocking=nb)
            self.pixels.put(index, images, masks)
            yield len(index), images, masks, self._ids(index)
        # Items this epoch did not load (a compiled step's dropped short batch): loaded now, or the
        # next epoch would find the store incomplete and go through the loader again.
        missing = (~self.pixels.filled).nonzero().flatten().tolist()
        if missing:
            for index, images, masks in self.loader([missing]):
                self.pixels.put(index, images.to(self.device, non_blocking=nb), masks.to(self.device, non_blocking=nb))


# ------------------------------------------------------------------ batching for evaluation
def eval_forward(model: nn.Module, batch: Mapping[str, Any], device: torch.device, amp: torch.dtype | None,
                 tokens: PromptTokens) -> torch.Tensor:
    """Logits of one evaluation batch on the fast path (bucketed prompts, no mask, non-blocking copy)."""
    ids = tokens(batch["prompts"]).to(device, non_blocking=True)
    px = batch["pixel_values"].to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        return model(px, ids, None)
