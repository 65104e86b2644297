"""The demo federation's hooks: synthetic hospitals, then the per-site comparison table.

``fedvlsm simulate`` runs the server's round loop with ``DemoHooks``: synthetic sites
(ultrasound-, endoscopy- and dermoscopy-like, see common/data/synth.py), the
demo base, a few rounds of FedAvg, and at the end one row per site:

- frozen base: the pretrained CLIPSeg, no adapter;
- local only: adapters trained on that site alone, same epoch budget
  (rounds x local-epochs), evaluated on that site's test split;
- federated: the final global adapter (personalised: plus the site's own
  personal parts and optional final fine-tuning, when configured);
- pooled: adapters trained on all sites' training data in one place, the
  centralised upper bound. Only a simulation can do this (the server
  process reads the synthetic data it made); it is labelled as such.

All Dice figures are on each site's *test* split, at original resolution.
Site-side work happens in the ClientApp (messages ``evaluate.final`` and
``train.local_only``); only the pooled run happens in the server process.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common.atomic import json_text
from common.bases import Base
from common.data import SegDataset
from common.data.formats import Item
from common.evaluate import evaluate
from common.federation_config import ConfigError, FederationConfig
from common.payload import Action, Cfg, Rec, downlink_dtype, to_wire
from common.train import fit
from server.hooks import RunHooks
from server.run_records import RunRecords
from server.server_app import SiteNames, is_simulation, say, split_replies
from simulations.demo_data import prepare_data
from simulations.partition import partition, site_folders


class DemoHooks(RunHooks):
    """What a simulation adds around the server's round loop (the server imports none of it)."""

    def before_rounds(self, grid: Grid, cfg: FederationConfig, nodes: list[int]) -> None:
        say(f"simulation data: {prepare_data(cfg, len(nodes))} (partition '{cfg.partition}')")
        check_site_count(cfg, len(nodes))

    def after_final(self, grid, cfg, frozen, global_arrays, records, nodes) -> dict[str, Any] | None:
        if not cfg.compare:
            return None
        return {"comparison": compare_and_report(grid, cfg, frozen, global_arrays, records, nodes,
                                                 pooled=is_simulation(grid))}


def check_site_count(cfg: FederationConfig, connected: int) -> None:
    """Natural sites need one simulated SuperNode per site folder: fail fast, say how."""
    if cfg.partition != "natural":
        return
    folders = site_folders(cfg.data_dir(connected))
    if len(folders) != connected:
        raise ConfigError(
            f"the data at {cfg.data_dir(connected)} has {len(folders)} site(s) but the simulation has {connected} "
            f"SuperNode(s): run `fedvlsm simulate --num-sites {len(folders)}`, "
            "or use partition = 'iid' / 'quantity-skew' / 'dirichlet' to split the data over any number of sites"
        )


def compare_and_report(
    grid: Grid,
    cfg: FederationConfig,
    frozen: Base,
    global_arrays: dict[str, np.ndarray],
    records: RunRecords,
    nodes: list[int],
    pooled: bool = True,
) -> dict[str, Any]:
    """Ask every site for its final Dice figures, train the pooled bound, print and save the table.

    `pooled` needs every site's data in this process: simulation only. In a
    deployment the column reads n/a and the table says why.
    """
    epochs = cfg.rounds * cfg.local_epochs
    config = {Cfg.RUN_NAME: cfg.run_name, Cfg.RUN_ID: records.run_id, Cfg.ROUND: cfg.rounds,
              Cfg.RUN_CONFIG: cfg.to_json()}
    wire = to_wire(global_arrays, downlink_dtype(cfg.payload_dtype))
    say(f"comparison: final test Dice at every site, local-only adapters ({epochs} epoch(s) each)"
        + (", pooled bound" if pooled else " (no pooled bound outside simulation)"))
    start = time.perf_counter()
    final = _ask(grid, nodes, f"{MessageType.EVALUATE}.{Action.FINAL}", config, wire)
    local = _ask(grid, nodes, f"{MessageType.TRAIN}.{Action.LOCAL_ONLY}", {**config, "epochs": epochs}, None)
    pooled_dice = pooled_upper_bound(cfg, frozen, len(nodes), epochs) if pooled else {}
    rows = []
    for name in sorted(final):
        f = final[name]
        rows.append({
            "site": name,
            "test_images": int(f["num-examples"]),
            "frozen_base": f["dice-base"],
            "local_only": local.get(name, {}).get("dice-local", math.nan),
            "federated": f["dice-global"],
            "federated_personalised": f.get("dice-finetuned", f["dice-personal"]),
            "pooled": pooled_dice.get(name, math.nan),
        })
    personalised = bool(cfg.personal) or cfg.finetune_epochs > 0
    table = format_table(rows, personalised)
    result = {
        "rows": rows,
        "epochs_per_site": epochs,
        "personalised_column": personalised,
        "seconds": time.perf_counter() - start,
        "note": "Dice on each site's test split; pooled = centralised upper bound trained in the "
                "simulation's server process on all sites' training data (impossible in a real federation)"
                + ("." if pooled else "; not available here: this run is not a simulation."),
    }
    records.save_final_file("comparison.json", json_text(result, indent=2) + "\n")  # NaN (no pooled bound) as null
    records.save_final_file("comparison.md", table + "\n")
    say("per-site test Dice:\n" + table)
    return result


