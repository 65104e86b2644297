"""The VLSM-Adapter block.

Paper block (``init="paper"``): ``x + relu(up(relu(down(x))))``, both linears
with bias and PyTorch's default init, no scale.

``init="identity"`` zeroes the up-projection so the adapted model starts
exactly at the base model (useful for federated round 0). It also drops the
trailing ReLU: with a zeroed up-projection every pre-activation is exactly 0,
and ReLU'(0) = 0 in PyTorch, so the paper block would pass no gradient to
either linear and never train. ``x + up(relu(down(x)))`` starts at the
identity and trains.
"""

from __future__ import annotations

import torch
from torch import nn

from common.adapters.spec import INITS  # defined with the spec so the CLI can list it without torch


class Adapter(nn.Module):
    def __init__(self, dim: int, bottleneck: int, init: str = "paper") -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"adapter init must be one of {INITS}, got {init!r}")
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.init = init
        if init == "identity":
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The learned part alone (the block minus its residual)."""
        h = self.up(torch.relu(self.down(x)))
        return torch.relu(h) if self.init == "paper" else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)
