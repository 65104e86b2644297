"""Client-level DP at the server: fp32 clipping (norm 600, fp16 wire), noise z*C/m, equal weights,
epsilon vs dp_accounting (and after a restore), budget, refusals, the client-side clipping mod."""

from __future__ import annotations

import json
import math

import dp_accounting as dpa
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import FedAdam
from flwr.supercore.differential_privacy import compute_clip_model_update

from client.privacy_mods import KEY_CLIPPING_NORM, fp32_fixedclipping_mod
from common.federation_config import ConfigError, FederationConfig
from common.payload import from_wire, to_wire
from common.privacy import clip_for_wire, clip_update_fp32, update_norm
from server.privacy import (
    ClientSideClipping,
    ServerSideClipping,
    accountant_state,
    num_sampled_sites,
    restore_accountant,
    server_budget_check,
    server_epsilon,
    wrap_strategy,
)
from server.strategies import build_strategy, restore_strategy_state, strategy_state

SHAPES = {"a.weight": (64, 32), "b.bias": (40,), "c.weight": (8, 8)}


class NodesOnly:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


@pytest.fixture(autouse=True)
def numpy_seed():
    np.random.seed(0)  # Flower draws its DP noise from numpy's global generator


def arrays(rng, scale=0.1, shapes=SHAPES):
    return {k: (rng.normal(size=s) * scale).astype(np.float32) for k, s in shapes.items()}


def with_norm(direction: dict, norm: float) -> dict:
    n = update_norm(direction)
    return {k: (v * (norm / n)).astype(np.float32) for k, v in direction.items()}


def reply_to(msg: Message, arrs: dict, examples: int = 10, order=None) -> Message:
    keys = order or list(arrs)
    return Message(RecordDict({
        "arrays": ArrayRecord({k: Array(np.ascontiguousarray(arrs[k])) for k in keys}),
        "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0}),
    }), reply_to=msg)


def dp_cfg(**kw) -> FederationConfig:
    return FederationConfig(**{"dp": "client", "dp_noise_multiplier": 1.0, "dp_clip_norm": 1.0, **kw})


def server_round(strategy, rnd, global_arrays, updates, examples=None, wire="fp16", order=None, nodes=None):
    """One round as the ServerApp runs it: wire-encode what is sent, sites add `updates` to what they
    received, replies come back in the wire dtype and are decoded to fp32 before aggregate_train."""
    record = ArrayRecord({k: Array(v) for k, v in global_arrays.items()})
    messages = list(strategy.configure_train(rnd, record, ConfigRecord(), NodesOnly(nodes or len(updates))))
    received = from_wire(to_wire(global_arrays, wire))
    replies = []
    for i, (msg, up) in enumerate(zip(messages, updates)):
        trained = {k: received[k] + up[k] for k in received}
        wire_reply = from_wire(to_wire(trained, wire))
        replies.append(reply_to(msg, wire_reply, (examples or [10] * len(updates))[i], order))
    aggregated, _ = strategy.aggregate_train(rnd, replies)
    return {k: np.asarray(a.numpy(), dtype=np.float32) for k, a in aggregated.items()}, messages


# ------------------------------------------------------------- fp32 clipping
def test_clip_update_fp32_scales_a_600_norm_update_to_c_and_flower_fp16_would_zero_it():
    rng = np.random.default_rng(0)
    big = with_norm(arrays(rng), 600.0)
    clipped = clip_update_fp32({k: v.astype(np.float16) for k, v in big.items()}, 1.5)
    assert update_norm(clipped) == pytest.approx(1.5, rel=1e-3)
    for k in big:  # same direction
        np.testing.assert_allclose(clipped[k], big[k] * (1.5 / 600.0), rtol=2e-3, atol=1e-6)
    small = with_norm(arrays(rng), 0.5)
    assert update_norm(clip_update_fp32(small, 1.5)) == pytest.approx(0.5, rel=1e-6)
    # The pitfall this avoids: Flower clips in the arrays' dtype; in fp16 the squared norm
    # overflows to inf and the update is scaled to zero.
    zero = {k: np.zeros_like(v, dtype=np.float16) for k, v in big.items()}
    flower = [v.astype(np.float16) for v in big.values()]
    with np.errstate(over="ignore"):
        compute_clip_model_update(flower, list(zero.values()), 1.5)
    assert update_norm(dict(zip(big, flower))) == 0.0


