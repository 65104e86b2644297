"""The ServerApp's round loop against in-process sites: records, resume, personal parts.

A small stand-in for Flower's Grid delivers each message to the real
ClientApp in this process (content deep-copied both ways, as serialisation
would), so the server logic runs exactly as under `flwr run`, in seconds
and deterministically. The real `flwr run` is tested in test_fed_flwr_run.py.
"""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from common.data import synthesize
from common.federation_config import FederationConfig
from server.server_app import run_federation
from simulations.demo import DemoHooks
from fed_harness import InProcessGrid

ROUND_KEYS = {"round", "status", "excluded", "dice", "dice_personal", "train_loss", "sites", "payload_bytes_up", "payload_bytes_down",
              "failures", "train_seconds", "round_seconds", "time"}


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed-data")
    synthesize(root, sites=3, per_site=9, seed=0, image_size=64)
    return root


def make_cfg(data, home, **kw) -> FederationConfig:
    values = {"base": "arch:tiny", "adapter": "shallow-vlc", "data": str(data), "home": str(home), "rounds": 2,
              "compare": False, "lr": 0.01, **kw}
    return FederationConfig(**values)


def run(cfg: FederationConfig, sites: int = 3) -> tuple[dict, InProcessGrid]:
    grid = InProcessGrid(cfg, sites)
    return run_federation(grid, cfg, DemoHooks()), grid


def final_adapter(home, name) -> dict[str, np.ndarray]:
    return load_file(str(home / "runs" / name / "final" / "adapter" / "adapter_model.safetensors"))


def test_run_directory_records_every_round(data, tmp_path):
    cfg = make_cfg(data, tmp_path, run_name="plain", strategy="fedprox", prox_mu=0.1)
    summary, _ = run(cfg)
    run_dir = tmp_path / "runs" / "plain"
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert ROUND_KEYS <= set(r)
        assert sorted(r["sites"]) == ["site-0", "site-1", "site-2"]
        for s in r["sites"].values():
            assert s["num_examples"] > 0 and 0 <= s["val_dice"] <= 1 and s["wire_dtype"] == "float16"
            assert s["payload_bytes_up"] == summary["trainable_parameters"] * 2
            # down = train + evaluate message, each with the global adapter
            assert s["payload_bytes_down"] == 2 * s["payload_bytes_up"]
        assert r["payload_bytes_up"] == 3 * summary["trainable_parameters"] * 2
        assert r["failures"] == []
    assert json.loads((run_dir / "config.json").read_text())["strategy"] == "fedprox"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-0001", "round-0002"]
    for ck in ("checkpoints/round-0002", "final"):
        assert (run_dir / ck / "adapter" / "adapter_config.json").is_file()
    saved = json.loads((run_dir / "final" / "summary.json").read_text())
    assert saved["rounds"] == 2
    # The frozen base alone (it held base + adapters, unlike the run store's figure).
    from common.bases import load_base

    assert saved["base_parameters"] == sum(p.numel() for p in load_base("arch:tiny").model.parameters())


def test_personal_parts_never_reach_the_server(data, tmp_path):
    cfg = make_cfg(data, tmp_path, run_name="personal", personal=("adapters.vision",), rounds=1)
    _, grid = run(cfg)
    sent = [set(r.content["arrays"].keys()) for r in grid.replies if "arrays" in r.content]
    assert sent and all(not any(n.startswith("adapters.vision") for n in names) for names in sent)
    for where in ("checkpoints/round-0001", "final"):
        names = load_file(str(tmp_path / "runs/personal" / where / "adapter/adapter_model.safetensors")).keys()
        assert names and not any(n.startswith("adapters.vision") for n in names)
    # ...while each site kept its own, on its own disk.
    kept = list((tmp_path / "sites").rglob("runs/personal/personal/round-0001.safetensors"))
    assert len(kept) == 3


