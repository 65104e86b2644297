"""Sample-level differential privacy at a site: DP-SGD with an accountant that outlives processes.

Plain PyTorch + Opacus, no Flower. What a site calls each round (run config
``dp = "sample"``)::

    dp = DPSettings.from_config(cfg)
    state_path = site_state_path(site_dir, run_name)     # <site-dir>/privacy/<run-name>.json
    result, report = fit_private(model, train_ds, tokenizer, train_cfg, dp, state_path,
                                 server_round=r, prox_reference=global_shared)
    report.as_record()   # {"epsilon", "delta", "dp_steps", "dp_sample_rate", "dp_noise_multiplier"}

and on ``BudgetExhausted`` (raised *before* any data is touched) replies
with ``err.reason`` instead of an update.

Design (each point is a test in tests/test_privacy.py):

- DP-SGD on the model's trainable tensors only: Opacus' ``GradSampleModule``
  (``hooks`` mode: our forward passes keyword arguments to HF modules, which
  breaks ``ew``) computes per-sample gradients of the adapter layers;
  ``DPOptimizer`` clips each sample's gradient to ``max_grad_norm`` (C),
  sums, adds N(0, (zC)^2) and divides by the expected batch size. The frozen
  towers have no trainable parameters, so no hooks and no per-sample memory.
- Poisson sampling: each step takes every training image independently with
  probability q = batch_size / N; an epoch is ceil(N / batch_size) steps.
  An empty draw is still a step (noise only), as the analysis assumes.
- A drawn (logical) batch is run in physical chunks of at most
  ``batch_size`` images (Opacus' virtual-step mechanism: clip and
  accumulate per chunk, noise once per logical step), so memory stays that
  of non-private training at the same batch size plus the per-sample
  adapter gradients (chunk x trainable parameters x 4 bytes). Ghost
  clipping would save only that last term at the cost of a second
  backward; with about 3 M adapter parameters it is 0.4 GB at 32 images,
  small next to the activations of the frozen towers.
- Accounting: the steps of a round are *reserved* in the site's state file
  (atomic write) before the first image is read, so a crash, a new
  ClientApp process per message or a resumed run can only over-count,
  never forget. Epsilon is composed over every step of every round in the
  state (Opacus RDP or PRV accountant, history ``[(z, q, steps), ...]``).
- Budget: a round whose steps would take epsilon past ``epsilon_budget``
  is refused before training (``BudgetExhausted``). That budget is the
  run's (the server's); a site's own ``SitePolicy.budget``
  (common/site_policy.py) bounds all its runs together: every state file in
  its ``privacy/`` folder composed with RDP (``within_site_budget``), checked
  and charged under a file lock.
- ``target_epsilon``: z is calibrated once, at the site's first round, for
  ``planned_rounds x epochs x steps-per-epoch`` steps (Opacus
  ``get_noise_multiplier``: the planned run ends at or just below the
  target) and kept in the state for every later round.
- Randomness for noise and sampling comes from ``os.urandom`` unless a
  test passes ``rng_seed``: a noise draw that the run's (shared) seed could
  reproduce would void the guarantee. torch's generator is not a CSPRNG
  (Opacus' ``secure_mode`` needs torchcsprng, not installed), the same
  limitation as Opacus' default.
- FedProx: the proximal term does not depend on data, so its gradient
  mu (w - w_global) is added after noising (post-processing, no privacy
  cost); Opacus would otherwise drop it (it replaces ``p.grad``).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from common.atomic import write_json_atomic
from common.config import TrainConfig, resolve_device
from common.data.dataset import collate_fn
from common.evaluate import make_loss
from common.model import AdaptedCLIPSeg
from common.site_policy import SitePolicy

STATE_VERSION = 1
ACCOUNTANTS = ("rdp", "prv")
# Variants Opacus can give per-sample gradients for through our forward (Linear, Conv,
# LayerNorm layers only). `full` would need raw nn.Parameters of the CLIP embeddings.
SUPPORTED_VARIANTS = ("shallow-v", "shallow-vl", "shallow-vlc", "dense-v", "dense-vl", "dense-vlc", "decoder", "lora")


class PrivacyError(ValueError):
    """A privacy state or setting that cannot be used (mismatched accountant, delta, variant)."""


class BudgetExhausted(RuntimeError):
    """The next round would exceed the site's epsilon budget; nothing was trained.

    ``reason`` is short and has no paths (it travels to the server);
    ``report`` is the privacy spent so far.
    """

    def __init__(self, reason: str, report: PrivacyReport) -> None:
        super().__init__(reason)
        self.reason = reason
        self.report = report


@dataclass(frozen=True)
class DPSettings:
    """The differential-privacy part of a FederationConfig (see its dp-* keys)."""

    mode: str = "off"  # off | sample | client
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    epsilon_budget: float = 0.0  # 0: none
    max_grad_norm: float = 1.0  # sample level: per-sample clip
    target_epsilon: float = 0.0  # sample level: > 0 calibrates z
    accountant: str = "rdp"  # sample level: rdp | prv
    clip_norm: float = 1.0  # client level: update clip
    clipping: str = "server"  # client level: server | client
    planned_rounds: int = 1  # for calibration: the run's rounds

    @classmethod
    def from_config(cls, cfg: Any) -> DPSettings:
        """From a FederationConfig (duck-typed: no import cycle)."""
        return cls(
            mode=cfg.dp,
            noise_multiplier=cfg.dp_noise_multiplier,
            delta=cfg.dp_delta,
            epsilon_budget=cfg.dp_epsilon_budget,
            max_grad_norm=cfg.dp_max_grad_norm,
            target_epsilon=cfg.dp_target_epsilon,
            accountant=cfg.dp_accountant,
            clip_norm=cfg.dp_clip_norm,
            clipping=cfg.dp_clipping,
            planned_rounds=cfg.rounds,
        )


@dataclass(frozen=True)
class PrivacyReport:
    """Exactly the per-site fields of a round record under sample-level DP."""

    epsilon: float
    delta: float
    dp_steps: int  # all DP-SGD steps this site has taken in this run so far
    dp_sample_rate: float
    dp_noise_multiplier: float

    def as_record(self) -> dict[str, float | int]:
        """rounds.jsonl ``sites.<name>`` fields."""
        return asdict(self)

    def as_metrics(self) -> dict[str, float | int]:
        """The train reply's MetricRecord entries (hyphenated like the other metric keys)."""
        return {METRIC_KEYS[k]: v for k, v in asdict(self).items()}

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> PrivacyReport | None:
        """Back from a reply's metrics (None if the reply has none: dp off or client level)."""
        if not all(key in metrics for key in METRIC_KEYS.values()):
            return None
        return cls(epsilon=float(metrics[METRIC_KEYS["epsilon"]]), delta=float(metrics[METRIC_KEYS["delta"]]),
                   dp_steps=int(metrics[METRIC_KEYS["dp_steps"]]),
                   dp_sample_rate=float(metrics[METRIC_KEYS["dp_sample_rate"]]),
                   dp_noise_multiplier=float(metrics[METRIC_KEYS["dp_noise_multiplier"]]))


