"""Client-side update clipping for client-level DP (``dp = "client"``, ``dp-clipping = "client"``).

Register per handler, never globally (a global mod turns every evaluate
reply into an error)::

    @app.train(mods=[fp32_fixedclipping_mod])
    def train(msg, context): ...

Same contract as Flower's ``fixedclipping_mod`` (reads ``clipping_norm``
from the message's ConfigRecord, which DifferentialPrivacyClientSideFixedClipping
puts there; clips reply - received; the reply keeps its keys and dtype),
but computed in fp32/float64 and checked after the wire encoding, so an
fp16 update of norm 600 arrives clipped to C instead of zeroed.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message
from flwr.common.constant import ErrorCode

from common.privacy import clip_for_wire

KEY_CLIPPING_NORM = "clipping_norm"  # flwr.supercore.differential_privacy.KEY_CLIPPING_NORM


def _error(msg: Message, reason: str) -> Message:
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


def fp32_fixedclipping_mod(msg: Message, ctxt: Context, call_next) -> Message:
    if len(msg.content.array_records) != 1 or len(msg.content.config_records) != 1:
        return _error(msg, "fp32_fixedclipping_mod expects exactly one ArrayRecord and one ConfigRecord")
    config = next(iter(msg.content.config_records.values()))
    if KEY_CLIPPING_NORM not in config:
        return _error(msg, f"fp32_fixedclipping_mod needs '{KEY_CLIPPING_NORM}' in the ConfigRecord "
                           "(the server must use dp = 'client' with dp-clipping = 'client')")
    clip = float(config[KEY_CLIPPING_NORM])
    received = {k: np.array(a.numpy(), copy=True) for k, a in next(iter(msg.content.array_records.values())).items()}

    out = call_next(msg, ctxt)
    if out.has_error():
        return out
    if len(out.content.array_records) != 1:
        return _error(msg, "fp32_fixedclipping_mod expects exactly one ArrayRecord in the reply")
    key, record = next(iter(out.content.array_records.items()))
    reply = {k: a.numpy() for k, a in record.items()}
    if set(reply) != set(received):
        return _error(msg, "fp32_fixedclipping_mod: reply tensor names differ from the received ones")
    dtypes = {a.dtype for a in reply.values()}
    if len(dtypes) != 1:
        return _error(msg, f"fp32_fixedclipping_mod: mixed reply dtypes {sorted(map(str, dtypes))}")
    clipped = clip_for_wire(received, reply, clip, dtypes.pop())
    out.content[key] = ArrayRecord({k: Array(np.ascontiguousarray(clipped[k])) for k in record.keys()})
    return out
