"""What crosses the network: adapter tensors <-> wire arrays, and their size.

The one place that decides what a site sends and receives:
- only adapter tensors (the model's trainable state), minus the parts a
  personalised run keeps at the site (``split_personal``);
- down (server -> site): the global adapter's weights, in fp32 or fp16
  (``to_wire``; fp16 also when uploads are int8, see ``downlink_dtype``);
- up (site -> server): the *update*, local adapter minus the global one the
  site received (``encode_update``), in fp32, fp16 or int8. The server adds
  the aggregated update to its fp32 global. Updates are small and centred
  on zero, which is what makes int8 work, and what privacy clipping bounds;
- int8: one symmetric scale per tensor (max |x| / 127), stochastic
  rounding (unbiased: E[q * scale] = x, so quantisation noise averages out
  over sites and rounds instead of biasing the update), seeded by the
  caller so a resumed run rounds exactly as an uninterrupted one; each
  tensor ``name`` travels as int8 with its scale in ``name@scale`` (float32,
  shape (1,)). Dequantised to fp32 before aggregation (``decode_update``);
- aggregation always works in fp32, so the wire dtype never accumulates
  rounding across sites or rounds;
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
# Upload (update) encodings: the wire dtypes plus int8 with a per-tensor scale.
UPDATE_DTYPES = ("fp32", "fp16", "int8")
SCALE_SUFFIX = "@scale"
INT8_MAX = 127
# np.save's header is padded to a multiple of 64 bytes; adapter tensors
# (short dtype + shape) need 128 at most.
WIRE_HEADER_BYTES_MAX = 128


class PayloadError(ValueError):
    """Arrays that cannot go on (or come off) the wire as they are."""


def cast(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``arr.astype(dtype)``, through torch for float16 <-> float32.

    Why: numpy converts float16 in software, and updates are small enough
    to be fp16 subnormals, which its conversion handles slowest: about 10 ms
    for a 266k-element update against 0.1 ms in torch (bench/round_overhead.py:
    9 ms of a 40 ms train message). Both round to nearest-even, so the bytes
    are the same (tests/test_fed_payload.py compares them).
    """
    dtype = np.dtype(dtype)
    if arr.dtype == dtype:
        return arr
    if {arr.dtype, dtype} == {np.dtype(np.float16), np.dtype(np.float32)}:
        src = np.ascontiguousarray(arr)
        # torch.from_numpy warns on read-only arrays (np.frombuffer views): copy those (rare, cheap).
        src = torch.from_numpy(src if src.flags.writeable else src.copy())
        return src.to(torch.float16 if dtype == np.float16 else torch.float32).numpy()
    return arr.astype(dtype)


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
    names = sorted(state)
    arrays = [_as_numpy(state[name]) for name in names]
    if names and all(a.dtype == np.float32 for a in arrays):
        # The usual case: all fp32. One cast and one finiteness check over the
        # whole adapter; each tensor is then a view of that one buffer (same bytes).
        flat, wire = _in_one_buffer(arrays, target)
        if _all_finite(flat):
            return dict(zip(names, wire, strict=True))
    out: dict[str, np.ndarray] = {}
    for name, arr in zip(names, arrays, strict=True):  # mixed dtypes, or a tensor to name in the error
        wire = np.ascontiguousarray(cast(arr, target))  # fp16 overflow becomes inf: reported just below
        if not _all_finite(wire):
            where = "overflows fp16 (|x| > 65504)" if np.isfinite(arr).all() else "holds NaN/inf"
            raise PayloadError(f"adapter tensor '{name}' {where}; use payload-dtype = 'fp32' or check training")
        out[name] = wire
    return out


def _all_finite(arr: np.ndarray) -> bool:
    """No inf/NaN in `arr`; for fp16 by its exponent bits (numpy and torch check fp16 ~10x slower)."""
    if arr.dtype == np.float16:
        return not bool(((np.ascontiguousarray(arr).view(np.uint16) & 0x7C00) == 0x7C00).any())
    return bool(np.isfinite(arr).all())


def _as_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    return value.detach().cpu().float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _in_one_buffer(arrays: list[np.ndarray], target: np.dtype) -> tuple[np.ndarray, list[np.ndarray]]:
    """`cast(a, target)` of each array, done as one cast of their concatenation: (buffer, views of it).

    An adapter is 28 small tensors: per-tensor conversions cost more in
    per-call overhead than in arithmetic (bench/round_overhead.py).
    """
    flat = cast(np.concatenate([a.reshape(-1) for a in arrays]), target)
    out, offset = [], 0
    for a in arrays:
        out.append(flat[offset: offset + a.size].reshape(a.shape))
        offset += a.size
    return flat, out