# PrivacyReport field -> train-reply metric key
METRIC_KEYS = {"epsilon": "dp-epsilon", "delta": "dp-delta", "dp_steps": "dp-steps",
               "dp_sample_rate": "dp-sample-rate", "dp_noise_multiplier": "dp-noise-multiplier"}


# ------------------------------------------------------------------ accounting
def sample_rate_and_steps(num_examples: int, batch_size: int) -> tuple[float, int]:
    """(q, steps per epoch): Poisson rate batch_size / N, and ceil(N / batch_size) steps."""
    if num_examples < 1 or batch_size < 1:
        raise PrivacyError(f"need >= 1 example and batch size >= 1, got {num_examples}, {batch_size}")
    return min(1.0, batch_size / num_examples), math.ceil(num_examples / batch_size)


def planned_steps(num_examples: int, batch_size: int, local_epochs: int, rounds: int = 1) -> int:
    """DP-SGD steps of `rounds` rounds of `local_epochs` epochs at one site."""
    return rounds * local_epochs * sample_rate_and_steps(num_examples, batch_size)[1]


def _opacus_accountant(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name not in ACCOUNTANTS:
        raise PrivacyError(f"accountant must be one of {ACCOUNTANTS}, got {name!r}")
    return RDPAccountant() if name == "rdp" else PRVAccountant()


def compute_epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` of composing every (z, q, steps) entry of `history` (0 if empty)."""
    history = [(float(z), float(q), int(n)) for z, q, n in history if int(n) > 0]
    if not history:
        return 0.0
    acc = _opacus_accountant(accountant)
    acc.history = history
    with warnings.catch_warnings():  # Opacus RDP logs orders it skips; they only loosen the bound
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp") -> float:
    """Smallest z (to Opacus' tolerance, 0.01 in epsilon) such that `steps` steps end at <= target."""
    from opacus.accountants.utils import get_noise_multiplier

    if target_epsilon <= 0 or steps < 1:
        raise PrivacyError(f"calibration needs target epsilon > 0 and steps >= 1, got {target_epsilon}, {steps}")
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps, accountant=accountant))


@dataclass
class SiteAccountantState:
    """What a site must remember between processes: everything the epsilon depends on.

    ``history`` is Opacus' accountant history ``[(z, q, steps), ...]`` (one
    entry per round; the accountant composes them all); ``rounds`` says which
    server round reserved which steps (a retried round is charged again:
    its data was used again).
    """

    accountant: str
    delta: float
    noise_multiplier: float  # z this site uses (calibrated once if target_epsilon > 0)
    target_epsilon: float = 0.0
    calibrated_for_steps: int = 0
    history: list[tuple[float, float, int]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(int(n) for _, _, n in self.history)

    @property
    def sample_rate(self) -> float:
        return float(self.history[-1][1]) if self.history else 0.0

    def epsilon(self) -> float:
        return compute_epsilon(self.history, self.delta, self.accountant)

    def report(self, sample_rate: float | None = None) -> PrivacyReport:
        return PrivacyReport(
            epsilon=self.epsilon(),
            delta=self.delta,
            dp_steps=self.steps,
            dp_sample_rate=self.sample_rate if sample_rate is None else sample_rate,
            dp_noise_multiplier=self.noise_multiplier,
        )

    def reserve(self, sample_rate: float, steps: int, server_round: int) -> None:
        """Charge `steps` steps at (z, q) to this state (call before training, then save)."""
        self.history.append((self.noise_multiplier, float(sample_rate), int(steps)))
        self.rounds.append({"round": int(server_round), "steps": int(steps), "sample_rate": float(sample_rate),
                            "noise_multiplier": self.noise_multiplier, "time": time.time()})

    # -------------------------------------------------------------- persistence
    def to_json(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **asdict(self), "history": [list(h) for h in self.history],
                "steps": self.steps, "epsilon": self.epsilon()}

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> SiteAccountantState:
        raw = json.loads(Path(path).read_text())
        if raw.get("version") != STATE_VERSION:
            raise PrivacyError(f"privacy state version {raw.get('version')!r} is not {STATE_VERSION}")
        return cls(
            accountant=raw["accountant"],
            delta=float(raw["delta"]),
            noise_multiplier=float(raw["noise_multiplier"]),
            target_epsilon=float(raw.get("target_epsilon", 0.0)),
            calibrated_for_steps=int(raw.get("calibrated_for_steps", 0)),
            history=[(float(z), float(q), int(n)) for z, q, n in raw["history"]],
            rounds=list(raw.get("rounds", [])),
        )


# ------------------------------------------------------- the site's own terms (common/site_policy.py)
def ledger_history(privacy_dir: str | Path, exclude: str | Path | None = None) -> list[tuple[float, float, int]]:
    """Every DP-SGD step this site took, over all runs: the histories of `privacy_dir`'s state files.

    A state that cannot be read is an error, not a gap (it would undercount).
    """
    out: list[tuple[float, float, int]] = []
    skip = Path(exclude).resolve() if exclude is not None else None
    for path in sorted(Path(privacy_dir).glob("*.json")):
        if path.name.startswith(".") or path.resolve() == skip:
            continue
        try:
            out += SiteAccountantState.load(path).history
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise PrivacyError(f"{path}: this site's privacy state cannot be read ({type(err).__name__}); "
                               "the site's total epsilon would be undercounted") from None
    return out


@contextmanager
def ledger_lock(privacy_dir: str | Path) -> Iterator[None]:
    """One process at a time checks and charges this site's budget (two runs at once cannot both
    pass a check that only one of them fits)."""
    import fcntl

    folder = Path(privacy_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def site_state_path(site_dir: str | Path, run_name: str) -> Path:
    """Where a site keeps its accountant for a run: ``<site-dir>/privacy/<run-name>.json``."""
    from common.federation_config import is_run_name

    if not run_name:
        raise PrivacyError("a privacy state needs the run's name")
    # The name comes from the server's message. '../x' would put the state outside privacy/ (and check it
    # against another folder's ledger), '.x' would hide it from every other run's check: either way the
    # site's dp-site-budget would not count it.
    if not is_run_name(run_name):
        raise PrivacyError(f"run name {run_name!r} cannot name a privacy state: a run-name is letters, digits, "
                           "'.', '_' or '-', starting with a letter or digit")
    return Path(site_dir) / "privacy" / f"{run_name}.json"


def open_state(path: str | Path, dp: DPSettings, num_examples: int, batch_size: int,
               local_epochs: int) -> SiteAccountantState:
    """The site's state for this run: loaded if it exists (same accountant and delta), else new.

    A new state fixes z: `dp.noise_multiplier`, or, with `dp.target_epsilon`,
    z calibrated for `dp.planned_rounds x local_epochs x steps-per-epoch` steps.
    Not saved here: `fit_private` saves it together with the round's reservation.
    """
    path = Path(path)
    if path.exists():
        state = SiteAccountantState.load(path)
        if state.accountant != dp.accountant or not math.isclose(state.delta, dp.delta, rel_tol=1e-12):
            raise PrivacyError(
                f"this site's privacy state for the run was made with accountant {state.accountant!r}, delta "
                f"{state.delta:g}; the run now asks for {dp.accountant!r}, {dp.delta:g} (it cannot be reset)"
            )
        return state
    if dp.target_epsilon > 0:
        q, _ = sample_rate_and_steps(num_examples, batch_size)
        steps = planned_steps(num_examples, batch_size, local_epochs, dp.planned_rounds)
        z = calibrate_noise(dp.target_epsilon, dp.delta, q, steps, dp.accountant)
        return SiteAccountantState(dp.accountant, dp.delta, z, dp.target_epsilon, steps)
    return SiteAccountantState(dp.accountant, dp.delta, float(dp.noise_multiplier))


def epsilon_after(state: SiteAccountantState, extra_steps: int, sample_rate: float | None = None) -> float:
    """Epsilon if `extra_steps` more steps were taken at the state's z and `sample_rate` (default: its last q)."""
    q = state.sample_rate if sample_rate is None else sample_rate
    extra = [(state.noise_multiplier, q, int(extra_steps))] if extra_steps > 0 else []
    return compute_epsilon(state.history + extra, state.delta, state.accountant)


def can_train_round(state: SiteAccountantState, steps_this_round: int, budget: float,
                    sample_rate: float | None = None) -> tuple[bool, str]:
    """(True, "") if the round's steps keep epsilon <= `budget` (0: no budget), else (False, reason)."""
    if budget <= 0:
        return True, ""
    after = epsilon_after(state, steps_this_round, sample_rate)
    if after <= budget:
        return True, ""
    return False, (f"privacy budget: epsilon {state.epsilon():.3f} after {state.steps} DP-SGD steps; "
                   f"this round ({steps_this_round} steps) would reach {after:.3f} > budget {budget:g} "
                   f"(delta {state.delta:g}); site stops training")


def within_site_budget(policy: SitePolicy, state_path: Path, state: SiteAccountantState, sample_rate: float,
                       steps: int) -> tuple[bool, str]:
    """(True, "") if this round keeps the epsilon of all the site's runs within its own budget."""
    history = ledger_history(state_path.parent, exclude=state_path) + state.history
    after = compute_epsilon(history + [(state.noise_multiplier, sample_rate, int(steps))], policy.delta, "rdp")
    if after <= policy.budget:
        return True, ""
    return False, (f"privacy budget: this round would take the epsilon of all this site's runs to "
                   f"{after:.3f} > its dp-site-budget {policy.budget:g} (delta {policy.delta:g}); site stops "
                   "training")


# -------------------------------------------------------------------- training
def make_private_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dp: DPSettings,
                      noise_multiplier: float, expected_batch_size: int,
                      generator: torch.Generator | None = None):
    """(GradSampleModule, DPOptimizer) for `model`'s trainable parameters.

    Exposed for the tests (they inspect clipping and noise through these
    objects); `fit_private` is the only production caller.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    # Opacus' conv grad sampler returns all-zero per-sample weight gradients for a
    # non-contiguous input (CLIPSeg's decoder feeds its first conv a view of a
    # transposed tensor): hand trainable convs a contiguous copy.
    handles = [m.register_forward_pre_hook(_contiguous_inputs) for m in model.modules()
               if isinstance(m, torch.nn.modules.conv._ConvNd) and any(p.requires_grad for p in m.parameters())]
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    gsm._fedvlsm_handles = handles
    dpo = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=dp.max_grad_norm,
                      expected_batch_size=expected_batch_size, loss_reduction="mean", generator=generator)
    return gsm, dpo


def _contiguous_inputs(module: torch.nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous() if torch.is_tensor(a) else a for a in args)


def close_private(gsm: Any, params: list[torch.nn.Parameter]) -> None:
    """Remove Opacus' hooks and per-sample attributes (and ours): the model is a plain model again."""
    gsm._close()
    for handle in getattr(gsm, "_fedvlsm_handles", []):
        handle.remove()
    for p in params:
        for attr in ("summed_grad", "grad_sample"):
            if hasattr(p, attr):
                delattr(p, attr)


def dp_step(gsm: torch.nn.Module, dpo: Any, batches: list[Mapping[str, Any]], loss_fn: Any,
            device: torch.device, prox: tuple[float, Mapping[str, torch.Tensor]] | None = None) -> list[float]:
    """One DP-SGD step over one Poisson draw, given as physical chunks (may be empty).

    Per chunk: forward, backward, clip and accumulate (Opacus' virtual step);
    after the last: noise once, scale by the expected batch size, the
    data-free FedProx gradient, the optimiser step. Returns chunk losses.
    """
    from common.train import batch_loss

    params = [p for p in dpo.params]
    losses: list[float] = []
    for i, batch in enumerate(batches):
        loss, _, _ = batch_loss(gsm, batch, loss_fn, device)
        loss.backward()
        losses.append(float(loss.item()))
        if i < len(batches) - 1:
            dpo.signal_skip_step(do_skip=True)
            dpo.pre_step()  # clip and accumulate this chunk; no noise, no step
            dpo.zero_grad(set_to_none=True)  # keeps the accumulated clipped sum
    if not batches:  # an empty Poisson draw: a step of pure noise
        for p in params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    if not dpo.pre_step():  # clip, accumulate, add noise, scale
        raise RuntimeError("DP optimiser skipped the final chunk of a step")
    if prox is not None:
        mu, reference = prox
        named = dict(gsm._module.named_parameters())
        with torch.no_grad():
            for name, ref in reference.items():
                if name in named and named[name].requires_grad:
                    named[name].grad.add_(named[name].detach() - ref.to(device), alpha=mu)
    dpo.original_optimizer.step()
    dpo.zero_grad(set_to_none=True)
    return losses


def reached_parameters(model: AdaptedCLIPSeg, tokenizer: Any, device: torch.device) -> list[torch.nn.Parameter]:
    """The trainable parameters our forward actually reaches (a data-free probe on a blank image).

    `lora` puts adapters in every vision layer, but the forward stops at the
    last layer the decoder reads, so the later ones never get a gradient;
    Opacus needs a per-sample gradient for every parameter it steps, so they
    are left out of the private optimiser (they stay exactly as received).
    """
    probe = {"pixel_values": torch.zeros(3, model.image_size, model.image_size),
             "mask": torch.zeros(1, model.image_size, model.image_size),
             "orig_mask": torch.zeros(model.image_size, model.image_size, dtype=torch.uint8),
             "prompt": "a", "id": "probe"}
    batch = collate_fn(tokenizer, model.max_prompt_tokens)([probe])
    model.zero_grad(set_to_none=True)
    out = model(batch["pixel_values"].to(device), batch["input_ids"].to(device), batch["attention_mask"])
    out.sum().backward()
    reached = [p for p in model.trainable_parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return reached


def fit_private(
    model: AdaptedCLIPSeg,
    train_ds: Dataset,
    tokenizer: Any,
    train_cfg: TrainConfig,
    dp: DPSettings,
    state_path: str | Path,
    *,
    server_round: int = 0,
    prox_reference: Mapping[str, torch.Tensor] | None = None,
    rng_seed: int | None = None,
    physical_batch: int | None = None,
    policy: SitePolicy | None = None,
) -> tuple[Any, PrivacyReport]:
    """One round of sample-level DP-SGD at a site; returns (FitResult, PrivacyReport).

    `train_cfg`: epochs (the round's local epochs), batch_size (the expected
    Poisson batch, also the physical chunk limit), lr, weight_decay, prox_mu,
    device, seed (data order of the dataset's prompt draws only). `amp`,
    `fast` and `compile` are ignored (eager fp32) and `grad_clip` is replaced by per-sample clipping at
    `dp.max_grad_norm`. `state_path`: `site_state_path(site_dir, run_name)`.
    `physical_batch`: most images per forward/backward (default
    batch_size); a Poisson draw is split into such chunks, noise is added
    once per draw (memory only: the privacy accounting is the same).
    `rng_seed`: tests only (default: fresh from os.urandom).
    `policy`: the site's own terms; with a `budget`, the round must also keep
    the epsilon of all this site's runs together within it.

    Raises BudgetExhausted before reading any image if this round would
    exceed `dp.epsilon_budget` or the site's budget; PrivacyError for an
    unsupported variant or a state made with another accountant/delta.
    """
    from common.train import FitResult, seed_everything

    start = time.perf_counter()
    if dp.mode != "sample":
        raise PrivacyError(f"fit_private needs dp mode 'sample', got {dp.mode!r}")
    if model.spec.variant not in SUPPORTED_VARIANTS:
        raise PrivacyError(f"sample-level DP does not support adapter {model.spec.variant!r}; "
                           f"use one of {', '.join(SUPPORTED_VARIANTS)}")
    n = len(train_ds)
    if n == 0:
        raise ValueError("cannot train on an empty dataset")
    q, steps_per_epoch = sample_rate_and_steps(n, train_cfg.batch_size)
    round_steps = train_cfg.epochs * steps_per_epoch

    state_path = Path(state_path)
    with ledger_lock(state_path.parent):
        state = open_state(state_path, dp, n, train_cfg.batch_size, train_cfg.epochs)
        ok, reason = can_train_round(state, round_steps, dp.epsilon_budget, q)
        if not ok:
            raise BudgetExhausted(reason, state.report())
        if policy is not None and policy.budget > 0:
            ok, reason = within_site_budget(policy, state_path, state, q, round_steps)
            if not ok:
                raise BudgetExhausted(reason, state.report())
        state.reserve(q, round_steps, server_round)
        state.save(state_path)  # charged before any image is read: a crash can only over-count

    seed_everything(train_cfg.seed)
    seed = rng_seed if rng_seed is not None else int.from_bytes(os.urandom(8), "little")
    sampler_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(seed ^ 0x5DEECE66D)
    device = resolve_device(train_cfg.device)
    model.to(device)
    # DP-SGD is eager fp32: undo what a fast-path run in this process left on the shared base
    # (bf16 frozen weights, fused/folded modules), as the plain fit does.
    from common import fast

    fast.restore_fp32(model)
    if device.type != "cpu":
        noise_gen = torch.Generator(device=device).manual_seed(seed ^ 0x5DEECE66D)
    params = reached_parameters(model, tokenizer, device)
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr_for(model.spec.variant, model.spec.family),
                                  weight_decay=train_cfg.weight_decay)
    expected_batch = max(1, round(q * n))
    gsm, dpo = make_private_step(model, optimizer, dp, state.noise_multiplier, expected_batch, noise_gen)
    loss_fn = make_loss(train_cfg)
    collate = collate_fn(tokenizer, model.max_prompt_tokens)
    prox = None
    if prox_reference and train_cfg.prox_mu > 0:
        prox = (train_cfg.prox_mu, {k: v.to(device) for k, v in prox_reference.items()})

    chunk = physical_batch or train_cfg.batch_size
    if chunk < 1:
        raise ValueError(f"physical_batch must be >= 1, got {chunk}")
    history: list[dict[str, Any]] = []
    train_loss, steps = math.nan, 0
    # Adapters on frozen activations: torch warns that the full backward hook fires with no input
    # needing a gradient; Opacus only reads the output gradient there (the tests check the values).
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    try:
        for epoch in range(train_cfg.epochs):
            if hasattr(train_ds, "set_epoch"):
                train_ds.set_epoch(epoch)
            gsm.train()
            losses: list[float] = []
            for _ in range(steps_per_epoch):
                drawn = torch.nonzero(torch.rand(n, generator=sampler_gen) < q).flatten().tolist()
                chunks = [drawn[i:i + chunk] for i in range(0, len(drawn), chunk)]
                batches = [collate([train_ds[j] for j in chunk]) for chunk in chunks]
                losses += dp_step(gsm, dpo, batches, loss_fn, device, prox)
                steps += 1
            train_loss = float(np.mean(losses)) if losses else math.nan
            history.append({"epoch": epoch + 1, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"]})
    finally:
        close_private(gsm, params)
    if steps != round_steps:
        raise RuntimeError(f"took {steps} DP-SGD steps, reserved {round_steps}")
    result = FitResult(num_examples=n, epochs_run=len(history), steps=steps, train_loss=train_loss,
                       best_val_dice=None, best_epoch=None, seconds=time.perf_counter() - start, history=history)
    return result, state.report(q)


# ------------------------------------------- client level: update clipping (numpy, fp32)
def update_norm(update: Mapping[str, np.ndarray]) -> float:
    """L2 norm of all tensors together, squares summed in float64 (fp16 would overflow above ~256)."""
    return float(math.sqrt(sum(float(np.square(np.asarray(v, dtype=np.float64)).sum()) for v in update.values())))


def clip_update_fp32(update: Mapping[str, np.ndarray], clip_norm: float) -> dict[str, np.ndarray]:
    """`update` scaled by min(1, clip_norm / ||update||), in float32, norm computed in float64.

    Never zeroes a large update (Flower's own clipping squares in the array's
    dtype: an fp16 update of norm ~600 becomes inf and is scaled to 0).
    """
    if clip_norm <= 0:
        raise PrivacyError(f"clip norm must be > 0, got {clip_norm}")
    norm = update_norm(update)
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    return {k: (np.asarray(v, dtype=np.float32) * np.float32(scale)).astype(np.float32) for k, v in update.items()}


def clip_for_wire(received: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray], clip_norm: float,
                  dtype: np.dtype) -> dict[str, np.ndarray]:
    """Arrays in `dtype` whose update over `received`, as the server will decode it, has norm <= clip_norm.

    The update (trained - received) is clipped in fp32; rounding to fp16 can
    push its norm a hair above the bound, so the encoded reply is measured
    again (decoded to fp32, as the server does) and shrunk until it holds.
    `received` is what the site got (wire arrays); keys must match.
    """
    if set(received) != set(trained):
        raise PrivacyError("update clipping: reply tensor names differ from the received ones")
    base = {k: np.asarray(received[k], dtype=np.float32) for k in received}
    delta = {k: np.asarray(trained[k], dtype=np.float32) - base[k] for k in base}
    norm = update_norm(delta)
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    for _ in range(60):
        with np.errstate(over="ignore"):
            wire = {k: (base[k] + np.float32(scale) * delta[k]).astype(dtype) for k in base}
        actual = update_norm({k: wire[k].astype(np.float32) - base[k] for k in base})
        if actual <= clip_norm and all(np.isfinite(w).all() for w in wire.values()):
            return wire
        scale *= 0.999 * clip_norm / actual if np.isfinite(actual) and actual > 0 else 0.5
    return {k: base[k].astype(dtype) for k in base}  # the received arrays: update 0
