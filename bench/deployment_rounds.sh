#!/usr/bin/env bash
# Round time of a real loopback deployment (SuperLink + K sites, TLS + site
# authentication, `fedvlsm site start` = warm worker + SuperNode) against a
# no-op Flower app on the same SuperLink and SuperNodes, in the same script:
#
#   overhead = round time - slowest site's training time (train handler)
#   target:  overhead - no-op round time <= 1 s
#
# The no-op app runs three times: with Flower's send_and_receive (3 s reply
# poll), polling every 0.25 s like fedvlsm, and polling every 0.25 s with
# pipelined rounds (round r+1's train messages pushed with round r's evaluate
# messages, as fedvlsm's default `pipeline-rounds`). The target line compares
# with the no-op run that has fedvlsm's message pattern (RUN_CONFIG=
# "pipeline-rounds=false" makes that the unpipelined one).
#
#   K=3 ROUNDS=5 bash bench/deployment_rounds.sh      [NO_WORKER=1: the old per-message processes]
#   NOOP_BASELINE=after ...   the no-op runs after the fedvlsm run instead of before
# Writes bench/results/deployment-rounds-<K>-sites[-no-worker].json.
set -euo pipefail
cd "$(dirname "$0")/.."
K=${K:-3}; ROUNDS=${ROUNDS:-5}
WORK=${WORK:-$(mktemp -d -t fedvlsm-bench-XXXX)}
start=$(date +%s)
# ANALYSE_ONLY=1 WORK=<folder of an earlier run>: only the tables (e.g. after changing this analysis).
[ "${ANALYSE_ONLY:-0}" = 1 ] || WORK=$WORK K=$K ROUNDS=$ROUNDS NOOP_BASELINE=${NOOP_BASELINE:-1} RUN_NAME=bench \
  RUN_CONFIG="base='arch:tiny' compare=false ${RUN_CONFIG:-}" bash scripts/deploy_loopback.sh
[ "${ANALYSE_ONLY:-0}" = 1 ] || echo $(( $(date +%s) - start )) >"$WORK/wall_seconds"
suffix=""; [ "${NO_WORKER:-0}" = 1 ] && suffix="-no-worker"
python3 - "$WORK" "$K" "$(cat "$WORK/wall_seconds")" "bench/results/deployment-rounds-$K-sites$suffix.json" <<'PY'
import contextlib, json, statistics as st, sys, platform, os
work, k, wall, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
noop = json.load(open(f"{work}/noop_rounds.json"))["round_seconds"]
noop_poll = json.load(open(f"{work}/noop_rounds-poll.json"))["round_seconds"]
noop_pipe = json.load(open(f"{work}/noop_rounds-pipeline.json"))["round_seconds"]
# The no-op run with fedvlsm's message pattern: pipelined unless this run said pipeline-rounds=false.
pipelined = "pipeline-rounds=false" not in os.environ.get("RUN_CONFIG", "").replace(" ", "")
rounds = [json.loads(l) for l in open(f"{work}/fedvlsm/runs/bench/rounds.jsonl")]
# Segments of one message's life (server/messaging.py, client/forwarder.py, client/worker.py timestamps).
SEGMENTS = [("delivery: server push -> ClientApp process started (SuperNode 3 s poll, SuperExec 1 s poll, spawn)",
             "t-sent", "t-clientapp-start"),
            ("flwr-clientapp start-up (imports, pull, FAB) -> our ClientApp called", "t-clientapp-start",
             "t-dispatch-start"),
            ("our ClientApp called -> forward to worker (unpack)", "t-dispatch-start", "t-forward-start"),
            ("forward -> worker handler start (serialise, socket)", "t-forward-start", "t-handler-start"),
            ("worker handler", "t-handler-start", "t-handler-end"),
            ("handler end -> forward end (serialise back)", "t-handler-end", "t-forward-end"),
            ("forward end -> reply at the server (ClientApp push, SuperNode 0.5 s push poll, server poll)",
             "t-forward-end", "t-received")]
