"""ClientApp handlers called directly: what a site sends back, FedProx, personal parts, base cache."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client import handlers as client_app
from client import site as sites
from common.bases import load_base
from common.data import synthesize
from common.federation_config import FederationConfig
from client.handlers import _local_seed as handlers_seed
from common.payload import (SCALE_SUFFIX, decode_update, downlink_dtype, expected_update_bytes, from_wire,
                            split_personal, to_wire)
from common.train import fit


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("client-data")
    synthesize(root, sites=2, per_site=9, seed=0, image_size=64)
    return root


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


def make_cfg(data, tmp_path, **kw) -> FederationConfig:
    return FederationConfig(base="arch:tiny", adapter="shallow-vlc", data=str(data), home=str(tmp_path),
                            run_name="unit", **kw)


def context(cfg: FederationConfig, pid: int = 0) -> Context:
    return Context(run_id=1, node_id=10 + pid, node_config={"partition-id": pid, "num-partitions": 2},
                   state=RecordDict(), run_config=cfg.to_run_config())


def train_message(cfg: FederationConfig, server_round: int = 1, mu: float | None = None, shift: float = 0.0):
    model = cfg.initial_model(load_base(cfg.base))
    shared, _ = split_personal(model.adapter_state(), cfg.personal)
    shared = {k: v + shift for k, v in shared.items()}
    config = {"server-round": server_round, "run-name": cfg.run_name, "fedvlsm-run-config": cfg.to_json()}
    if mu is not None:
        config["proximal-mu"] = mu
    wire = to_wire(shared, downlink_dtype(cfg.payload_dtype))
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in wire.items()}),
                          "config": ConfigRecord(config)})
    return Message(content, dst_node_id=10, message_type="train"), shared, model


def update_in(reply: Message) -> dict[str, np.ndarray]:
    """The update a site sent (fp32), decoded as the server decodes it."""
    return decode_update({k: a.numpy() for k, a in reply.content["arrays"].items()})


def sent_global(msg: Message) -> dict[str, np.ndarray]:
    return from_wire({k: a.numpy() for k, a in msg.content["arrays"].items()})


def received(reply: Message, msg: Message) -> dict[str, np.ndarray]:
    """The site's local adapter after training: what it received plus its update."""
    sent = sent_global(msg)
    return {k: sent[k] + v for k, v in update_in(reply).items()}


@pytest.mark.parametrize("dtype,itemsize", [("fp16", 2), ("fp32", 4), ("int8", 1)])
def test_train_reply_holds_the_update_of_exactly_the_adapter_tensors(data, tmp_path, dtype, itemsize):
    cfg = make_cfg(data, tmp_path, payload_dtype=dtype, lr=0.01)
    msg, shared, model = train_message(cfg)
    reply = client_app.train(msg, context(cfg))
    arrays = reply.content["arrays"]
    names = set(model.adapter_names())
    tensors = {k: a for k, a in arrays.items() if not k.endswith(SCALE_SUFFIX)}
    assert set(tensors) == names
    assert {a.dtype for a in tensors.values()} == {{"fp16": "float16", "fp32": "float32", "int8": "int8"}[dtype]}
    metrics = reply.content["metrics"]
    n = model.parameter_counts()["trainable"]
    assert metrics["payload-bytes-up"] == expected_update_bytes(n, len(names), dtype)
    if dtype == "int8":
        assert set(arrays.keys()) == names | {k + SCALE_SUFFIX for k in names}
        assert metrics["payload-bytes-up"] == n + 4 * len(names)
    # Weights travel down in fp16 when uploads are int8.
    assert metrics["payload-bytes-down"] == n * (2 if dtype == "int8" else itemsize)
    assert metrics["num-examples"] == len(sites.Site(cfg, {"partition-id": 0, "num-partitions": 2}).items("train"))
    assert reply.content["site"]["name"] == "site-0"

    # The reply is the update: the site's trained adapter minus the global one it received.
    # Re-run the same local training (same seed) outside the ClientApp for the reference.
    site = sites.Site(cfg, {"partition-id": 0, "num-partitions": 2})
    frozen = load_base(cfg.base)
    got = sent_global(msg)
    local = site.model(frozen, {k: torch.from_numpy(v.copy()) for k, v in got.items()})
    seed = handlers_seed(cfg, 1, "site-0")
    fit(local, site.dataset("train", frozen, train=True, seed=seed), None, frozen.tokenizer,
        cfg.train_config(cfg.local_epochs, seed))
    expected = {k: v.numpy() - got[k] for k, v in local.adapter_state().items()}
    update = update_in(reply)
    assert any(np.abs(v).max() > 1e-4 for v in expected.values())  # the site trained
    for k, v in expected.items():
        if dtype == "fp32":
            np.testing.assert_allclose(update[k], v, atol=1e-7)
        elif dtype == "fp16":
            np.testing.assert_allclose(update[k], v, atol=1e-3 * max(1.0, float(np.abs(v).max())))
        else:  # int8: within one quantisation step of its tensor's scale
            step = float(arrays[k + SCALE_SUFFIX].numpy()[0])
            assert np.abs(update[k] - v).max() <= step * (1 + 1e-5)