def _ask(grid: Grid, nodes: list[int], message_type: str, config: dict, wire: dict | None) -> dict[str, dict]:
    """Send one message per site and return each site's metrics by site name."""
    content = {Rec.CONFIG: ConfigRecord(config)}
    if wire is not None:
        content[Rec.ARRAYS] = ArrayRecord({k: Array(v) for k, v in wire.items()})
    messages = [Message(RecordDict(content), dst_node_id=n, message_type=message_type) for n in nodes]
    ok, failures = split_replies(list(grid.send_and_receive(messages)), message_type, SiteNames())
    if failures:
        raise RuntimeError(f"{message_type} failed: " + "; ".join(f"{f['site']}: {f['reason']}" for f in failures))
    return {str(reply.content[Rec.SITE]["name"]): dict(reply.content[Rec.METRICS]) for reply in ok}


def pooled_upper_bound(cfg: FederationConfig, frozen: Base, num_sites: int, epochs: int) -> dict[str, float]:
    """Adapters trained on the union of all sites' training data; test Dice per site."""
    parts = partition(cfg.data_dir(num_sites), cfg.partition, num_sites, seed=cfg.seed, alpha=cfg.partition_alpha)

    def cap(items: list[Item]) -> list[Item]:
        return items[: cfg.max_images] if cfg.max_images else items

    pooled_items = [item for part in parts for item in cap(part["train"])]
    cache = cfg.home_dir / "sites" / "pooled-cache"
    model = cfg.initial_model(frozen)
    seed = cfg.seed + 7919  # any fixed seed; distinct from the sites' streams
    train_ds = SegDataset(pooled_items, frozen.image_size, train=True, seed=seed, cache_dir=cache)
    fit(model, train_ds, None, frozen.tokenizer, cfg.train_config(epochs, seed))
    out = {}
    for k, part in enumerate(parts):
        test_ds = SegDataset(cap(part["test"]), frozen.image_size, train=False, prompt_index=9, cache_dir=cache)
        out[f"site-{k}"] = evaluate(model, test_ds, frozen.tokenizer, cfg.train_config(1, seed)).dice
    return out


def format_table(rows: list[dict[str, Any]], personalised: bool) -> str:
    cols = [("site", "site"), ("test_images", "test imgs"), ("frozen_base", "frozen base"),
            ("local_only", "local only"), ("federated", "federated")]
    if personalised:
        cols.append(("federated_personalised", "fed. personalised"))
    cols.append(("pooled", "pooled (upper bound)"))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.3f}"  # n/a: not measurable here (pooled in deployment)
        return str(v)

    def cell(row: dict[str, Any], key: str) -> str:
        return fmt(row[key])

    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(r, k) for k, _ in cols) + " |" for r in rows]
    if rows:
        mean = {k: float(np.mean([r[k] for r in rows])) for k, _ in cols[2:]}
        lines.append("| mean of sites | " + str(sum(r["test_images"] for r in rows)) + " | "
                     + " | ".join(fmt(mean[k]) for k, _ in cols[2:]) + " |")
    return "\n".join(lines)

