"""Bad train/evaluate replies are excluded with a reason; none of them may raise out of the ServerApp.

The real round loop against real handlers (fed_harness.InProcessGrid, Flower's
protobuf serde on the way); one site's reply is corrupted after it was sent,
the way a buggy or hostile site would send it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from common.data import synthesize
from common.federation_config import ConfigError, FederationConfig
from fed_harness import InProcessGrid
from server.server_app import run_federation


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    synthesize(root, sites=3, per_site=9, seed=0, image_size=64)
    return root


class TamperingGrid(InProcessGrid):
    """Delivers as Flower would, then corrupts site-0's replies of one kind (None: of every kind)."""

    def __init__(self, *a, tamper, kind="train", sites=(100,), **kw):
        super().__init__(*a, **kw)
        self.tamper, self.kind, self.sites = tamper, kind, sites

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for r in replies:
            if r.metadata.src_node_id in self.sites and self.kind in (None, r.metadata.message_type) \
                    and r.has_content():
                self.tamper(r)
        return replies


def _edit_arrays(fn):
    def tamper(reply):
        arrays = {k: a.numpy().copy() for k, a in reply.content["arrays"].items()}
        fn(arrays)
        reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return tamper


def _first(arrays):
    return sorted(arrays)[0]


def _missing_tensor(arrays):
    del arrays[_first(arrays)]


def _wrong_shape(arrays):
    k = _first(arrays)
    arrays[k] = np.concatenate([arrays[k].ravel(), np.zeros(1, arrays[k].dtype)])


def _wrong_dtype(arrays):
    k = _first(arrays)
    arrays[k] = arrays[k].astype(np.float32)  # the run's wire dtype is fp16


def _inf(arrays):
    arrays[_first(arrays)].flat[0] = np.inf


def _huge(arrays):
    k = _first(arrays)
    arrays[k] = (arrays[k].astype(np.float32) + 100.0).astype(np.float16)


def _metric(key, value):
    def tamper(reply):
        m = reply.content["metrics"]
        if value is None:
            del m[key]
        else:
            m[key] = value
    return tamper


def _second_array_record(reply):
    reply.content["extra"] = ArrayRecord({"x": Array(np.zeros(2, np.float16))})


def _drop_metrics(reply):
    del reply.content["metrics"]


def _nan_loss(reply):
    reply.content["metrics"]["train-loss"] = float("nan")


CASES = [
    (_edit_arrays(_missing_tensor), "tensors are not the shared adapter: 0 unexpected, 1 missing"),
    (_edit_arrays(_wrong_shape), "wrong shape: "),
    (_edit_arrays(_wrong_dtype), "wrong dtype: float32 where the run's payload dtype is float16"),
    (_edit_arrays(_inf), "update holds NaN/Inf"),
    (_edit_arrays(_huge), "update norm "),
    (_metric("num-examples", None), "num-examples missing or not a whole number in [1, 2147483647]"),
    (_metric("num-examples", -3.0), "num-examples missing or not a whole number in [1, 2147483647]"),
    (_metric("num-examples", float("inf")), "num-examples missing or not a whole number in [1, 2147483647]"),
    # A fraction was accepted and truncated: 0.5 became an accepted update of weight 0.
    (_metric("num-examples", 0.5), "num-examples missing or not a whole number in [1, 2147483647]"),
    (_metric("num-examples", 1.9), "num-examples missing or not a whole number in [1, 2147483647]"),
    (_metric("num-examples", 1e300), "num-examples missing or not a whole number in [1, 2147483647]"),
    (_metric("train-loss", None), "metric train-loss missing or not a finite number"),
    (_nan_loss, "metric train-loss missing or not a finite number"),
    (_metric("steps", float("nan")), "malformed metrics: 1 not finite numbers (e.g. steps)"),
    (_metric("base-loads", None), None),  # optional runtime figures may be absent: accepted
    (_second_array_record, "reply must hold exactly one adapter ArrayRecord and one MetricRecord"),
    (_drop_metrics, "reply must hold exactly one adapter ArrayRecord and one MetricRecord"),
]


def cfg_for(tmp_path, data, **kw) -> FederationConfig:
    values = {"base": "arch:tiny", "adapter": "shallow-vlc", "home": str(tmp_path / "server"), "rounds": 1,
              "compare": False, "lr": 0.01, "run_name": "checks", "data": str(data), "max_update_norm": 50.0,
              "local_epochs": 1, **kw}
    return FederationConfig(**values)


def records(tmp_path) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "server/runs/checks/rounds.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("tamper,reason", CASES, ids=[str(i) for i in range(len(CASES))])
def test_each_kind_of_bad_train_reply_is_excluded_and_the_rest_aggregated(tmp_path, data, tamper, reason):
    cfg = cfg_for(tmp_path, data)
    run_federation(TamperingGrid(cfg, 3, tamper=tamper), cfg)
    (record,) = records(tmp_path)
    assert record["status"] == "ok"
    # Every message counts down, the excluded site's train message too (it was left out: 5 of 6).
    assert record["payload_bytes_down"] == 3 * record["sites"]["site-1"]["payload_bytes_down"]
    if reason is None:
        assert record["excluded"] == [] and record["sites"]["site-0"]["base_loads"] is None
        return
    assert [e["site"] for e in record["excluded"]] == ["site-0"]
    assert record["excluded"][0]["reason"].startswith(reason), record["excluded"]
    assert "num_examples" not in record["sites"]["site-0"]
    assert all("num_examples" in record["sites"][s] for s in ("site-1", "site-2"))
    assert (tmp_path / "server/runs/checks/final/adapter").is_dir()


