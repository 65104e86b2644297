"""Privacy through the real round loop: records, budgets, clipping of updates on the wire.

The ServerApp's loop and the ClientApp's handlers, through fed_harness.InProcessGrid
(Flower's protobuf serialisation both ways).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load_file

from common.data import synthesize
from common.federation_config import FederationConfig
from common.payload import decode_update, encode_update
from common.privacy import compute_epsilon, sample_rate_and_steps
from fed_harness import InProcessGrid
from server.server_app import run_federation


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp-data")
    synthesize(root, sites=2, per_site=9, seed=0, image_size=64)
    return root


def cfg_for(data, home, **kw) -> FederationConfig:
    values = {"base": "arch:tiny", "adapter": "shallow-vlc", "data": str(data), "home": str(home),
              "rounds": 4, "local_epochs": 1, "batch_size": 2, "compare": False, "lr": 0.01,
              "run_name": "dp", **kw}
    return FederationConfig(**values)


def rounds_of(home) -> list[dict]:
    return [json.loads(x) for x in (home / "runs/dp/rounds.jsonl").read_text().splitlines()]


def test_sample_level_dp_records_each_site_budget_and_ends_cleanly_when_all_are_spent(data, tmp_path):
    # Each site's epsilon after k rounds (its own train split, batch 2, 1 epoch per round, z = 1),
    # computed independently of the run: the budget admits exactly 2 rounds.
    grid = InProcessGrid(cfg_for(data, tmp_path), 2)
    from client.site import Site

    sizes = [len(Site(cfg_for(data, tmp_path), nc).items("train")) for nc in
             (c.node_config for c in grid.contexts.values())]
    assert len(set(sizes)) == 1, sizes
    n_train = sizes[0]
    q, steps = sample_rate_and_steps(n_train, 2)
    eps = [compute_epsilon([(1.0, q, steps * k)], 1e-5) for k in (1, 2, 3)]
    budget = (eps[1] + eps[2]) / 2
    cfg = cfg_for(data, tmp_path, dp="sample", dp_noise_multiplier=1.0, dp_epsilon_budget=budget)
    summary = run_federation(InProcessGrid(cfg, 2), cfg)

    rounds = rounds_of(tmp_path)
    assert [r["status"] for r in rounds] == ["ok", "ok", "skipped"]
    for k, r in enumerate(rounds[:2], start=1):
        assert r["epsilon_max"] == pytest.approx(eps[k - 1], rel=1e-6)
        for site in r["sites"].values():
            assert site["dp_steps"] == steps * k and site["dp_sample_rate"] == pytest.approx(q)
            assert site["dp_noise_multiplier"] == 1.0 and site["delta"] == 1e-5
            assert site["epsilon"] == pytest.approx(eps[k - 1], rel=1e-6)
    # Round 3 would exceed every site's budget: refused before training, with the reason, and the run
    # ends cleanly (finished, final adapter saved) instead of failing.
    assert {f["site"] for f in rounds[2]["failures"] if f["phase"] == "train"} == {"site-0", "site-1"}
    assert all(f["reason"].startswith("privacy budget:") for f in rounds[2]["failures"])
    assert summary["ended_early"].startswith("privacy budget")
    assert json.loads((tmp_path / "runs/dp/status.json").read_text())["status"] == "finished"
    assert (tmp_path / "runs/dp/final/adapter/adapter_model.safetensors").is_file()
    # The accountant lives at the site: a resumed run cannot restart it.
    state = json.loads(next((tmp_path / "sites").rglob("privacy/dp.json")).read_text())
    assert sum(int(n) for _, _, n in state["history"]) == 2 * steps


class HugeUpdateGrid(InProcessGrid):
    """One site (node 100) sends an fp16 update of norm ~600, as a site without clipping would."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for r in replies:
            if "arrays" in r.content.array_records and r.metadata.src_node_id in (100, 101):
                update = decode_update({k: a.numpy() for k, a in r.content["arrays"].items()})
                names = sorted(update)
                direction = {k: np.ones_like(update[k]) for k in names}
                norm = float(np.sqrt(sum((d ** 2).sum() for d in direction.values())))
                huge = {k: direction[k] * np.float32(600.0 / norm) for k in names}
                r.content["arrays"] = ArrayRecord({k: Array(v) for k, v in encode_update(huge, "fp16").items()})
        return replies


