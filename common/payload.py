"""What crosses the network: adapter tensors <-> wire arrays, and their size.

The one place that decides what a site sends and receives:
- only adapter tensors (the model's trainable state), minus the parts a
  personalised run keeps at the site (``split_personal``);
- in the wire dtype (fp32 or fp16); aggregation always works in fp32
  (``from_wire``), so fp16 only halves the bytes on the wire and never
  accumulates rounding across sites or rounds;
- payload size = number of parameters x wire dtype size
  (``payload_bytes``); Flower's npy serialisation adds a small header per
  tensor on top (``WIRE_HEADER_BYTES_MAX``).

Plain numpy/torch; the Flower shells wrap these arrays in ArrayRecords.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

WIRE_DTYPES: dict[str, np.dtype] = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16)}
# np.save's header is padded to a multiple of 64 bytes; adapter tensors
# (short dtype + shape) need 128 at most.
WIRE_HEADER_BYTES_MAX = 128


class PayloadError(ValueError):
    """Arrays that cannot go on (or come off) the wire as they are."""


def wire_dtype(name: str) -> np.dtype:
    if name not in WIRE_DTYPES:
        raise PayloadError(f"payload dtype must be one of {tuple(WIRE_DTYPES)}, got {name!r}")
    return WIRE_DTYPES[name]


def split_personal(
    state: Mapping[str, torch.Tensor | np.ndarray], personal_prefixes: Iterable[str]
) -> tuple[dict, dict]:
    """(shared, personal): tensors whose name starts with a personal prefix stay at the site."""
    prefixes = tuple(personal_prefixes)
    shared = {k: v for k, v in state.items() if not k.startswith(prefixes)} if prefixes else dict(state)
    personal = {k: v for k, v in state.items() if k not in shared}
    return shared, personal


def check_personal_prefixes(names: Iterable[str], personal_prefixes: Iterable[str]) -> None:
    """Refuse prefixes that match nothing or everything: both are certainly typos."""
    names = list(names)
    for prefix in personal_prefixes:
        if not any(n.startswith(prefix) for n in names):
            sample = ", ".join(sorted({n.rsplit(".", 3)[0] for n in names})[:6])
            raise PayloadError(
                f"run config 'personal': prefix {prefix!r} matches no adapter tensor (tensor names look like: {sample})"
            )
    shared, _ = split_personal(dict.fromkeys(names, 0), personal_prefixes)
    if names and not shared:
        raise PayloadError("run config 'personal': every adapter tensor is personal, nothing would be federated")


def to_wire(state: Mapping[str, torch.Tensor | np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Adapter state -> contiguous numpy arrays in the wire dtype, in a stable (sorted) order."""
    target = wire_dtype(dtype)
    out: dict[str, np.ndarray] = {}
    for name in sorted(state):
        value = state[name]
        arr = value.detach().cpu().float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        with np.errstate(over="ignore"):  # overflow is detected and reported just below
            wire = np.ascontiguousarray(arr.astype(target, copy=False))
        if not np.isfinite(wire).all():
            where = "overflows fp16 (|x| > 65504)" if np.isfinite(arr).all() else "holds NaN/inf"
            raise PayloadError(f"adapter tensor '{name}' {where}; use payload-dtype = 'fp32' or check training")
        out[name] = wire
    return out


def from_wire(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Wire arrays -> float32 arrays (what aggregation and the model work with)."""
    out = {}
    for name, arr in arrays.items():
        if arr.dtype not in (np.float16, np.float32):
            raise PayloadError(f"wire tensor '{name}' has dtype {arr.dtype}; expected float16 or float32")
        out[name] = arr.astype(np.float32, copy=False)
    return out


def to_torch(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in arrays.items()}


def payload_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Tensor bytes of a payload: sum of (elements x dtype size)."""
    return int(sum(a.nbytes for a in arrays.values()))


def expected_payload_bytes(num_parameters: int, dtype: str) -> int:
    return int(num_parameters) * wire_dtype(dtype).itemsize


class Rec:
    """Names of the records inside a Message's RecordDict (both directions)."""

    ARRAYS = "arrays"  # Flower strategies' default ArrayRecord key
    CONFIG = "config"  # Flower strategies' default ConfigRecord key
    METRICS = "metrics"
    SITE = "site"  # ConfigRecord with the site's name (metrics hold numbers only)
    # ConfigRecord {"error": short public reason} in a site's reply when it
    # could not serve the message (see common/site_errors.py).
    STATUS = "status"


class Cfg:
    """Keys of the per-message config the server sends."""

    ROUND = "server-round"  # set by Flower strategies
    PROX_MU = "proximal-mu"  # set by Flower's FedProx
    RUN_NAME = "run-name"
    # The run's whole FederationConfig (JSON). Sites build their settings from
    # it, never from their own launch's run_config: a resumed run's saved
    # config governs every participant.
    RUN_CONFIG = "fedvlsm-run-config"


class Action:
    """Message actions beyond Flower's default train/evaluate (message_type 'train.<action>')."""

    # Flower wants action names that are Python identifiers.
    LOCAL_ONLY = "local_only"  # train.local_only: a site-only adapter, reply with its test Dice
    FINAL = "final"  # evaluate.final: test Dice of base, global, personalised adapters
