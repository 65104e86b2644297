"""Client-level (central) differential privacy at the server: Flower's fixed-clipping wrappers.

What the ServerApp calls (run config ``dp = "client"``)::

    strategy = build_strategy(cfg, n)     # server/strategies.py wraps it when dp = "client"
                                          # (= wrap_strategy(FedAvg/FedProx, cfg, n); idempotent)
    ok, reason = server_budget_check(strategy)                 # before configure_train of each round
    ...configure_train / aggregate_train as now...
    epsilon, delta = server_epsilon(strategy)                  # round record: epsilon_server, delta
    checkpoint/resume: strategy_state / restore_strategy_state (server/strategies.py) carry the
    accountant (accountant_state / restore_accountant underneath)

Why a thin subclass of each Flower wrapper:

- Flower clips (reply - sent) pairing tensors *by position*; replies are
  re-keyed here to the order of the arrays sent (and refused if the names
  differ) so that a tensor is never compared with another one.
- Flower's RdpAccountant (no amplification, add/remove one site) needs the
  plain mean of clipped updates, sensitivity C/m: the inner FedAvg is made
  to weigh every site equally (metric ``dp-unit-weight`` = 1, set here on
  each reply), whatever its number of examples.
- Client-side clipping: the server cannot clip, but it can check. Each
  update (decoded reply minus the arrays the site received, in the wire
  dtype) must have norm <= C, or the round is refused: an epsilon is never
  printed for updates that were not clipped. Sites register
  ``client.privacy_mods.fp32_fixedclipping_mod`` on the train handler
  (Flower's ``fixedclipping_mod`` squares in fp16 and zeroes large updates).
- Server-side clipping works on the fp32 replies the ServerApp decodes
  before ``aggregate_train`` (exact: no fp16 anywhere in the clip), with
  our zero-safe fp32 clip in place of Flower's (which divides by the
  update's norm: an unchanged reply would crash the round); validation,
  FedAvg, noise and the accountant are Flower's own methods.

Accounting is conservative under partial participation (``fraction-train``
< 1): no amplification by sampling is claimed; m = the number sampled each
round, which must not change during the run (Flower refuses otherwise).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.grid import Grid
from flwr.serverapp.strategy.dp_fixed_clipping import validate_replies
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)

from common.atomic import write_json_atomic
from common.federation_config import ConfigError, FederationConfig
from server.strategies import num_sampled_sites  # re-exported: the m of the accountant
from common.privacy import clip_for_wire, clip_update_fp32, update_norm  # noqa: F401  (re-exported)

DP_WEIGHT_KEY = "dp-unit-weight"
__all__ = [
    "DP_WEIGHT_KEY", "PrivacyBudgetExhausted", "accountant_state", "clip_update_fp32", "num_sampled_sites",
    "restore_accountant", "server_budget_check", "server_epsilon", "wrap_strategy",
]


class _Uniform:
    """Shared by both wrappers: replies re-keyed to the sent order, equal weights."""

    def _prepare_replies(self, replies: list[Message], order: list[str]) -> None:
        for reply in replies:
            if reply.has_error():
                continue
            for key, record in list(reply.content.array_records.items()):
                if order and set(record.keys()) != set(order):
                    raise ValueError(f"dp: a reply's tensor names differ from the ones sent (key {key!r})")
                names = order or list(record.keys())
                # fp32 before Flower's clip: it squares in the arrays' dtype (fp16 overflows above ~256)
                reply.content[key] = ArrayRecord(
                    {k: Array(np.ascontiguousarray(record[k].numpy(), dtype=np.float32)) for k in names}
                )
            for key, metrics in list(reply.content.metric_records.items()):
                reply.content[key] = MetricRecord({**dict(metrics), DP_WEIGHT_KEY: 1.0})


class ServerSideClipping(_Uniform, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping + accountant, with name-safe pairing and equal weights."""

    def __init__(self, *args: Any, wire_dtype: str = "fp32", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wire_dtype = wire_dtype

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Flower's steps (validate, clip, FedAvg, noise z*C/m, compose the release), clipping by
        name in fp32 with a float64 norm: Flower's own clip divides by the norm, so a site that
        sends back exactly what it received (update 0) would crash the round."""
        replies = list(replies)
        order = list(self.current_arrays.keys())
        self._prepare_replies(replies, order)
        event = self._pop_pending_event(server_round)
        if not validate_replies(replies, self.num_sampled_clients, strict=self.accountant is not None):
            return None, None
        self._validate_uniform_weights(replies)
        sent = {k: np.asarray(self.current_arrays[k].numpy(), dtype=np.float32) for k in order}
        for reply in replies:
            for key, record in list(reply.content.array_records.items()):
                update = clip_update_fp32({k: record[k].numpy() - sent[k] for k in order}, self.clipping_norm)
                reply.content[key] = ArrayRecord({k: Array(sent[k] + update[k]) for k in order})
        aggregated, metrics = self.strategy.aggregate_train(server_round, replies)
        if aggregated:
            aggregated = self._add_noise_to_aggregated_arrays(aggregated)
            self._compose_release(event)
        return aggregated, metrics


class ClientSideClipping(_Uniform, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping + accountant; checks every update really is clipped."""

    def __init__(self, *args: Any, wire_dtype: str = "fp32", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wire_dtype = wire_dtype
        self.sent: dict[str, np.ndarray] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        # The ServerApp hands this wrapper `global + update` with the fp32 global
        # (sites send updates, see common/payload.py), so the update it checks
        # is measured against the fp32 arrays, not their wire encoding.
        self.sent = {k: np.asarray(a.numpy(), dtype=np.float32) for k, a in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self._prepare_replies(replies, list(self.sent))
        tolerance = self.clipping_norm * 1e-5
        for reply in replies:
            if reply.has_error():
                continue
            for record in reply.content.array_records.values():
                got = {k: np.asarray(a.numpy(), dtype=np.float32) for k, a in record.items()}
                norm = update_norm({k: got[k] - self.sent[k] for k in self.sent})
                if norm > self.clipping_norm + tolerance:
                    self._pop_pending_event(server_round)
                    raise ValueError(
                        f"dp-clipping = 'client': node {reply.metadata.src_node_id} sent an update of norm "
                        f"{norm:.4g} > dp-clip-norm {self.clipping_norm:g}; is fp32_fixedclipping_mod "
                        "registered on its train handler? Round refused (no epsilon for unclipped updates)."
                    )
        return super().aggregate_train(server_round, replies)


def wrap_strategy(strategy: Strategy, cfg: FederationConfig, num_sites: int) -> Strategy:
    """`strategy` itself unless dp = "client"; then Flower's fixed-clipping DP wrapper with RdpAccountant.

    population_size = num_sites, m = num_sampled_sites(cfg, num_sites),
    noise std z*C/m added to the mean; max_epsilon = dp-epsilon-budget (0:
    none). Mutates the inner FedAvg's weighting key (equal weights).
    """
    if cfg.dp != "client" or isinstance(strategy, (ServerSideClipping, ClientSideClipping)):
        return strategy
    if not isinstance(strategy, FedAvg) or type(strategy).aggregate_train is not FedAvg.aggregate_train:
        raise ConfigError(f"run config 'dp' = 'client' with 'strategy' = {cfg.strategy!r}: the client-level "
                          "accountant needs FedAvg's mean of clipped updates (fedavg or fedprox)")
    if num_sites < 1:
        raise ValueError("wrap_strategy needs at least one site")
    strategy.weighted_by_key = DP_WEIGHT_KEY
    accountant_cls = RdpAccountant if cfg.dp_client_neighbour == "zero-update" else AddRemoveAccountant
    accountant = accountant_cls(PrivacyConfig(
        target_delta=cfg.dp_delta,
        population_size=num_sites,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=cfg.dp_epsilon_budget if cfg.dp_epsilon_budget > 0 else None,
    ))
    cls = ServerSideClipping if cfg.dp_clipping == "server" else ClientSideClipping
    return cls(strategy, cfg.dp_noise_multiplier, cfg.dp_clip_norm, num_sampled_sites(cfg, num_sites),
               accountant=accountant, wire_dtype=cfg.payload_dtype)


def _at_half_noise(event: GaussianPrivacyEvent) -> GaussianPrivacyEvent:
    return GaussianPrivacyEvent(noise_multiplier=event.noise_multiplier / 2, sample_size=event.sample_size,
                                population_size=event.population_size)


class AddRemoveAccountant(RdpAccountant):
    """Flower's RDP accountant for `dp-client-neighbour = "add-remove"`: every release at noise z / 2.

    Flower's wrappers add noise z x C / m to the mean of m clipped updates and account it as a
    Gaussian of sensitivity C / m (one update replaced by zero, m fixed). Adding or removing a
    hospital also changes what is averaged (another site sampled in its place, or one fewer in the
    mean): the mean moves by up to 2C / m, the sensitivity doubles, and the same noise is worth
    z / 2. The noise added is unchanged; only what it is accounted as. The state (ledger of
    events) records the halved multiplier, so a resumed run continues in the same terms.
    """

    def compose(self, event: GaussianPrivacyEvent, count: int = 1) -> None:
        super().compose(_at_half_noise(event), count)

    def would_exceed(self, event: GaussianPrivacyEvent, max_epsilon: float | None = None, count: int = 1) -> bool:
        return super().would_exceed(_at_half_noise(event), max_epsilon, count)


def _accountant(strategy: Strategy):
    return getattr(strategy, "accountant", None)


def server_epsilon(strategy: Strategy) -> tuple[float, float] | None:
    """(epsilon, delta) spent so far by the client-level accountant; None without one."""
    spent = strategy.privacy_spent() if _accountant(strategy) is not None else None
    return None if spent is None else (float(spent.epsilon), float(spent.delta))


def server_budget_check(strategy: Strategy) -> tuple[bool, str]:
    """(True, "") if one more round stays within dp-epsilon-budget, else (False, reason) to end the run cleanly."""
    acc = _accountant(strategy)
    if acc is None or acc.config.max_epsilon is None:
        return True, ""
    event = GaussianPrivacyEvent(noise_multiplier=strategy.noise_multiplier,
                                 sample_size=strategy.num_sampled_clients,
                                 population_size=acc.config.population_size)
    if not acc.would_exceed(event):
        return True, ""
    spent = acc.get_privacy_spent()
    return False, (f"privacy budget: epsilon {spent.epsilon:.3f} (delta {spent.delta:g}) after "
                   f"{spent.num_releases} round(s); one more would exceed dp-epsilon-budget {acc.config.max_epsilon:g}")


# <run dir>/privacy_journal.json: the client-level accountant after the last noised global made,
# written (atomically) before any message carries that global to a site.
JOURNAL_FILE = "privacy_journal.json"


def journal_release(strategy: Strategy, run_dir: Path, server_round: int) -> None:
    """Record the accountant with this round's release composed, before the release leaves the server.

    The round checkpoint holds the accountant too, but it is written after
    the round (write-behind): a crash after the noised global went out in
    evaluate messages would resume from the previous checkpoint, run the
    round again with fresh noise and count two releases as one.
    """
    write_json_atomic(Path(run_dir) / JOURNAL_FILE, {"round": server_round, "accountant": accountant_state(strategy)})


def carry_privacy_journal(strategy: Strategy, run_dir: Path) -> str | None:
    """Continue from the journal where it counts more releases than the accountant has (a resume
    from a checkpoint older than the last release, or a new attempt after a crash in round 1).

    Returns what was done, for the log; None when the accountant already counts them all.
    """
    path = Path(run_dir) / JOURNAL_FILE
    acc = _accountant(strategy)
    if acc is None or not path.is_file():
        return None
    before, checkpointed = acc.num_releases, acc.state_dict()
    try:
        acc.load_state_dict(json.loads(path.read_text())["accountant"])  # validates before it changes anything
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: the client-level privacy journal cannot be used ({type(err).__name__}: {err}); "
                          "the run's epsilon would be undercounted: start a new run-name") from None
    if acc.num_releases <= before:
        acc.load_state_dict(checkpointed)
        return None
    return (f"privacy journal: {acc.num_releases} noised globals sent so far (the checkpoint counted {before}); "
            f"epsilon continues from {acc.get_privacy_spent().epsilon:.3f}")


def accountant_state(strategy: Strategy) -> dict[str, Any] | None:
    """JSON-able accountant state for the round checkpoint (None without an accountant)."""
    acc = _accountant(strategy)
    return None if acc is None else acc.state_dict()


def restore_accountant(strategy: Strategy, state: dict[str, Any] | None) -> None:
    """Continue the epsilon of a resumed run (refuses a state made with another config)."""
    acc = _accountant(strategy)
    if acc is None or state is None:
        if (acc is None) != (state is None):
            raise ValueError("checkpoint and run disagree on whether client-level DP is on")
        return
    acc.load_state_dict(state)