@pytest.mark.parametrize("clipping", ["server", "client"])
def test_an_update_of_norm_600_arrives_clipped_not_zeroed_with_fp16_on_the_wire(data, tmp_path, clipping):
    cfg = cfg_for(data, tmp_path, rounds=1, dp="client", dp_clipping=clipping, dp_clip_norm=0.5,
                  dp_noise_multiplier=1e-6, payload_dtype="fp16")
    before = {k: v.numpy() for k, v in cfg.initial_model(__import__("common").load_base("arch:tiny"))
              .adapter_state().items()}
    run_federation(HugeUpdateGrid(cfg, 2), cfg)
    after = load_file(str(tmp_path / "runs/dp/final/adapter/adapter_model.safetensors"))
    moved = float(np.sqrt(sum(((after[k] - before[k]) ** 2).sum() for k in after)))
    # Both sites' updates (norm 600, same direction) clipped to C = 0.5 and averaged: the global
    # adapter moves by C, not 0 (what Flower's fp16 clipping would do) and not 600.
    assert moved == pytest.approx(0.5, rel=0.01)
    record = rounds_of(tmp_path)[0]
    assert record["epsilon_server"] > 0 and record["delta"] == 1e-5


def test_client_level_budget_ends_the_run_cleanly_before_the_round_that_would_exceed_it(data, tmp_path):
    # z = 2 with every site each round: epsilon 3.19 after 2 rounds, 4.01 after 3 (delta 1e-5, computed
    # independently with Opacus' RDP accountant), so a budget of 3.6 admits exactly 2 of the 4 planned rounds.
    eps = [compute_epsilon([(2.0, 1.0, k)], 1e-5) for k in (2, 3)]
    assert eps[0] < 3.6 < eps[1]
    # (a small clip norm keeps the noise, z x C / m per coordinate, from wrecking the tiny model)
    cfg = cfg_for(data, tmp_path, dp="client", dp_noise_multiplier=2.0, dp_clip_norm=1e-3, dp_epsilon_budget=3.6)
    summary = run_federation(InProcessGrid(cfg, 2), cfg)
    rounds = rounds_of(tmp_path)
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[-1]["epsilon_server"] == pytest.approx(eps[0], rel=0.01)
    assert summary["ended_early"].startswith("privacy budget")
    assert json.loads((tmp_path / "runs/dp/status.json").read_text())["status"] == "finished"
    assert (tmp_path / "runs/dp/final/adapter/adapter_model.safetensors").is_file()


def test_a_sites_compile_choice_is_logged_as_not_applying_to_dp_sgd(data, tmp_path, monkeypatch):
    """A worker started with --compile ($FEDVLSM_COMPILE) serving a DP-SGD run: the rounds train
    (Opacus' eager fp32 steps) and the site's log says the choice does not apply, once per round."""
    import logging

    from flwr.common.logger import FLOWER_LOGGER

    monkeypatch.setenv("FEDVLSM_COMPILE", "cuda-graph")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    FLOWER_LOGGER.addHandler(handler)
    try:
        cfg = cfg_for(data, tmp_path, rounds=1, dp="sample", dp_noise_multiplier=1.0)
        run_federation(InProcessGrid(cfg, 2), cfg)
    finally:
        FLOWER_LOGGER.removeHandler(handler)
    assert [r["status"] for r in rounds_of(tmp_path)] == ["ok"]
    said = [m for m in records if "compile=cuda-graph does not apply to DP-SGD" in m]
    assert len(said) == 2  # one per site


