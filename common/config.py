"""TrainConfig: the one typed configuration of local (site) training.

Defaults follow the VLSM-Adapter recipe (DiceCE 1.5/1.0, AdamW wd 1e-3,
lr 3e-4 shallow / 1e-3 dense, ReduceLROnPlateau 0.3/5, clip 0.5, early stop
on validation Dice) with CPU-friendly epoch and batch sizes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

# Learning rate by adapter family / baseline when none is given.
DEFAULT_LR = {"shallow": 3e-4, "dense": 1e-3, "decoder": 1e-3, "lora": 3e-4, "full": 1e-5, "none": 0.0}


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 8
    lr: float | None = None  # None: by variant (DEFAULT_LR)
    weight_decay: float = 1e-3
    grad_clip: float = 0.5
    plateau_factor: float = 0.3
    plateau_patience: int = 5
    early_stop_patience: int = 20
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: str = "auto"  # auto (bf16/fp16 on GPU, off on CPU) | bf16 | fp16 | off
    eval_prompt_index: int = 9  # fixed prompt for evaluation (falls back to the nearest lower non-empty one)
    lambda_dice: float = 1.5
    lambda_ce: float = 1.0
    prox_mu: float = 0.0  # FedProx proximal term weight (0: plain local training)
    select_best: bool = True  # restore the best-validation-Dice weights at the end
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip", "prox_mu"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"TrainConfig.amp must be auto|bf16|fp16|off, got {self.amp!r}")

    def lr_for(self, variant: str, family: str) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR.get(family, DEFAULT_LR.get(variant, 1e-3)) if family != "baseline" else DEFAULT_LR[variant]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {sorted(unknown)}")
        return cls(**d)


def resolve_device(name: str = "auto") -> torch.device:
    """cuda if present, else Apple mps, else cpu (or exactly what was asked)."""
    if name != "auto":
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for this device, or None for plain fp32."""
    if amp == "off" or device.type != "cuda":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16
