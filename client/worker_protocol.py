"""The local channel between a thin ClientApp (client/forwarder.py) and a site worker (client/worker.py).

Light on purpose: grpc, numpy and flwr only (no torch), since the ClientApp
process imports it for every message.

- Transport: gRPC over a Unix domain socket, `unix:<site-dir>/worker.sock`
  (the folder is 0700 and the socket 0600: only the site's own user can
  connect; nothing listens on a network interface). No .proto codegen:
  generic bytes-in/bytes-out methods.
- `/fedvlsm.SiteWorker/Handle`: request = frame(message, context), reply =
  frame(reply message, context) where message and context are Flower's own
  protobufs (`flwr.common.serde.message_to_proto` / `context_to_proto`)
  serialised once; arrays travel inside them as Flower's bytes, so the only
  copies are the ones serialisation itself makes. The returned context
  carries the state (`context.state`) the handler changed, which the
  forwarder copies back into the SuperNode's context.
- `/fedvlsm.SiteWorker/Info`: JSON (pid, messages served, bases held,
  start time); the launcher's readiness and liveness check.

A frame is: 8-byte big-endian length of part 1, part 1, part 2.
"""

from __future__ import annotations

import struct

SERVICE = "fedvlsm.SiteWorker"
HANDLE = f"/{SERVICE}/Handle"
INFO = f"/{SERVICE}/Info"
# Adapter payloads ('full' variant) exceed gRPC's 4 MB default by far.
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
# Reply keys (the same strings as common.payload.Rec, which imports torch; tests check they agree).
REC_STATUS = "status"
REC_SITE = "site"
NODE_WORKER = "worker"  # node-config key: the worker's address, set by `fedvlsm site start`
ENV_WORKER = "FEDVLSM_WORKER"  # ...or this environment variable


def stamp(reply, **values: float) -> None:
    """Add numbers (the round timeline's timestamps, UNIX s) to a reply's `metrics` record, if it has one.

    Keyword names use underscores for the record's hyphens: t_handler_start -> "t-handler-start".
    """
    if reply.has_content() and "metrics" in reply.content.metric_records:
        m = reply.content.metric_records["metrics"]
        for key, value in values.items():
            m[key.replace("_", "-")] = value


def frame(first: bytes, second: bytes) -> bytes:
    return struct.pack(">Q", len(first)) + first + second


def unframe(data: bytes) -> tuple[bytes, bytes]:
    if len(data) < 8:
        raise ValueError("truncated frame")
    (n,) = struct.unpack(">Q", data[:8])
    if 8 + n > len(data):
        raise ValueError("truncated frame")
    view = memoryview(data)
    return bytes(view[8:8 + n]), bytes(view[8 + n:])


def encode(message, context) -> bytes:
    from flwr.common.serde import context_to_proto, message_to_proto

    return frame(message_to_proto(message).SerializeToString(), context_to_proto(context).SerializeToString())


def decode(data: bytes):
    from flwr.common.serde import context_from_proto, message_from_proto
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage

    m, c = unframe(data)
    pm, pc = ProtoMessage(), ProtoContext()
    pm.ParseFromString(m)
    pc.ParseFromString(c)
    return message_from_proto(pm), context_from_proto(pc)


def socket_address(path) -> str:
    """gRPC's name for a Unix socket at `path` (absolute; sockaddr_un allows about 107 bytes)."""
    from pathlib import Path

    p = str(Path(path).expanduser().resolve())
    if len(p.encode()) > 100:
        raise ValueError(f"worker socket path too long for a Unix socket ({len(p)} > 100 bytes): {p}; "
                         "use a shorter --site-dir or --socket")
    return f"unix:{p}"
