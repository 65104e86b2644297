"""The towers' self-attention on the fast path: q, k and v as one matmul.

The stock ``CLIPSegAttention`` runs three projections, each a GEMM in the
forward and another (plus an add) in the backward, then reshapes each and
calls transformers' attention dispatcher. The fast step was measured
host-bound on an H200 (about 116 ms of host time for 29 ms of GPU work per
step, README "Benchmarks"), so every operator the host dispatches counts.
Here the frozen q/k/v weights of each attention module are laid out as one
``(3D, D)`` tensor, the module's own three weights becoming views of it
(``fuse_qkv``: no second copy, so sites sharing a process still share one
base), and the forward is one ``F.linear``, a split and
``scaled_dot_product_attention``: the same maths (q, k, v are the same dot
products), about 23 fewer dispatched operators per layer, forward and
backward (``bench/host_step.py`` counts them).

Anything that rebinds a weight (a move to another device, the fp32 restore
of ``fast.restore_fp32``, ``cast_frozen``) breaks the views; ``qkv`` notices
(the three weights no longer lie back to back in the fused tensor) and fuses
again, so a stale fused tensor is never used. Modules whose q/k/v weights
train (the ``full`` baseline) are left alone and run the stock forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ATTR = "_fedvlsm_qkv"


def _projections(module: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear] | None:
    lins = tuple(getattr(module, name, None) for name in ("q_proj", "k_proj", "v_proj"))
    if not all(isinstance(lin, nn.Linear) for lin in lins):
        return None
    return lins  # type: ignore[return-value]


def _frozen(lins: tuple[nn.Linear, ...]) -> bool:
    return not any(lin.weight.requires_grad or (lin.bias is not None and lin.bias.requires_grad) for lin in lins)


def _tensors(lins: tuple[nn.Linear, ...]) -> list[torch.Tensor | None]:
    # Straight from the modules' parameter dicts: nn.Module.__getattr__ costs ~0.6 us a name.
    return [lin._parameters[name] for lin in lins for name in ("weight", "bias")]


def _pointers(tensors: list[torch.Tensor | None]) -> tuple[int, ...]:
    return tuple(0 if t is None else t.data_ptr() for t in tensors)


def _fuse(module: nn.Module, lins: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows = lins[0].out_features
    with torch.no_grad():
        weight = torch.cat([lin.weight.detach() for lin in lins])
        has_bias = all(lin.bias is not None for lin in lins)
        bias = torch.cat([lin.bias.detach() for lin in lins]) if has_bias else None
    for i, lin in enumerate(lins):
        lin.weight.data = weight[i * rows:(i + 1) * rows]
        if bias is not None:
            lin.bias.data = bias[i * rows:(i + 1) * rows]
    # The addresses the three weights (and biases) have as views of the fused tensors: a later
    # rebinding (device move, dtype cast, new Parameters) gives them others, and the fused ones are stale.
    module.__dict__[_ATTR] = (weight, bias, lins, _pointers(_tensors(lins)))
    return weight, bias


def qkv(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(fused weight, fused bias) of `module`'s frozen q/k/v projections, fusing (again) if needed;
    None when it has no such projections or they train."""
    fused = module.__dict__.get(_ATTR)
    if fused is not None:
        # Checked at every call, so kept to a few reads (~3 us, for ~23 operators saved per layer).
        weight, bias, lins, pointers = fused
        if torch.compiler.is_compiling():  # prepare_model fused them just before; data_ptr() breaks graphs
            return weight, bias
        tensors = _tensors(lins)
        if _pointers(tensors) == pointers and not any(t is not None and t.requires_grad for t in tensors) \
                and lins == (module._modules.get("q_proj"), module._modules.get("k_proj"),
                             module._modules.get("v_proj")):
            return weight, bias
        del module.__dict__[_ATTR]  # stale: not to be found by a compiled step either
    lins = _projections(module)
    if lins is None or not _frozen(lins):
        return None
    if len({(lin.weight.dtype, lin.weight.device, lin.weight.shape) for lin in lins}) != 1 or \
            len({None if lin.bias is None else (lin.bias.dtype, lin.bias.device) for lin in lins}) != 1:
        return None  # mixed layouts: nothing to fuse
    return _fuse(module, lins)


def fuse_qkv(layers: list[nn.Module]) -> int:
    """Fuse the q/k/v weights of each given encoder layer's ``self_attn`` in place; how many were fused."""
    return sum(qkv(layer.self_attn) is not None for layer in layers)


def forget_fused(root: nn.Module) -> int:
    """Drop the fused q/k/v records under `root` (the plain path reads none); how many there were.

    The projections stay views of the fused tensors until rebound, so this
    frees memory only where a cast already made the record a stale copy.
    """
    n = 0
    for module in root.modules():
        n += module.__dict__.pop(_ATTR, None) is not None
    return n


def attention(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """``module(x, mask, is_causal=causal)[0]`` of a CLIP attention module, q/k/v in one matmul.

    `x` is (B, N, D). As transformers' SDPA path: with a mask, it is used
    and `causal` is dropped (the mask holds the causal part); without one,
    `causal` selects SDPA's causal kernel. Modules whose projections train
    run their stock forward.
    """
    fused = qkv(module) if not (module.training and module.dropout > 0) else None
    if fused is None:
        out, _ = module(hidden_states=x, attention_mask=mask, is_causal=causal)
        return out
    weight, bias = fused
    b, n, d = x.shape
    heads = module.num_heads
    q, k, v = F.linear(x, weight, bias).view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=module.scale,
                                         is_causal=causal and mask is None and n > 1)
    return module.out_proj(out.transpose(1, 2).reshape(b, n, d))


class _FusedForward:
    """Mixed in before an attention class (``use_fused_attention``): its forward, q/k/v in one matmul."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        if qkv(self) is None or (self.training and self.dropout > 0) or kwargs.get("output_attentions"):
            return super().forward(hidden_states, attention_mask, **kwargs)
        causal = bool(kwargs.get("is_causal", getattr(self, "is_causal", False)))
        return attention(self, hidden_states, attention_mask, causal), None


def use_fused_attention(root: nn.Module, on: bool) -> int:
    """Swap the class of `root`'s frozen attention modules to (on) or back from (off) the fused forward.

    For modules that stock code calls (the decoder's layers: the towers' are
    called by AdaptedCLIPSeg._layer, see ``attention``). The class swap keeps
    the module's parameters and names (common/class_swap.py).
    """
    from common.class_swap import swap_all

    n = swap_all(root, _FusedForward, on, lambda m: hasattr(m, "scale") and qkv(m) is not None)
    if on:  # modules swapped earlier: fuse again now if their weights were rebound since (a cast, a
        # device move), as qkv does at a call; a compiled step trusts what it finds (see there).
        for m in root.modules():
            if isinstance(m, _FusedForward):
                qkv(m)
    return n