@pytest.mark.parametrize("clipping", ["server", "client"])
def test_an_update_of_norm_600_reaches_the_aggregate_clipped_not_zeroed_with_fp16_on_the_wire(clipping):
    rng = np.random.default_rng(1)
    g = arrays(rng)
    direction = arrays(rng)
    cfg = dp_cfg(dp_clip_norm=2.0, dp_noise_multiplier=1e-6, dp_clipping=clipping, payload_dtype="fp16")
    strategy = wrap_strategy(build_strategy(cfg, 3), cfg, 3)
    assert isinstance(strategy, ServerSideClipping if clipping == "server" else ClientSideClipping)
    big = with_norm(direction, 600.0)
    if clipping == "server":
        out, _ = server_round(strategy, 1, g, [big] * 3)
        moved = {k: out[k] - g[k] for k in g}
    else:  # the site's mod clips; the wrapper checks
        record = ArrayRecord({k: Array(v) for k, v in g.items()})
        messages = list(strategy.configure_train(1, record, ConfigRecord(), NodesOnly(3)))
        assert all(m.content["config"][KEY_CLIPPING_NORM] == 2.0 for m in messages)
        replies = []
        for msg in messages:
            received = {k: a.numpy() for k, a in msg.content["arrays"].items()}
            wire_in = to_wire(received, "fp16")  # what ServerApp._put_on_wire sends
            msg.content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in wire_in.items()}),
                                      "config": msg.content["config"]})

            def handler(m, ctx):  # a site: trains far away (norm 600), replies in fp16
                got = from_wire({k: a.numpy() for k, a in m.content["arrays"].items()})
                return reply_to(m, to_wire({k: got[k] + big[k] for k in got}, "fp16"))

            out_msg = fp32_fixedclipping_mod(msg, Context(1, 1, {}, RecordDict(), {}), handler)
            assert not out_msg.has_error()
            sent_back = {k: a.numpy() for k, a in out_msg.content["arrays"].items()}
            assert all(v.dtype == np.float16 for v in sent_back.values())
            replies.append(reply_to(msg, from_wire(sent_back)))  # the ServerApp decodes to fp32
        aggregated, _ = strategy.aggregate_train(1, replies)
        received32 = from_wire(to_wire(g, "fp16"))
        moved = {k: np.asarray(aggregated[k].numpy()) - received32[k] for k in g}
    assert update_norm(moved) == pytest.approx(2.0, rel=5e-3)  # clipped to C, not zeroed
    cos = sum(float((moved[k] * big[k]).sum()) for k in g) / (update_norm(moved) * 600.0)
    assert cos > 0.999


def test_flower_fixedclipping_mod_zeroes_it_and_ours_does_not():
    """Same fp16 round trip through Flower's own mod: the update vanishes (why we ship our own)."""
    from flwr.clientapp.mod import fixedclipping_mod

    rng = np.random.default_rng(2)
    g16 = to_wire(arrays(rng), "fp16")
    big = with_norm(arrays(rng), 600.0)
    results = {}
    for name, mod in (("flower", fixedclipping_mod), ("ours", fp32_fixedclipping_mod)):
        msg = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in g16.items()}),
                                  "config": ConfigRecord({KEY_CLIPPING_NORM: 1.0})}), dst_node_id=1,
                      message_type="train")

        def handler(m, ctx):
            got = from_wire({k: a.numpy() for k, a in m.content["arrays"].items()})
            return reply_to(m, to_wire({k: got[k] + big[k] for k in got}, "fp16"))

        with np.errstate(over="ignore", invalid="ignore"):
            out = mod(msg, Context(1, 1, {}, RecordDict(), {}), handler)
        sent = from_wire({k: a.numpy() for k, a in out.content["arrays"].items()})
        results[name] = update_norm({k: sent[k] - g16[k].astype(np.float32) for k in g16})
    assert results["flower"] == 0.0
    assert 0.99 <= results["ours"] <= 1.0


