"""A site's own privacy terms (node config, set by the hospital): what a server cannot switch off.

Before them a site's budget was per run and decided by the server: a new
run-name gave the same images a fresh budget, and `dp = "off"` trained with
no noise at all. The real round loop and handlers (fed_harness.InProcessGrid).
"""

from __future__ import annotations

import json

import pytest

from client.launcher import _check_args, _policy_node_config
from common.data import synthesize
from common.federation_config import FederationConfig
from common.privacy import PrivacyError, compute_epsilon, sample_rate_and_steps, site_state_path
from common.site_policy import SitePolicy, SitePolicyError
from fed_harness import InProcessGrid
from server.server_app import RunFailed, run_federation


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy-data")
    synthesize(root, sites=2, per_site=9, seed=0, image_size=64)
    return root


def cfg_for(data, home, run_name, **kw) -> FederationConfig:
    values = {"base": "arch:tiny", "adapter": "shallow-vlc", "data": str(data), "home": str(home), "rounds": 1,
              "local_epochs": 1, "batch_size": 2, "compare": False, "lr": 0.01, "run_name": run_name, **kw}
    return FederationConfig(**values)


def grid_with(cfg, policy: dict) -> InProcessGrid:
    return InProcessGrid(cfg, 2, node_configs=[{"partition-id": k, "num-partitions": 2, **policy} for k in range(2)])


def records(home, run_name) -> list[dict]:
    return [json.loads(x) for x in (home / "runs" / run_name / "rounds.jsonl").read_text().splitlines()]


def test_a_site_that_requires_dp_refuses_a_run_without_it(data, tmp_path):
    cfg = cfg_for(data, tmp_path, "plain", max_skipped_rounds=1)
    with pytest.raises(RunFailed):
        run_federation(grid_with(cfg, {"dp-require": "true"}), cfg)
    (record,) = records(tmp_path, "plain")
    assert record["status"] == "skipped" and record["sites"] == {}
    assert [f["reason"] for f in record["failures"]] == ["site policy: this site trains only with dp = 'sample'"] * 2


def test_a_site_with_only_a_budget_also_refuses_a_run_without_dp(data, tmp_path):
    """A site budget is a promise about every run on the data: a run without DP-SGD cannot be charged to it."""
    cfg = cfg_for(data, tmp_path, "plain", max_skipped_rounds=1)
    with pytest.raises(RunFailed):
        run_federation(grid_with(cfg, {"dp-site-budget": 5.0}), cfg)
    (record,) = records(tmp_path, "plain")
    assert record["status"] == "skipped" and record["sites"] == {}


@pytest.mark.parametrize("value,required", [("false", False), ("False", False), (False, False), ("true", True),
                                            (True, True)])
def test_dp_require_reads_its_words(value, required):
    assert SitePolicy.from_node_config({"dp-require": value}).require_dp is required


def test_the_sites_own_budget_holds_across_runs_the_server_starts(data, tmp_path):
    # Run A spends one round of DP-SGD. Run B has a fresh run budget (its own dp-epsilon-budget is
    # generous), but the site's budget admits only 1.5 rounds over both runs: B's round is refused
    # before training and B ends cleanly. Before, B trained: its accountant started from zero.
    from client.site import Site

    probe = cfg_for(data, tmp_path, "a")
    n_train = len(Site(probe, {"partition-id": 0, "num-partitions": 2}).items("train"))
    q, steps = sample_rate_and_steps(n_train, 2)
    one, two = (compute_epsilon([(1.0, q, steps * k)], 1e-5) for k in (1, 2))
    policy = {"dp-site-budget": (one + two) / 2, "dp-site-delta": 1e-5}
    dp = {"dp": "sample", "dp_noise_multiplier": 1.0, "dp_epsilon_budget": 100.0}

    cfg_a = cfg_for(data, tmp_path, "a", **dp)
    run_federation(grid_with(cfg_a, policy), cfg_a)
    assert records(tmp_path, "a")[0]["status"] == "ok"

    cfg_b = cfg_for(data, tmp_path, "b", **dp)
    summary = run_federation(grid_with(cfg_b, policy), cfg_b)
    (record,) = records(tmp_path, "b")
    assert record["sites"] == {} and len(record["failures"]) == 2
    assert all(f["reason"].startswith("privacy budget: this round would take the epsilon of all this site's runs")
               for f in record["failures"])
    assert summary["ended_early"].startswith("privacy budget")
    # Nothing was charged for the refused round: each site's run-B state is as it was (none at all).
    assert not list((tmp_path / "sites").rglob("privacy/b.json"))

    # Without the site's budget the same run trains (the run's own budget allows it).
    cfg_c = cfg_for(data, tmp_path, "c", **dp)
    run_federation(grid_with(cfg_c, {}), cfg_c)
    assert records(tmp_path, "c")[0]["status"] == "ok"


