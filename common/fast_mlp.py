"""The fast path's MLPs: CLIP's QuickGELU as one SiLU kernel, its constant folded into frozen weights.

CLIP's activation ``x * sigmoid(1.702 x)`` runs as three elementwise
kernels forward (mul, sigmoid, mul) and about five backward, each a full
pass over the (tokens, 4D) intermediate, the largest tensor of a layer: on
an H200 the bf16 elementwise multiplies alone were the 3rd-largest kernel
time of a fast dense-vl step (bench/results/h200-gpu_sh-run2-table.txt).
Since ``x * sigmoid(1.702 x) = silu(1.702 x) / 1.702``, with fc1's weight and
bias scaled by 1.702 and fc2's weight by 1 / 1.702 the MLP is
``fc2'(silu(fc1'(x)))``: the same function, one kernel each way (SiLU and
its backward are single fused kernels in PyTorch).

The scaled weights are copies, made once per base and dtype (156 MiB in
bf16 for the full-size towers' 24 MLPs), so the stock modules and the
plain path are untouched; in bf16 the scaling costs one more rounding of
each weight (both sides of the comparison are bf16 anyway). They are made
again when a weight is rebound (a device move, a cast), as
common/fast_attention.py's fused q/k/v are. Only frozen MLPs whose
activation is QuickGELU are changed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import QuickGELUActivation

from common.class_swap import swap_all

SCALE = 1.702  # QuickGELU's constant (transformers.activations.QuickGELUActivation)
_ATTR = "_fedvlsm_folded"


def _tensors(mlp: nn.Module) -> list[torch.Tensor | None]:
    fc1, fc2 = mlp._modules["fc1"], mlp._modules["fc2"]
    return [fc1._parameters["weight"], fc1._parameters["bias"], fc2._parameters["weight"]]


def _key(tensors: list[torch.Tensor | None]) -> tuple:
    return tuple((0, None) if t is None else (t.data_ptr(), t.dtype) for t in tensors)


def eligible(module: nn.Module) -> bool:
    """A frozen MLP (fc1, activation, fc2) whose activation is QuickGELU."""
    fc1, fc2 = getattr(module, "fc1", None), getattr(module, "fc2", None)
    return (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)
            and isinstance(getattr(module, "activation_fn", None), QuickGELUActivation)
            and not any(p.requires_grad for p in (*fc1.parameters(), *fc2.parameters())))


def folded(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
    """(fc1 weight * 1.702, fc1 bias * 1.702, fc2 weight / 1.702), made again if a weight was rebound;
    None if the MLP's weights train."""
    record = mlp.__dict__.get(_ATTR)
    if record is not None and torch.compiler.is_compiling():  # prepare_model made them; data_ptr() breaks graphs
        return record[0]
    tensors = _tensors(mlp)
    if any(t is not None and t.requires_grad for t in tensors):
        if record is not None:
            del mlp.__dict__[_ATTR]  # not to be found by a compiled step either
        return None
    key = _key(tensors)
    if record is not None and record[1] == key:
        return record[0]
    w1, b1, w2 = tensors

    def scaled(t: torch.Tensor, factor: float) -> torch.Tensor:  # in fp32 at least, rounded once to t's dtype
        return (t.to(torch.promote_types(t.dtype, torch.float32)) * factor).to(t.dtype)

    with torch.no_grad():
        out = (scaled(w1, SCALE), None if b1 is None else scaled(b1, SCALE), scaled(w2, 1 / SCALE))
    mlp.__dict__[_ATTR] = (out, key)
    return out


class _FoldedForward:
    """Mixed in before an MLP class (``use_folded_mlp``)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weights = folded(self)
        if weights is None:
            return super().forward(hidden_states)
        w1, b1, w2 = weights
        return F.linear(F.silu(F.linear(hidden_states, w1, b1)), w2, self.fc2.bias)


def use_folded_mlp(root: nn.Module, on: bool) -> int:
    """Swap `root`'s eligible MLPs to (on, making their folded weights now) or back from (off, dropping
    them) the folded forward; how many changed."""
    n = swap_all(root, _FoldedForward, on, lambda m: eligible(m) and folded(m) is not None)
    if not on and n:  # the folded copies: a second set of the MLP weights (~156 MiB in bf16 at full size)
        for m in root.modules():
            m.__dict__.pop(_ATTR, None)
    if on:  # MLPs swapped earlier: make their copies again now if a weight was rebound since, as
        # folded does at a call; a compiled step trusts what it finds (see there).
        for m in root.modules():
            if isinstance(m, _FoldedForward):
                folded(m)
    return n