def test_clip_for_wire_holds_the_bound_after_fp16_rounding():
    rng = np.random.default_rng(3)
    for trial in range(5):
        received = to_wire(arrays(rng, scale=1.0), "fp16")
        trained = {k: received[k].astype(np.float32) + with_norm(arrays(rng), 50.0)[k] for k in received}
        out = clip_for_wire(received, trained, 0.7, np.dtype(np.float16))
        norm = update_norm({k: out[k].astype(np.float32) - received[k].astype(np.float32) for k in received})
        assert 0.69 <= norm <= 0.7


def test_client_side_wrapper_refuses_an_unclipped_update():
    rng = np.random.default_rng(4)
    g = arrays(rng)
    cfg = dp_cfg(dp_clipping="client", payload_dtype="fp32")
    strategy = wrap_strategy(build_strategy(cfg, 2), cfg, 2)
    with pytest.raises(ValueError, match="dp-clip-norm"):
        server_round(strategy, 1, g, [with_norm(arrays(rng), 5.0)] * 2, wire="fp32")
    assert server_epsilon(strategy) == (0.0, 1e-5)  # nothing released, nothing accounted


# -------------------------------------------------------------------- noise
@pytest.mark.parametrize("neighbour", ["zero-update", "add-remove"])
def test_aggregate_noise_std_is_z_c_over_m(neighbour):
    """Sites send back exactly what they received (update 0: Flower's own clip would divide by 0).
    The stricter neighbour changes what the noise is accounted as, never the noise itself."""
    rng = np.random.default_rng(5)
    shapes = {"w": (400, 500)}
    g = arrays(rng, shapes=shapes)
    z, c, m = 2.0, 0.5, 3
    cfg = dp_cfg(dp_noise_multiplier=z, dp_clip_norm=c, payload_dtype="fp32", dp_client_neighbour=neighbour)
    strategy = wrap_strategy(build_strategy(cfg, m), cfg, m)
    zero = {"w": np.zeros(shapes["w"], np.float32)}
    out, _ = server_round(strategy, 1, g, [zero] * m, wire="fp32")
    noise = (out["w"] - g["w"]).astype(np.float64)
    n = noise.size
    assert abs(noise.std() / (z * c / m) - 1) < 5 / math.sqrt(2 * n)
    assert abs(noise.mean()) < 5 * (z * c / m) / math.sqrt(n)


def test_sites_weigh_equally_whatever_their_example_counts():
    rng = np.random.default_rng(6)
    g = arrays(rng)
    ups = [with_norm(arrays(rng), 0.2) for _ in range(3)]  # below C: not clipped
    cfg = dp_cfg(dp_noise_multiplier=1e-6, payload_dtype="fp32")
    strategy = wrap_strategy(build_strategy(cfg, 3), cfg, 3)
    out, _ = server_round(strategy, 1, g, ups, examples=[10, 30, 60], wire="fp32")
    for k in g:
        np.testing.assert_allclose(out[k], g[k] + sum(u[k] for u in ups) / 3, atol=1e-5)


