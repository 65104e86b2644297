"""ServerApp: configure, run the rounds, record them. Thin over common/ and server/.

One round, top to bottom (``run_round``):
1. the strategy picks the sites and builds the train messages around the
   global adapter (fp32); every message also carries the run's whole config
   (sites never use their own launch's settings), and we put the adapter on
   the wire in the payload dtype (fp16 halves the bytes);
2. sites train and reply with their shared adapter tensors, or with a short
   public reason why they could not (no paths or exception texts ever come
   back); we check each reply holds exactly the shared tensor names
   (personal parts must never arrive), count the bytes, decode to fp32;
3. the strategy aggregates the usable replies (in fp32), then evaluation
   messages collect each site's validation Dice of the new global (and
   personalised) adapter; a round no site could serve is recorded as skipped;
4. run_records writes the round's checkpoint and record, atomically, and
   the round's console line names every site that failed and why.

Flower's ``Strategy.start`` is not used because a resumed run must restart
at round k+1 with its strategy state, and every round must be checkpointed
as soon as it ends; the loop below is the same sequence of strategy calls.
This module holds no demo or simulation code: ``simulations/`` drives the
same loop with its own hooks (server/hooks.py).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from logging import INFO, WARNING
from typing import Any, Callable, NamedTuple, TextIO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from client.arrays import to_numpy, to_record
from common.adapter_io import adapter_config
from common.bases import load_base
from common.federation_config import RESUME_OVERRIDABLE, ConfigError, FederationConfig
from common.payload import (
    Cfg,
    SCALE_SUFFIX,
    PayloadError,
    Rec,
    check_personal_prefixes,
    decode_update,
    downlink_dtype,
    payload_bytes,
    split_personal,
    to_wire,
    wire_dtype,
)
from common.privacy import PrivacyReport, clip_update_fp32, update_norm
from server.flower_exit import FlowerExit
from server.hooks import RunHooks
from server.privacy import carry_privacy_journal, journal_release, server_budget_check, server_epsilon
from server.messaging import Pushed, can_push_ahead, collect, push, timeline
from server.run_records import Checkpoint, RunRecords, claim_run_name
from server.strategies import build_strategy, num_sampled_sites, restore_strategy_state, strategy_state
from server.write_behind import WriteBehind

app = ServerApp()

SIMULATED_SITES = "simulated_sites"  # run meta: a simulated run's site count (a resume must keep it)
BASE_FINGERPRINT = "base_fingerprint"  # run meta: the frozen base's weights (a resume must load the same)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = FederationConfig.from_run_config(context.run_config)
    run_federation(grid, cfg, given=launch_keys(grid))


def launch_keys(grid: Grid) -> set[str] | None:
    """The run-config keys this launch gave (`flwr run --run-config`), or None if Flower does not say.

    Flower fills every other key of the run config with pyproject's default, so a resume
    (`run-name='x' resume=true`) would otherwise take `rounds = 10`, `min-sites = 0`, ...
    from the defaults instead of the run's saved values.
    """
    try:
        return set(grid.run.override_config)
    except Exception:  # a grid without Flower's Run (tests' in-process grids): every key counts as given
        return None


def run_federation(grid: Grid, cfg: FederationConfig, hooks: RunHooks | None = None,
                   given: set[str] | None = None) -> dict[str, Any]:
    """The whole run: set-up, rounds (or the rest of them), final adapter; its status recorded.

    `given`: the run-config keys the launch set itself (None: all of them); on a resume only
    those of the keys a resume may change replace the run's saved values.
    """
    hooks = hooks or RunHooks()
    cfg.apply_threads()
    records, cfg, start_round, config_to_save, checkpoint, claim = open_run(cfg, given)
    # `flwr stop` of a simulated run never reaches this thread: Flower's exit records it (server/flower_exit.py)
    flower_exit = FlowerExit(records)
    try:  # the run name stays this process's until its status is written
        say(f"run directory: {records.run_dir}")
        if cfg.dashboard_port:
            start_dashboard(cfg)
        try:
            summary = _run(grid, cfg, hooks, records, start_round, config_to_save, checkpoint)
        except (KeyboardInterrupt, SystemExit):
            if records.changed:
                flower_exit.stopped()
            raise
        except Exception as err:
            if records.changed:
                flower_exit.end("failed", f"{type(err).__name__}: {err}")
            else:
                say("the resume failed before the run was changed: its records, status and final/ are as they were")
            raise
        flower_exit.end("finished", summary.get("ended_early") or "")  # why it ended early, if it did
        return summary
    finally:
        claim.close()


def _run(
    grid: Grid,
    cfg: FederationConfig,
    hooks: RunHooks,
    records: RunRecords,
    start_round: int,
    config_to_save: dict[str, Any] | None,
    checkpoint: Checkpoint | None,
) -> dict[str, Any]:
    say(f"run name: {cfg.run_name} | strategy {cfg.strategy} | adapter {cfg.adapter} | base {cfg.base} "
        f"| rounds {f'{start_round}..{cfg.rounds}' if start_round <= cfg.rounds else f'all {cfg.rounds} done'} "
        f"| payload {cfg.payload_dtype} | config {cfg.fingerprint()}")
    t = time.perf_counter()
    frozen = load_base(cfg.base)
    say(f"base '{cfg.base}' loaded in {time.perf_counter() - t:.2f}s on the server")
    model = cfg.initial_model(frozen)
    if cfg.resume:
        check_same_base(cfg, records.read_meta().get(BASE_FINGERPRINT), model.base_fingerprint)
    try:
        check_personal_prefixes(model.adapter_names(), cfg.personal)
    except PayloadError as err:  # a refused config (`fedvlsm simulate`: exit 2), not a failed run
        raise ConfigError(str(err)) from None
    shared, personal = split_personal(model.adapter_state(), cfg.personal)
    counts = model.parameter_counts()
    say(f"adapter tensors: {len(shared)} shared, {len(personal)} personal; trainable parameters "
        f"{counts['trainable']:,} of {counts['total']:,}")
    base_parameters = sum(p.numel() for p in frozen.model.parameters())  # the frozen base alone
    global_arrays = {k: v.float().numpy() for k, v in shared.items()}
    meta = adapter_config(model, shared, extra={"personal": list(cfg.personal), "shared_only": bool(personal)})

    simulation = is_simulation(grid)
    nodes = wait_for_sites(grid, cfg, simulation=simulation)
    if cfg.resume and simulation:  # a simulation's sites are its data partition: the same count, or other data
        before = records.read_meta().get(SIMULATED_SITES)
        if before is not None and before != len(nodes):
            raise ConfigError(f"run '{cfg.run_name}' was simulated with {before} sites, this simulation has "
                              f"{len(nodes)}: the partition (and the demo data) would differ; resume it with "
                              f"{before} sites (fedvlsm simulate: --num-sites {before}, or none)")
    records.set_meta({"trainable_parameters": counts["trainable"], "base_parameters": base_parameters,
                      BASE_FINGERPRINT: model.base_fingerprint,
                      **({SIMULATED_SITES: len(nodes)} if simulation else {})})
    hooks.before_rounds(grid, cfg, nodes)
    check_min_replies(cfg, len(nodes), simulation=simulation)
    strategy = build_strategy(cfg, len(nodes))
    if checkpoint is not None:  # read (and checked) by open_run, before anything of the run changed
        global_arrays = checkpoint.arrays
        restore_strategy_state(strategy, checkpoint.strategy_arrays, checkpoint.state["strategy"])
        say(f"resumed after round {start_round - 1} from {records.run_dir / 'checkpoints'}")
    if cfg.resume:  # everything is ready: only now is the run changed (rewound, `running`)
        records.continue_after(start_round - 1, rerun=start_round <= cfg.rounds)

    on_release: Callable[[int], None] | None = None
    if cfg.dp == "client":
        # A noised global that reached a site is a release, whether or not its round completes:
        # journal each one before it is sent, and count every one a crashed attempt sent.
        carried = carry_privacy_journal(strategy, records.run_dir)
        if carried:
            say(carried)
        on_release = functools.partial(journal_release, strategy, records.run_dir)

    names = SiteNames()
    run_id = records.run_id  # sites key this run's personal parts by it
    # What a resume continues from, read once from its records: the most DP-SGD steps each site has
    # reported (sample level), the last round each site trained with personal parts.
    recorded = records.read_rounds() if cfg.dp == "sample" or cfg.personal else []
    steps_seen = dp_steps_seen(recorded) if cfg.dp == "sample" else None
    personal_seen = personal_rounds_seen(recorded) if cfg.personal else None
    skipped_in_a_row = 0
    ended_early = ""
    ahead: TrainAhead | None = None  # the next round's train messages, already pushed (pipeline-rounds)
    writer = WriteBehind()  # each round's checkpoint and record, written while the next round runs
    round_end = time.perf_counter()
    try:
        for server_round in range(start_round, cfg.rounds + 1):
            if cfg.dp == "client":
                within, why = server_budget_check(strategy)
                if not within:  # client-level budget: end cleanly, before the round that would exceed it
                    ended_early = why
                    writer.wait()  # the last round's line first
                    say(f"stopping before round {server_round}: {why}")
                    break
            global_arrays, record, ahead = run_round(grid, strategy, cfg, server_round, global_arrays, set(shared),
                                                     names, ahead, since=round_end, on_release=on_release,
                                                     run_id=run_id, steps_seen=steps_seen,
                                                     personal_seen=personal_seen)
            # The next round's clock starts here: what the server does until
            # then (the strategy's state, the copies handed to the writer) is in its time.
            round_end = time.perf_counter()
            arrays, state = strategy_state(strategy)
            if config_to_save is not None:
                # A resumed run's config.json changes (its new round count) only
                # once it has really continued: a failed resume attempt leaves it as it was.
                records.write_config(config_to_save)
                config_to_save = None
            # The writer gets its own copies: the strategy and the next round go on with theirs.
            writer.submit(_write_round, records, server_round, {k: v.copy() for k, v in global_arrays.items()}, meta,
                          {k: np.array(v, copy=True) for k, v in arrays.items()},
                          copy.deepcopy({"strategy": state}), copy.deepcopy(record), round_line(record, cfg))
            if record["status"] == "skipped" and _all_out_of_budget(record):
                # Sample-level budgets: no site may train any more. Data is never
                # used past its budget; the run ends cleanly with what it has.
                ended_early = ("privacy budget: every site has spent its budget (the run's dp-epsilon-budget "
                               "or its own dp-site-budget)")
                writer.wait()  # this round's line first
                say(f"stopping after round {server_round}: {ended_early}")
                break
            skipped_in_a_row = skipped_in_a_row + 1 if record["status"] == "skipped" else 0
            if skipped_in_a_row >= cfg.max_skipped_rounds:
                raise RunFailed(f"{skipped_in_a_row} round(s) in a row had no usable site update "
                                f"(max-skipped-rounds = {cfg.max_skipped_rounds}); last failures: "
                                + "; ".join(f"{f['site']} ({f['reason']})" for f in record["failures"]))
    except BaseException:
        writer.close(quiet=True)  # what was handed over is written before the run's status says why it ended
        raise
    writer.close()

    rounds = records.read_rounds()
    done = [r for r in rounds if r.get("status", "ok") == "ok"]
    summary = {
        "run_name": cfg.run_name,
        "rounds": len(rounds),
        "rounds_skipped": len(rounds) - len(done),
        "final_dice": done[-1]["dice"] if done else None,
        "final_dice_personal": done[-1]["dice_personal"] if done else None,
        "payload_bytes_up": sum(r["payload_bytes_up"] for r in rounds),
        "payload_bytes_down": sum(r["payload_bytes_down"] for r in rounds),
        "trainable_parameters": counts["trainable"],
        "base_parameters": base_parameters,
        "personal_tensors_kept_at_sites": sorted(personal),
        "config_fingerprint": cfg.fingerprint(),
        "ended_early": ended_early,
    }
    final = records.save_final(global_arrays, meta, summary)
    say(f"final adapter: {final / 'adapter'}")
    extra = hooks.after_final(grid, cfg, frozen, global_arrays, records, nodes)
    if extra:
        summary.update(extra)
    return summary


def _write_round(records: RunRecords, server_round: int, arrays: dict[str, np.ndarray], meta: dict[str, Any],
                 strategy_arrays: dict[str, np.ndarray], state: dict[str, Any], record: dict[str, Any],
                 line: str) -> None:
    """A round's checkpoint, then its record (a resume takes the last round that has both), then its log line.

    The line comes last, so a round the log shows as done is one a resume continues after.
    """
    records.save_checkpoint(server_round, arrays, meta, strategy_arrays, state)
    records.append_round(record)
    say(line)


def _all_out_of_budget(record: dict[str, Any]) -> bool:
    """Every site that was asked to train refused for its privacy budget."""
    train = [f for f in record["failures"] if f["phase"] == "train"]
    return bool(train) and not record["sites"] and all(f["reason"].startswith("privacy budget:") for f in train)


class RunFailed(RuntimeError):
    """The run cannot usefully go on (e.g. no site could train for several rounds)."""


class OpenedRun(NamedTuple):
    records: RunRecords
    cfg: FederationConfig  # the config the run really uses (a resume's: the saved one)
    start_round: int  # the first round to run
    config_to_save: dict[str, Any] | None  # config.json to write once a round completes
    checkpoint: Checkpoint | None  # a resume's last complete round, to continue from
    claim: TextIO  # the claim on the run name: close it when the run has ended


def open_run(cfg: FederationConfig, given: set[str] | None = None) -> OpenedRun:
    """The run to run: a new one, or the one to resume, checked before anything of it changes.

    A name another server process is running now is refused (RunRecordsError) before anything is read
    or written: two runs at once never share a run folder."""
    cfg = cfg.named()
    claim = claim_run_name(cfg.runs_dir, cfg.run_name)
    try:
        return OpenedRun(*_open_claimed_run(cfg, given), claim)
    except BaseException:
        claim.close()
        raise


def _open_claimed_run(cfg: FederationConfig, given: set[str] | None
                      ) -> tuple[RunRecords, FederationConfig, int, dict[str, Any] | None, Checkpoint | None]:
    if cfg.resume:
        records = RunRecords.open_existing(cfg.runs_dir, cfg.run_name)
        saved = FederationConfig.from_run_config(records.read_config())
        # The saved config rules what shapes results; the round count (to
        # extend a run) and purely operational keys come from this launch.
        launch = cfg
        # `home` always: it is where this launch found the run. The others only if the launch set them.
        taken = [k for k in RESUME_OVERRIDABLE if k == "home" or given is None or k.replace("_", "-") in given]
        cfg = saved.replace(resume=True, **{k: getattr(launch, k) for k in taken})
        kept = saved.to_run_config()
        ignored = sorted(key for key, value in launch.to_run_config().items()
                         if _k(key) not in RESUME_OVERRIDABLE + ("resume",) and (given is None or key in given)
                         and kept.get(key) != value)
        if ignored:
            say("resume: the run's saved config governs every participant; this launch's values for "
                + ", ".join(ignored) + " are ignored")
        check_target_epsilon_kept(saved, cfg)
        last = records.last_complete_round()
        if cfg.rounds < last:  # the final stage (comparison epochs, personal parts) would not match the adapter
            raise ConfigError(f"run config 'rounds' = {cfg.rounds} but run '{cfg.run_name}' already has {last} "
                              f"complete rounds; resume with rounds >= {last}")
        # a damaged checkpoint is said now, before anything of the run is changed
        checkpoint = records.load_checkpoint(last) if last else None
        if last == cfg.rounds:
            say(f"run '{cfg.run_name}' already has {last} complete round(s) (rounds = {cfg.rounds})")
        new_config = cfg.replace(resume=False).to_run_config()
        return records, cfg, last + 1, (new_config if new_config != records.read_config() else None), checkpoint
    records = RunRecords.create(cfg.runs_dir, cfg.run_name, cfg.to_run_config())
    return records, cfg, 1, None, None


def check_same_base(cfg: FederationConfig, before: str | None, now: str) -> None:
    """Refuse to resume on other base weights than the run's rounds so far were trained on.

    The `base` key alone does not say: a relative folder resolved from another working directory (or
    a folder or hub model changed since) loaded other weights, and the run went on with config.json
    naming the same base and final/ naming the new one. A run recorded before this check: unchecked.
    """
    if before is not None and before != now:
        raise ConfigError(f"run config 'base': run '{cfg.run_name}' was trained on base weights with fingerprint "
                          f"{before}, but base '{cfg.base}' loads weights with fingerprint {now}; resume it with "
                          "the same base (a relative folder: from the same working directory)")


def check_target_epsilon_kept(saved: FederationConfig, resumed: FederationConfig) -> None:
    """Refuse to extend a run whose noise `dp-target-epsilon` calibrated for its planned rounds.

    Each site fixes z at its first round for `rounds x local-epochs`; more rounds ran on with that z
    and ended far above the target (8 became 15.7 going from 1 to 3 rounds) without a word.
    """
    if resumed.dp == "sample" and resumed.dp_target_epsilon > 0 and resumed.rounds > saved.rounds:
        raise ConfigError(f"run config 'rounds' = {resumed.rounds}: run '{resumed.run_name}' calibrated its noise "
                          f"for dp-target-epsilon = {resumed.dp_target_epsilon:g} over rounds = {saved.rounds}; "
                          "more rounds would end above that epsilon. Resume it with rounds <= "
                          f"{saved.rounds}, or start a new run planned for {resumed.rounds} rounds")


def start_dashboard(cfg: FederationConfig) -> None:
    """`dashboard-port`: serve the dashboard for this server's runs folder; a taken port is not fatal."""
    from server.dashboard import DashboardError, start_in_background

    try:
        url = start_in_background(cfg.runs_dir, port=cfg.dashboard_port)
    except DashboardError as err:
        log(WARNING, "[fedvlsm] dashboard not started: %s", err)
        return
    say(f"dashboard: {url.rstrip('/')}/runs/{cfg.run_name}")  # url ends with '/': '//runs/x' was a 404