rows, seg = [], {"train": {s[0]: [] for s in SEGMENTS}, "evaluate": {s[0]: [] for s in SEGMENTS}}
gaps = []
for r in rounds:
    train = max(s["handler_seconds"] for s in r["sites"].values() if "handler_seconds" in s)
    tl = {n: s.get("timeline", {}) for n, s in r["sites"].items()}
    vtl = {n: s.get("val_timeline", {}) for n, s in r["sites"].items()}
    row = {"round": r["round"], "round_seconds": r["round_seconds"], "slowest_train_handler_seconds": train,
           "overhead_seconds": r["round_seconds"] - train,
           "slowest_evaluate_handler_seconds": max((s.get("val_handler_seconds") or 0) for s in r["sites"].values()),
           "base_loads": {n: s.get("base_loads") for n, s in r["sites"].items()},
           "process_messages": {n: s.get("process_messages") for n, s in r["sites"].items()},
           "timeline": {"train": tl, "evaluate": vtl}}
    # Server-side time between the last train reply and the evaluate messages' push (absent if a phase has no timeline).
    with contextlib.suppress(KeyError, ValueError):
        row["server_gap_train_to_evaluate_seconds"] = (max(v["t-sent"] for v in vtl.values())
                                                      - max(v["t-received"] for v in tl.values()))
    rows.append(row)
    if r["round"] > 1:
        for phase, t in (("train", tl), ("evaluate", vtl)):
            for name, a, b in SEGMENTS:
                seg[phase][name] += [v[b] - v[a] for v in t.values() if a in v and b in v]
        if "server_gap_train_to_evaluate_seconds" in row:
            gaps.append(row["server_gap_train_to_evaluate_seconds"])
# The same four segments for the no-op app (0.25 s poll) and fedvlsm, side by side: where fedvlsm's extra goes.
COMMON = [("delivery (server push -> ClientApp process started)", "t-sent", "t-clientapp-start"),
          ("ClientApp process start -> handler start (fedvlsm: incl. forwarding to the worker)",
           "t-clientapp-start", "t-handler-start"),
          ("handler", "t-handler-start", "t-handler-end"),
          ("handler end -> reply at the server", "t-handler-end", "t-received")]
def common_segments(timelines):  # timelines: one {phase: {node: stamps}} per round
    out = {p: {n: [] for n, _, _ in COMMON} for p in ("train", "evaluate")}
    for tl in timelines[1:]:
        for phase in out:
            for stamps in tl.get(phase, {}).values():
                for n, a, b in COMMON:
                    if a in stamps and b in stamps:
                        out[phase][n].append(stamps[b] - stamps[a])
    return out
# Side by side with the no-op run that has fedvlsm's message pattern (pipelined or not).
noop_tl = json.load(open(f"{work}/noop_rounds-{'pipeline' if pipelined else 'poll'}.json")).get("timelines", [])
ours_tl = [{"train": {n: s.get("timeline", {}) for n, s in r["sites"].items()},
            "evaluate": {n: s.get("val_timeline", {}) for n, s in r["sites"].items()}} for r in rounds]
