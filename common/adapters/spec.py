"""AdapterSpec: which adapter variant, with which sizes. Saved in adapter_config.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

INITS = ("paper", "identity")  # adapter initialisations (block.Adapter implements them)

FAMILIES = {
    # variant: (family, scopes)
    "shallow-v": ("shallow", ("v",)),
    "shallow-vl": ("shallow", ("v", "l")),
    "shallow-vlc": ("shallow", ("v", "l", "c")),
    "dense-v": ("dense", ("v",)),
    "dense-vl": ("dense", ("v", "l")),
    "dense-vlc": ("dense", ("v", "l", "c")),
    "decoder": ("baseline", ()),
    "full": ("baseline", ()),
    "lora": ("baseline", ()),
    "none": ("baseline", ()),
}
VARIANTS = tuple(FAMILIES)


@dataclass(frozen=True)
class AdapterSpec:
    """What to train on top of the frozen base.

    Dims follow the paper: shallow side taps r=512, dense in-block r=64,
    conditional-embedding adapter r=256 (both families).
    """

    variant: str = "dense-vl"
    init: str = "paper"
    shallow_dim: int = 512
    dense_dim: int = 64
    cond_dim: int = 256
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = field(default=("q_proj", "v_proj"))

    def __post_init__(self) -> None:
        if self.variant not in FAMILIES:
            raise ValueError(f"unknown adapter variant {self.variant!r}; choose one of: {', '.join(VARIANTS)}")
        if self.init not in INITS:
            raise ValueError(f"adapter init must be one of {INITS}, got {self.init!r}")
        # lora_alpha too: LoRA scales its update by alpha / rank, so 0 made a LoRA that changed
        # nothing and never trained (a zero gradient), without any error.
        for name in ("shallow_dim", "dense_dim", "cond_dim", "lora_rank", "lora_alpha"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        allowed = {"q_proj", "k_proj", "v_proj", "out_proj"}
        if not self.lora_targets or not set(self.lora_targets) <= allowed:
            raise ValueError(f"lora_targets must be a non-empty subset of {sorted(allowed)}, got {self.lora_targets}")

    @property
    def family(self) -> str:
        return FAMILIES[self.variant][0]

    @property
    def scopes(self) -> tuple[str, ...]:
        return FAMILIES[self.variant][1]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdapterSpec":
        """The spec `to_dict` wrote; ValueError naming any missing, unknown or wrong-typed field.

        Strict because defaults would be silent: a missing ``init`` read as "paper"
        changes the forward of an identity-init adapter with no shape to betray it.
        """
        if not isinstance(d, dict):
            raise ValueError(f"adapter spec must be a JSON object, got {type(d).__name__}")
        fields = cls.__dataclass_fields__
        missing, unknown = sorted(set(fields) - set(d)), sorted(set(d) - set(fields))
        if missing or unknown:
            raise ValueError("adapter spec " + "; ".join(
                ([f"lacks {', '.join(missing)}"] if missing else []) + ([f"has unknown {', '.join(unknown)}"] if unknown else [])))
        for name in fields:
            value = d[name]
            if name in ("variant", "init"):
                ok = isinstance(value, str)
            elif name == "lora_targets":
                ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
            else:  # the sizes; bool is an int in Python, never a size
                ok = isinstance(value, int) and not isinstance(value, bool)
            if not ok:
                raise ValueError(f"adapter spec field {name} has the wrong type: {value!r}")
        return cls(**{**d, "lora_targets": tuple(d["lora_targets"])})
