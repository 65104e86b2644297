"""Sample-level DP at a site: clipping, noise, accounting vs dp_accounting, restart, calibration, budget."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import dp_accounting as dpa
import pytest
import torch

from common.config import TrainConfig
from common.data import SegDataset, load_items
from common.data.dataset import collate_fn
from common.evaluate import make_loss
from common.federation_config import ConfigError, FederationConfig
from common.model import build_model
from common.privacy import (
    BudgetExhausted,
    DPSettings,
    PrivacyError,
    PrivacyReport,
    SiteAccountantState,
    calibrate_noise,
    close_private,
    can_train_round,
    compute_epsilon,
    dp_step,
    epsilon_after,
    fit_private,
    make_private_step,
    planned_steps,
    reached_parameters,
    sample_rate_and_steps,
    site_state_path,
)
from common.train import batch_loss

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def dp_accounting_epsilon(q: float, z: float, steps: int, delta: float, method: str = "rdp") -> float:
    """Independent: Poisson-subsampled Gaussian self-composed `steps` times (Google's dp_accounting)."""
    acc = dpa.rdp.RdpAccountant() if method == "rdp" else dpa.pld.PLDAccountant()
    acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), steps)
    return acc.get_epsilon(delta)


@pytest.fixture(scope="module")
def train_ds(synth_sites, tiny_base):
    return SegDataset(load_items(synth_sites[0], "train"), tiny_base.image_size, train=True, seed=0)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 1, "batch_size": 4, "progress": False, "device": "cpu", **kw})


def _dp(**kw) -> DPSettings:
    return DPSettings(**{"mode": "sample", "noise_multiplier": 1.0, "max_grad_norm": 1.0, **kw})


def _flat_grad(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


# ------------------------------------------------------------------ clipping
@pytest.mark.parametrize("variant", ["shallow-vlc", "dense-vlc", "decoder", "lora"])
def test_per_sample_gradients_are_clipped_to_the_bound_before_noise(tiny_base, train_ds, variant):
    """Opacus' clipped sum equals sum_i min(1, C/||g_i||) g_i, g_i computed one image at a time (no Opacus).

    Run as two physical chunks (the virtual step), with z = 0 so the
    summed gradient is observable; C is set between the smallest and the
    largest per-sample norm, so both clipped and unclipped samples occur.
    """
    torch.manual_seed(0)
    model = build_model(tiny_base, variant)
    model.train()
    loss_fn = make_loss(_cfg())
    collate = collate_fn(tiny_base.tokenizer)
    items = [train_ds[i] for i in range(5)]
    params = reached_parameters(model, tiny_base.tokenizer, CPU)

    per_sample = []
    for item in items:  # the reference: one image per backward, plain autograd
        model.zero_grad(set_to_none=True)
        loss, _, _ = batch_loss(model, collate([item]), loss_fn, CPU)
        loss.backward()
        per_sample.append(_flat_grad(params).clone())
    model.zero_grad(set_to_none=True)
    norms = torch.stack([g.norm() for g in per_sample])
    clip = float(norms.median())
    assert norms.min() < clip < norms.max()
    expected_sum = sum(min(1.0, clip / (n.item() + 1e-6)) * g for g, n in zip(per_sample, norms))
    assert all((min(1.0, clip / n.item()) * g).norm() <= clip * (1 + 1e-6) for g, n in zip(per_sample, norms))

    opt = torch.optim.SGD(params, lr=0.0)
    gsm, dpo = make_private_step(model, opt, _dp(max_grad_norm=clip), 0.0, expected_batch_size=len(items))
    seen: dict[str, torch.Tensor] = {}
    step = opt.step

    def capture(*a, **k):  # the gradient the optimiser applies: (clipped sum + noise) / expected batch
        seen["grad"] = _flat_grad(params).clone()
        return step(*a, **k)

    opt.step = capture
    opacus_norms = []
    clip_and_accumulate = dpo.clip_and_accumulate

    def record_norms():
        gs = dpo.grad_samples
        opacus_norms.append(torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in gs], 1).norm(dim=1))
        clip_and_accumulate()

    dpo.clip_and_accumulate = record_norms
    dp_step(gsm, dpo, [collate(items[:3]), collate(items[3:])], loss_fn, CPU)
    close_private(gsm, params)
    # Opacus' per-sample gradients through our forward are the true ones ...
    torch.testing.assert_close(torch.cat(opacus_norms), norms, rtol=1e-3, atol=1e-6)
    # ... and the step uses their clipped sum, divided by the expected batch size.
    # (batched vs one-image float rounding: compare as vectors)
    assert (seen["grad"] * len(items) - expected_sum).norm() <= 1e-4 * expected_sum.norm()
    assert expected_sum.norm() <= clip * len(items)


