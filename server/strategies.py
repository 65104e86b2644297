"""Config -> Flower strategy, and the strategy state a resumed run needs.

Strategies are Flower's own (flwr.serverapp.strategy); this file only
chooses one and sets its parameters from the FederationConfig:

- ``fedavg``: weighted by each site's ``num-examples``.
- ``fedprox``: FedAvg on the server; sends ``proximal-mu`` in the train
  config and the *site* adds mu/2 * ||w - w_global||^2 to its loss.
- ``fedadam`` / ``fedyogi``: server-side Adam/Yogi on the averaged update
  (``server-lr``, ``server-beta1/2``, ``server-tau``).
- ``fedmedian`` / ``fedtrimmedavg`` (``trim-beta`` cut per tail): robust
  coordinate-wise aggregates, unweighted.

Minimum node counts are derived from the number of sites actually
connected: Flower's defaults (2) would make a strategy wait silently for
sites that do not exist until its round timeout.

With ``dp = "client"``, fedavg/fedprox come wrapped in Flower's
fixed-clipping DP wrapper with its RdpAccountant (server/privacy.py), whose
state is part of the strategy state below.

State for resume: FedAdam/FedYogi keep first/second moments ``m_t`` and
``v_t`` (and use the round number in FedAdam's bias correction, which the
round loop passes on unchanged). ``current_arrays`` is reset from the
global arrays by ``configure_train`` every round, so the moments are all
that must be saved. The others are stateless between rounds.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Strategy,
)
from flwr.serverapp.strategy.fedopt import FedOpt

from common.federation_config import FederationConfig

MOMENTS = ("m_t", "v_t")


def num_sampled_sites(cfg: FederationConfig, num_sites: int) -> int:
    """How many sites a round samples with build_strategy's minimums (ceil(fraction-train x n), >= 1)."""
    return max(1, math.ceil(cfg.fraction_train * num_sites))


def build_strategy(cfg: FederationConfig, num_sites: int) -> Strategy:
    if num_sites < 1:
        raise ValueError("build_strategy needs at least one connected site")
    common: dict[str, Any] = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": num_sampled_sites(cfg, num_sites),
        "min_evaluate_nodes": max(1, math.ceil(cfg.fraction_evaluate * num_sites)),
        "min_available_nodes": num_sites,
    }
    if cfg.dp == "client":  # Flower's fixed-clipping DP wrapper + RdpAccountant (server/privacy.py)
        from server.privacy import wrap_strategy

        inner = FedAvg(**common) if cfg.strategy == "fedavg" else FedProx(**common, proximal_mu=cfg.prox_mu)
        return wrap_strategy(inner, cfg, num_sites)
    if cfg.strategy == "fedavg":
        return FedAvg(**common)
    if cfg.strategy == "fedprox":
        return FedProx(**common, proximal_mu=cfg.prox_mu)
    if cfg.strategy in ("fedadam", "fedyogi"):
        cls = FedAdam if cfg.strategy == "fedadam" else FedYogi
        # eta_l is only informational in Flower's FedOpt: local training uses `lr`.
        return cls(
            **common,
            eta=cfg.server_lr,
            eta_l=cfg.lr or 1e-3,
            beta_1=cfg.server_beta1,
            beta_2=cfg.server_beta2,
            tau=cfg.server_tau,
        )
    if cfg.strategy == "fedmedian":
        return FedMedian(**common)
    if cfg.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=cfg.trim_beta)
    raise ValueError(f"run config 'strategy': unknown strategy {cfg.strategy!r}")


def strategy_state(strategy: Strategy) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, json-able meta) that restore_strategy_state needs to continue exactly."""
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"strategy": type(strategy).__name__, "moments": []}
    if getattr(strategy, "accountant", None) is not None:  # dp = "client": epsilon must survive a resume
        meta["dp_accountant"] = strategy.accountant.state_dict()
    if isinstance(strategy, FedOpt):
        for moment in MOMENTS:
            values = getattr(strategy, moment)
            if values:
                meta["moments"].append(moment)
                for name, value in values.items():
                    arrays[f"{moment}/{name}"] = np.asarray(value)  # own dtype: exact resume
    return arrays, meta


def restore_strategy_state(strategy: Strategy, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    saved = meta.get("strategy")
    if saved != type(strategy).__name__:
        raise ValueError(f"checkpoint was written by strategy {saved}, this run uses {type(strategy).__name__}")
    if getattr(strategy, "accountant", None) is not None or "dp_accountant" in meta:
        from server.privacy import restore_accountant

        restore_accountant(strategy, meta.get("dp_accountant"))
    if not isinstance(strategy, FedOpt):
        return
    for moment in MOMENTS:
        if moment in meta.get("moments", []):
            prefix = f"{moment}/"
            values = {k.removeprefix(prefix): np.array(v) for k, v in arrays.items() if k.startswith(prefix)}
            setattr(strategy, moment, values)
        else:
            setattr(strategy, moment, None)
