"""ServerApp: configure, run the rounds, record them. Thin over common/ and server/.

One round, top to bottom (``run_round``):
1. the strategy picks the sites and builds the train messages around the
   global adapter (fp32); we put the adapter on the wire in the payload
   dtype (fp16 halves the bytes) and note the bytes per site;
2. sites train and reply with their shared adapter tensors; we check each
   reply holds exactly the shared tensor names (personal parts must never
   arrive), count the bytes, and decode to fp32;
3. the strategy aggregates (in fp32), then evaluation messages collect each
   site's validation Dice of the new global (and personalised) adapter;
4. run_records writes the round's checkpoint and record, atomically.

Flower's ``Strategy.start`` is not used because a resumed run must restart
at round k+1 with its strategy state, and every round must be checkpointed
as soon as it ends; the loop below is the same sequence of strategy calls.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from datetime import UTC, datetime
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from common.adapter_io import adapter_config
from common.bases import load_base
from common.federation_config import ConfigError, FederationConfig
from common.payload import (
    Cfg,
    Rec,
    check_personal_prefixes,
    from_wire,
    payload_bytes,
    split_personal,
    to_wire,
)
from server.run_records import RunRecords
from server.strategies import build_strategy, restore_strategy_state, strategy_state

app = ServerApp()

# Keys a resumed run takes from the new launch instead of its saved config.json.
RESUME_OVERRIDABLE = ("rounds", "home", "round_timeout", "torch_threads", "min_sites", "compare")


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = FederationConfig.from_run_config(context.run_config)
    run_federation(grid, cfg)


def run_federation(grid: Grid, cfg: FederationConfig) -> dict[str, Any]:
    """The whole run: set-up, rounds (or the rest of them), final adapter, demo table."""
    simulation = is_simulation(grid)
    cfg.apply_threads()
    records, cfg, start_round = open_run(cfg)
    say(f"run directory: {records.run_dir}")
    say(f"run name: {cfg.run_name} | strategy {cfg.strategy} | adapter {cfg.adapter} | base {cfg.base} "
        f"| rounds {start_round}..{cfg.rounds} | payload {cfg.payload_dtype}")
    if simulation:
        # Only a simulation's server may see (and here, synthesize) the data.
        from simulations.demo import prepare_data

        say(f"simulation data: {prepare_data(cfg)} (partition '{cfg.partition}')")

    t = time.perf_counter()
    frozen = load_base(cfg.base)
    say(f"base '{cfg.base}' loaded in {time.perf_counter() - t:.2f}s on the server")
    model = cfg.initial_model(frozen)
    check_personal_prefixes(model.adapter_names(), cfg.personal)
    shared, personal = split_personal(model.adapter_state(), cfg.personal)
    counts = model.parameter_counts()
    say(f"adapter tensors: {len(shared)} shared, {len(personal)} personal; trainable parameters "
        f"{counts['trainable']:,} of {counts['total']:,}")
    global_arrays = {k: v.float().numpy() for k, v in shared.items()}
    meta = adapter_config(model, shared, extra={"personal": list(cfg.personal), "shared_only": bool(personal)})

    nodes = wait_for_sites(grid, cfg)
    if simulation:
        from simulations.demo import check_site_count

        check_site_count(cfg, len(nodes))
    strategy = build_strategy(cfg, len(nodes))
    if start_round > 1:
        checkpoint = records.load_checkpoint(start_round - 1)
        global_arrays = checkpoint.arrays
        restore_strategy_state(strategy, checkpoint.strategy_arrays, checkpoint.state["strategy"])
        say(f"resumed after round {start_round - 1} from {records.run_dir / 'checkpoints'}")

    for server_round in range(start_round, cfg.rounds + 1):
        global_arrays, record = run_round(grid, strategy, cfg, server_round, global_arrays, set(shared))
        arrays, state = strategy_state(strategy)
        records.save_checkpoint(server_round, global_arrays, meta, arrays, {"strategy": state})
        records.append_round(record)
        personalised = f" (personalised {record['dice_personal']:.4f})" if cfg.personal else ""
        say(f"round {server_round}/{cfg.rounds}: val Dice {record['dice']:.4f}{personalised} | "
            f"up {record['payload_bytes_up']:,} B, down {record['payload_bytes_down']:,} B | "
            f"{record['round_seconds']:.1f}s")

    rounds = records.read_rounds()
    summary = {
        "run_name": cfg.run_name,
        "rounds": len(rounds),
        "final_dice": rounds[-1]["dice"] if rounds else None,
        "final_dice_personal": rounds[-1]["dice_personal"] if rounds else None,
        "payload_bytes_up": sum(r["payload_bytes_up"] for r in rounds),
        "payload_bytes_down": sum(r["payload_bytes_down"] for r in rounds),
        "trainable_parameters": counts["trainable"],
        "personal_tensors_kept_at_sites": sorted(personal),
    }
    final = records.save_final(global_arrays, meta, summary)
    say(f"final adapter: {final / 'adapter'}")
    if cfg.compare:
        from simulations.demo import compare_and_report

        summary["comparison"] = compare_and_report(
            grid, cfg, frozen, global_arrays, records, nodes, pooled=simulation
        )
    return summary


def open_run(cfg: FederationConfig) -> tuple[RunRecords, FederationConfig, int]:
    """(records, config the run really uses, first round to run)."""
    if cfg.resume:
        records = RunRecords.open_existing(cfg.runs_dir, cfg.run_name)
        saved = FederationConfig.from_run_config(records.read_config())
        # The saved config rules what shapes results; the round count (to
        # extend a run) and purely operational keys come from this launch.
        cfg = saved.replace(resume=True, **{k: getattr(cfg, k) for k in RESUME_OVERRIDABLE})
        last = records.last_complete_round()
        records.rewind_to(last)
        records.write_config(cfg.replace(resume=False).to_run_config())
        if last >= cfg.rounds:
            say(f"run '{cfg.run_name}' already has {last} complete round(s) (rounds = {cfg.rounds})")
        return records, cfg, last + 1
    if not cfg.run_name:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        cfg = cfg.replace(run_name=f"{stamp}-{cfg.strategy}-{cfg.adapter}")
    records = RunRecords.create(cfg.runs_dir, cfg.run_name, cfg.to_run_config())
    return records, cfg, 1


def run_round(
    grid: Grid,
    strategy: Strategy,
    cfg: FederationConfig,
    server_round: int,
    global_arrays: dict[str, np.ndarray],
    shared_names: set[str],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One federated round; returns the new global adapter (fp32) and the round's record."""
    start = time.perf_counter()
    # Flower samples sites with the global `random` module: seed it per round
    # so that a resumed run samples the same sites as an uninterrupted one.
    random.seed(f"{cfg.seed}:{server_round}")
    config = ConfigRecord({Cfg.RUN_NAME: cfg.run_name})

    train_messages = list(strategy.configure_train(server_round, _record(global_arrays), config, grid))
    down = _put_on_wire(train_messages, cfg.payload_dtype)
    replies = list(grid.send_and_receive(train_messages, timeout=cfg.round_timeout))
    ok, failures = _split_replies(replies, server_round, "train")
    # A stable reply order makes float sums (and so resumed runs) reproducible.
    ok.sort(key=_site_name)
    sites = {_site_name(r): _train_row(r, shared_names, down) for r in ok}
    for reply in ok:
        wire = {k: a.numpy() for k, a in reply.content[Rec.ARRAYS].items()}
        reply.content[Rec.ARRAYS] = _record(from_wire(wire))
    aggregated, _ = strategy.aggregate_train(server_round, ok)
    if aggregated is None:
        raise RuntimeError(f"round {server_round}: no site replied with a usable update ({failures})")
    new_global = {k: np.asarray(a.numpy(), dtype=np.float32) for k, a in aggregated.items()}
    train_seconds = time.perf_counter() - start

    eval_messages = list(strategy.configure_evaluate(server_round, _record(new_global), config, grid))
    eval_down = _put_on_wire(eval_messages, cfg.payload_dtype)
    eval_replies, eval_failures = _split_replies(
        list(grid.send_and_receive(eval_messages, timeout=cfg.round_timeout)), server_round, "evaluate"
    )
    for reply in eval_replies:
        row = sites.setdefault(_site_name(reply), {"node_id": reply.metadata.src_node_id})
        m = reply.content[Rec.METRICS]
        row.update(val_dice=m["dice"], val_dice_personal=m["dice-personal"], val_loss=m["loss"],
                   val_examples=int(m["num-examples"]))
        row["payload_bytes_down"] = row.get("payload_bytes_down", 0) + eval_down.get(reply.metadata.src_node_id, 0)

    n_val = sum(int(r.content[Rec.METRICS]["num-examples"]) for r in eval_replies)

    def weighted(key: str) -> float:
        if not n_val:
            return float("nan")
        return sum(r.content[Rec.METRICS][key] * r.content[Rec.METRICS]["num-examples"] for r in eval_replies) / n_val

    record = {
        "round": server_round,
        "dice": weighted("dice"),
        "dice_personal": weighted("dice-personal"),
        "train_loss": _weighted_train_loss(sites),
        "sites": dict(sorted(sites.items())),
        "payload_bytes_up": sum(s.get("payload_bytes_up", 0) for s in sites.values()),
        "payload_bytes_down": sum(s.get("payload_bytes_down", 0) for s in sites.values()),
        "failures": failures + eval_failures,
        "train_seconds": train_seconds,
        "round_seconds": time.perf_counter() - start,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return new_global, record


# ----------------------------------------------------------------- helpers
def is_simulation(grid: Grid) -> bool:
    """Flower's simulation engine runs the ServerApp on an in-memory grid."""
    from flwr.superlink.grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid) or bool(getattr(grid, "fedvlsm_simulation", False))