def test_noise_std_is_z_times_c_on_the_summed_gradient(tiny_base):
    """With zero gradients (an empty Poisson draw), what the optimiser sees x expected batch ~ N(0, (zC)^2)."""
    torch.manual_seed(0)
    model = build_model(tiny_base, "dense-vl")
    params = reached_parameters(model, tiny_base.tokenizer, CPU)
    z, clip, expected = 1.7, 0.3, 4
    opt = torch.optim.SGD(params, lr=0.0)
    gsm, dpo = make_private_step(model, opt, _dp(max_grad_norm=clip), z, expected, torch.Generator().manual_seed(1))
    draws = []
    step = opt.step

    def capture(*a, **k):
        draws.append(_flat_grad(params).clone() * expected)
        return step(*a, **k)

    opt.step = capture
    for _ in range(5):
        dp_step(gsm, dpo, [], make_loss(_cfg()), CPU)
    close_private(gsm, params)
    noise = torch.cat(draws)
    n = noise.numel()
    assert n > 100_000
    # std of a sample std ~ sigma / sqrt(2n): 5 sigma is < 1.2% here
    assert abs(noise.std().item() / (z * clip) - 1) < 5 / math.sqrt(2 * n)
    assert abs(noise.mean().item()) < 5 * z * clip / math.sqrt(n)


# ---------------------------------------------------------------- accounting
@pytest.mark.parametrize(
    "q,z,steps,delta",
    [(0.1, 1.0, 100, 1e-5), (0.01, 1.1, 3000, 1e-5), (0.032, 1.0, 3125, 1e-4), (0.5, 2.0, 40, 1e-6),
     (1.0, 5.0, 50, 1e-5)],
)
def test_reported_epsilon_matches_dp_accounting(q, z, steps, delta):
    state = SiteAccountantState("rdp", delta, z, history=[(z, q, steps)])
    assert state.epsilon() == pytest.approx(dp_accounting_epsilon(q, z, steps, delta), rel=0.01)
    prv = SiteAccountantState("prv", delta, z, history=[(z, q, steps)])
    assert prv.epsilon() == pytest.approx(dp_accounting_epsilon(q, z, steps, delta, "pld"), rel=0.01)


