"""Send a round's messages and collect the replies, with a short reply poll and per-message timestamps.

Flower 1.42's deployment grid (`HttpGrid.send_and_receive`) pushes the
messages, then pulls replies and sleeps a fixed **3 s** between pulls
(flwr/superlink/grid/http_grid.py). A reply that reaches the SuperLink just
after a pull waits up to 3 s before the ServerApp sees it, and a fedvlsm
round has two such waits (train, then evaluate): about 3 s per round on
average, for nothing. `push` + `collect` here do the same push and pull
through the Grid's public `push_messages`/`pull_messages` and poll every
`REPLY_POLL_SECONDS` (0.25 s; `$FEDVLSM_REPLY_POLL_SECONDS` to change it, 3
reproduces Flower's). Flower's simulation grid (`InMemoryGrid`) sleeps 0.1 s
between pulls, against rounds of well under a second on `arch:tiny`
(bench/round_overhead.py: a reply finished at 0.30 s was seen at 0.40 s); its
pulls are in-memory, so it is polled every `SIMULATION_POLL_SECONDS` (0.02 s).
Other grids (the tests' in-process grids) keep their own `send_and_receive`.

They are two calls, so that the round loop can have two phases' messages
on their way at once (pipelined rounds in deployment, server/server_app.py
`pushes_ahead`).

In deployment the adapter also travels as ONE Array per message
(common/packed.py, client/wire.py): Flower moves every Array as its own object with its own
HTTP request per hop, and 28 tensors cost seconds per round on a loaded
host. Replies are unpacked here, before any check sees them.

Each reply's MetricRecord `metrics` gets two timestamps (UNIX seconds) of
this process: `t-sent` (before the push) and `t-received` (the pull that
returned it). With the site's own (`t-clientapp-start`, `t-forward-start`,
`t-handler-start`, ...) they show where a round's time goes
(bench/deployment_rounds.sh prints the breakdown).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, RecordDict

from common.packed import ARRAYS, MANIFEST_RECORD

REPLY_POLL_SECONDS = 0.25
SIMULATION_POLL_SECONDS = 0.02
ENV_POLL = "FEDVLSM_REPLY_POLL_SECONDS"


def reply_poll_seconds() -> float:
    raw = os.environ.get(ENV_POLL, "")
    try:
        value = float(raw) if raw else REPLY_POLL_SECONDS
    except ValueError:
        return REPLY_POLL_SECONDS
    return min(max(value, 0.01), 10.0)


def _is_deployment_grid(grid) -> bool:
    from flwr.superlink.grid import HttpGrid

    return isinstance(grid, HttpGrid)


def _is_simulation_grid(grid) -> bool:
    from flwr.superlink.grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


@dataclass
class Pushed:
    """Messages on their way: what `push` sent (or, on a grid without push/pull, will send at `collect`)."""

    messages: list[Message]
    ids: set[str] = field(default_factory=set)  # ids of the pushed messages (deployment and simulation grids)
    sent: float = 0.0  # UNIX time of the push
    mode: str = "grid"  # "deployment" | "simulation" | "grid" (the grid's own send_and_receive, at collect)


def can_push_ahead(grid) -> bool:
    """Whether messages pushed now wait their turn at each node (a deployment SuperNode takes one at a time).

    Not in simulation: Flower's simulation may run two messages for one node
    at once on different actors, and a site's state is not built for that.
    """
    return _is_deployment_grid(grid)


def push(grid, messages: Iterable[Message]) -> Pushed:
    """Send `messages` now (deployment: packed); their replies are taken with `collect`."""
    messages = list(messages)
    if _is_deployment_grid(grid):
        mode = "deployment"
        _pack(messages)
    elif _is_simulation_grid(grid):
        mode = "simulation"
    else:
        return Pushed(messages)
    sent = time.time()
    return Pushed(messages, {i for i in grid.push_messages(messages) if i}, sent, mode)


def collect(grid, pushed: Pushed, timeout: float) -> list[Message]:
    """Replies to `pushed` received within `timeout` seconds from now (a missing reply is simply absent)."""
    if pushed.mode == "grid":
        sent = time.time()
        replies = list(grid.send_and_receive(pushed.messages, timeout=timeout))
        _stamp(replies, sent, time.time())
        return replies
    deployment = pushed.mode == "deployment"
    poll = reply_poll_seconds() if deployment else SIMULATION_POLL_SECONDS
    pending = set(pushed.ids)
    end = time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        started = time.monotonic()
        got = list(grid.pull_messages(pending))
        if deployment:
            _unpack(got)
        _stamp(got, pushed.sent, time.time())
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        # Stop only after a pull that began at or after the deadline: one pull can block far past it
        # (Flower's HttpGrid retries the objects of a reply whose site died while uploading it, until
        # the upload session expires: 164 s measured), and replies that came in meanwhile count.
        if not pending or started >= end:
            break
        time.sleep(min(poll, max(0.0, end - time.monotonic())))
    return replies


def _pack(messages: list[Message]) -> None:
    """The adapter as one Array per message (client/wire.py); messages sharing a record share its packing."""
    from client.wire import pack_content

    done: dict[int, object] = {}
    for msg in messages:
        if ARRAYS not in msg.content.array_records:
            continue
        key = id(msg.content.array_records[ARRAYS])
        if key not in done:
            done[key] = pack_content(msg.content)
        packed = done[key]
        msg.content = RecordDict({**{k: v for k, v in msg.content.items() if k != ARRAYS},
                                  ARRAYS: packed[ARRAYS], MANIFEST_RECORD: packed[MANIFEST_RECORD]})


def _unpack(replies: list[Message]) -> None:
    """Per-tensor arrays back in every packed reply; an unreadable one becomes a failed reply (site named)."""
    from client.wire import PackError, is_packed, unpack_content

    for reply in replies:
        if not reply.has_content() or not is_packed(reply.content):
            continue
        try:
            reply.content = unpack_content(reply.content)
        except PackError as err:
            site = reply.content.config_records.get("site")
            reply.content = RecordDict({"status": ConfigRecord({"error": f"malformed reply: {err}"}),
                                        **({"site": site} if site is not None else {})})


def _stamp(replies: list[Message], sent: float, received: float) -> None:
    for reply in replies:
        if reply.has_content() and "metrics" in reply.content.metric_records:
            m = reply.content.metric_records["metrics"]
            m["t-sent"] = sent
            m["t-received"] = received


# Timestamps a reply may carry (UNIX seconds), in the order they happen; the round record keeps them per site.
TIMELINE_KEYS = ("t-sent", "t-clientapp-start", "t-dispatch-start", "t-forward-start", "t-handler-start", "t-handler-end",
                 "t-forward-end", "t-received")


def timeline(metrics) -> dict[str, float]:
    return {k: float(metrics[k]) for k in TIMELINE_KEYS if k in metrics}
