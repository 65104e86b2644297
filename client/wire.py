"""A Flower message's content packed for the deployment wire, and back (common/packed.py is the format).

Both ends use this: the ClientApp (client/client_app.py) and the server's
messaging (server/messaging.py), so that they agree byte for byte. Light on
purpose (numpy and flwr only): the thin ClientApp imports it.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from client.arrays import to_array, to_numpy, to_record
from common.packed import ARRAYS, MANIFEST_RECORD, PACKED, PackError, pack_tensors, unpack_tensors

__all__ = ["PackError", "is_packed", "pack_content", "unpack_content"]


def is_packed(content: RecordDict) -> bool:
    return MANIFEST_RECORD in content.config_records


def pack_content(content: RecordDict) -> RecordDict:
    """`content` with its `arrays` record as one uint8 Array and a manifest (unchanged if there is none)."""
    if ARRAYS not in content.array_records or is_packed(content):
        return content
    buffer, manifest = pack_tensors({k: to_numpy(a) for k, a in content.array_records[ARRAYS].items()})
    out = RecordDict({k: v for k, v in content.items() if k != ARRAYS})
    out[ARRAYS] = ArrayRecord({PACKED: to_array(buffer)})
    out[MANIFEST_RECORD] = ConfigRecord({"manifest": manifest})
    return out


def unpack_content(content: RecordDict) -> RecordDict:
    """`content` with the ordinary per-tensor `arrays` record back (unchanged if it is not packed)."""
    if not is_packed(content):
        return content
    try:
        manifest = str(content.config_records[MANIFEST_RECORD]["manifest"])
        record = content.array_records[ARRAYS]
        if list(record.keys()) != [PACKED]:
            raise PackError("packed record must hold exactly one array")
        buffer = to_numpy(record[PACKED])
    except PackError:
        raise
    except Exception as err:  # noqa: BLE001 - missing records, undecodable bytes
        raise PackError(f"packed payload unreadable ({type(err).__name__})") from err
    out = RecordDict({k: v for k, v in content.items() if k not in (ARRAYS, MANIFEST_RECORD)})
    out[ARRAYS] = to_record(unpack_tensors(buffer, manifest))
    return out
