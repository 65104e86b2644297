"""The thin ClientApp's half of the local channel: hand a message to the site worker, return its reply.

Imports grpc, numpy and flwr only (what `flwr-clientapp` has loaded anyway):
a forwarded message costs no torch/transformers/MONAI import. If the worker
cannot be reached or fails, the reply says so in a short public reason (the
same shape as a site's own refusal: `status.error` + `site.name`), so the
server records it and the round goes on with the other sites.
"""

from __future__ import annotations

import time

import grpc
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.worker_protocol import CHANNEL_OPTIONS, HANDLE, REC_SITE, REC_STATUS, decode, encode

# A message can legitimately take long (a big site's epochs); the round's own
# timeout on the server bounds it. This only catches a worker that vanished.
CONNECT_TIMEOUT_S = 10.0


def forward(address: str, msg: Message, context: Context) -> Message:
    """Send `msg` (and the SuperNode's context) to the worker at `address`; its reply, or an error reply."""
    start = time.perf_counter()
    try:
        with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            # Unix socket only (0600, in the site folder): no network exposure, no TLS needed.
            grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT_S)
            call = channel.unary_unary(HANDLE, request_serializer=None, response_deserializer=None)
            data = call(encode(msg, context), wait_for_ready=True)
    except grpc.FutureTimeoutError:
        return error_reply(msg, context, "worker: the site worker is not running (no answer on its socket)")
    except grpc.RpcError as err:
        code = err.code().name if hasattr(err, "code") else "UNKNOWN"
        return error_reply(msg, context, f"worker: the site worker failed this message (gRPC {code})")
    reply, new_context = decode(data)
    # What the handler changed in the node's per-run state must reach the SuperNode.
    context.state = new_context.state
    if reply.has_content() and "metrics" in reply.content.metric_records:
        reply.content.metric_records["metrics"]["forward-seconds"] = time.perf_counter() - start
    return reply


def error_reply(msg: Message, context: Context, reason: str) -> Message:
    name = str(context.node_config.get("site-name", "") or f"node-{context.node_id}")
    return Message(RecordDict({REC_STATUS: ConfigRecord({"error": reason}), REC_SITE: ConfigRecord({"name": name})}),
                   reply_to=msg)
