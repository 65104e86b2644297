"""The adapter as ONE buffer on the deployment wire: tensors <-> (uint8 buffer, manifest). numpy only.

Flower 1.42 sends a Message as a tree of objects, and every Array (and its
chunks) is its own object, pushed and pulled with its own HTTP request on
each hop (ServerApp -> SuperLink -> SuperNode -> ClientApp, and back). An
adapter of 28 tensors therefore cost about 60 requests per hop and message;
on a loaded 2-core loopback deployment the train reply's way back took 6.2 s
against 1.0 s for the evaluate reply (metrics only), and a no-op app sending
the same bytes as one Array was 7 s per round faster
(bench/results/deployment-rounds-3-sites.txt). So in deployment the server
(server/messaging.py) and the ClientApp (client/client_app.py) pack the
`arrays` ArrayRecord into one uint8 Array plus a manifest (name, dtype,
shape per tensor, in order) and unpack it on arrival; handlers, reply
checks and strategies only ever see the ordinary per-tensor ArrayRecord.
This module is the format (no Flower: the thin ClientApp imports it, and
`common` knows nothing of Flower); client/wire.py puts it into and takes it
out of a Flower message's records, for both ends.
A site packs its reply only if the message it got was packed, so a packed
server never meets an unpacking-unaware site silently (the site would reply
without the update's tensors, an excluded reply).

The manifest is checked on unpacking (names unique, numeric dtypes, sizes
adding up to the buffer exactly); a bad one raises PackError, which the
server turns into a failed reply.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np

ARRAYS = "arrays"  # = common.payload.Rec.ARRAYS (that module imports torch)
PACKED = "fedvlsm-packed"  # the one Array inside the `arrays` record
MANIFEST_RECORD = "fedvlsm-packed-manifest"  # ConfigRecord {"manifest": JSON [[name, dtype, shape], ...]}
_DTYPES = {"float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"}
MAX_TENSORS = 100_000


class PackError(ValueError):
    """A packed payload that cannot be unpacked (bad manifest or sizes)."""


def pack_tensors(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str]:
    """Tensors (in their order) -> one 1-D uint8 buffer and its JSON manifest [[name, dtype, shape], ...]."""
    manifest, parts = [], []
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        dtype = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        a = a.astype(dtype, copy=False)
        manifest.append([name, dtype.name, list(a.shape)])
        parts.append(a.reshape(-1).view(np.uint8))
    buffer = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return buffer, json.dumps(manifest, separators=(",", ":"))


def unpack_tensors(buffer: np.ndarray, manifest_json: str) -> dict[str, np.ndarray]:
    """The tensors back from `pack_tensors`' buffer and manifest; PackError (short, no values) if they disagree."""
    try:
        manifest = json.loads(manifest_json)
    except (TypeError, ValueError) as err:
        raise PackError(f"packed payload unreadable ({type(err).__name__})") from err
    if buffer.dtype != np.uint8 or buffer.ndim != 1:
        raise PackError("packed buffer must be 1-D uint8")
    if not isinstance(manifest, list) or len(manifest) > MAX_TENSORS:
        raise PackError("packed manifest must be a list of [name, dtype, shape]")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for entry in manifest:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                and entry[1] in _DTYPES and isinstance(entry[2], list)
                and all(type(d) is int and d >= 0 for d in entry[2])):  # not bool, a JSON true
            raise PackError("packed manifest entry malformed")
        name, dtype, shape = entry
        if name in out:
            raise PackError("packed manifest names a tensor twice")
        # Python ints: an int64 product wrapped around (dims 2**32 x 2**32 gave 0 bytes), passed the
        # size checks and failed in reshape with a ValueError the receivers do not catch.
        n = math.prod(shape) * np.dtype(dtype).itemsize
        if offset + n > buffer.size:
            raise PackError("packed manifest larger than its buffer")
        out[name] = buffer[offset:offset + n].view(np.dtype(dtype).newbyteorder("<")).reshape(shape).copy()
        offset += n
    if offset != buffer.size:
        raise PackError("packed buffer larger than its manifest")
    return out