def from_wire(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Wire arrays -> float32 arrays (what aggregation and the model work with)."""
    for name, arr in arrays.items():
        if arr.dtype not in (np.float16, np.float32):
            raise PayloadError(f"wire tensor '{name}' has dtype {arr.dtype}; expected float16 or float32")
    return _all_fp32(arrays)


def _all_fp32(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`cast(a, float32)` of each (fp16/fp32) array; fp16 ones converted together, as views of one buffer."""
    out = {name: cast(arr, np.float32) for name, arr in arrays.items() if arr.dtype != np.float16}
    halves = [name for name, arr in arrays.items() if arr.dtype == np.float16]
    if halves:
        out.update(zip(halves, _in_one_buffer([arrays[n] for n in halves], np.dtype(np.float32))[1], strict=True))
    return {name: out[name] for name in arrays}


def downlink_dtype(payload_dtype: str) -> str:
    """What the global adapter travels in: the payload dtype, but weights never go int8."""
    return "fp16" if payload_dtype == "int8" else payload_dtype


def update_of(local: Mapping[str, torch.Tensor | np.ndarray], received: Mapping[str, np.ndarray | torch.Tensor]
              ) -> dict[str, np.ndarray]:
    """local - received, in fp32 (the update a site sends), for the names of `local`."""
    out = {}
    for name in sorted(local):
        a = local[name]
        b = received[name]
        a = a.detach().cpu().float().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float32)
        b = b.detach().cpu().float().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, np.float32)
        out[name] = (a.astype(np.float32, copy=False) - b.astype(np.float32, copy=False))
    return out


def encode_update(update: Mapping[str, np.ndarray], dtype: str, seed: int = 0) -> dict[str, np.ndarray]:
    """An fp32 update -> wire arrays (see the module docstring for int8's layout)."""
    if dtype not in UPDATE_DTYPES:
        raise PayloadError(f"payload dtype must be one of {UPDATE_DTYPES}, got {dtype!r}")
    if dtype != "int8":
        return to_wire(update, dtype)
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name in sorted(update):
        x = np.asarray(update[name], dtype=np.float32)
        if not np.isfinite(x).all():
            raise PayloadError(f"adapter update '{name}' holds NaN/inf; check training")
        peak = float(np.abs(x).max()) if x.size else 0.0
        # The scale travels as float32: a subnormal peak / 127 would underflow to 0 there
        # (and the server rejects a scale of 0), so it is at least float32's smallest normal.
        scale = max(peak / INT8_MAX, float(np.finfo(np.float32).tiny)) if peak > 0 else 1.0
        scaled = x / scale
        # Stochastic rounding: floor(v + u), u ~ U[0, 1): E[result] = v.
        q = np.floor(scaled + rng.random(x.shape, dtype=np.float32))
        # reshape: np.ascontiguousarray makes a 0-d array 1-d, and the `full` variant has a 0-d
        # tensor (CLIP's logit_scale) whose update the server then refused as misshaped.
        out[name] = np.ascontiguousarray(np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8)).reshape(x.shape)
        out[name + SCALE_SUFFIX] = np.array([scale], dtype=np.float32)
    return out


def decode_update(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Wire arrays of an update -> fp32 update by tensor name; PayloadError (short, no values) if malformed."""
    out: dict[str, np.ndarray] = {}
    floats: dict[str, np.ndarray] = {}  # fp16/fp32 tensors, converted together below
    scales = {k[: -len(SCALE_SUFFIX)]: v for k, v in arrays.items() if k.endswith(SCALE_SUFFIX)}
    for name, arr in arrays.items():
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in arrays:
                raise PayloadError(f"scale '{name}' without its tensor")
            continue
        if arr.dtype == np.int8:
            scale = scales.get(name)
            if scale is None or scale.shape != (1,) or scale.dtype != np.float32 or not np.isfinite(scale).all() \
                    or float(scale[0]) <= 0:
                raise PayloadError(f"int8 tensor '{name}' without a valid float32 scale")
            deq = arr.astype(np.float32)
            deq *= np.float32(scale[0])  # in place: `arr * scale` of a 0-d array is a numpy scalar, not an array
            out[name] = deq
        elif arr.dtype in (np.float16, np.float32):
            if name in scales:
                raise PayloadError(f"tensor '{name}' is {arr.dtype} but has an int8 scale")
            floats[name] = arr
        else:
            raise PayloadError(f"wire tensor '{name}' has dtype {arr.dtype}; expected float16, float32 or int8")
    out.update(_all_fp32(floats))
    return {name: out[name] for name in arrays if name in out}  # the wire's order, as before


def expected_update_bytes(num_parameters: int, num_tensors: int, dtype: str) -> int:
    """Tensor bytes of one update upload (int8: 1 byte per parameter + one float32 scale per tensor)."""
    if dtype == "int8":
        return int(num_parameters) + 4 * int(num_tensors)
    return expected_payload_bytes(num_parameters, dtype)


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
    # Which run of that name (server/run_records.py, RunRecords.run_id): kept by a resume, new for a
    # new run under a deleted one's name. Sites key their personal parts by it.
    RUN_ID = "run-id"
    # The run's whole FederationConfig (JSON). Sites build their settings from
    # it, never from their own launch's run_config: a resumed run's saved
    # config governs every participant.
    RUN_CONFIG = "fedvlsm-run-config"


class Action:
    """Message actions beyond Flower's default train/evaluate (message_type 'train.<action>')."""

    # Flower wants action names that are Python identifiers.
    LOCAL_ONLY = "local_only"  # train.local_only: a site-only adapter, reply with its test Dice
    FINAL = "final"  # evaluate.final: test Dice of base, global, personalised adapters
