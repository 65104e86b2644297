"""The thin ClientApp's half of the local channel: hand a message to the site worker, return its reply.

Imports the standard library and flwr only (what `flwr-clientapp` has loaded anyway):
a forwarded message costs no torch/transformers/MONAI import. If the worker
cannot be reached or fails, the reply says so in a short public reason (the
same shape as a site's own refusal: `status.error` + `site.name`), so the
server records it and the round goes on with the other sites.
"""

from __future__ import annotations

import os
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.worker_protocol import (HANDLE, OK, REC_SITE, REC_STATUS, ProtocolError, WorkerNotRunning, call, decode,
                                    encode, stamp)

# A message can legitimately take long (a big site's epochs); the round's own
# timeout on the server bounds it. This only catches a worker that vanished:
# long enough for `fedvlsm site start` to restart a dead worker (its imports
# took 5-20 s on a loaded 2-core machine), so a message arriving meanwhile is
# served instead of refused. A worker that is gone for good takes its
# SuperNode (and this process) down with it.
CONNECT_TIMEOUT_S = 30.0


def forward(address: str, msg: Message, context: Context) -> Message:
    """Send `msg` (and the SuperNode's context) to the worker at `address`; its reply, or an error reply."""
    start, t_start = time.perf_counter(), time.time()
    try:
        status, data = call(address, HANDLE, encode(msg, context), connect_timeout=CONNECT_TIMEOUT_S)
    except WorkerNotRunning:
        return error_reply(msg, context, "worker: the site worker is not running (no answer on its socket)")
    except (ProtocolError, OSError):  # e.g. the worker was killed while it handled this message
        return error_reply(msg, context, "worker: the site worker failed this message (connection lost)")
    if status != OK:  # the worker's own short reason (it could not decode the message)
        reason = bytes(data).decode("utf-8", "replace")[:200]
        return error_reply(msg, context, f"worker: the site worker refused this message ({reason})")
    try:
        reply, new_context = decode(data)
    except Exception as err:  # noqa: BLE001 - a garbled reply fails this message, not the SuperNode
        return error_reply(msg, context, f"worker: the site worker's reply is unreadable ({type(err).__name__})")
    # What the handler changed in the node's per-run state must reach the SuperNode.
    context.state = new_context.state
    # Timestamps (UNIX seconds) for the round's timeline (server/messaging.py); the worker adds its own.
    stamp(reply, forward_seconds=time.perf_counter() - start, t_forward_start=t_start, t_forward_end=time.time())
    started = process_start_time()
    if started is not None:
        stamp(reply, t_clientapp_start=started)
    return reply


def process_start_time() -> float | None:
    """When this (flwr-clientapp) process was created, UNIX seconds (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, clock ticks after boot
        with open("/proc/stat") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def error_reply(msg: Message, context: Context, reason: str) -> Message:
    name = str(context.node_config.get("site-name", "") or f"node-{context.node_id}")
    return Message(RecordDict({REC_STATUS: ConfigRecord({"error": reason}), REC_SITE: ConfigRecord({"name": name})}),
                   reply_to=msg)