def test_personal_parts_stay_at_the_site_and_come_back_next_round(data, tmp_path):
    cfg = make_cfg(data, tmp_path, personal=("adapters.vision",))
    msg, shared, model = train_message(cfg, server_round=1)
    reply = client_app.train(msg, context(cfg))
    names = set(reply.content["arrays"].keys())
    assert names == set(shared) and not any(n.startswith("adapters.vision") for n in names)
    site = sites.Site(cfg, {"partition-id": 0, "num-partitions": 2})
    saved = site.load_personal("unit", before_round=2)
    assert saved and all(k.startswith("adapters.vision") for k in saved)
    initial = model.adapter_state()
    assert any(not torch.equal(saved[k], initial[k]) for k in saved)  # they trained
    assert site.load_personal("unit", before_round=1) == {}  # nothing before round 1
    # Round 2 starts from the site's own personal parts, not from the initial ones.
    m2 = site.model(load_base(cfg.base), {k: torch.from_numpy(v) for k, v in received(reply, msg).items()}, saved)
    for k, v in saved.items():
        assert torch.equal(m2.adapter_state()[k], v)


def distance_to_global(reply, shared) -> float:
    return float(sum((v ** 2).sum() for v in update_in(reply).values()) ** 0.5)


def test_fedprox_mu_pulls_the_update_towards_the_global_adapter(data, tmp_path):
    # Start away from the identity init so the local loss gradient is not tiny,
    # then compare how far the site moves with mu = 0, moderate and large.
    cfg = make_cfg(data, tmp_path, local_epochs=2, lr=0.01, payload_dtype="fp32")
    distances = []
    for mu in (0.0, 1.0, 100.0):
        msg, shared, _ = train_message(cfg, mu=mu, shift=0.05)
        distances.append(distance_to_global(client_app.train(msg, context(cfg)), shared))
    assert distances[0] > distances[1] > distances[2] > 0


def test_the_base_is_loaded_once_per_process(data, tmp_path):
    cfg = make_cfg(data, tmp_path)
    client_app.train(train_message(cfg)[0], context(cfg, 0))
    loads = sites.process_stats()["base-loads"]
    reply = client_app.train(train_message(cfg)[0], context(cfg, 1))
    assert sites.process_stats()["base-loads"] == loads  # a second message, another site: no reload
    m = reply.content["metrics"]
    assert m["base-loads"] == loads and m["base-load-seconds"] >= 0 and m["import-seconds"] > 0