def test_the_norm_bound_is_off_at_zero_and_measured_in_fp32(tmp_path, data):
    cfg = cfg_for(tmp_path, data, max_update_norm=0.0)
    run_federation(TamperingGrid(cfg, 3, tamper=_edit_arrays(_huge)), cfg)
    assert records(tmp_path)[0]["excluded"] == []


def _update_of_norm(norm):
    def edit(arrays):
        for k in arrays:
            arrays[k][...] = 0
        arrays[_first(arrays)].flat[0] = norm  # exact in fp16: the update's norm is `norm`
    return _edit_arrays(edit)


@pytest.mark.parametrize("norm,excluded", [(52.0, True), (48.0, False)])
def test_the_norm_bound_is_sharp(tmp_path, data, norm, excluded):
    cfg = cfg_for(tmp_path, data)  # max-update-norm 50
    run_federation(TamperingGrid(cfg, 3, tamper=_update_of_norm(norm)), cfg)
    got = records(tmp_path)[0]["excluded"]
    if excluded:
        assert [(e["site"], e["reason"]) for e in got] == [("site-0", "update norm 52 above max-update-norm 50")]
    else:
        assert got == []


class ReversingGrid(InProcessGrid):
    """Replies arrive in the opposite order (as they may over a network)."""

    def send_and_receive(self, messages, *, timeout=None):
        return list(reversed(list(super().send_and_receive(messages, timeout=timeout))))


def test_the_global_adapter_does_not_depend_on_the_order_replies_arrive_in(tmp_path, data):
    """Float sums depend on their order: the server sorts replies by site, so a resumed run (or a rerun)
    whose replies come back in another order reaches the same bits."""
    from safetensors.numpy import load_file

    finals = []
    for grid_cls, name in ((InProcessGrid, "a"), (ReversingGrid, "b")):
        cfg = cfg_for(tmp_path / name, data, rounds=2)
        run_federation(grid_cls(cfg, 3), cfg)
        finals.append(load_file(tmp_path / name / "server/runs/checks/final/adapter/adapter_model.safetensors"))
    assert finals[0].keys() == finals[1].keys()
    assert all(np.array_equal(finals[0][k], finals[1][k]) for k in finals[0])


