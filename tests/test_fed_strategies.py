"""Aggregation math of every configured strategy against a numpy reference, and FedOpt state."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.federation_config import FederationConfig
from common.payload import from_wire, to_wire
from server.strategies import build_strategy, restore_strategy_state, strategy_state

NAMES = ("a.weight", "b.bias")
SHAPES = {"a.weight": (3, 4), "b.bias": (5,)}


class NodesOnly:
    """The part of Flower's Grid that configure_train/evaluate use."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


def site_arrays(rng, n):
    return [{k: rng.normal(size=SHAPES[k]).astype(np.float32) for k in NAMES} for _ in range(n)]


def reply(to: Message, arrays: dict, examples: int) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0}),
    })
    return Message(content, reply_to=to)


def one_round(strategy, server_round, global_arrays, updates, examples):
    grid = NodesOnly(len(updates))
    record = ArrayRecord({k: Array(v) for k, v in global_arrays.items()})
    messages = list(strategy.configure_train(server_round, record, ConfigRecord(), grid))
    assert len(messages) == len(updates)
    replies = [reply(m, u, n) for m, u, n in zip(messages, updates, examples)]
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    return {k: np.asarray(a.numpy(), dtype=np.float32) for k, a in aggregated.items()}, messages


def cfg(strategy, **kw):
    return FederationConfig(strategy=strategy, **kw)


def test_fedavg_is_the_example_weighted_mean():
    rng = np.random.default_rng(0)
    g = site_arrays(rng, 1)[0]
    ups, n = site_arrays(rng, 3), [10, 30, 60]
    out, _ = one_round(build_strategy(cfg("fedavg"), 3), 1, g, ups, n)
    for k in NAMES:
        ref = sum(u[k].astype(np.float64) * w for u, w in zip(ups, n)) / sum(n)
        np.testing.assert_allclose(out[k], ref, rtol=1e-6, atol=1e-6)


def test_fedprox_sends_mu_and_aggregates_like_fedavg():
    rng = np.random.default_rng(1)
    g = site_arrays(rng, 1)[0]
    ups, n = site_arrays(rng, 2), [5, 15]
    out, messages = one_round(build_strategy(cfg("fedprox", prox_mu=0.3), 2), 1, g, ups, n)
    assert all(m.content["config"]["proximal-mu"] == pytest.approx(0.3) for m in messages)
    for k in NAMES:
        np.testing.assert_allclose(out[k], (ups[0][k] * 5 + ups[1][k] * 15) / 20, rtol=1e-6, atol=1e-6)


def adam_reference(g, ups, n, rounds, eta, b1, b2, tau, yogi=False):
    """FedAdam/FedYogi of Reddi et al. as Flower implements them (bias-corrected eta for Adam)."""
    x = {k: v.astype(np.float64) for k, v in g.items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.zeros_like(v) for k, v in x.items()}
    for t in range(1, rounds + 1):
        avg = {k: sum(u[k] * w for u, w in zip(ups[t - 1], n)) / sum(n) for k in x}
        delta = {k: avg[k] - x[k] for k in x}
        m = {k: b1 * m[k] + (1 - b1) * delta[k] for k in x}
        if yogi:
            v = {k: v[k] - (1 - b2) * delta[k] ** 2 * np.sign(v[k] - delta[k] ** 2) for k in x}
            step = eta
        else:
            v = {k: b2 * v[k] + (1 - b2) * delta[k] ** 2 for k in x}
            step = eta * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
        x = {k: x[k] + step * m[k] / (np.sqrt(v[k]) + tau) for k in x}
    return x


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_fedadam_fedyogi_match_the_reference_over_rounds(name):
    rng = np.random.default_rng(2)
    g = site_arrays(rng, 1)[0]
    ups = [site_arrays(rng, 3) for _ in range(3)]
    n = [4, 8, 12]
    c = cfg(name, server_lr=0.05, server_beta1=0.8, server_beta2=0.95, server_tau=1e-2)
    strategy = build_strategy(c, 3)
    x = g
    for t in range(1, 4):
        x, _ = one_round(strategy, t, x, ups[t - 1], n)
    ref = adam_reference(g, ups, n, 3, 0.05, 0.8, 0.95, 1e-2, yogi=name == "fedyogi")
    for k in NAMES:
        np.testing.assert_allclose(x[k], ref[k], rtol=1e-4, atol=1e-5)


def test_fedmedian_and_trimmed_mean_match_numpy():
    rng = np.random.default_rng(3)
    g = site_arrays(rng, 1)[0]
    ups, n = site_arrays(rng, 5), [1, 100, 1, 1, 1]  # robust aggregates ignore weights
    med, _ = one_round(build_strategy(cfg("fedmedian"), 5), 1, g, ups, n)
    trim, _ = one_round(build_strategy(cfg("fedtrimmedavg", trim_beta=0.2), 5), 1, g, ups, n)
    for k in NAMES:
        stack = np.stack([u[k] for u in ups])
        np.testing.assert_allclose(med[k], np.median(stack, axis=0), rtol=1e-6)
        trimmed = np.sort(stack, axis=0)[1:-1].mean(axis=0)  # beta 0.2 of 5 cuts one per tail
        np.testing.assert_allclose(trim[k], trimmed, rtol=1e-5, atol=1e-6)


def test_fp16_wire_then_fp32_aggregation_stays_close_to_exact_fedavg():
    rng = np.random.default_rng(4)
    g = site_arrays(rng, 1)[0]
    ups, n = site_arrays(rng, 3), [3, 3, 3]
    decoded = [from_wire(to_wire(u, "fp16")) for u in ups]
    out, _ = one_round(build_strategy(cfg("fedavg"), 3), 1, g, decoded, n)
    for k in NAMES:
        assert out[k].dtype == np.float32
        np.testing.assert_allclose(out[k], np.mean([u[k] for u in ups], axis=0), atol=2e-3)


def test_min_node_counts_follow_the_federation_size():
    s = build_strategy(cfg("fedavg", fraction_train=0.5), 5)
    assert (s.min_train_nodes, s.min_available_nodes) == (3, 5)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedavg"])
def test_saved_strategy_state_continues_exactly(name):
    rng = np.random.default_rng(5)
    g = site_arrays(rng, 1)[0]
    ups = [site_arrays(rng, 2) for _ in range(3)]
    n = [2, 6]
    c = cfg(name)
    straight = build_strategy(c, 2)
    x = g
    for t in range(1, 4):
        x, _ = one_round(straight, t, x, ups[t - 1], n)

    first = build_strategy(c, 2)
    y = g
    for t in range(1, 3):
        y, _ = one_round(first, t, y, ups[t - 1], n)
    arrays, meta = strategy_state(first)
    if name != "fedavg":
        assert set(meta["moments"]) == {"m_t", "v_t"} and len(arrays) == 2 * len(NAMES)
    resumed = build_strategy(c, 2)
    restore_strategy_state(resumed, {k: np.array(v) for k, v in arrays.items()}, meta)
    y, _ = one_round(resumed, 3, y, ups[2], n)
    for k in NAMES:
        np.testing.assert_array_equal(x[k], y[k])


def test_restoring_into_another_strategy_is_refused():
    arrays, meta = strategy_state(build_strategy(cfg("fedadam"), 2))
    with pytest.raises(ValueError, match="FedAdam"):
        restore_strategy_state(build_strategy(cfg("fedyogi"), 2), arrays, meta)