@pytest.mark.parametrize("fits", [2, 1])
def test_the_site_budget_counts_each_round_of_the_running_run_once(data, tmp_path, fits):
    """Budget for `fits` rounds of a 2-round run: the run's own earlier round counts, and only once."""
    from client.site import Site

    probe = cfg_for(data, tmp_path, "a")
    n_train = len(Site(probe, {"partition-id": 0, "num-partitions": 2}).items("train"))
    q, steps = sample_rate_and_steps(n_train, 2)
    eps = [compute_epsilon([(1.0, q, steps * k)], 1e-5) for k in (1, 2, 3)]
    policy = {"dp-site-budget": (eps[fits - 1] + eps[fits]) / 2, "dp-site-delta": 1e-5}
    cfg = cfg_for(data, tmp_path, "a", rounds=2, dp="sample", dp_noise_multiplier=1.0, dp_epsilon_budget=100.0)
    run_federation(grid_with(cfg, policy), cfg)
    got = records(tmp_path, "a")
    assert got[0]["status"] == "ok"
    if fits == 2:
        assert [r["status"] for r in got] == ["ok", "ok"]
    else:
        assert got[1]["sites"] == {} and all(f["reason"].startswith("privacy budget") for f in got[1]["failures"])


def test_an_unreadable_privacy_state_stops_the_site_rather_than_undercount(data, tmp_path):
    cfg = cfg_for(data, tmp_path, "a", dp="sample", dp_noise_multiplier=1.0, max_skipped_rounds=1)
    grid = grid_with(cfg, {"dp-site-budget": 50.0})
    # the sites keep their state under their site folder: plant the unreadable file in each
    for k in range(2):
        from client.site import Site

        folder = Site(cfg, {"partition-id": k, "num-partitions": 2}).site_dir / "privacy"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "old-run.json").write_text("{ not json")
    with pytest.raises(RunFailed):
        run_federation(grid, cfg)
    (record,) = records(tmp_path, "a")
    assert record["sites"] == {} and len(record["failures"]) == 2
    assert [f["reason"] for f in record["failures"]] == ["train failed: PrivacyError (details in the site's log)"] * 2
    log = (Site(cfg, {"partition-id": 0, "num-partitions": 2}).site_dir / "logs" / "site.log").read_text()
    assert "old-run.json: this site's privacy state cannot be read" in log  # the site's own log names the file


@pytest.mark.parametrize("config,message", [
    ({"dp-require": "maybe"}, "node config 'dp-require': expected true or false"),
    ({"dp-site-budget": "lots"}, "node config 'dp-site-budget': expected a number"),
    ({"dp-site-budget": -1.0}, "node config 'dp-site-budget': must be a finite epsilon >= 0"),
    ({"dp-site-budget": float("inf")}, "node config 'dp-site-budget': must be a finite epsilon >= 0"),
    ({"dp-site-budget": 3.0, "dp-site-delta": 1.0}, "node config 'dp-site-delta': must be in \\(0, 1\\)"),
])
def test_unusable_policy_values_are_refused_naming_the_key(config, message):
    with pytest.raises(SitePolicyError, match=message):
        SitePolicy.from_node_config(config)


def test_site_start_puts_the_policy_in_the_node_config_and_checks_it_first(tmp_path):
    from common.cli import build_parser

    def args(*extra):
        return build_parser().parse_args(["site", "start", "--superlink", "x:9092", "--data", str(tmp_path),
                                          "--insecure", *extra])

    assert _policy_node_config(args()) == {}
    node_config = _policy_node_config(args("--dp-site-budget", "4", "--dp-site-delta", "1e-6"))
    assert SitePolicy.from_node_config(node_config) == SitePolicy(False, 4.0, 1e-6)
    assert SitePolicy.from_node_config(_policy_node_config(args("--dp-require"))).demands_dp
    assert _check_args(args("--dp-site-budget", "-2")) == \
        "--dp-site-budget: must be a finite epsilon >= 0 (0: none), got -2.0"
    # A delta without the budget it belongs to was dropped without a word; with it, or alone, the default.
    assert _check_args(args("--dp-site-delta", "1e-7")) == \
        "--dp-site-delta: it is the delta of --dp-site-budget, which is not given"
    assert _check_args(args("--dp-site-budget", "4", "--dp-site-delta", "1e-7")) is None
    assert SitePolicy.from_node_config(_policy_node_config(args("--dp-site-budget", "4"))) == SitePolicy(False, 4.0, 1e-5)


def _site_message(cfg, message_type: str, **config):
    from flwr.app import ConfigRecord, Message, RecordDict

    from common.payload import Cfg, Rec

    content = {Cfg.RUN_NAME: cfg.run_name, Cfg.RUN_ID: "1", Cfg.ROUND: cfg.rounds, Cfg.RUN_CONFIG: cfg.to_json(),
               **config}
    return Message(RecordDict({Rec.CONFIG: ConfigRecord(content)}), dst_node_id=100, message_type=message_type)