def _k(key: str) -> str:
    return key.replace("-", "_")


@dataclass
class TrainAhead:
    """A round's train messages, pushed while the previous round's evaluation runs (`pipeline-rounds`)."""

    server_round: int
    messages: list[Message]
    down: dict[int, int]
    pushed: Pushed


def pushes_ahead(cfg: FederationConfig, grid: Grid, server_round: int) -> bool:
    """Push round r+1's train messages together with round r's evaluate messages?

    In deployment an idle SuperNode pulls every 3 s, and a site that has just
    replied has just pulled: its next message waits up to 3 s for it. Pushed
    together, a SuperNode that has answered the evaluate message finds the
    next train message at its next pull (right after its reply): one such
    wait less per round. Both carry the same global adapter, and the site's
    evaluation does not depend on having trained first (personal parts are
    kept per round). Not under DP: a round pushed ahead spends privacy budget
    at the sites even if the run were to end before it.
    """
    return cfg.pipeline_rounds and cfg.dp == "off" and server_round < cfg.rounds and can_push_ahead(grid)


def train_messages_for(grid: Grid, strategy: Strategy, cfg: FederationConfig, server_round: int,
                       global_arrays: dict[str, np.ndarray], run_id: str = "") -> tuple[list[Message], dict[int, int]]:
    """The round's train messages (sites sampled), adapter in the downlink dtype; bytes per node."""
    # Flower samples sites with the global `random` module: seed it per round
    # so that a resumed run samples the same sites as an uninterrupted one.
    random.seed(f"{cfg.seed}:{server_round}")
    fit_minimums_to_connected(strategy, grid, cfg)
    messages = list(strategy.configure_train(server_round, to_record(global_arrays), message_config(cfg, run_id),
                                             grid))
    return messages, _put_on_wire(messages, downlink_dtype(cfg.payload_dtype))


