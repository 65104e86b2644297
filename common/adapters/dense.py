"""Dense (in-block) adapters, r = 64.

In layers 0 .. max(extract_layers) - 1 of each adapted tower (layers 0..8 of
the real model), one adapter after self-attention and one after the MLP,
each applied before its residual add:
``x = x + A_attn(attn(ln1(x)))``; ``x = x + A_mlp(mlp(ln2(x)))``.
The text tower still runs all its layers, final norm, pooling, projection.
Optional VLC adapter on the projected text feature (512 -> 256 -> 512).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPSegConfig

from common.adapters.base import AdapterSet, cond_adapter
from common.adapters.block import Adapter
from common.adapters.spec import AdapterSpec


def _tower(dim: int, layers: int, bottleneck: int, init: str) -> nn.ModuleList:
    return nn.ModuleList(
        nn.ModuleDict({"attn": Adapter(dim, bottleneck, init), "mlp": Adapter(dim, bottleneck, init)})
        for _ in range(layers)
    )


class DenseAdapters(AdapterSet):
    def __init__(self, spec: AdapterSpec, config: CLIPSegConfig) -> None:
        super().__init__()
        depth = max(config.extract_layers)
        if depth > config.text_config.num_hidden_layers and "l" in spec.scopes:
            raise ValueError(
                f"dense text adapters need {depth} text layers, the base has {config.text_config.num_hidden_layers}"
            )
        v_dim, t_dim = config.vision_config.hidden_size, config.text_config.hidden_size
        self.vision = _tower(v_dim, depth, spec.dense_dim, spec.init) if "v" in spec.scopes else None
        self.text = _tower(t_dim, depth, spec.dense_dim, spec.init) if "l" in spec.scopes else None
        self.cond = cond_adapter(spec.scopes, config.projection_dim, spec.cond_dim, spec.init)

    def layer_adapters(self, tower: str, index: int) -> tuple[Adapter, Adapter] | None:
        layers = self.vision if tower == "vision" else self.text
        if layers is None or index >= len(layers):
            return None
        return layers[index]["attn"], layers[index]["mlp"]

    def adapt_condition(self, cond: torch.Tensor, text_taps: list[torch.Tensor]) -> torch.Tensor:
        return self.cond(cond) if self.cond is not None else cond
