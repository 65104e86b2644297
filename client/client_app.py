"""ClientApp: a site's four message handlers, run here or forwarded to the site's warm worker.

- ``train``: global adapter in, local epochs, shared adapter tensors out.
- ``evaluate``: validation Dice of the global (and personalised) adapter.
- ``evaluate.final``: test Dice of frozen base, global, personalised adapters.
- ``train.local_only``: a site-only baseline adapter's test Dice.

Deployment (`fedvlsm site start`): the SuperNode's node config carries
``worker="unix:<site-dir>/worker.sock"``; each message is forwarded to that
long-lived site worker (client/worker.py), which keeps the frozen base, the
caches and the site state warm across rounds and runs. This module then
imports nothing heavy (no torch, transformers or MONAI: a fresh
`flwr-clientapp` process per message costs only Flower's own start-up).

Without a worker (simulation, tests, a plain `flower-supernode`), the same
handlers (client/handlers.py) run in this process, imported on first use.
"""

from __future__ import annotations

import logging
import os
import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.worker_protocol import ENV_WORKER, NODE_WORKER, stamp
from client.wire import PackError, is_packed, pack_content, unpack_content

app = ClientApp()


def worker_address(context: Context) -> str:
    """The site worker's address (node config `worker`, else $FEDVLSM_WORKER), or '' to run in-process."""
    return str(context.node_config.get(NODE_WORKER, "") or os.environ.get(ENV_WORKER, ""))


def dispatch(msg: Message, context: Context) -> Message:
    """Serve `msg`; whatever fails here becomes an error reply with a short public reason.

    Nothing may leave this function as an exception: Flower would put its text in the reply
    (`Error.reason`, "<class ...>:<'text'>") on its way to the SuperLink, and a simulation
    logs it in the server's console. A worker address that is not `unix:<path>` raised
    "worker address must be unix:<path>, got '/hospital/...'" through here.
    """
    try:
        return _packed_dispatch(msg, context)
    except Exception as err:  # noqa: BLE001 - the last net before Flower sends the text to the server
        return _failed(msg, context, err)


def _failed(msg: Message, context: Context, err: Exception) -> Message:
    """The error reply for a failure outside the handlers: the error's class only; the details stay here."""
    import traceback

    from flwr.common.logger import log

    from client.forwarder import error_reply
    from common.site_errors import public_reason

    reason = public_reason("clientapp", err)
    details = traceback.format_exc()
    try:
        from client.handlers import log_at_site
    except Exception:  # noqa: BLE001 - the handlers themselves cannot be imported: the console holds the details
        where: object = "this console"
    else:  # the site's log, where the reason says the details are (as the handlers' failures go)
        where = log_at_site(msg, context, f"[clientapp] {reason}\n{details}")
    # This process's console (the SuperNode's, or a simulation actor's) says where they went, or holds them.
    if where == "this console":
        log(logging.WARNING, "[fedvlsm site] %s\n%s", reason, details)
    else:
        log(logging.WARNING, "[fedvlsm site] %s (details: %s)", reason, where)
    return error_reply(msg, context, reason)


def _packed_dispatch(msg: Message, context: Context) -> Message:
    # In deployment the server packs the adapter into one Array (client/wire.py): unpack it for the
    # handlers, and pack the reply's tensors the same way (only then: a server that did not pack gets
    # the ordinary per-tensor reply).
    t_dispatch = time.time()
    packed = msg.has_content() and is_packed(msg.content)
    if packed:
        try:
            msg.content = unpack_content(msg.content)
        except PackError as err:
            from client.forwarder import error_reply

            return error_reply(msg, context, f"protocol: the message's packed adapter is unreadable ({err})")
    reply = _dispatch(msg, context)
    # When Flower handed this process the message (after its start-up, pull and FAB install).
    stamp(reply, t_dispatch_start=t_dispatch)
    if packed and reply.has_content():
        reply.content = pack_content(reply.content)
    return reply


def _dispatch(msg: Message, context: Context) -> Message:
    address = worker_address(context)
    if address:
        from client.forwarder import forward

        return forward(address, msg, context)
    from client.handlers import handle  # heavy: torch, transformers, MONAI

    t_start = time.time()
    reply = handle(msg, context)
    stamp(reply, t_handler_start=t_start, t_handler_end=time.time())  # as the worker does (client/worker.py)
    return reply


# String literals (common.payload.Action imports torch); tests check they agree.
app.train()(dispatch)
app.evaluate()(dispatch)
app.evaluate("final")(dispatch)
app.train("local_only")(dispatch)
