"""The local channel between a thin ClientApp (client/forwarder.py) and a site worker (client/worker.py).

Light on purpose: the standard library (and flwr, lazily) only, since the
ClientApp process imports it for every message.

- Transport: a Unix domain socket, `unix:<site-dir>/worker.sock` (the folder
  is 0700 and the socket 0600: only the site's own user can connect; nothing
  listens on a network interface), one request per connection. Plain
  sockets, not gRPC: creating a gRPC channel inside `flwr-clientapp` took
  71-78 ms per message (measured in a loopback deployment), connecting this
  socket 0.07 ms, and a fresh ClientApp process does it for every message.
- A request is `MAGIC`, one kind byte, an 8-byte big-endian length and the
  payload; a reply is the same with a status byte (`OK`, or `REFUSED` with a
  short UTF-8 reason) in place of the kind.
- `HANDLE`: payload = frame(message, context) where message and context are
  Flower's own protobufs (`flwr.common.serde.message_to_proto` /
  `context_to_proto`) serialised once; arrays travel inside them as Flower's
  bytes, so the only copies are the ones serialisation itself makes. The
  reply's context carries the state (`context.state`) the handler changed,
  which the forwarder copies back into the SuperNode's context.
- `INFO`: JSON (pid, messages served, bases held, start time): the
  launcher's readiness and liveness check.

A frame is: 8-byte big-endian length of part 1, part 1, part 2.
"""

from __future__ import annotations

import socket
import struct
import time

MAGIC = b"FVW1"  # fedvlsm worker protocol, version 1
HANDLE, INFO = b"H", b"I"  # request kinds
OK, REFUSED = b"\x00", b"\x01"  # reply statuses
_HEADER = struct.Struct(">4scQ")  # magic, kind or status, payload length
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


class ProtocolError(ValueError):
    """The peer sent something that is not this protocol (or stopped mid-frame)."""


class WorkerNotRunning(ConnectionError):
    """Nothing accepted a connection on the worker's socket within the time allowed."""


def send(sock: socket.socket, kind: bytes, payload: bytes | bytearray | memoryview) -> None:
    sock.sendall(_HEADER.pack(MAGIC, kind, len(payload)))
    sock.sendall(payload)


def receive(sock: socket.socket) -> tuple[bytes, bytearray]:
    """(kind or status byte, payload) of one frame; ProtocolError if the peer sent anything else."""
    magic, kind, n = _HEADER.unpack(_read(sock, _HEADER.size))
    if magic != MAGIC:
        raise ProtocolError("not a fedvlsm worker frame")
    return kind, _read(sock, n)


def _read(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ProtocolError("connection closed mid-frame")
        got += k
    return buf


def call(address: str, kind: bytes, payload: bytes, connect_timeout: float,
         timeout: float | None = None) -> tuple[bytes, bytearray]:
    """One request to the worker at `address`: (status, payload).

    Waits up to `connect_timeout` s for a worker to accept (one that is
    restarting); then WorkerNotRunning. `timeout` bounds the exchange itself
    (None: a message may legitimately train for long). A worker that dies
    mid-message closes the connection: ProtocolError (or OSError).
    """
    path = socket_path(address)
    deadline = time.monotonic() + connect_timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            sock.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError, socket.timeout) as err:
            sock.close()
            if time.monotonic() >= deadline:
                raise WorkerNotRunning("no worker accepts on the socket") from err
            time.sleep(0.05)
    with sock:
        sock.settimeout(timeout)
        send(sock, kind, payload)
        return receive(sock)


def socket_path(address: str) -> str:
    """The file system path of a `unix:<path>` address."""
    if not address.startswith("unix:"):
        raise ValueError(f"worker address must be unix:<path>, got {address!r}")
    return address.removeprefix("unix:")


def socket_address(path) -> str:
    """The worker address (`unix:<absolute path>`) of a socket at `path` (sockaddr_un allows about 107 bytes)."""
    from pathlib import Path

    p = str(Path(path).expanduser().resolve())
    if len(p.encode()) > 100:
        raise ValueError(f"worker socket path too long for a Unix socket ({len(p)} > 100 bytes): {p}; "
                         "use a shorter --site-dir or --socket")
    return f"unix:{p}"