class SpyGrid(InProcessGrid):
    """Keeps every train reply's metric keys as the server receives them."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.train_metric_keys: list[set[str]] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        self.train_metric_keys += [set(r.content["metrics"].keys()) for r in replies
                                   if r.metadata.message_type == "train" and r.has_content()]
        return replies


def test_sample_level_dp_sites_send_no_training_loss(data, tmp_path):
    # The loss over the drawn training images has no noise in it (the accountant covers the update only):
    # it was sent and recorded per site every round.
    cfg = cfg_for(data, tmp_path, rounds=1, dp="sample", dp_noise_multiplier=1.0)
    grid = SpyGrid(cfg, 2)
    run_federation(grid, cfg)
    assert len(grid.train_metric_keys) == 2
    assert all("train-loss" not in keys and "dp-epsilon" in keys for keys in grid.train_metric_keys)
    (record,) = rounds_of(tmp_path)
    assert record["status"] == "ok" and record["train_loss"] is None  # no figure, as for a skipped round
    assert all(site["train_loss"] is None and site["epsilon"] > 0 for site in record["sites"].values())


def test_an_excluded_dp_reply_keeps_its_sites_epsilon_in_the_record(data, tmp_path):
    # Both updates are over max-update-norm: excluded, but each site spent budget on its round.
    cfg = cfg_for(data, tmp_path, rounds=1, max_skipped_rounds=1, dp="sample", dp_noise_multiplier=1.0,
                  max_update_norm=1e-9)
    from server.server_app import RunFailed

    with pytest.raises(RunFailed):
        run_federation(InProcessGrid(cfg, 2), cfg)
    (record,) = rounds_of(tmp_path)
    assert record["status"] == "skipped" and len(record["excluded"]) == 2
    assert all(e["epsilon"] > 0 for e in record["excluded"])
    assert record["epsilon_max"] == max(e["epsilon"] for e in record["excluded"])  # was None


class CrashAfterReleaseGrid(InProcessGrid):
    """The server dies once round `crash_round`'s evaluate messages (carrying its noised global) were delivered."""

    def __init__(self, *a, crash_round=None, **kw):
        super().__init__(*a, **kw)
        self.crash_round, self.noised_globals = crash_round, 0

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        evaluate = [m for m in messages if m.metadata.message_type == "evaluate"]
        if evaluate:
            self.noised_globals += 1
            if int(evaluate[0].content["config"]["server-round"]) == self.crash_round:
                raise RuntimeError("server host lost power")
        return replies


def test_the_add_remove_neighbour_is_recorded_at_half_the_noise(data, tmp_path):
    # The run config as `--run-config` gives it (hyphenated); the same noise, accounted as z / 2.
    cfg = FederationConfig.from_run_config({**cfg_for(data, tmp_path, rounds=1, dp="client", dp_noise_multiplier=2.0,
                                                       dp_clip_norm=1e-3).to_run_config(),
                                            "dp-client-neighbour": "add-remove"})
    run_federation(InProcessGrid(cfg, 2), cfg)
    (record,) = rounds_of(tmp_path)
    assert record["epsilon_server"] == pytest.approx(compute_epsilon([(1.0, 1.0, 1)], 1e-5), rel=0.01)
    assert record["epsilon_server"] > 1.5 * compute_epsilon([(2.0, 1.0, 1)], 1e-5)


def test_a_client_level_release_sent_before_a_crash_is_counted_after_the_resume(data, tmp_path):
    # Round 2's noised global reached the sites, then the server died before round 2's checkpoint. The
    # resume runs round 2 again with fresh noise: three releases in all. The accountant came back from
    # round 1's checkpoint and counted two.
    cfg = cfg_for(data, tmp_path, rounds=2, dp="client", dp_noise_multiplier=2.0, dp_clip_norm=1e-3)
    first = CrashAfterReleaseGrid(cfg, 2, crash_round=2)
    with pytest.raises(RuntimeError, match="lost power"):
        run_federation(first, cfg)
    resumed = cfg_for(data, tmp_path, rounds=2, dp="client", dp_noise_multiplier=2.0, dp_clip_norm=1e-3, resume=True)
    second = CrashAfterReleaseGrid(resumed, 2)
    run_federation(second, resumed)
    assert first.noised_globals + second.noised_globals == 3
    assert rounds_of(tmp_path)[-1]["epsilon_server"] == pytest.approx(compute_epsilon([(2.0, 1.0, 3)], 1e-5),
                                                                    rel=0.01)