side_by_side = {"noop_matching": common_segments(noop_tl), "fedvlsm": common_segments(ours_tl)}
later = rows[1:] or rows  # round 1 includes the first base load at each site
med = lambda xs: st.median(xs) if xs else float("nan")
res = {"sites": k, "rounds": len(rows), "no_worker": os.environ.get("NO_WORKER") == "1", "wall_seconds": wall,
       "noop_round_seconds": noop, "noop_poll_025_round_seconds": noop_poll,
       "noop_poll_025_pipelined_round_seconds": noop_pipe, "fedvlsm_pipelined": pipelined, "fedvlsm_rounds": rows,
       "median_round_seconds_after_round_1": med([r["round_seconds"] for r in later]),
       "median_overhead_seconds_after_round_1": med([r["overhead_seconds"] for r in later]),
       "median_noop_round_seconds_after_round_1": med(noop[1:] or noop),
       "median_noop_poll_025_round_seconds_after_round_1": med(noop_poll[1:] or noop_poll),
       "median_noop_poll_025_pipelined_round_seconds_after_round_1": med(noop_pipe[1:] or noop_pipe),
       "median_segment_seconds_after_round_1": {p: {n: med(v) for n, v in d.items()} for p, d in seg.items()},
       "max_segment_seconds_after_round_1": {p: {n: max(v) if v else None for n, v in d.items()} for p, d in seg.items()},
       "median_server_gap_train_to_evaluate_seconds": med(gaps),
       "median_common_segment_seconds_after_round_1": {
           who: {p: {n: med(v) for n, v in d.items()} for p, d in segs.items()} for who, segs in side_by_side.items()},
       "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "machine": platform.platform()}
for key, ref in (("", "median_noop_round_seconds_after_round_1"), ("_poll_025", "median_noop_poll_025_round_seconds_after_round_1"),
                 ("_poll_025_pipelined", "median_noop_poll_025_pipelined_round_seconds_after_round_1")):
    res[f"overhead_minus_noop{key}_seconds"] = res["median_overhead_seconds_after_round_1"] - res[ref]
    res[f"overhead_over_noop{key}_ratio"] = res["median_overhead_seconds_after_round_1"] / res[ref]
match = "_poll_025_pipelined" if pipelined else "_poll_025"
res["target_difference_seconds"] = res[f"overhead_minus_noop{match}_seconds"]
os.makedirs(os.path.dirname(out), exist_ok=True)
json.dump(res, open(out, "w"), indent=1)
lines = [f"no-op app, Flower's send_and_receive (3 s reply poll), round times (s): {', '.join(f'{x:.1f}' for x in noop)}",
         f"no-op app, 0.25 s reply poll (as fedvlsm), round times (s): {', '.join(f'{x:.1f}' for x in noop_poll)}",
         f"no-op app, 0.25 s reply poll, pipelined rounds, round times (s): {', '.join(f'{x:.1f}' for x in noop_pipe)}"]
for r in rows:
    lines.append(f"fedvlsm round {r['round']}: {r['round_seconds']:.1f}s, slowest train {r['slowest_train_handler_seconds']:.2f}s, "
                 f"overhead {r['overhead_seconds']:.1f}s, slowest evaluate {r['slowest_evaluate_handler_seconds']:.2f}s, "
                 f"base_loads {sorted(set(r['base_loads'].values()))}, process_messages {sorted(r['process_messages'].values())}")
lines.append("median per message after round 1 (train | evaluate), seconds:")
for name, _, _ in SEGMENTS:
    lines.append(f"  {seg and res['median_segment_seconds_after_round_1']['train'][name]:6.2f} | "
                 f"{res['median_segment_seconds_after_round_1']['evaluate'][name]:6.2f}  {name}")
lines.append(f"  server between last train reply and evaluate push: {res['median_server_gap_train_to_evaluate_seconds']:.2f}")
lines.append(f"median per message after round 1, no-op (0.25 s poll{', pipelined' if pipelined else ''}) vs fedvlsm, "
             "train | evaluate, seconds:")
cs = res["median_common_segment_seconds_after_round_1"]
for name, _, _ in COMMON:
    lines.append(f"  {cs['noop_matching']['train'][name]:6.2f} vs {cs['fedvlsm']['train'][name]:6.2f} | "
                 f"{cs['noop_matching']['evaluate'][name]:6.2f} vs {cs['fedvlsm']['evaluate'][name]:6.2f}  {name}")
lines.append(f"median after round 1: overhead {res['median_overhead_seconds_after_round_1']:.1f}s vs no-op "
             f"{res['median_noop_round_seconds_after_round_1']:.1f}s (Flower's poll): {res['overhead_minus_noop_seconds']:+.1f}s, "
             f"ratio {res['overhead_over_noop_ratio']:.2f}; vs no-op with the same 0.25 s poll "
             f"{res['median_noop_poll_025_round_seconds_after_round_1']:.1f}s: {res['overhead_minus_noop_poll_025_seconds']:+.1f}s; "
             f"vs no-op with the same poll and pipelined rounds {res['median_noop_poll_025_pipelined_round_seconds_after_round_1']:.1f}s: "
             f"{res['overhead_minus_noop_poll_025_pipelined_seconds']:+.1f}s")
lines.append(f"target (difference <= 1 s) against the no-op app with fedvlsm's message pattern "
             f"({'pipelined' if pipelined else 'not pipelined'}, 0.25 s poll): {res['target_difference_seconds']:+.1f}s; "
             f"written to {out}")
text = "\n".join(lines)
print(text)
open(out.replace(".json", ".txt"), "w").write(text + "\n")
PY
