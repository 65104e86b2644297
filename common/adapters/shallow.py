"""Shallow (side-tap) adapters: the towers run unchanged.

- V: one adapter on each extracted vision activation (layers 3, 6, 9 of the
  real model; 768 -> 512 -> 768); its output replaces what the decoder reads.
- L: one adapter on the text hidden state of each extracted layer at the
  end-of-text position (before the final layer norm; 512 -> 512 -> 512); each
  adapter's output, residual included, is added to the conditional embedding.
  With ``init="identity"`` only the learned branch is added: the residual
  would add the raw hidden state, which no init can cancel.
- C: one adapter (512 -> 256 -> 512) on the projected text feature, applied
  before the text-tap sums are added.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPSegConfig

from common.adapters.base import AdapterSet, cond_adapter
from common.adapters.block import Adapter
from common.adapters.spec import AdapterSpec


class ShallowAdapters(AdapterSet):
    def __init__(self, spec: AdapterSpec, config: CLIPSegConfig) -> None:
        super().__init__()
        n = len(config.extract_layers)
        v_dim, t_dim = config.vision_config.hidden_size, config.text_config.hidden_size
        self.init = spec.init
        self.vision = (
            nn.ModuleList(Adapter(v_dim, spec.shallow_dim, spec.init) for _ in range(n)) if "v" in spec.scopes else None
        )
        if "l" in spec.scopes and t_dim != config.projection_dim:
            raise ValueError(
                f"shallow text adapters add text hidden states (size {t_dim}) to the conditional embedding "
                f"(projection_dim {config.projection_dim}); this base has different sizes"
            )
        self.text = (
            nn.ModuleList(Adapter(t_dim, spec.shallow_dim, spec.init) for _ in range(n)) if "l" in spec.scopes else None
        )
        self.cond = cond_adapter(spec.scopes, config.projection_dim, spec.cond_dim, spec.init)
        self.needs_text_taps = self.text is not None

    def adapt_activations(self, activations: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.vision is None:
            return activations
        return [adapter(a) for adapter, a in zip(self.vision, activations)]

    def adapt_condition(self, cond: torch.Tensor, text_taps: list[torch.Tensor]) -> torch.Tensor:
        if self.cond is not None:
            cond = self.cond(cond)
        if self.text is not None:
            for adapter, h in zip(self.text, text_taps):
                cond = cond + (adapter(h) if self.init == "paper" else adapter.branch(h))
        return cond