def test_epsilon_composes_over_rounds_and_survives_a_process_restart(tiny_base, train_ds, tmp_path):
    """Two rounds in this process, a third in a fresh Python process: epsilon is over all steps."""
    state_path = site_state_path(tmp_path / "site", "run-a")
    dp, cfg = _dp(noise_multiplier=0.9, delta=1e-4), _cfg(epochs=2, batch_size=3)
    reports = []
    for rnd in (1, 2):
        model = build_model(tiny_base, "shallow-vlc")
        _, rep = fit_private(model, train_ds, tiny_base.tokenizer, cfg, dp, state_path, server_round=rnd, rng_seed=rnd)
        reports.append(rep)
    q, spe = sample_rate_and_steps(len(train_ds), 3)
    assert reports[0].dp_steps == 2 * spe and reports[1].dp_steps == 4 * spe
    assert reports[1].dp_sample_rate == q and reports[1].dp_noise_multiplier == 0.9
    assert reports[1].epsilon > reports[0].epsilon
    for rep in reports:
        assert rep.epsilon == pytest.approx(dp_accounting_epsilon(q, 0.9, rep.dp_steps, 1e-4), rel=0.01)

    script = textwrap.dedent(f"""
        import json, sys
        from common.bases import load_base
        from common.config import TrainConfig
        from common.data import SegDataset, load_items
        from common.model import build_model
        from common.privacy import DPSettings, fit_private
        base = load_base("arch:tiny")
        ds = SegDataset(load_items({str(train_ds.items[0].image.parents[1])!r}, "train"), base.image_size, train=True)
        _, rep = fit_private(build_model(base, "shallow-vlc"), ds, base.tokenizer,
                             TrainConfig(epochs=2, batch_size=3, progress=False, device="cpu"),
                             DPSettings(mode="sample", noise_multiplier=0.9, delta=1e-4), {str(state_path)!r},
                             server_round=3)
        print(json.dumps(rep.as_record()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    third = json.loads(out.stdout.strip().splitlines()[-1])
    assert third["dp_steps"] == 6 * spe
    assert set(third) == {"epsilon", "delta", "dp_steps", "dp_sample_rate", "dp_noise_multiplier"}
    assert PrivacyReport.from_metrics(PrivacyReport(**third).as_metrics()).as_record() == third
    assert PrivacyReport.from_metrics({"num-examples": 3}) is None
    assert third["epsilon"] == pytest.approx(dp_accounting_epsilon(q, 0.9, 6 * spe, 1e-4), rel=0.01)
    saved = json.loads(state_path.read_text())
    assert [r["round"] for r in saved["rounds"]] == [1, 2, 3]


def test_a_state_of_another_accountant_or_delta_is_refused(tiny_base, train_ds, tmp_path):
    path = tmp_path / "p.json"
    fit_private(build_model(tiny_base, "decoder"), train_ds, tiny_base.tokenizer, _cfg(), _dp(), path, rng_seed=0)
    for other in (_dp(accountant="prv"), _dp(delta=1e-6)):
        with pytest.raises(PrivacyError, match="cannot be reset"):
            fit_private(build_model(tiny_base, "decoder"), train_ds, tiny_base.tokenizer, _cfg(), other, path)


# --------------------------------------------------------------- calibration
@pytest.mark.parametrize("target,q,steps,accountant", [(3.0, 0.05, 400, "rdp"), (8.0, 0.25, 60, "rdp"),
                                                        (2.0, 0.1, 200, "prv")])
def test_calibrated_noise_ends_the_planned_run_at_or_just_below_the_target(target, q, steps, accountant):
    z = calibrate_noise(target, 1e-5, q, steps, accountant)
    eps = compute_epsilon([(z, q, steps)], 1e-5, accountant)
    assert target - 0.02 <= eps <= target
    assert compute_epsilon([(z * 0.97, q, steps)], 1e-5, accountant) > target  # z is not needlessly large


def test_target_epsilon_run_ends_just_below_target_at_the_site(tiny_base, train_ds, tmp_path):
    """3 planned rounds of 1 epoch: z calibrated at round 1, kept; the last round lands at <= target."""
    path = tmp_path / "cal.json"
    dp, cfg = _dp(target_epsilon=4.0, planned_rounds=3), _cfg(epochs=1, batch_size=4)
    zs, last = set(), None
    for rnd in (1, 2, 3):
        _, last = fit_private(build_model(tiny_base, "decoder"), train_ds, tiny_base.tokenizer, cfg, dp, path,
                              server_round=rnd, rng_seed=rnd)
        zs.add(last.dp_noise_multiplier)
    assert len(zs) == 1 and zs.pop() != 1.0  # calibrated, not the default z
    assert last.dp_steps == planned_steps(len(train_ds), 4, 1, 3)
    assert 4.0 - 0.02 <= last.epsilon <= 4.0
    assert last.epsilon == pytest.approx(
        dp_accounting_epsilon(last.dp_sample_rate, last.dp_noise_multiplier, last.dp_steps, 1e-5), rel=0.01)


# -------------------------------------------------------------------- budget
class CountingDataset(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds, self.reads = ds, 0

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.reads += 1
        return self.ds[i]


def test_budget_refuses_the_round_that_would_exceed_it_before_reading_data(tiny_base, train_ds, tmp_path):
    path = tmp_path / "budget.json"
    q, spe = sample_rate_and_steps(len(train_ds), 4)
    one_round = compute_epsilon([(1.0, q, spe)], 1e-5)
    two_rounds = compute_epsilon([(1.0, q, 2 * spe)], 1e-5)
    dp = _dp(epsilon_budget=(one_round + two_rounds) / 2)
    _, rep = fit_private(build_model(tiny_base, "decoder"), train_ds, tiny_base.tokenizer, _cfg(), dp, path, rng_seed=0)
    assert rep.epsilon <= dp.epsilon_budget

    counting = CountingDataset(train_ds)
    with pytest.raises(BudgetExhausted) as err:
        fit_private(build_model(tiny_base, "decoder"), counting, tiny_base.tokenizer, _cfg(), dp, path, server_round=2)
    assert counting.reads == 0  # the data were never touched
    assert "budget" in err.value.reason and "/" not in err.value.reason  # short, no paths
    assert err.value.report.dp_steps == spe  # nothing charged for the refused round
    state = SiteAccountantState.load(path)
    ok, reason = can_train_round(state, spe, dp.epsilon_budget, q)
    assert not ok and reason
    assert epsilon_after(state, spe) > dp.epsilon_budget >= state.epsilon()
    assert can_train_round(state, spe, 0.0) == (True, "")  # 0 = no budget


def test_steps_are_charged_before_training_so_a_crash_cannot_undercount(tiny_base, train_ds, tmp_path):
    class Broken(CountingDataset):
        def __getitem__(self, i):
            raise RuntimeError("disk gone")

    path = tmp_path / "crash.json"
    with pytest.raises(RuntimeError, match="disk gone"):
        fit_private(build_model(tiny_base, "decoder"), Broken(train_ds), tiny_base.tokenizer, _cfg(), _dp(), path,
                    rng_seed=0)
    assert SiteAccountantState.load(path).steps == sample_rate_and_steps(len(train_ds), 4)[1]


def test_fit_private_trains_and_leaves_a_clean_model(tiny_base, train_ds, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_base, "dense-vl")
    start = model.adapter_state()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    # Hooks already there (transformers installs output-capturing hooks on the shared base once its
    # stock forward has run) must stay; whatever Opacus or fit_private adds must go.
    hooks_before = {n: (set(m._forward_hooks), set(m._forward_pre_hooks)) for n, m in model.named_modules()}
    result, _ = fit_private(model, train_ds, tiny_base.tokenizer, _cfg(epochs=2), _dp(), tmp_path / "s.json",
                            prox_reference=start, rng_seed=0, physical_batch=2)
    assert result.steps == 2 * sample_rate_and_steps(len(train_ds), 4)[1] and math.isfinite(result.train_loss)
    assert any(not torch.equal(start[n], t) for n, t in model.adapter_state().items())
    for n, p in model.named_parameters():
        assert not hasattr(p, "grad_sample") and not hasattr(p, "summed_grad")
        if n in frozen:
            assert torch.equal(frozen[n], p)  # the towers never move
    hooks_after = {n: (set(m._forward_hooks), set(m._forward_pre_hooks)) for n, m in model.named_modules()}
    assert hooks_after == hooks_before


def test_fit_private_after_the_fast_path_trains_on_the_plain_one(tiny_base, train_ds, tmp_path):
    """A GPU site evaluates on the fast path (frozen base cast to bf16, fused and folded modules) between
    its DP rounds; DP-SGD is eager fp32 by design, so it must undo all that first, not run the fast forward
    on an fp32 batch (it raised a dtype mismatch) or leave the bf16 weights (or their fp32 rounding) in place."""
    import copy

    from common import fast
    from common.bases import Base

    base = Base(copy.deepcopy(tiny_base.model), tiny_base.tokenizer, tiny_base.base_id, tiny_base.image_size)
    torch.manual_seed(0)
    model = build_model(base, "dense-vl")
    pristine = {n: p.detach().clone() for n, p in base.model.named_parameters() if not p.requires_grad}
    fast.prepare_model(model, CPU, torch.bfloat16)  # what a fast evaluate on a GPU leaves behind
    seen = {}
    q = base.model.clip.vision_model.encoder.layers[0].self_attn.q_proj
    q.register_forward_pre_hook(lambda m, args: None if "q" in seen else seen.update(q=m.weight.detach().clone()))
    result, _ = fit_private(model, train_ds, base.tokenizer, _cfg(), _dp(), tmp_path / "s.json", rng_seed=0,
                            physical_batch=2)
    assert math.isfinite(result.train_loss) and model.fast is None
    # DP-SGD ran on the base as it was, not on its bf16 rounding (a warm worker's rounds after a fast
    # evaluate used to differ from a fresh process's)
    assert torch.equal(seen["q"], pristine["clip.vision_model.encoder.layers.0.self_attn.q_proj.weight"])
    assert all(torch.equal(p, pristine[n]) for n, p in base.model.named_parameters() if n in pristine)


def test_full_variant_is_refused(tiny_base, train_ds, tmp_path):
    with pytest.raises(PrivacyError, match="full"):
        fit_private(build_model(tiny_base, "full"), train_ds, tiny_base.tokenizer, _cfg(), _dp(), tmp_path / "f.json")


# -------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "override,keys",
    [
        ({"dp": "local"}, ["'dp'"]),
        ({"dp": "client", "strategy": "fedadam"}, ["'dp'", "'strategy'"]),
        ({"dp": "client", "strategy": "fedyogi"}, ["'dp'", "'strategy'"]),
        ({"dp": "client", "strategy": "fedmedian"}, ["'dp'", "'strategy'"]),
        ({"dp": "client", "strategy": "fedtrimmedavg"}, ["'dp'", "'strategy'"]),
        ({"dp": "client", "dp-noise-multiplier": 0.0}, ["'dp-noise-multiplier'"]),
        ({"dp": "client", "dp-target-epsilon": 3.0}, ["'dp-target-epsilon'"]),
        ({"dp": "client", "dp-accountant": "prv"}, ["'dp-accountant'"]),
        ({"dp": "sample", "adapter": "full"}, ["'dp'", "'adapter'"]),
        ({"dp": "sample", "dp-noise-multiplier": 0.0}, ["'dp-noise-multiplier'"]),
        ({"dp": "sample", "dp-target-epsilon": 5.0, "dp-epsilon-budget": 3.0},
         ["'dp-target-epsilon'", "'dp-epsilon-budget'"]),
        ({"dp-delta": 1.0}, ["'dp-delta'"]),
        ({"dp-delta": 0.0}, ["'dp-delta'"]),
        ({"dp-accountant": "gdp"}, ["'dp-accountant'"]),
        ({"dp-clipping": "both"}, ["'dp-clipping'"]),
        ({"dp-max-grad-norm": 0.0}, ["'dp-max-grad-norm'"]),
        ({"dp-clip-norm": -1.0}, ["'dp-clip-norm'"]),
        ({"dp-epsilon-budget": float("inf")}, ["'dp-epsilon-budget'"]),
    ],
)
def test_dp_config_refusals_name_the_keys(override, keys):
    with pytest.raises(ConfigError) as err:
        FederationConfig.from_run_config(override)
    for key in keys:
        assert key in str(err.value)


def test_dp_config_accepts_what_can_be_accounted():
    cfg = FederationConfig.from_run_config({"dp": "client", "strategy": "fedprox", "fraction-train": 0.5,
                                            "personal": "adapters.vision", "dp-epsilon-budget": 10.0})
    assert cfg.dp == "client"
    cfg = FederationConfig.from_run_config({"dp": "sample", "strategy": "fedadam", "dp-target-epsilon": 3.0,
                                            "dp-epsilon-budget": 3.0, "dp-accountant": "prv"})
    dp = DPSettings.from_config(cfg)
    assert (dp.mode, dp.target_epsilon, dp.accountant, dp.planned_rounds) == ("sample", 3.0, "prv", cfg.rounds)


def test_a_round_s_budget_check_uses_this_round_s_sampling_rate():
    """A site whose data shrank (q = batch / N grew) must be charged at the new q, not its last round's."""
    from common.privacy import can_train_round

    state = SiteAccountantState("rdp", 1e-5, noise_multiplier=1.0)
    state.reserve(0.01, 100, server_round=1)
    assert compute_epsilon(state.history + [(1.0, 0.5, 100)], 1e-5, "rdp") > 2 * compute_epsilon(
        state.history + [(1.0, 0.01, 100)], 1e-5, "rdp")
    budget = compute_epsilon(state.history + [(1.0, 0.01, 100)], 1e-5, "rdp") * 1.01
    assert can_train_round(state, 100, budget)[0]  # the old q: fits
    allowed, reason = can_train_round(state, 100, budget, sample_rate=0.5)  # the new q: does not
    assert not allowed and "budget" in reason
