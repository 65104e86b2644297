"""numpy <-> Flower `Array`, with the same bytes as Flower's own conversions, made faster.

Flower serialises each tensor with ``np.save`` and reads it back with
``np.load``, which parses the ``.npy`` header (``ast.literal_eval``) every
time: 30-70 us per tensor. An adapter is 28 tensors, so a round on the
server (10 replies checked, 10 records for the strategy, the new global)
and every site message pay it hundreds of times, and it showed in the
round overhead (bench/round_overhead.py). Headers repeat (same names,
shapes and dtypes every round), so here each distinct header is built or
parsed once per process (numpy's own code does it) and the data is a plain
byte copy. `to_array(x).data` equals `Array(x).data` byte for byte, and
`to_numpy(a)` equals `a.numpy()` (tests/test_packed_wire.py).

Light on purpose (numpy and flwr only): the thin ClientApp imports it.
"""

from __future__ import annotations

import functools
import io
import struct

import numpy as np
from flwr.app import Array, ArrayRecord

__all__ = ["to_array", "to_numpy", "to_record"]

_MAGIC = b"\x93NUMPY"
_NUMPY_STYPE = "numpy.ndarray"


def to_array(x: np.ndarray) -> Array:
    """`flwr.app.Array(x)` (same fields, same bytes), without np.save's per-call header work."""
    x = np.asarray(x)
    if x.dtype.hasobject or (x.flags.f_contiguous and not x.flags.c_contiguous):
        return Array(x)  # object dtypes (Flower refuses them) and Fortran order (np.save keeps it)
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)  # np.save writes any other layout in C order too
    header = _header(x.dtype, x.shape)
    return Array(dtype=str(x.dtype), shape=tuple(int(n) for n in x.shape), stype=_NUMPY_STYPE,
                 data=header + x.tobytes())


@functools.lru_cache(maxsize=1024)
def _header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """np.save's header for a C-ordered array of `dtype` and `shape`, made by np.save itself."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(shape, dtype=dtype), allow_pickle=False)
    data = buffer.getvalue()
    return data[: len(data) - int(np.prod(shape)) * dtype.itemsize]


@functools.lru_cache(maxsize=1024)
def _parsed(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    """(dtype, shape, fortran_order) of a .npy header, by numpy's own parser (no pickles)."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(stream)
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    return dtype, tuple(shape), bool(fortran)


def to_numpy(array: Array) -> np.ndarray:
    """`array.numpy()` (a writable array equal to it), parsing each distinct header once per process."""
    data = array.data
    if array.stype != _NUMPY_STYPE or not data.startswith(_MAGIC) or len(data) < 10:
        return array.numpy()  # Flower's own errors for anything unusual
    major = data[6]
    if major == 1:
        end = 10 + struct.unpack("<H", data[8:10])[0]
    elif major == 2 and len(data) >= 12:
        end = 12 + struct.unpack("<I", data[8:12])[0]
    else:
        return array.numpy()
    dtype, shape, fortran = _parsed(data[:end])
    count = int(np.prod(shape)) if shape else 1
    if len(data) - end != count * dtype.itemsize:
        return array.numpy()  # truncated or padded: let np.load say so
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=end)
    return flat.reshape(shape, order="F" if fortran else "C").copy(order="K")


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of `arrays` (same order), through `to_array`."""
    return ArrayRecord({k: to_array(v) for k, v in arrays.items()})