@pytest.mark.parametrize("policy", [{"dp-require": "true"}, {"dp-site-budget": 0.5}])
def test_a_site_with_its_own_terms_trains_nothing_outside_dp_sgd(data, tmp_path, monkeypatch, policy):
    """train.local_only and evaluate.final's fine-tuning are plain SGD on the training images, charged to
    no accountant. Before, a site with dp-site-budget 0.5 trained 3 plain epochs for train.local_only and
    replied with the adapter's test Dice, and fine-tuned for evaluate.final: its budget did not hold."""
    from client import handlers
    from common.payload import Rec

    plain_fits = []
    monkeypatch.setattr(handlers, "fit", lambda *a, **k: plain_fits.append(a) or pytest.fail("plain fit at the site"))
    cfg = cfg_for(data, tmp_path, "terms", dp="sample", dp_noise_multiplier=1.0, finetune_epochs=2)
    grid = grid_with(cfg, policy)

    (local,) = grid.send_and_receive([_site_message(cfg, "train.local_only", epochs=3)])
    assert Rec.METRICS not in local.content.metric_records
    assert local.content.config_records[Rec.STATUS]["error"] == "site policy: this site trains only with dp = 'sample'"

    (final,) = grid.send_and_receive([_site_message(cfg, "evaluate.final")])
    metrics = final.content[Rec.METRICS]
    assert "dice-finetuned" not in metrics and "dice-personal" in metrics
    assert plain_fits == []
    assert not list((tmp_path / "sites").rglob("privacy/*.json"))  # and nothing was trained to charge


@pytest.mark.parametrize("hidden", [".a", "../a"])
def test_a_run_name_cannot_hide_its_steps_from_the_sites_budget(data, tmp_path, hidden):
    """The site's ledger is `privacy/*.json`, and the run name comes from the server's message. Before,
    run '.a' (a dot file the ledger skips) or '../a' (a state outside privacy/, checked against that
    folder's ledger) trained a round, then run 'b' trained too: both rounds on site-0's images, epsilon
    6.84 > its dp-site-budget 6.02 (n = 6, q = 1/3, z = 1, 3 steps a round, delta 1e-5)."""
    from client.site import Site
    from common.payload import Rec

    probe = cfg_for(data, tmp_path, "a")
    n_train = len(Site(probe, {"partition-id": 0, "num-partitions": 2}).items("train"))
    q, steps = sample_rate_and_steps(n_train, 2)
    one, two = (compute_epsilon([(1.0, q, steps * k)], 1e-5) for k in (1, 2))
    cfg = cfg_for(data, tmp_path, "b", dp="sample", dp_noise_multiplier=1.0, dp_epsilon_budget=100.0)
    grid = grid_with(cfg, {"dp-site-budget": (one + two) / 2, "dp-site-delta": 1e-5})

    (first,) = grid.send_and_receive([_site_message(cfg, "train", **{"run-name": hidden})])
    assert Rec.STATUS in first.content.config_records, f"run {hidden!r} trained outside the site's ledger"
    # Refused with every message that names a run so (the site's folders are named by it too), before
    # any step; site_state_path refuses it as well, for any other caller.
    assert first.content.config_records[Rec.STATUS]["error"].startswith(f"protocol: run name {hidden!r} is not")
    with pytest.raises(PrivacyError, match="cannot name a privacy state"):
        site_state_path(tmp_path, hidden)
    (second,) = grid.send_and_receive([_site_message(cfg, "train")])
    assert second.content[Rec.METRICS]["dp-epsilon"] == pytest.approx(one, rel=1e-6)
    site_dir = Site(cfg, {"partition-id": 0, "num-partitions": 2}).site_dir
    states = [p.relative_to(site_dir).as_posix() for p in site_dir.rglob("*.json") if "history" in p.read_text()]
    assert states == ["privacy/b.json"]  # nothing was charged anywhere for the refused name


@pytest.mark.parametrize("field, value", [("run-name", "../../escaped"), ("run-id", "../../escaped"),
                                          ("run-name", ".hidden")])
def test_a_message_cannot_name_site_folders_outside_the_site(data, tmp_path, field, value):
    """The run name and run id name the site's folders (`runs/<run-name>/personal`, its run-id marker, the
    folder a replaced run's parts move to). Before, run-name '../../escaped' with personal parts made and
    wrote `<site-dir>/../escaped/personal/` outside the site's folder; now the site refuses the message."""
    from client.site import Site
    from common.payload import Rec

    cfg = cfg_for(data, tmp_path / "home", "ok", personal=("adapters.vision",))
    grid = grid_with(cfg, {})
    (reply,) = grid.send_and_receive([_site_message(cfg, "train", **{field: value})])
    assert Rec.STATUS in reply.content.config_records, "the site served it"
    assert reply.content.config_records[Rec.STATUS]["error"].startswith("protocol: run ")
    site_dir = Site(cfg, {"partition-id": 0, "num-partitions": 2}).site_dir
    outside = [p for p in (tmp_path / "home").rglob("*") if site_dir not in p.parents and p != site_dir
               and "escaped" in str(p)]
    assert outside == [] and not list(tmp_path.rglob("*escaped*")) and not list(tmp_path.rglob(".hidden"))