def test_a_reused_model_trains_exactly_like_a_fresh_one(data, tmp_path, monkeypatch):
    # A warm process reuses idle adapter models (Site.leased_model). A model another site
    # has just trained (its personal parts included) must give exactly what a fresh one gives.
    cfg = make_cfg(data, tmp_path, personal=("adapters.vision",), payload_dtype="fp32", lr=0.01)
    messages = {run: train_message(dataclasses.replace(cfg, run_name=run), shift=shift)[0]
                for run, shift in (("a", 0.0), ("b", 0.05), ("c", 0.0))}
    builds = []
    real_initial = FederationConfig.initial_model
    monkeypatch.setattr(FederationConfig, "initial_model", lambda self, base: builds.append(1) or real_initial(self, base))
    monkeypatch.setattr(sites, "_IDLE_MODELS", {})

    def train(pid: int, run: str):
        reply = client_app.train(messages[run], context(cfg, pid))
        assert "status" not in reply.content, reply.content
        personal = sites.Site(cfg, {"partition-id": pid, "num-partitions": 2}).load_personal(run, before_round=2)
        return {k: a.numpy().copy() for k, a in reply.content["arrays"].items()}, personal

    fresh, fresh_personal = train(0, "a")
    train(1, "b")  # dirties the idle model: other site, other global, trained personal parts
    reused, reused_personal = train(0, "c")
    assert len(builds) == 1  # the second and third messages reused the first model
    # A base loaded again (another object) gets a model of its own, which replaces the idle one.
    monkeypatch.setattr(sites, "_BASES", {})
    train(0, "a")
    assert len(builds) == 2 and [len(pool) for pool in sites._IDLE_MODELS.values()] == [1]
    (pool,) = sites._IDLE_MODELS.values()
    assert pool[0][0] is sites.base(cfg.base)
    assert fresh.keys() == reused.keys() and all(np.array_equal(fresh[k], reused[k]) for k in fresh)
    assert fresh_personal.keys() == reused_personal.keys()
    assert all(torch.equal(fresh_personal[k], reused_personal[k]) for k in fresh_personal)


def test_a_sites_items_are_listed_once_per_data_change(tmp_path, monkeypatch):
    # A warm process keeps a site's items while its checked data is unchanged; any change re-lists them.
    root = tmp_path / "data"
    synthesize(root, sites=2, per_site=6, seed=0, image_size=32)
    cfg = FederationConfig(base="arch:tiny", data=str(root), home=str(tmp_path / "home"), run_name="memo")
    listed = []
    real = sites.Site._load_items
    monkeypatch.setattr(sites.Site, "_load_items", lambda self: listed.append(1) or real(self))
    monkeypatch.setattr(sites, "_ITEMS", {})

    def train_items(pid: int = 0) -> list:
        site = sites.Site(cfg, {"partition-id": pid, "num-partitions": 2})
        site.ensure_data_ok()
        return site.items("train")

    first = train_items()
    assert train_items() == first and len(listed) == 1  # second message: from the memo
    assert train_items(1) != first and len(listed) == 2  # another site: its own entry
    ann = root / "site-0" / "anns" / "train.json"
    records = json.loads(ann.read_text())
    ann.write_text(json.dumps(records[:-1]))  # one training item fewer
    assert len(train_items()) == len(first) - 1 and len(listed) == 3


def test_evaluate_and_final_report_global_and_personalised_dice(data, tmp_path):
    cfg = make_cfg(data, tmp_path, personal=("adapters.vision",), finetune_epochs=1)
    msg, _, _ = train_message(cfg, server_round=1)
    ctx = context(cfg)
    trained = client_app.train(msg, ctx)
    content = RecordDict({"arrays": ArrayRecord({k: Array(a.numpy()) for k, a in trained.content["arrays"].items()}),
                          "config": ConfigRecord({"server-round": 1, "run-name": "unit", "fedvlsm-run-config": cfg.to_json()})})
    ev = client_app.evaluate(Message(content, dst_node_id=10, message_type="evaluate"), ctx).content["metrics"]
    assert 0 <= ev["dice"] <= 1 and 0 <= ev["dice-personal"] <= 1 and ev["num-examples"] >= 1
    final = client_app.evaluate_final(
        Message(content, dst_node_id=10, message_type="evaluate.final"), ctx).content["metrics"]
    assert {"dice-base", "dice-global", "dice-personal", "dice-finetuned"} <= set(final)
    assert ctx.state.config_records["site-history"]["rounds-trained"] == 1