class RecordingGrid(InProcessGrid):
    """Keeps what the server sent each round and what each site replied, site-0 claiming 10x its examples."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.sent, self.got = [], []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type == "train"]
        if train:
            self.sent.append({k: a.numpy().copy() for k, a in train[0].content["arrays"].items()})
        replies = super().send_and_receive(messages, timeout=timeout)
        if train:
            for r in replies:
                if r.metadata.src_node_id == 100:
                    r.content["metrics"]["num-examples"] = 10 * int(r.content["metrics"]["num-examples"])
            self.got.append([({k: a.numpy().copy() for k, a in r.content["arrays"].items()},
                              int(r.content["metrics"]["num-examples"])) for r in replies])
        return replies


def test_fedavg_in_the_round_loop_weighs_each_site_s_update_by_its_example_count(tmp_path, data):
    cfg = cfg_for(tmp_path, data, rounds=2, payload_dtype="fp32")  # fp32 both ways: exact arrays to compare
    grid = RecordingGrid(cfg, 3)
    run_federation(grid, cfg)
    counts = [n for _, n in grid.got[0]]
    assert counts[0] == 10 * counts[1]  # unequal weights, or the test could not tell weighted from equal
    total = sum(counts)
    for k, before in grid.sent[0].items():
        expected = before + sum(n * update[k] for update, n in grid.got[0]) / total
        np.testing.assert_allclose(grid.sent[1][k], expected, rtol=1e-5, atol=1e-7)


def test_fewer_usable_replies_than_min_replies_skip_the_round_and_the_run_goes_on(tmp_path, data):
    cfg = cfg_for(tmp_path, data, rounds=2, min_replies=3)
    hurt = {"n": 0}

    def once(reply):  # only round 1's reply from site-0 is bad
        hurt["n"] += 1
        if hurt["n"] == 1:
            _inf_reply(reply)

    run_federation(TamperingGrid(cfg, 3, tamper=once), cfg)
    r1, r2 = records(tmp_path)
    assert r1["status"] == "skipped" and r1["skip_reason"] == "2 usable train replies, fewer than min-replies = 3"
    assert [e["site"] for e in r1["excluded"]] == ["site-0"]
    assert r2["status"] == "ok" and r2["excluded"] == []


def _inf_reply(reply):
    _edit_arrays(_inf)(reply)


def test_all_replies_bad_for_n_rounds_end_the_run_cleanly(tmp_path, data):
    from server.server_app import RunFailed

    cfg = cfg_for(tmp_path, data, rounds=3, max_skipped_rounds=2)
    with pytest.raises(RunFailed, match="2 round\\(s\\) in a row had no usable site update"):
        run_federation(TamperingGrid(cfg, 3, tamper=_edit_arrays(_inf), sites=(100, 101, 102)), cfg)
    assert [r["status"] for r in records(tmp_path)] == ["skipped", "skipped"]
    status = json.loads((tmp_path / "server/runs/checks/status.json").read_text())
    assert status["status"] == "failed"


@pytest.mark.parametrize("tamper,reason", [
    (_metric("dice", None), "evaluate metric dice missing or not a finite number"),
    (_metric("num-examples", float("nan")), "evaluate metric num-examples missing or not a finite number"),
    (lambda r: r.content.__setitem__("metrics", MetricRecord({})),
     "evaluate metric num-examples missing or not a finite number"),
    # 1.9 was summed as 1 and weighted as 1.9: a round Dice above 1 was possible.
    (_metric("num-examples", 1.9), "evaluate num-examples missing or not a whole number in [1, 2147483647]"),
])
def test_a_malformed_evaluate_reply_is_a_failure_not_a_crash(tmp_path, data, tamper, reason):
    cfg = cfg_for(tmp_path, data)
    run_federation(TamperingGrid(cfg, 3, tamper=tamper, kind="evaluate"), cfg)
    (record,) = records(tmp_path)
    assert record["status"] == "ok"
    assert [(f["site"], f["phase"], f["reason"]) for f in record["failures"]] == [("site-0", "evaluate", reason)]
    assert "val_dice" not in record["sites"]["site-0"]


def test_a_status_reply_without_a_reason_and_a_garbage_config_are_handled(tmp_path, data):
    def garbage(reply):
        reply.content["status"] = ConfigRecord({"nothing": "here"})

    cfg = cfg_for(tmp_path, data)
    run_federation(TamperingGrid(cfg, 3, tamper=garbage), cfg)
    (record,) = records(tmp_path)
    assert [(f["site"], f["reason"]) for f in record["failures"]] == [("site-0", "unspecified")]


def test_every_site_reporting_a_fraction_of_an_example_skips_the_round_without_a_crash(tmp_path, data):
    # Each count became weight 0: Flower's FedAvg divided by a total weight of 0 and the run failed.
    cfg = cfg_for(tmp_path, data, rounds=2, max_skipped_rounds=2)
    from server.server_app import RunFailed

    with pytest.raises(RunFailed, match="no usable site update"):
        run_federation(TamperingGrid(cfg, 3, tamper=_metric("num-examples", 0.5), sites=(100, 101, 102)), cfg)
    assert [r["status"] for r in records(tmp_path)] == ["skipped", "skipped"]


def test_two_sites_with_one_name_keep_two_rows_in_the_round_record(tmp_path, data):
    def same_name(reply):
        reply.content["site"] = ConfigRecord({"name": "data"})

    cfg = cfg_for(tmp_path, data)
    run_federation(TamperingGrid(cfg, 3, tamper=same_name, kind=None, sites=(100, 101)), cfg)
    (record,) = records(tmp_path)
    # Before, both went into one row "data": the record showed 2 sites, half the bytes up.
    assert sorted(record["sites"]) == ["data", "data (node 101)", "site-2"]
    assert all(row["num_examples"] > 0 for row in record["sites"].values())
    assert record["payload_bytes_up"] == sum(row["payload_bytes_up"] for row in record["sites"].values())


def test_a_min_replies_no_round_can_reach_is_refused_at_the_start(tmp_path, data):
    # 3 sites at fraction-train 0.5 sample 2 a round: min-replies 3 skipped every round, after training.
    cfg = cfg_for(tmp_path, data, fraction_train=0.5, min_replies=3)
    with pytest.raises(ConfigError, match="'min-replies' = 3 but a round samples 2 site"):
        run_federation(TamperingGrid(cfg, 3, tamper=lambda r: None), cfg)
    assert not (tmp_path / "server/runs/checks/rounds.jsonl").exists()


@pytest.mark.parametrize("key", ["max-update-norm", "round-timeout", "site-wait-timeout", "lr", "server-lr"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_nan_and_inf_are_refused_for_every_float_key(key, value):
    # `nan < 0` is False: NaN passed every range check (max-update-norm = nan turned the bound off).
    with pytest.raises(ConfigError, match=f"'{key}': must be a finite number, got {value}"):
        FederationConfig.from_run_config({key: float(value)})


def test_the_new_keys_are_validated():
    with pytest.raises(ConfigError, match="max-update-norm/min-replies"):
        FederationConfig(max_update_norm=-1.0)
    with pytest.raises(ConfigError, match="max-update-norm/min-replies"):
        FederationConfig(min_replies=0)
    assert FederationConfig.from_run_config({"max-update-norm": 2, "min-replies": 2}).max_update_norm == 2.0