@pytest.mark.parametrize(
    "strategy,interruption,extra",
    [
        ("fedadam", "crash", {"personal": ("adapters.vision",)}),
        ("fedyogi", "extend", {"fraction_train": 0.67}),
        ("fedavg", "crash", {}),
    ],
)
def test_resume_reaches_the_same_final_adapter(data, tmp_path, strategy, interruption, extra):
    kw = dict(strategy=strategy, server_lr=0.05, **extra)
    straight = tmp_path / "straight"
    run(make_cfg(data, straight, run_name="r", rounds=3, **kw))
    resumed = tmp_path / "resumed"
    if interruption == "extend":
        # A run of 1 round, continued to 3.
        run(make_cfg(data, resumed, run_name="r", rounds=1, **kw))
    else:
        # What a crash after round 1's checkpoint but before its record leaves
        # behind: round-2 checkpoint present, round-2 record missing, no final/.
        run(make_cfg(data, resumed, run_name="r", rounds=2, **kw))
        rounds_file = resumed / "runs/r/rounds.jsonl"
        rounds_file.write_text(rounds_file.read_text().splitlines(keepends=True)[0])
        shutil.rmtree(resumed / "runs/r/final")
        (resumed / "runs/r/checkpoints/.round-0003.tmp-x").mkdir()
    summary, _ = run(make_cfg(data, resumed, run_name="r", rounds=3, resume=True, **kw))
    assert summary["rounds"] == 3
    a, b = final_adapter(straight, "r"), final_adapter(resumed, "r")
    assert a.keys() == b.keys()
    # Same seed, same site sampling, same reply order: bit-identical on this
    # CPU; the tolerance stated for other machines/BLAS builds is 1e-6.
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    print(f"{strategy}/{interruption}: resumed vs straight max |diff| = {worst:.3g}")
    assert worst <= 1e-6
    straight_rounds = [json.loads(x) for x in (straight / "runs/r/rounds.jsonl").read_text().splitlines()]
    resumed_rounds = [json.loads(x) for x in (resumed / "runs/r/rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in resumed_rounds] == [1, 2, 3]
    assert sorted(p.name for p in (resumed / "runs/r/checkpoints").iterdir()) == [
        "round-0001", "round-0002", "round-0003"]
    # Restored moments (not restarted ones) give the same per-round validation Dice.
    for x, y in zip(straight_rounds, resumed_rounds):
        assert x["dice"] == pytest.approx(y["dice"], abs=1e-6)
        assert sorted(x["sites"]) == sorted(y["sites"])


def test_natural_sites_need_one_supernode_each_and_the_error_says_how(data, tmp_path):
    from common.federation_config import ConfigError

    cfg = make_cfg(data, tmp_path, run_name="two")
    with pytest.raises(ConfigError, match='--num-sites 3'):
        run(cfg, sites=2)


def test_comparison_table_has_every_column(data, tmp_path):
    cfg = make_cfg(data, tmp_path, run_name="cmp", rounds=1, compare=True, finetune_epochs=1)
    summary, _ = run(cfg)
    rows = summary["comparison"]["rows"]
    assert [r["site"] for r in rows] == ["site-0", "site-1", "site-2"]
    for r in rows:
        for key in ("frozen_base", "local_only", "federated", "federated_personalised", "pooled"):
            assert 0.0 <= r[key] <= 1.0, (key, r)
    # The fine-tuned column is really a different model from the global one at some site.
    assert any(r["federated_personalised"] != r["federated"] for r in rows)
    # The saved table holds exactly these values, one row per site (not just its header).
    table = (tmp_path / "runs/cmp/final/comparison.md").read_text().splitlines()
    for r in rows:
        line = next(x for x in table if x.startswith(f"| {r['site']} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[2:] == [f"{r[k]:.3f}" for k in ("frozen_base", "local_only", "federated",
                                                       "federated_personalised", "pooled")]


def test_outside_simulation_the_table_has_no_pooled_bound(data, tmp_path):
    class DeploymentLikeGrid(InProcessGrid):
        fedvlsm_simulation = False

    cfg = make_cfg(data, tmp_path, run_name="deploy", rounds=1, compare=True, finetune_epochs=0)
    summary = run_federation(DeploymentLikeGrid(cfg, 3), cfg, DemoHooks())
    rows = summary["comparison"]["rows"]
    assert all(np.isnan(r["pooled"]) and 0 <= r["local_only"] <= 1 for r in rows)
    assert "not a simulation" in summary["comparison"]["note"]
    # The file is strict JSON: the missing bound is null (a NaN token broke JSON.parse and jq).
    text = (tmp_path / "runs" / "deploy" / "final" / "comparison.json").read_text()
    assert all(r["pooled"] is None for r in json.loads(text, parse_constant=lambda t: pytest.fail(t))["rows"])


def test_work_between_rounds_is_in_the_next_rounds_time(data, tmp_path, monkeypatch):
    """round_seconds covers the server's work after a round too (state, checkpoint, record), not the call alone."""
    from server import server_app

    state = server_app.strategy_state
    pause = 1.0

    def slow_state(strategy):
        time.sleep(pause)  # the server's own work after a round (here: reading the strategy's state)
        return state(strategy)

    monkeypatch.setattr(server_app, "strategy_state", slow_state)
    cfg = make_cfg(data, tmp_path, run_name="clock", rounds=2)
    run(cfg)
    rounds = [json.loads(line) for line in (tmp_path / "runs/clock/rounds.jsonl").read_text().splitlines()]
    # Round 1's pause came after its record was made: it is in round 2's time.
    assert rounds[1]["round_seconds"] >= pause + rounds[1]["train_seconds"]


def test_a_new_run_under_a_deleted_runs_name_never_starts_from_its_personal_parts(data, tmp_path):
    # The sites keyed personal parts by run name only: a run deleted at the server (its folder removed)
    # and started anew under that name trained, from round 2, on the old run's personal tensors.
    import shutil

    run(make_cfg(data, tmp_path, run_name="p", personal=("adapters.vision",), rounds=2))
    first_id = (tmp_path / "runs/p/run-id").read_text()
    shutil.rmtree(tmp_path / "runs" / "p")  # "already holds rounds" points users there
    run(make_cfg(data, tmp_path, run_name="p", rounds=2))  # no personal parts this time
    rounds = [json.loads(x) for x in (tmp_path / "runs/p/rounds.jsonl").read_text().splitlines()]
    assert all(r["dice_personal"] == r["dice"] for r in rounds)  # the global adapter only (was not so)

    shutil.rmtree(tmp_path / "runs" / "p")
    run(make_cfg(data, tmp_path, run_name="p", personal=("adapters.vision",), rounds=1))
    third_id = (tmp_path / "runs/p/run-id").read_text()
    assert third_id != first_id
    sites = list((tmp_path / "sites").rglob("runs/p"))
    assert len(sites) == 3
    for site in sites:
        # The first run's parts are moved aside, not deleted; the folder now holds the third run's only.
        assert sorted(p.name for p in site.iterdir()) == ["personal", f"personal-{first_id}"]
        assert sorted(p.name for p in (site / "personal").iterdir()) == ["round-0001.safetensors", "run-id"]
        assert (site / "personal" / "run-id").read_text() == third_id
        assert sorted(p.name for p in (site / f"personal-{first_id}").iterdir()) == [
            "round-0001.safetensors", "round-0002.safetensors", "run-id"]


def _state(home, name):
    run_dir = home / "runs" / name
    return (json.loads((run_dir / "status.json").read_text())["status"],
            sorted(p.name for p in (run_dir / "final").iterdir()) if (run_dir / "final").is_dir() else None,
            len((run_dir / "rounds.jsonl").read_text().splitlines()))


def test_a_resume_that_fails_before_any_round_leaves_the_finished_run_as_it_was(data, tmp_path):
    # It set the run `running`, deleted final/ (adapter, summary) and ended `failed`, before any check.
    from common.federation_config import ConfigError
    from server.run_records import RunRecordsError

    run(make_cfg(data, tmp_path, run_name="done", rounds=2))
    before = _state(tmp_path, "done")
    assert before == ("finished", ["adapter", "summary.json"], 2)
    # More sites than the simulation has: found once the server waits for them, after the base loaded.
    with pytest.raises(ConfigError, match="min-sites"):
        run(make_cfg(data, tmp_path, run_name="done", rounds=3, resume=True, min_sites=5))
    assert _state(tmp_path, "done") == before
    # A damaged last checkpoint: said at once, naming the file; nothing changed either.
    weights = tmp_path / "runs/done/checkpoints/round-0002/adapter/adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(RunRecordsError, match="round-0002/adapter/adapter_model.safetensors.*remove the folder"):
        run(make_cfg(data, tmp_path, run_name="done", rounds=3, resume=True))
    assert _state(tmp_path, "done") == before


def test_a_resume_with_fewer_rounds_than_the_run_has_is_refused(data, tmp_path):
    # It was accepted: the final adapter stayed round 2's while the comparison trained its baselines for 1.
    from common.federation_config import ConfigError

    run(make_cfg(data, tmp_path, run_name="two", rounds=2))
    with pytest.raises(ConfigError, match="'rounds' = 1 but run 'two' already has 2 complete rounds"):
        run(make_cfg(data, tmp_path, run_name="two", rounds=1, resume=True))
    assert _state(tmp_path, "two") == ("finished", ["adapter", "summary.json"], 2)


def test_a_simulated_run_resumes_only_with_its_own_number_of_sites(data, tmp_path):
    # The site count is no config key: a run simulated with 4 sites, resumed with the documented
    # command (no --num-sites), went on with 3: other demo data, another partition, exit 0.
    from common.federation_config import ConfigError
    from simulations.simulate import saved_num_sites

    cfg = make_cfg(data, tmp_path, run_name="four", rounds=1, partition="iid")
    run(cfg, sites=4)
    assert saved_num_sites(cfg) == 4  # what `fedvlsm simulate` resumes with when given no --num-sites
    with pytest.raises(ConfigError, match="was simulated with 4 sites, this simulation has 3"):
        run(make_cfg(data, tmp_path, run_name="four", rounds=2, partition="iid", resume=True), sites=3)
    assert _state(tmp_path, "four") == ("finished", ["adapter", "summary.json"], 1)
    run(make_cfg(data, tmp_path, run_name="four", rounds=2, partition="iid", resume=True), sites=4)
    assert _state(tmp_path, "four") == ("finished", ["adapter", "summary.json"], 2)


def test_a_resume_on_other_base_weights_is_refused(data, tmp_path, monkeypatch):
    # A relative base folder resumed from another working directory loaded other weights under the
    # same `base` key: round 2 trained on them, final/ named the new folder, config.json the old name.
    import torch

    from common.bases import load_base
    from common.federation_config import ConfigError
    from server import server_app

    run(make_cfg(data, tmp_path, run_name="based", rounds=1))

    def other_weights(spec):
        base = load_base(spec)
        with torch.no_grad():
            next(base.model.parameters()).add_(0.01)
        return base

    monkeypatch.setattr(server_app, "load_base", other_weights)
    with pytest.raises(ConfigError, match=r"'base': run 'based' was trained on base weights with fingerprint \w+, "
                                          r"but base 'arch:tiny' loads weights with fingerprint \w+"):
        run(make_cfg(data, tmp_path, run_name="based", rounds=2, resume=True))
    assert _state(tmp_path, "based") == ("finished", ["adapter", "summary.json"], 1)
    monkeypatch.setattr(server_app, "load_base", load_base)  # the run's own base: it goes on
    run(make_cfg(data, tmp_path, run_name="based", rounds=2, resume=True))
    assert _state(tmp_path, "based") == ("finished", ["adapter", "summary.json"], 2)


def test_a_resume_whose_sites_lost_their_personal_parts_fails_naming_them(data, tmp_path):
    # A site that finds no personal parts starts them afresh: a simulation resumed with another `home`
    # (or a site's folder wiped) went on with fresh parts, its personalised Dice reported as the run's.
    from server.server_app import RunFailed

    run(make_cfg(data, tmp_path, run_name="mine", rounds=1, personal=("adapters.vision",)))
    kept = sorted(tmp_path.glob("sites/**/runs/mine/personal/round-0001.safetensors"))
    assert len(kept) == 3
    for parts in kept:
        parts.unlink()
    with pytest.raises(RunFailed, match=r"personal parts: site-\d starts round 2 from none, but it trained round 1"):
        run(make_cfg(data, tmp_path, run_name="mine", rounds=2, personal=("adapters.vision",), resume=True))


@pytest.mark.parametrize(("dp", "rounds", "refused"), [("sample", 3, True), ("sample", 1, False), ("off", 3, False)])
def test_a_run_calibrated_for_a_target_epsilon_is_not_extended(tmp_path, dp, rounds, refused):
    # Its sites fixed z for the planned rounds: resumed with rounds 1 -> 3 it ended at epsilon 15.7, not 8.
    from common.federation_config import ConfigError
    from server.run_records import RunRecords
    from server.server_app import open_run

    dp_keys = {"dp": dp, "dp_target_epsilon": 8.0} if dp != "off" else {}
    planned = FederationConfig(base="arch:tiny", home=str(tmp_path), run_name="dpt", rounds=1, **dp_keys)
    RunRecords.create(planned.runs_dir, "dpt", planned.to_run_config())
    resumed = planned.replace(rounds=rounds, resume=True)
    if refused:
        with pytest.raises(ConfigError, match=r"'rounds' = 3: run 'dpt' calibrated its noise for "
                                              r"dp-target-epsilon = 8 over rounds = 1"):
            open_run(resumed)
    else:
        open_run(resumed).claim.close()
