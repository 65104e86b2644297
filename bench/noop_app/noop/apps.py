"""No-op ServerApp and ClientApp (see pyproject.toml): Flower's own cost of a round."""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    need = int(rc["min-sites"])
    while len(nodes := sorted(grid.get_node_ids())) < need:
        time.sleep(1)
    arrays = ArrayRecord({"w": Array(np.zeros(int(rc["payload-floats"]), np.float16))})
    times = []
    for r in range(1, int(rc["rounds"]) + 1):
        start = time.perf_counter()
        for kind in ("train", "evaluate"):
            msgs = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": r})}),
                            dst_node_id=n, message_type=kind) for n in nodes]
            replies = exchange(grid, msgs, float(rc["reply-poll"]))
            assert all(not x.has_error() for x in replies), [x.error for x in replies if x.has_error()]
        times.append(time.perf_counter() - start)
        print(f"[noop] round {r}: {times[-1]:.2f}s", flush=True)
    if rc["out"]:
        with open(str(rc["out"]), "w") as fh:
            json.dump({"round_seconds": times, "sites": len(nodes)}, fh)


def exchange(grid: Grid, msgs: list[Message], poll: float) -> list[Message]:
    """poll = 0: Flower's own send_and_receive (a 3 s reply poll); else push + pull every `poll` s,
    exactly what fedvlsm's server/messaging.py does."""
    if poll <= 0:
        return list(grid.send_and_receive(msgs, timeout=600))
    pending = {i for i in grid.push_messages(msgs) if i}
    end, out = time.monotonic() + 600, []
    while pending and time.monotonic() < end:
        got = list(grid.pull_messages(pending))
        out += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if pending:
            time.sleep(poll)
    return out


@client.train()
def train(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 1})}),
                   reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)