def test_replies_are_paired_with_the_sent_tensors_by_name_not_position():
    rng = np.random.default_rng(7)
    g = arrays(rng)
    up = with_norm(arrays(rng), 10.0)
    cfg = dp_cfg(dp_noise_multiplier=1e-6, dp_clip_norm=1.0, payload_dtype="fp32")
    strategy = wrap_strategy(build_strategy(cfg, 1), cfg, 1)
    out, _ = server_round(strategy, 1, g, [up], wire="fp32", order=list(reversed(list(g))))
    moved = {k: out[k] - g[k] for k in g}
    assert update_norm(moved) == pytest.approx(1.0, rel=1e-3)
    for k in g:
        np.testing.assert_allclose(moved[k], up[k] / 10.0, atol=1e-5)


# --------------------------------------------------------------- accounting
def dp_accounting_rounds(z: float, rounds: int, delta: float) -> float:
    acc = dpa.rdp.RdpAccountant()
    acc.compose(dpa.GaussianDpEvent(z), rounds)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("neighbour,accounted_z", [("zero-update", 1.0), ("add-remove", 0.5)])
@pytest.mark.parametrize("z,rounds,delta,sites,fraction", [(1.0, 10, 1e-5, 3, 1.0), (5.0, 6, 1e-5, 5, 1.0),
                                                           (2.0, 4, 1e-6, 4, 0.5)])
def test_server_epsilon_matches_dp_accounting_and_survives_a_restore(z, rounds, delta, sites, fraction, neighbour,
                                                                     accounted_z):
    """add-remove: a hospital added or removed moves the mean by up to 2C / m, so the same noise is
    accounted as z / 2 (checked against dp_accounting at z / 2)."""
    rng = np.random.default_rng(8)
    cfg = dp_cfg(dp_noise_multiplier=z, dp_delta=delta, fraction_train=fraction, payload_dtype="fp32",
                 dp_client_neighbour=neighbour)
    m = num_sampled_sites(cfg, sites)
    assert m == math.ceil(fraction * sites)
    strategy = wrap_strategy(build_strategy(cfg, sites), cfg, sites)
    g = arrays(rng)
    half = rounds // 2
    for r in range(1, half + 1):
        g, messages = server_round(strategy, r, g, [with_norm(arrays(rng), 3.0)] * m, wire="fp32", nodes=sites)
        assert len(messages) == m
    arrays_state, meta = strategy_state(strategy)  # what the round checkpoint stores
    meta = json.loads(json.dumps(meta))
    resumed = build_strategy(cfg, sites)  # a new ServerApp process, resumed
    restore_strategy_state(resumed, arrays_state, meta)
    assert accountant_state(resumed) == accountant_state(strategy)
    assert server_epsilon(resumed) == server_epsilon(strategy)
    for r in range(half + 1, rounds + 1):
        g, _ = server_round(resumed, r, g, [with_norm(arrays(rng), 3.0)] * m, wire="fp32", nodes=sites)
    eps, d = server_epsilon(resumed)
    assert d == delta
    assert eps == pytest.approx(dp_accounting_rounds(z * accounted_z, rounds, delta), rel=0.01)
    if (z, rounds, delta, neighbour) == (1.0, 10, 1e-5, "zero-update"):
        assert eps == pytest.approx(19.05, abs=0.01)  # the reference value measured on flwr 1.42


@pytest.mark.parametrize("neighbour,after_1,after_10", [("zero-update", 2.05, 7.62), ("add-remove", 4.47, 17.89)])
def test_the_demo_noise_is_worth_what_the_readme_says_under_each_neighbour(neighbour, after_1, after_10):
    """README, Privacy: z = 2.1, every site each round, delta 1e-5."""
    rng = np.random.default_rng(10)
    cfg = dp_cfg(dp_noise_multiplier=2.1, payload_dtype="fp32", dp_client_neighbour=neighbour)
    strategy = wrap_strategy(build_strategy(cfg, 3), cfg, 3)
    g = arrays(rng)
    seen = []
    for r in range(1, 11):
        g, _ = server_round(strategy, r, g, [with_norm(arrays(rng), 0.5)] * 3, wire="fp32")
        seen.append(server_epsilon(strategy)[0])
    assert (round(seen[0], 2), round(seen[-1], 2)) == (after_1, after_10)