def wait_for_sites(grid: Grid, cfg: FederationConfig, timeout: float = 600.0) -> list[int]:
    """Node ids once `min-sites` are connected (0: whoever is there once one is)."""
    need = max(1, cfg.min_sites)
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < need:
        if time.monotonic() > deadline:
            raise ConfigError(f"run config 'min-sites': {len(nodes)} of {need} site(s) connected after {timeout:.0f}s")
        time.sleep(1.0)
    say(f"{len(nodes)} site(s) connected")
    return nodes


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _put_on_wire(messages: list[Message], dtype: str) -> dict[int, int]:
    """Re-encode each message's adapter in the wire dtype; payload bytes per destination node."""
    sent: dict[int, int] = {}
    encoded: dict[int, tuple[ArrayRecord, int]] = {}
    for msg in messages:
        if Rec.ARRAYS not in msg.content:
            continue
        arrays = msg.content[Rec.ARRAYS]
        if id(arrays) not in encoded:  # strategies share one record across messages
            wire = to_wire({k: a.numpy() for k, a in arrays.items()}, dtype)
            encoded[id(arrays)] = (_record(wire), payload_bytes(wire))
        record, size = encoded[id(arrays)]
        msg.content = RecordDict({**{k: v for k, v in msg.content.items() if k != Rec.ARRAYS}, Rec.ARRAYS: record})
        sent[msg.metadata.dst_node_id] = size
    return sent


