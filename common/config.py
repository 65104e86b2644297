"""TrainConfig: the one typed configuration of local (site) training.

Defaults follow the VLSM-Adapter recipe (DiceCE 1.5/1.0, AdamW wd 1e-3,
lr 3e-4 shallow / 1e-3 dense, ReduceLROnPlateau 0.3/5, clip 0.5, early stop
on validation Dice) with CPU-friendly epoch and batch sizes.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only where a function needs it: the CLI reads COMPILE_MODES at parser-build time
    import torch

# TrainConfig.compile's modes: off, torch.compile's modes, or the whole step as one CUDA graph.
COMPILE_MODES = ("off", "cuda-graph", "default", "reduce-overhead", "max-autotune-no-cudagraphs")

# Learning rate by adapter family / baseline when none is given.
DEFAULT_LR = {"shallow": 3e-4, "dense": 1e-3, "decoder": 1e-3, "lora": 3e-4, "full": 1e-5, "none": 0.0}
# AdamW moves every weight by about lr per step, so an lr above 1 is never a fine-tuning rate; from
# about 3.4e37 its step size (lr / bias correction) does not even fit a float32 (a traceback in AdamW).
MAX_LR = 1.0
# ... and below 1e-10 that step is under float32's resolution of every weight above ~1e-3 (ulp(1e-3) =
# 1.2e-10): lr = 1e-320 was accepted, and AdamW's step left a float32 weight of 0.02 unchanged, silently.
MIN_LR = 1e-10
# numpy's generators (np.random.seed, default_rng) take seeds in [0, 2**32 - 1].
MAX_TRAIN_SEED = 2**32 - 1
# A batch size is a count of images: above this it only overflowed deep in the DataLoader (islice).
MAX_BATCH_SIZE = 2**31 - 1
# The devices fedvlsm runs on (what --device's help lists); checked before torch is imported.
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class TrainConfigError(ValueError):
    """A TrainConfig value that cannot be used; `field` names it (callers say their own option or key)."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"TrainConfig.{field} {why}")
        self.field = field
        self.why = why


def device_problem(name: str) -> str | None:
    """Why `name` is not a device fedvlsm can use (None if it is): one check for every --device."""
    if not isinstance(name, str) or not _DEVICE.match(name):
        return f"must be auto, cpu, cuda, cuda:N or mps, got {name!r}"
    return None


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
    # DataLoader workers; -1: auto (0 on the plain path and on CPU; on the GPU
    # fast path min(8, cores - 1), with pinned memory and persistent workers).
    num_workers: int = -1
    progress: bool = True
    # --- fast path (common/fast.py). "auto": on with CUDA, off elsewhere;
    # "on" forces it (CPU tests compare it with the plain path), "off" never.
    fast: str = "auto"
    # torch.compile of the fast step's forward + loss: off | default |
    # reduce-overhead (CUDA graphs) | max-autotune-no-cudagraphs; or
    # cuda-graph: the whole eager step (backward and AdamW too) captured with
    # torch.cuda.graph, CUDA only (common/graphed_step.py).
    compile: str = "off"
    # Fast path: prompts are padded to the smallest of these lengths that
    # holds the batch's longest prompt, so shapes are static (few buckets).
    prompt_buckets: tuple[int, ...] = (16, 32, 77)
    # Fast path, shallow-* variants: frozen tower outputs cached per site
    # (memory + <site cache>/activations/); auto = on for shallow variants.
    activation_cache: str = "auto"

    def __post_init__(self) -> None:
        # early_stop_patience: fit stops once this many epochs in a row brought no better val Dice;
        # 0 (or less) stopped every training after its first epoch, improving or not.
        positive = ("epochs", "batch_size", "early_stop_patience")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.batch_size > MAX_BATCH_SIZE:
            raise TrainConfigError("batch_size", f"must be at most {MAX_BATCH_SIZE}, got {self.batch_size}")
        if not 0 <= self.seed <= MAX_TRAIN_SEED:
            raise TrainConfigError("seed", f"must be in [0, {MAX_TRAIN_SEED}], got {self.seed}")
        if self.eval_prompt_index < 0:
            raise TrainConfigError("eval_prompt_index", f"must be >= 0 (p0, p1, ...), got {self.eval_prompt_index}")
        problem = device_problem(self.device)
        if problem:
            raise TrainConfigError("device", problem)
        # NaN passes every `< 0` check: grad_clip NaN made every weight NaN, prox_mu NaN turned
        # FedProx off (`nan > 0` is False), lr or weight_decay inf diverged in the first step.
        for name in ("lr", "weight_decay", "grad_clip", "prox_mu", "plateau_factor", "lambda_dice", "lambda_ce"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise TrainConfigError(name, f"must be a finite number, got {value}")
        for name in ("weight_decay", "grad_clip", "prox_mu", "plateau_patience"):
            if getattr(self, name) < 0:
                raise TrainConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        # clip_grad_norm_(params, 0) scales every gradient to zero: the adapter never trained, silently.
        if self.grad_clip == 0:
            raise TrainConfigError("grad_clip", "must be > 0 (a gradient-norm bound; 0 zeroes every gradient), got 0")
        if self.lr is not None and not 0 < self.lr <= MAX_LR:
            raise TrainConfigError("lr", f"must be > 0 and at most {MAX_LR:g} (AdamW moves each weight by about lr per step), "
                            f"got {self.lr}")
        if self.lr is not None and self.lr < MIN_LR:
            raise TrainConfigError("lr", f"must be at least {MIN_LR:g} (AdamW moves each weight by about lr per step: "
                                         f"less is lost in float32 rounding), got {self.lr}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise TrainConfigError("amp", f"must be auto|bf16|fp16|off, got {self.amp!r}")
        if self.num_workers < -1:
            raise TrainConfigError("num_workers", f"must be >= -1 (-1: auto), got {self.num_workers}")
        choices = {"fast": ("auto", "on", "off"), "activation_cache": ("auto", "on", "off"),
                   "compile": COMPILE_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise TrainConfigError(name, f"must be one of {'|'.join(allowed)}, got {getattr(self, name)!r}")
        self.prompt_buckets = tuple(sorted(int(b) for b in self.prompt_buckets))
        if not self.prompt_buckets or self.prompt_buckets[0] < 2:
            raise TrainConfigError("prompt_buckets", f"must be lengths >= 2, got {self.prompt_buckets}")

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
    """cuda if present, else Apple mps, else cpu (or exactly what was asked, if this machine has it)."""
    import torch

    problem = device_problem(name)
    if problem:
        raise ValueError(f"device {problem}")
    if name != "auto":
        dev = torch.device(name)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {name!r} asked for, but CUDA is not available")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ValueError(f"device {name!r} asked for, but this machine has "
                                 f"{torch.cuda.device_count()} CUDA device(s) (cuda:0..)")
        if dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                      and torch.backends.mps.is_available()):
            raise ValueError(f"device {name!r} asked for, but Apple's MPS is not available on this machine")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def plain_workers(cfg: TrainConfig) -> int:
    """DataLoader workers of the plain path and evaluation (-1, auto, is 0 there)."""
    return max(cfg.num_workers, 0)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for this device, or None for plain fp32."""
    import torch

    if amp == "off" or device.type != "cuda":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16