def run_round(
    grid: Grid,
    strategy: Strategy,
    cfg: FederationConfig,
    server_round: int,
    global_arrays: dict[str, np.ndarray],
    shared_names: set[str],
    names: SiteNames | None = None,
    ahead: TrainAhead | None = None,
    since: float | None = None,
    on_release: Callable[[int], None] | None = None,
    run_id: str = "",
    steps_seen: dict[str, int] | None = None,
    personal_seen: dict[str, int] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any], TrainAhead | None]:
    """One federated round: the new global adapter (fp32), the round's record, the next round's pushed messages.

    The round's time (`round_seconds`) counts from `since`, when the previous
    round's call returned, so the server's work between rounds (the
    strategy's state, the copies handed to the writer) is in the next round's time, also
    when its train messages were pushed earlier (`ahead`, see
    `pushes_ahead`). `train_seconds` is this call's train phase.
    `on_release(round)`: called once the new global exists and before any
    message carries it to a site (client-level DP journals its release there).
    `steps_seen`: sample-level DP, the most DP-SGD steps each site has reported in this run
    (`dp_steps_seen`); checked and updated before anything is aggregated (`check_accountants_kept`).
    `personal_seen`: personal parts, the last round each site trained (`personal_rounds_seen`);
    checked and updated likewise (`check_personal_kept`).
    """
    names = names or SiteNames()
    start = time.perf_counter()
    since = start if since is None else since
    config = message_config(cfg, run_id)
    if ahead is not None and ahead.server_round == server_round:
        train_messages, down, pushed = ahead.messages, ahead.down, ahead.pushed
    else:
        train_messages, down = train_messages_for(grid, strategy, cfg, server_round, global_arrays, run_id)
        pushed = push(grid, train_messages)
    ok, failures = exchange(grid, pushed, cfg, "train", names)
    accepted, excluded = _check_train_replies(ok, global_arrays, cfg, names)
    # A stable reply order makes float sums (and so resumed runs) reproducible.
    accepted.sort(key=lambda checked: names.of(checked[0]))
    ok = [reply for reply, _, _ in accepted]
    sites = {names.of(reply): _train_row(reply, wire, down, cfg) for reply, _, wire in accepted}
    if steps_seen is not None:
        check_accountants_kept(server_round, [*sites.items(), *((e["site"], e) for e in excluded)], steps_seen)
    if personal_seen is not None:
        check_personal_kept(server_round, sites, personal_seen)
    for reply, update, _ in accepted:
        # Sites send updates (local - global), decoded once by the checks;
        # Flower's strategies (and DP wrappers) aggregate weights: hand them
        # global + update, in fp32, as exactly one ArrayRecord and one
        # MetricRecord with the same keys for every site (Flower refuses to
        # aggregate anything else).
        if cfg.dp == "client" and cfg.dp_clipping == "client":
            # The sites clipped in fp32; rounding on the wire (fp16, int8) can move
            # the norm a hair: enforce the bound the accountant assumes, in fp32.
            update = clip_update_fp32(update, cfg.dp_clip_norm)
        m = reply.content[Rec.METRICS]
        kept = {"num-examples": int(m["num-examples"])}
        if cfg.dp != "sample":
            kept["train-loss"] = float(m["train-loss"])
        reply.content = RecordDict({
            Rec.ARRAYS: to_record({k: global_arrays[k] + update[k] for k in global_arrays}),
            Rec.METRICS: MetricRecord(kept),
        })
    skip_reason = ""
    if not ok:
        skip_reason = "no usable site update"
    elif len(ok) < cfg.min_replies:
        skip_reason = (f"{len(ok)} usable train repl{'y' if len(ok) == 1 else 'ies'}, fewer than "
                       f"min-replies = {cfg.min_replies}")
        log(WARNING, "[fedvlsm] round %s skipped: %s", server_round, skip_reason)
    aggregated = strategy.aggregate_train(server_round, ok)[0] if not skip_reason else None
    if aggregated is None and not skip_reason:
        skip_reason = "the strategy aggregated nothing"
    status = "ok" if aggregated is not None else "skipped"
    new_global = (
        {k: np.asarray(to_numpy(a), dtype=np.float32) for k, a in aggregated.items()}
        if aggregated is not None else global_arrays
    )
    train_seconds = time.perf_counter() - start
    if aggregated is not None and on_release is not None:
        on_release(server_round)

    eval_replies: list[Message] = []
    eval_down: dict[int, int] = {}
    next_ahead: TrainAhead | None = None
    if status == "ok":
        fit_minimums_to_connected(strategy, grid, cfg)
        eval_messages = list(strategy.configure_evaluate(server_round, to_record(new_global), config, grid))
        eval_down = _put_on_wire(eval_messages, downlink_dtype(cfg.payload_dtype))
        eval_pushed = push(grid, eval_messages)
        if pushes_ahead(cfg, grid, server_round):
            # After configure_evaluate: the global `random` is used in the same order as without pipelining.
            messages, next_down = train_messages_for(grid, strategy, cfg, server_round + 1, new_global, run_id)
            next_ahead = TrainAhead(server_round + 1, messages, next_down, push(grid, messages))
        eval_replies, eval_failures = exchange(grid, eval_pushed, cfg, "evaluate", names)
        failures += eval_failures
        eval_replies, eval_excluded = _check_eval_replies(eval_replies, names)
        failures += eval_excluded
        for reply in eval_replies:
            row = sites.setdefault(names.of(reply), {"node_id": reply.metadata.src_node_id})
            m = reply.content[Rec.METRICS]
            row.update(val_dice=m["dice"], val_dice_personal=m["dice-personal"], val_loss=m["loss"],
                       val_examples=int(m["num-examples"]), val_handler_seconds=m.get("handler-seconds"),
                       val_timeline=timeline(m))
            row["payload_bytes_down"] = row.get("payload_bytes_down", 0) + eval_down.get(reply.metadata.src_node_id, 0)

    n_val = sum(int(r.content[Rec.METRICS]["num-examples"]) for r in eval_replies)

    def weighted(key: str) -> float:
        if not n_val:
            return float("nan")
        return sum(r.content[Rec.METRICS][key] * r.content[Rec.METRICS]["num-examples"] for r in eval_replies) / n_val

    record = {
        "round": server_round,
        "status": status,
        **({"skip_reason": skip_reason} if skip_reason else {}),
        "dice": weighted("dice"),
        "dice_personal": weighted("dice-personal"),
        "train_loss": _weighted_train_loss(sites),
        "sites": dict(sorted(sites.items())),
        "payload_bytes_up": sum(s.get("payload_bytes_up", 0) for s in sites.values()),
        # Every message sent, also to sites that then failed or were excluded (their rows are not in `sites`).
        "payload_bytes_down": sum(down.values()) + sum(eval_down.values()),
        "failures": failures,
        "excluded": excluded,
        "train_seconds": train_seconds,
        "round_seconds": time.perf_counter() - since,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if cfg.dp == "sample":
        spent = [s["epsilon"] for s in [*sites.values(), *excluded] if math.isfinite(s.get("epsilon", math.nan))]
        record["epsilon_max"] = max(spent) if spent else None
        record["delta"] = cfg.dp_delta
    elif cfg.dp == "client":
        spent_server = server_epsilon(strategy)
        record["epsilon_server"], record["delta"] = spent_server if spent_server else (0.0, cfg.dp_delta)
    return new_global, record, next_ahead


def dp_steps_seen(rounds: Iterable[dict[str, Any]]) -> dict[str, int]:
    """The most DP-SGD steps each site reported in these round records (its rows and excluded replies)."""
    seen: dict[str, int] = {}
    for record in rounds:
        rows = [*record.get("sites", {}).items(), *((e.get("site"), e) for e in record.get("excluded", []))]
        for name, row in rows:
            steps = row.get("dp_steps")
            if name and isinstance(steps, int):
                seen[name] = max(seen.get(name, 0), steps)
    return seen


def personal_rounds_seen(rounds: Iterable[dict[str, Any]]) -> dict[str, int]:
    """The last round each site trained with personal parts in these round records (accepted rows)."""
    seen: dict[str, int] = {}
    for record in rounds:
        for name, row in record.get("sites", {}).items():
            if isinstance(row.get("personal_from"), int):
                seen[name] = max(seen.get(name, 0), int(record["round"]))
    return seen


def check_personal_kept(server_round: int, sites: dict[str, dict[str, Any]], seen: dict[str, int]) -> None:
    """RunFailed if a site started this round from older personal parts than it saved when it last
    trained; else record this round in `seen` for each site.

    A site saves its personal parts every round it trains, and finding none it starts them afresh
    without a word: its folder lost or replaced (a simulation resumed with another `home`, a new
    --site-dir) made the rest of the run, and its personalised Dice, those of fresh parts.
    """
    for name, row in sites.items():
        start = row.get("personal_from")
        if isinstance(start, int) and start < seen.get(name, 0):
            raise RunFailed(
                f"personal parts: {name} starts round {server_round} from "
                f"{f'round {start}' if start else 'none'}, but it trained round {seen[name]} of this run: its "
                "personal parts (<site-dir>/runs/<run-name>/personal) were lost or replaced; restore them "
                "(a simulation: resume with the run's own 'home'), or start a new run-name"
            )
    for name, row in sites.items():
        if isinstance(row.get("personal_from"), int):
            seen[name] = server_round


def check_accountants_kept(server_round: int, rows: list[tuple[str, dict[str, Any]]], seen: dict[str, int]) -> None:
    """RunFailed if a site's accountant for this run lost steps; else record each site's new count in `seen`.

    Every DP-SGD round a site trains is charged to its state file first (>= 1 step), so a train
    reply must report more steps than any earlier one of the run. No more means the state was
    lost or replaced (a site folder wiped, a new --site-dir, a simulation resumed with another
    `home`): its epsilon restarted from 0 and this round would be reported, and checked against
    the budget, as if the earlier rounds had never used those images.
    """
    for name, row in rows:
        steps = row.get("dp_steps")
        if not isinstance(steps, int):
            continue
        if steps <= seen.get(name, 0):
            raise RunFailed(
                f"privacy: {name} reports {steps} DP-SGD step(s) in this run after round {server_round}, no more "
                f"than the {seen[name]} it had reported before: its privacy state for the run "
                "(<site-dir>/privacy/<run-name>.json) was lost or replaced, so its epsilon and budget would "
                "restart from 0; restore that file (or start a new run-name), then resume"
            )
    for name, row in rows:
        if isinstance(row.get("dp_steps"), int):
            seen[name] = max(seen.get(name, 0), row["dp_steps"])


def fit_minimums_to_connected(strategy: Strategy, grid: Grid, cfg: FederationConfig) -> None:
    """Lower the strategy's node minimums to the sites connected now (never below `min-replies`).

    The minimums come from the sites connected at the start (server/strategies.py), and Flower's
    sampling waits, without a deadline, until that many nodes are online: one site gone for good
    (Flower drops a dead node about 60 s after its last heartbeat) would stall the run forever. With
    every site connected nothing changes; a returning site is sampled again from the next round.
    """
    planned = getattr(strategy, "_fedvlsm_planned_minimums", None)
    if planned is None:
        planned = {k: getattr(strategy, k) for k in ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes")
                   if isinstance(getattr(strategy, k, None), int)}
        strategy._fedvlsm_planned_minimums = planned  # type: ignore[attr-defined]
    if is_simulation(grid):
        return
    floor = max(1, cfg.min_replies)
    connected = len(list(grid.get_node_ids()))
    for key, value in planned.items():
        lowered = max(min(value, connected), min(value, floor))
        if lowered != getattr(strategy, key):
            setattr(strategy, key, lowered)
            say(f"{key.replace('_', '-')}: {lowered} ({connected} site(s) connected, planned {value})")


def message_config(cfg: FederationConfig, run_id: str = "", **extra: Any) -> ConfigRecord:
    """What every message to a site carries besides arrays: the run's name, id and whole config."""
    return ConfigRecord({Cfg.RUN_NAME: cfg.run_name, Cfg.RUN_ID: run_id, Cfg.RUN_CONFIG: cfg.to_json(), **extra})


def round_line(record: dict[str, Any], cfg: FederationConfig) -> str:
    """The console line of a round: Dice, bytes, time, and every site that failed or was excluded."""
    head = f"round {record['round']}/{cfg.rounds}"
    if record["status"] == "skipped":
        text = f"{head}: SKIPPED ({record.get('skip_reason', 'no usable site update')})"
    else:
        personalised = f" (personalised {record['dice_personal']:.4f})" if cfg.personal else ""
        text = (f"{head}: val Dice {record['dice']:.4f}{personalised} | {len(record['sites'])} site(s) | "
                f"up {record['payload_bytes_up']:,} B, down {record['payload_bytes_down']:,} B | "
                f"{record['round_seconds']:.1f}s")
    problems = [f"{f['site']} failed {f['phase']}: {f['reason']}" for f in record["failures"]]
    problems += [f"{f['site']} excluded: {f['reason']}" for f in record["excluded"]]
    return text + ("".join(f"\n    {p}" for p in problems))


class SiteNames:
    """Site names by node id, learnt from replies (a Flower-level error reply carries no name).

    The round record keys its site rows by name, so two nodes must never share
    one: two hospitals can both give `--site-name data`. The second node to claim
    a name gets "<name> (node <id>)".
    """

    def __init__(self) -> None:
        self._by_node: dict[int, str] = {}

    def of(self, reply: Message) -> str:
        node = reply.metadata.src_node_id
        if reply.has_content() and Rec.SITE in reply.content.config_records:
            name = claimed = str(reply.content.config_records[Rec.SITE]["name"])
            if any(other == claimed for n, other in self._by_node.items() if n != node):
                name = f"{claimed} (node {node})"
                if self._by_node.get(node) != name:
                    log(WARNING, "[fedvlsm] two sites call themselves %r: node %s is recorded as %r "
                        "(give each site its own --site-name)", claimed, node, name)
            self._by_node[node] = name
        return self._by_node.get(node, f"node-{node}")

    def name_of_node(self, node: int) -> str:
        return self._by_node.get(node, f"node-{node}")


# Flower's own error codes (flwr.common.constant.ErrorCode), in words. Only the
# code is kept: Flower's reason text can quote a site's exception.
_FLOWER_ERRORS = {
    0: "unknown error", 1: "the site could not load the ClientApp", 2: "the ClientApp raised an exception",
    3: "message unavailable", 4: "reply unavailable (timed out?)", 5: "the site is not connected",
    6: "a mod refused the message", 7: "invalid app bundle", 8: "the ClientApp crashed",
}


def exchange(grid: Grid, pushed: Pushed, cfg: FederationConfig, phase: str,
             names: SiteNames) -> tuple[list[Message], list[dict]]:
    """Receive, split; a site that never replied (crashed, cut off) is a failure too, by name."""
    # Flower's deployment grid polls replies every 3 s; ours every 0.25 s (server/messaging.py).
    replies = collect(grid, pushed, cfg.round_timeout)
    messages = pushed.messages
    dst_by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    ok, failures = split_replies(replies, phase, names, dst_by_id)
    answered = {dst_by_id.get(r.metadata.reply_to_message_id, r.metadata.src_node_id) for r in replies}
    for node in sorted({m.metadata.dst_node_id for m in messages} - answered):
        site = names.name_of_node(node)
        reason = f"no reply within round-timeout ({cfg.round_timeout:g} s)"
        log(WARNING, "[fedvlsm] %s: %s failed: %s", site, phase, reason)
        failures.append({"site": site, "node_id": node, "phase": phase, "reason": reason})
    return ok, failures


def split_replies(replies: list[Message], phase: str, names: SiteNames,
                  dst_by_id: dict[str, int] | None = None) -> tuple[list[Message], list[dict]]:
    """(usable replies, failures as {site, phase, reason}); reasons are public by construction.

    Flower's own error replies (e.g. "node unavailable") come from the
    SuperLink, not the site: `dst_by_id` (sent message id -> node) names the site then.
    """
    ok, failures = [], []
    dst_by_id = dst_by_id or {}
    for reply in replies:
        site = names.of(reply)
        node = dst_by_id.get(reply.metadata.reply_to_message_id)
        if node is not None and node != reply.metadata.src_node_id:
            site = names.name_of_node(node)
        if reply.has_error():
            reason = f"flower: {_FLOWER_ERRORS.get(reply.error.code, f'error code {reply.error.code}')}"
        elif Rec.STATUS in reply.content.config_records:
            reason = _short(str(reply.content.config_records[Rec.STATUS].get("error", "unspecified")))
        else:
            ok.append(reply)
            continue
        failures.append(_site_event(site, node if node is not None else reply.metadata.src_node_id, phase, reason,
                                    f"{phase} failed"))
    return ok, failures


def _site_event(site: str, node_id: int, phase: str, reason: str, what: str) -> dict[str, Any]:
    """A failed or excluded site: logged, and the entry the round record keeps."""
    log(WARNING, "[fedvlsm] %s: %s: %s", site, what, reason)
    return {"site": site, "node_id": node_id, "phase": phase, "reason": reason}


def _short(reason: str, limit: int = 200) -> str:
    """A site's reason, one line, bounded (a reply is no place for an essay)."""
    line = " ".join(reason.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _check_train_replies(
    replies: list[Message], global_arrays: dict[str, np.ndarray], cfg: FederationConfig, names: SiteNames
) -> tuple[list[tuple[Message, dict[str, np.ndarray], dict[str, np.ndarray]]], list[dict]]:
    """(reply, its decoded fp32 update, its wire arrays) for replies that pass every check (see
    `accepted_update`); the rest excluded, with site and reason."""
    accepted, excluded = [], []
    for reply in replies:
        try:
            accepted.append((reply, *accepted_update(reply, global_arrays, cfg)))
            continue
        except ReplyRejected as err:
            reason = str(err)
        except Exception as err:  # noqa: BLE001 - a reply must never be able to end the run
            reason = f"malformed reply ({type(err).__name__})"
        event = _site_event(names.of(reply), reply.metadata.src_node_id, "train", reason, "train reply excluded")
        # A DP site whose update is excluded still spent budget on it: its epsilon stays in the record.
        metrics = reply.content.metric_records.get(Rec.METRICS) if reply.has_content() else None
        event.update(privacy_record(metrics) if metrics is not None else {})
        excluded.append(event)
    return accepted, excluded


class ReplyRejected(ValueError):
    """A site's reply the server will not use; the message is its public reason."""


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


# No site trains on more images than this in a round; a larger count would take all of FedAvg's weight.
MAX_EXAMPLES = 2**31 - 1


def _example_count(value: Any) -> bool:
    """A site's image count: a whole number in [1, MAX_EXAMPLES].

    The weights of FedAvg and of the round's mean Dice are these counts: 0.5
    would become weight 0 (an accepted update that counts for nothing; all
    sites so: a division by zero), 1.9 a weight the record and the mean disagree on.
    """
    return _finite_number(value) and 1 <= value <= MAX_EXAMPLES and float(value).is_integer()


NUM_EXAMPLES_REASON = f"num-examples missing or not a whole number in [1, {MAX_EXAMPLES}]"

# Metrics every train reply must carry, as finite numbers (the round record and FedAvg's weights use them).
TRAIN_METRICS = ("num-examples", "train-loss")
EVAL_METRICS = ("num-examples", "dice", "dice-personal", "loss")


def accepted_update(reply: Message, global_arrays: dict[str, np.ndarray], cfg: FederationConfig
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A site's train reply decoded to (its fp32 update, its arrays as sent), or ReplyRejected with why.

    The arrays as sent (decoded once, here) are what the round record measures. Checked in this order:

    one ArrayRecord and one MetricRecord; tensor names = the shared adapter
    (personal parts must never arrive; int8 adds one `<name>@scale` each);
    each tensor's dtype = the run's payload dtype and shape = the global
    tensor's; int8 scales valid; all values finite; the update's L2 norm
    (fp32) <= `max-update-norm` (0: off); `num-examples` a whole number in
    [1, MAX_EXAMPLES]; every metric a finite number (`train-loss` required,
    except under sample-level DP, where sites send none).
    """
    content = reply.content
    if (list(content.array_records) != [Rec.ARRAYS] or list(content.metric_records) != [Rec.METRICS]):
        raise ReplyRejected("reply must hold exactly one adapter ArrayRecord and one MetricRecord")
    arrays = content[Rec.ARRAYS]
    int8 = cfg.payload_dtype == "int8"
    got = {k for k in arrays.keys() if not (int8 and k.endswith(SCALE_SUFFIX))}
    want = set(global_arrays)
    if got != want:
        raise ReplyRejected(f"tensors are not the shared adapter: {len(got - want)} unexpected, "
                            f"{len(want - got)} missing (personal parts must never be sent)")
    if int8 and {k for k in arrays.keys() if k.endswith(SCALE_SUFFIX)} != {k + SCALE_SUFFIX for k in want}:
        raise ReplyRejected("int8 update without exactly one scale per tensor")
    expected_dtype = np.dtype(np.int8) if int8 else wire_dtype(cfg.payload_dtype)
    wire: dict[str, np.ndarray] = {}
    for name in sorted(arrays.keys()):
        try:
            a = to_numpy(arrays[name])
        except Exception as err:  # noqa: BLE001 - undecodable bytes
            raise ReplyRejected(f"a tensor cannot be decoded ({type(err).__name__})") from None
        wire[name] = a
        if name not in want:
            continue  # an int8 scale: checked by decode_update
        if a.dtype != expected_dtype:
            raise ReplyRejected(f"wrong dtype: {a.dtype} where the run's payload dtype is {expected_dtype} "
                                f"({_short(name, 80)})")
        if a.shape != global_arrays[name].shape:
            raise ReplyRejected(f"wrong shape: {tuple(a.shape)} where the global adapter has "
                                f"{tuple(global_arrays[name].shape)} ({_short(name, 80)})")
    try:
        update = decode_update(wire)
    except PayloadError as err:
        raise ReplyRejected(str(err)) from None
    if not all(np.isfinite(a).all() for a in update.values()):
        raise ReplyRejected("update holds NaN/Inf")
    if cfg.max_update_norm > 0:
        norm = update_norm(update)
        if not norm <= cfg.max_update_norm:
            raise ReplyRejected(f"update norm {norm:.4g} above max-update-norm {cfg.max_update_norm:g}")
    metrics = content[Rec.METRICS]
    if not _example_count(metrics.get("num-examples")):
        raise ReplyRejected(NUM_EXAMPLES_REASON)
    for key in TRAIN_METRICS if cfg.dp != "sample" else ():  # sample-level DP: no train-loss (see _train_row)
        if key not in metrics or not _finite_number(metrics[key]):
            raise ReplyRejected(f"metric {key} missing or not a finite number")
    bad = [k for k, v in metrics.items() if not (_finite_number(v) or (
        isinstance(v, list) and all(_finite_number(x) for x in v)))]
    if bad:
        raise ReplyRejected(f"malformed metrics: {len(bad)} not finite numbers "
                            f"(e.g. {_short(sorted(bad)[0], 40)})")
    return update, wire


def _check_eval_replies(replies: list[Message], names: SiteNames) -> tuple[list[Message], list[dict]]:
    """Evaluate replies with the metrics the round record needs; the rest become failures (phase evaluate)."""
    ok, bad = [], []
    for reply in replies:
        problem = eval_reply_problem(reply)
        if problem is None:
            ok.append(reply)
        else:
            bad.append(_site_event(names.of(reply), reply.metadata.src_node_id, "evaluate", problem,
                                   "evaluate reply excluded"))
    return ok, bad


def eval_reply_problem(reply: Message) -> str | None:
    """Why an evaluate reply's metrics cannot go into the round record, or None."""
    m = reply.content.metric_records.get(Rec.METRICS)
    if m is None:
        return "evaluate reply holds no metrics"
    if missing := [k for k in EVAL_METRICS if k not in m or not _finite_number(m[k])]:
        return f"evaluate metric {missing[0]} missing or not a finite number"
    if not _example_count(m["num-examples"]):
        return f"evaluate {NUM_EXAMPLES_REASON}"
    return None


# ----------------------------------------------------------------- helpers
def is_simulation(grid: Grid) -> bool:
    """Flower's simulation engine runs the ServerApp on an in-memory grid."""
    from flwr.superlink.grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid) or bool(getattr(grid, "fedvlsm_simulation", False))


def wait_for_sites(grid: Grid, cfg: FederationConfig, simulation: bool, poll: float = 1.0,
                   report_every: float = 30.0) -> list[int]:
    """Node ids once `min-sites` are connected (0: whoever is there once one is).

    A simulation's nodes are all there from the start: too few fails at once.
    In deployment the server says who it is waiting for, periodically, and
    gives up after `site-wait-timeout` seconds.
    """
    need = max(1, cfg.min_sites)
    nodes = sorted(grid.get_node_ids())
    if simulation and len(nodes) < need:
        raise ConfigError(f"run config 'min-sites' = {cfg.min_sites} but the simulation has {len(nodes)} "
                          "SuperNode(s); lower 'min-sites' or run more SuperNodes")
    start = time.monotonic()
    last_report = start - report_every
    while len(nodes) < need:
        now = time.monotonic()
        if now - start > cfg.site_wait_timeout:
            raise ConfigError(f"run config 'min-sites': {len(nodes)} of {need} site(s) connected after "
                              f"{cfg.site_wait_timeout:.0f}s ('site-wait-timeout'); giving up")
        if now - last_report >= report_every:
            say(f"waiting for {need} sites, {len(nodes)} connected")
            last_report = now
        time.sleep(poll)
        nodes = sorted(grid.get_node_ids())
    say(f"{len(nodes)} site(s) connected")
    return nodes


def check_min_replies(cfg: FederationConfig, num_sites: int, simulation: bool) -> None:
    """Refuse a `min-replies` that the sites sampled per round can never reach.

    Flower samples max(int(fraction-train x connected), ceil(fraction-train x sites at
    the start)) sites a round (server/strategies.py); fewer replies skip the round, so
    every round would train and then be thrown away until `max-skipped-rounds` ends the
    run. A simulation's sites are fixed: an error. In deployment more sites may still
    connect: a warning.
    """
    sampled = num_sampled_sites(cfg, num_sites)
    if cfg.min_replies <= sampled:
        return
    why = (f"run config 'min-replies' = {cfg.min_replies} but a round samples {sampled} site(s) "
           f"(fraction-train {cfg.fraction_train:g} of {num_sites}); every round would be skipped")
    if simulation:
        raise ConfigError(f"{why}; lower 'min-replies' or raise 'fraction-train'")
    log(WARNING, "[fedvlsm] %s until more sites connect", why)


def _put_on_wire(messages: list[Message], dtype: str) -> dict[int, int]:
    """Re-encode each message's adapter in the wire dtype; payload bytes per destination node."""
    sent: dict[int, int] = {}
    encoded: dict[int, tuple[ArrayRecord, int]] = {}
    for msg in messages:
        if Rec.ARRAYS not in msg.content:
            continue
        arrays = msg.content[Rec.ARRAYS]
        if id(arrays) not in encoded:  # strategies share one record across messages
            wire = to_wire({k: to_numpy(a) for k, a in arrays.items()}, dtype)
            encoded[id(arrays)] = (to_record(wire), payload_bytes(wire))
        record, size = encoded[id(arrays)]
        msg.content = RecordDict({**{k: v for k, v in msg.content.items() if k != Rec.ARRAYS}, Rec.ARRAYS: record})
        sent[msg.metadata.dst_node_id] = size
    return sent


def _train_row(reply: Message, wire: dict[str, np.ndarray], down: dict[int, int],
               cfg: FederationConfig) -> dict[str, Any]:
    """Per-site record of an accepted train reply (`wire`: its arrays as the checks decoded them)."""
    names = set(wire)
    m = reply.content[Rec.METRICS]
    return {
        "node_id": reply.metadata.src_node_id,
        "num_examples": int(m["num-examples"]),
        # Sample-level DP: a training loss is an un-noised figure of the private images; sites send none.
        "train_loss": None if cfg.dp == "sample" else m["train-loss"],
        "train_seconds": m.get("train-seconds"),
        "payload_bytes_up": payload_bytes(wire),
        "payload_bytes_down": down.get(reply.metadata.src_node_id, 0),
        "wire_dtype": str(next(v for k, v in wire.items() if not k.endswith(SCALE_SUFFIX)).dtype) if wire else None,
        "tensors": len([n for n in names if not n.endswith(SCALE_SUFFIX)]),
        "tensor_names_sha256": hashlib.sha256(json.dumps(sorted(names)).encode()).hexdigest()[:16],
        # Runtime figures of the process that served the message (the site
        # worker's when there is one); optional: checks never depend on them.
        "base_loads": _int_or_none(m.get("base-loads")),
        "base_load_seconds": m.get("base-load-seconds"),
        "import_seconds": m.get("import-seconds"),
        "process_age_seconds": m.get("process-age-seconds"),
        "process_messages": _int_or_none(m.get("process-messages")),
        "handler_seconds": m.get("handler-seconds"),
        "served_by_worker": bool(m.get("served-by-worker", 0.0)),
        "personal_from": _int_or_none(m.get("personal-from")),  # personal parts: the round they came from
        "forward_seconds": m.get("forward-seconds"),
        # Sample-level DP: the site's own accountant (all its DP-SGD steps in this run).
        **privacy_record(m),
        # When the server sent the message, the ClientApp process started, the worker handled it and the
        # reply reached the server (UNIX seconds; server/messaging.py): where a round's time goes.
        "timeline": timeline(m),
    }


def privacy_record(metrics: Any) -> dict[str, Any]:
    """epsilon, delta, dp_steps, dp_sample_rate, dp_noise_multiplier of a DP site's reply ({} otherwise)."""
    try:
        report = PrivacyReport.from_metrics(dict(metrics))
    except (TypeError, ValueError):  # a list where a number belongs: nothing to keep (never a crash)
        return {}
    return report.as_record() if report is not None else {}


def _int_or_none(value: Any) -> int | None:
    return int(value) if _finite_number(value) else None


def _weighted_train_loss(sites: dict[str, dict[str, Any]]) -> float:
    rows = [s for s in sites.values() if "num_examples" in s and s["train_loss"] is not None]
    n = sum(s["num_examples"] for s in rows)
    return sum(s["train_loss"] * s["num_examples"] for s in rows) / n if n else float("nan")


def say(text: str) -> None:
    """Progress lines users must see (run dir, data dir, per-round Dice): flwr's log, INFO."""
    log(INFO, "[fedvlsm] %s", text)