def test_idle_models_of_runs_no_longer_served_are_dropped(data, tmp_path, monkeypatch):
    # A site worker serving many runs (here: a seed sweep) kept one idle model per run it ever served.
    monkeypatch.setattr(sites, "_IDLE_MODELS", {})
    cfg = make_cfg(data, tmp_path)
    for seed in range(4):
        reply = client_app.train(train_message(dataclasses.replace(cfg, seed=seed))[0], context(cfg, 0))
        assert "status" not in reply.content, reply.content
    assert sorted(key[1] for key in sites._IDLE_MODELS) == [2, 3]  # the two latest runs' models only
    assert sum(len(pool) for pool in sites._IDLE_MODELS.values()) == 2


def test_a_failing_deployed_site_logs_in_its_own_site_dir_never_under_the_runs_home(data, tmp_path):
    # The fallback log path took the run's `home` (a folder on the server) and ignored `site-dir`; where
    # that home could not be created here, the log failed and its FileNotFoundError replaced the reason.
    cfg = make_cfg(data, "/proc/fedvlsm-server-home")
    site_dir = tmp_path / "hospital-a"
    ctx = Context(run_id=1, node_id=10, state=RecordDict(), run_config=cfg.to_run_config(),
                  node_config={"data-path": str(tmp_path / "missing"), "site-name": "hospital-a",
                               "site-dir": str(site_dir)})
    msg, _, _ = train_message(cfg)
    reply = client_app.train(msg, ctx)
    assert reply.content.config_records["status"]["error"] == "site config: data-path is not a folder"
    logged = (site_dir / "logs" / "site.log").read_text()
    assert "data-path" in logged and str(tmp_path / "missing") in logged  # the detail stays home


# ---- which adapter each handler trains and scores: spies on fit / evaluate (no scoring needed) ----

def _eval_spy(monkeypatch):
    """Replace the handlers' evaluate by one that records each model's adapter and answers
    dice 0.1, 0.2, 0.3 ... in call order."""
    from types import SimpleNamespace

    seen = []

    def fake(model, ds, tokenizer, cfg, **kw):
        seen.append(model.adapter_state())
        return SimpleNamespace(dice=0.1 * len(seen), loss=1.0, iou=0.0, n=len(ds))

    monkeypatch.setattr(client_app, "evaluate_model", fake)
    return seen


def _fit_spy(monkeypatch):
    seen = []
    real = client_app.fit

    def spy(model, train_ds, val_ds, tokenizer, cfg, **kw):
        seen.append({"state": model.adapter_state(), "cfg": cfg})
        return real(model, train_ds, val_ds, tokenizer, cfg, **kw)

    monkeypatch.setattr(client_app, "fit", spy)
    return seen


def _personal_of(state):
    return {k: v for k, v in state.items() if k.startswith("adapters.vision")}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _next_round(reply, msg, cfg, server_round, message_type="train", extra=None):
    """A message of round `server_round` carrying the adapter the site sent back (as the new global)."""
    arrays = {k: Array(v.astype(np.float32)) for k, v in received(reply, msg).items()}
    config = {"server-round": server_round, "run-name": cfg.run_name, "fedvlsm-run-config": cfg.to_json(),
              **(extra or {})}
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord(config)}),
                   dst_node_id=10, message_type=message_type)


def test_a_sites_next_round_trains_from_its_own_personal_parts(data, tmp_path, monkeypatch):
    cfg = make_cfg(data, tmp_path, personal=("adapters.vision",), payload_dtype="fp32", lr=0.01)
    ctx = context(cfg)
    msg, _, initial = train_message(cfg, server_round=1)
    reply = client_app.train(msg, ctx)
    saved = sites.Site(cfg, {"partition-id": 0, "num-partitions": 2}).load_personal("unit", before_round=2)
    assert saved and not _equal(saved, _personal_of(initial.adapter_state()))
    fits = _fit_spy(monkeypatch)
    reply2 = client_app.train(_next_round(reply, msg, cfg, 2), ctx)
    assert "status" not in reply2.content, reply2.content
    assert _equal(_personal_of(fits[0]["state"]), saved)  # round 2 starts where round 1 left them