def _split_replies(replies: list[Message], server_round: int, phase: str) -> tuple[list[Message], list[str]]:
    ok, failures = [], []
    for reply in replies:
        if reply.has_error():
            reason = f"node {reply.metadata.src_node_id}: {reply.error.reason}"
            log(INFO, "round %s %s failed at %s", server_round, phase, reason)
            failures.append(f"{phase}: {reason}")
        else:
            ok.append(reply)
    return ok, failures


def _site_name(reply: Message) -> str:
    site = reply.content.config_records.get(Rec.SITE)
    return str(site["name"]) if site else f"node-{reply.metadata.src_node_id}"


def _train_row(reply: Message, shared_names: set[str], down: dict[int, int]) -> dict[str, Any]:
    """Per-site record of a train reply, after checking what crossed the network."""
    arrays = reply.content[Rec.ARRAYS]
    names = set(arrays.keys())
    if names != shared_names:
        raise RuntimeError(
            f"site {_site_name(reply)} sent tensors that are not the shared adapter: "
            f"unexpected {sorted(names - shared_names)[:5]}, missing {sorted(shared_names - names)[:5]}"
        )
    wire = {k: a.numpy() for k, a in arrays.items()}
    m = reply.content[Rec.METRICS]
    return {
        "node_id": reply.metadata.src_node_id,
        "num_examples": int(m["num-examples"]),
        "train_loss": m["train-loss"],
        "train_seconds": m["train-seconds"],
        "payload_bytes_up": payload_bytes(wire),
        "payload_bytes_down": down.get(reply.metadata.src_node_id, 0),
        "wire_dtype": str(next(iter(wire.values())).dtype) if wire else None,
        "tensors": len(names),
        "tensor_names_sha256": hashlib.sha256(json.dumps(sorted(names)).encode()).hexdigest()[:16],
        "base_loads": int(m["base-loads"]),
        "base_load_seconds": m["base-load-seconds"],
        "import_seconds": m["import-seconds"],
        "process_age_seconds": m["process-age-seconds"],
        "process_messages": int(m["process-messages"]),
        "handler_seconds": m["handler-seconds"],
    }


def _weighted_train_loss(sites: dict[str, dict[str, Any]]) -> float:
    rows = [s for s in sites.values() if "num_examples" in s]
    n = sum(s["num_examples"] for s in rows)
    return sum(s["train_loss"] * s["num_examples"] for s in rows) / n if n else float("nan")


def say(text: str) -> None:
    """Progress lines users must see (run dir, data dir, per-round Dice): flwr's log, INFO."""
    log(INFO, "[fedvlsm] %s", text)