def test_the_stricter_neighbour_ends_a_budgeted_run_sooner():
    # Budget between 1 and 2 releases at z / 2 = 1: add-remove admits one round where zero-update admits more.
    budget = (dp_accounting_rounds(1.0, 1, 1e-5) + dp_accounting_rounds(1.0, 2, 1e-5)) / 2
    for neighbour, rounds_admitted in (("add-remove", 1), ("zero-update", 5)):
        rng = np.random.default_rng(11)
        cfg = dp_cfg(dp_noise_multiplier=2.0, dp_epsilon_budget=budget, payload_dtype="fp32",
                     dp_client_neighbour=neighbour)
        strategy = wrap_strategy(build_strategy(cfg, 2), cfg, 2)
        g, done = arrays(rng), 0
        while server_budget_check(strategy)[0] and done < 20:
            done += 1
            g, _ = server_round(strategy, done, g, [with_norm(arrays(rng), 0.5)] * 2, wire="fp32")
        assert done == rounds_admitted, neighbour
        assert server_epsilon(strategy)[0] <= budget


def test_budget_ends_the_run_before_the_round_that_would_exceed_it():
    rng = np.random.default_rng(9)
    budget = (dp_accounting_rounds(1.0, 2, 1e-5) + dp_accounting_rounds(1.0, 3, 1e-5)) / 2
    cfg = dp_cfg(dp_epsilon_budget=budget, payload_dtype="fp32")
    strategy = wrap_strategy(build_strategy(cfg, 2), cfg, 2)
    g = arrays(rng)
    for r in (1, 2):
        assert server_budget_check(strategy) == (True, "")
        g, _ = server_round(strategy, r, g, [with_norm(arrays(rng), 0.5)] * 2, wire="fp32")
    ok, reason = server_budget_check(strategy)
    assert not ok and "dp-epsilon-budget" in reason
    with pytest.raises(PrivacyBudgetExhausted):
        strategy.configure_train(3, ArrayRecord({k: Array(v) for k, v in g.items()}), ConfigRecord(), NodesOnly(2))
    assert server_epsilon(strategy)[0] <= budget


def test_wrap_is_identity_without_client_dp_and_refuses_non_fedavg():
    plain = FederationConfig()
    s = build_strategy(plain, 3)
    assert wrap_strategy(s, plain, 3) is s and server_epsilon(s) is None
    wrapped = build_strategy(dp_cfg(dp_clipping="client"), 3)  # the ServerApp gets DP from build_strategy
    assert isinstance(wrapped, ClientSideClipping) and wrap_strategy(wrapped, dp_cfg(), 3) is wrapped
    assert wrapped.num_sampled_clients == 3 and wrapped.noise_multiplier == 1.0 and wrapped.clipping_norm == 1.0
    assert server_budget_check(s) == (True, "") and accountant_state(s) is None
    with pytest.raises(ConfigError, match="'dp'"):
        wrap_strategy(FedAdam(), dp_cfg(), 3)
    with pytest.raises(ValueError, match="disagree"):
        restore_accountant(s, {"schema_version": 1})


@pytest.mark.parametrize("clipping", ["server", "client"])
def test_fedprox_under_client_dp_still_sends_its_proximal_mu(clipping):
    """The DP wrapper's inner strategy is the configured FedProx: sites get mu (0 would be plain FedAvg)."""
    rng = np.random.default_rng(7)
    g = arrays(rng)
    strategy = build_strategy(dp_cfg(strategy="fedprox", prox_mu=0.25, dp_clipping=clipping), 2)
    _, messages = server_round(strategy, 1, g, [with_norm(arrays(rng), 0.2)] * 2, wire="fp32")
    assert [float(m.content["config"]["proximal-mu"]) for m in messages] == [0.25, 0.25]