def test_evaluate_scores_the_personal_parts_of_the_round_just_trained(data, tmp_path, monkeypatch):
    cfg = make_cfg(data, tmp_path, personal=("adapters.vision",), payload_dtype="fp32", lr=0.01)
    ctx = context(cfg)
    msg, _, initial = train_message(cfg, server_round=1)
    reply = client_app.train(msg, ctx)
    saved = sites.Site(cfg, {"partition-id": 0, "num-partitions": 2}).load_personal("unit", before_round=2)
    seen = _eval_spy(monkeypatch)
    metrics = client_app.evaluate(_next_round(reply, msg, cfg, 1, "evaluate"), ctx).content["metrics"]
    assert len(seen) == 2
    assert _equal(_personal_of(seen[0]), _personal_of(initial.adapter_state()))  # global: initial personal
    assert _equal(_personal_of(seen[1]), saved)  # personalised: round 1's own
    assert metrics["dice"] == pytest.approx(0.1) and metrics["dice-personal"] == pytest.approx(0.2)


def test_final_evaluation_scores_base_global_personal_and_finetuned_in_their_slots(data, tmp_path, monkeypatch):
    cfg = make_cfg(data, tmp_path, personal=("adapters.vision",), payload_dtype="fp32", lr=0.01, finetune_epochs=1)
    ctx = context(cfg)
    msg, _, initial = train_message(cfg, server_round=1)
    reply = client_app.train(msg, ctx)
    saved = sites.Site(cfg, {"partition-id": 0, "num-partitions": 2}).load_personal("unit", before_round=2)
    seen, fits = _eval_spy(monkeypatch), _fit_spy(monkeypatch)
    metrics = client_app.evaluate_final(_next_round(reply, msg, cfg, 1, "evaluate.final"), ctx).content["metrics"]
    base, global_, personal, finetuned = seen
    assert base == {}  # the frozen base: no adapter
    assert _equal(_personal_of(global_), _personal_of(initial.adapter_state()))
    assert _equal(_personal_of(personal), saved)
    assert _equal(_personal_of(fits[0]["state"]), saved)  # the fine-tuning starts from the personalised adapter
    assert not _equal(_personal_of(finetuned), saved)
    assert [metrics[k] for k in ("dice-base", "dice-global", "dice-personal", "dice-finetuned")] == \
        pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_each_site_and_round_trains_with_its_own_seed(data, tmp_path, monkeypatch):
    cfg = make_cfg(data, tmp_path)
    seeds = {(r, s): handlers_seed(cfg, r, s) for r in (1, 2) for s in ("site-0", "site-1")}
    assert len(set(seeds.values())) == 4  # no two sites, no two rounds share a shuffle
    assert handlers_seed(dataclasses.replace(cfg, seed=1), 1, "site-0") != seeds[(1, "site-0")]
    assert handlers_seed(cfg, 1, "site-0") == seeds[(1, "site-0")]  # a resumed run trains the same
    fits = _fit_spy(monkeypatch)
    client_app.train(train_message(cfg, server_round=2)[0], context(cfg, 1))
    assert fits[0]["cfg"].seed == seeds[(2, "site-1")] and fits[0]["cfg"].epochs == cfg.local_epochs


def test_local_only_training_runs_the_epochs_the_server_asks_for(data, tmp_path, monkeypatch):
    cfg = make_cfg(data, tmp_path, local_epochs=1)
    fits = _fit_spy(monkeypatch)
    _eval_spy(monkeypatch)
    config = {"server-round": 0, "run-name": "unit", "fedvlsm-run-config": cfg.to_json(), "epochs": 2}
    reply = client_app.train_local_only(Message(RecordDict({"config": ConfigRecord(config)}), dst_node_id=10,
                                                message_type="train.local_only"), context(cfg))
    assert "status" not in reply.content, reply.content
    assert fits[0]["cfg"].epochs == 2 and reply.content["metrics"]["dice-local"] == pytest.approx(0.1)
