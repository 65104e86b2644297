"""No-op ServerApp and ClientApp (see pyproject.toml): Flower's own cost of a round."""

from __future__ import annotations

import json
import os
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
    poll, rounds = float(rc["reply-poll"]), int(rc["rounds"])
    # pipeline (needs reply-poll > 0): round r+1's train messages go out with round r's evaluate
    # messages, as fedvlsm's `pipeline-rounds` does in deployment.
    pipeline = bool(rc["pipeline"]) and poll > 0

    def messages(kind: str, r: int) -> list[Message]:
        return [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": r})}),
                        dst_node_id=n, message_type=kind) for n in nodes]

    times, timelines, ahead = [], [], None
    for r in range(1, rounds + 1):
        start = time.perf_counter()
        timelines.append({})
        for kind in ("train", "evaluate"):
            if kind == "train" and ahead is not None:
                replies = collect(grid, *ahead, poll)
            elif kind == "evaluate" and pipeline:
                pushed = push(grid, messages(kind, r))
                ahead = push(grid, messages("train", r + 1)) if r < rounds else None
                replies = collect(grid, *pushed, poll)
            else:
                replies = exchange(grid, messages(kind, r), poll)
            assert all(not x.has_error() for x in replies), [x.error for x in replies if x.has_error()]
            # The same timestamps fedvlsm's round records keep (server/messaging.py), per node.
            timelines[-1][kind] = {str(x.metadata.src_node_id): {k: float(v) for k, v in x.content["metrics"].items()
                                                                  if k.startswith("t-")} for x in replies}
        times.append(time.perf_counter() - start)
        print(f"[noop] round {r}: {times[-1]:.2f}s", flush=True)
    if rc["out"]:
        with open(str(rc["out"]), "w") as fh:
            json.dump({"round_seconds": times, "sites": len(nodes), "timelines": timelines}, fh)


def exchange(grid: Grid, msgs: list[Message], poll: float) -> list[Message]:
    """poll = 0: Flower's own send_and_receive (a 3 s reply poll in deployment, 0.1 s in simulation);
    else push, then pull every `poll` s, exactly what fedvlsm's server/messaging.py does."""
    sent = time.time()
    if poll <= 0:
        out = list(grid.send_and_receive(msgs, timeout=600))
        for m in out:  # Flower's send_and_receive: only the end of the exchange is known
            m.content["metrics"]["t-sent"], m.content["metrics"]["t-received"] = sent, time.time()
        return out
    return collect(grid, *push(grid, msgs), poll)


def push(grid: Grid, msgs: list[Message]) -> tuple[set[str], float]:
    sent = time.time()
    return {i for i in grid.push_messages(msgs) if i}, sent


def collect(grid: Grid, pending: set[str], sent: float, poll: float) -> list[Message]:
    """Pull the replies to `pending` every `poll` s (up to 600 s), stamped with push and pull times."""
    pending = set(pending)
    end, out = time.monotonic() + 600, []
    while pending and time.monotonic() < end:
        got = list(grid.pull_messages(pending))
        for m in got:
            m.content["metrics"]["t-sent"], m.content["metrics"]["t-received"] = sent, time.time()
        out += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if pending:
            time.sleep(poll)
    return out


def stamps(t_start: float) -> MetricRecord:
    """What fedvlsm's sites report for the round timeline: process start, handler start and end (UNIX s)."""
    return MetricRecord({"num-examples": 1, "t-clientapp-start": process_start_time(), "t-handler-start": t_start,
                         "t-handler-end": time.time()})


def process_start_time() -> float:
    """When this flwr-clientapp process was created (Linux /proc), as fedvlsm's client/forwarder.py does."""
    with open("/proc/self/stat") as fh:
        ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as fh:
        boot = next(int(line.split()[1]) for line in fh if line.startswith("btime "))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


@client.train()
def train(msg: Message, context: Context) -> Message:
    t = time.time()
    # A fresh array of the received size, as a site's update is. Not the received one echoed back:
    # Flower addresses objects by content hash, so an echo is never uploaded (the SuperLink has it),
    # and the no-op round would skip the reply's whole upload path (ClientApp -> SuperNode -> SuperLink).
    # One random value filling the array: unique content per message at almost no cost (0.1 ms).
    w = msg.content["arrays"]["w"].numpy()
    fresh = np.full(w.size, np.random.default_rng().standard_normal(), dtype=w.dtype)
    return Message(RecordDict({"arrays": ArrayRecord({"w": Array(fresh)}), "metrics": stamps(t)}), reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"metrics": stamps(time.time())}), reply_to=msg)
