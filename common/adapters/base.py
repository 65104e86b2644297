"""AdapterSet: the hooks through which adapters enter our CLIPSeg forward.

The model's forward (common/model.py) asks its AdapterSet at four points:
inside each tower layer (dense), on the extracted vision activations and on
the conditional embedding (shallow, cond). The default is "do nothing",
which is what the baselines use.
"""

from __future__ import annotations

import torch
from torch import nn

from common.adapters.block import Adapter


class AdapterSet(nn.Module):
    #: text hidden states at end-of-text of the extracted layers are needed
    needs_text_taps: bool = False

    def layer_adapters(self, tower: str, index: int) -> tuple[Adapter, Adapter] | None:
        """(after-attention, after-MLP) adapters for layer `index` of `tower`, or None."""
        return None

    def adapt_activations(self, activations: list[torch.Tensor]) -> list[torch.Tensor]:
        return activations

    def adapt_condition(self, cond: torch.Tensor, text_taps: list[torch.Tensor]) -> torch.Tensor:
        return cond


def cond_adapter(scopes: tuple[str, ...], dim: int, bottleneck: int, init: str) -> Adapter | None:
    """The VLC adapter on the projected text feature (both families)."""
    return Adapter(dim, bottleneck, init) if "c" in scopes else None