def test_a_damaged_privacy_journal_refuses_the_resume_rather_than_undercount(data, tmp_path):
    from common.federation_config import ConfigError

    cfg = cfg_for(data, tmp_path, rounds=2, dp="client", dp_noise_multiplier=2.0, dp_clip_norm=1e-3)
    with pytest.raises(RuntimeError, match="lost power"):
        run_federation(CrashAfterReleaseGrid(cfg, 2, crash_round=2), cfg)
    journal = tmp_path / "runs/dp/privacy_journal.json"
    journal.write_text(journal.read_text()[:20])
    resumed = cfg_for(data, tmp_path, rounds=2, dp="client", dp_noise_multiplier=2.0, dp_clip_norm=1e-3, resume=True)
    with pytest.raises(ConfigError, match="privacy_journal.json: the client-level privacy journal cannot be used"):
        run_federation(CrashAfterReleaseGrid(resumed, 2), resumed)
    assert [r["round"] for r in rounds_of(tmp_path)] == [1]  # nothing of the run was changed


class ReplyKeepingGrid(InProcessGrid):
    """Keeps each train reply's update as the site sent it (before the server re-clips anything)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.sent_updates = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for r in replies:
            if r.metadata.message_type == "train" and r.has_content():
                self.sent_updates.append(decode_update({k: a.numpy() for k, a in r.content["arrays"].items()}))
        return replies


@pytest.mark.parametrize("clipping,clipped_at_site", [("client", True), ("server", False)])
def test_with_client_side_clipping_no_site_sends_an_update_above_the_clip_norm(data, tmp_path, clipping,
                                                                              clipped_at_site):
    """The server bounds every update all the same; client-side clipping is the promise that it never
    sees one above C. With server-side clipping the same training sends larger ones (the test can tell)."""
    c = 1e-3
    cfg = cfg_for(data, tmp_path, rounds=1, dp="client", dp_clipping=clipping, dp_clip_norm=c,
                  dp_noise_multiplier=1e-6, payload_dtype="fp32", lr=0.05)
    grid = ReplyKeepingGrid(cfg, 2)
    run_federation(grid, cfg)
    norms = [float(np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in u.values())))
             for u in grid.sent_updates]
    assert len(norms) == 2
    if clipped_at_site:
        assert max(norms) <= c * (1 + 1e-5), norms
    else:
        assert min(norms) > 2 * c, norms


def test_a_site_whose_accountant_lost_its_steps_stops_the_run_before_its_update_is_used(data, tmp_path):
    """A site's privacy state lives in its own folder. Lost (a site folder wiped, a new --site-dir, a
    simulation resumed with another `home`), the site's epsilon restarted from 0: a resumed run recorded
    epsilon 2.994 after round 2 and 1.688 after round 4 for the same sites and images (budget 3 not held:
    composed, 3.287). Each DP-SGD round adds steps, so a reply with no more than before is refused."""
    from server.server_app import RunFailed

    cfg = cfg_for(data, tmp_path, rounds=1, dp="sample", dp_noise_multiplier=1.0)
    run_federation(InProcessGrid(cfg, 2), cfg)
    (state,) = [p for p in (tmp_path / "sites").rglob("privacy/dp.json") if p.parent.parent.name == "site-1"]
    state.unlink()  # site-1's accountant for the run is gone; site-0's is kept
    resumed = cfg_for(data, tmp_path, rounds=2, dp="sample", dp_noise_multiplier=1.0, resume=True)
    with pytest.raises(RunFailed, match=r"privacy: site-1 reports 3 DP-SGD step\(s\) in this run after round 2, "
                                        r"no more than the 3 it had reported before"):
        run_federation(InProcessGrid(resumed, 2), resumed)
    assert [r["round"] for r in rounds_of(tmp_path)] == [1]  # round 2 was neither aggregated nor recorded
