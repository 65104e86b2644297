"""Local training: seeded, early-stopped, FedProx pulls toward the global weights, best is restored."""

import math

import pytest
import torch

from common.config import TrainConfig
from common.data import SegDataset, load_items
from common.model import build_model
from common.train import fit


@pytest.fixture(scope="module")
def site_data(synth_sites, tiny_base):
    site = synth_sites[0]
    train = SegDataset(load_items(site, "train"), tiny_base.image_size, train=True, seed=0)
    val = SegDataset(load_items(site, "val"), tiny_base.image_size, train=False, prompt_index=9)
    return train, val


def _fit(base, data, **kw):
    torch.manual_seed(0)
    model = build_model(base, "dense-vl")
    cfg = TrainConfig(**{"epochs": 2, "batch_size": 4, "progress": False, **kw})
    result = fit(model, data[0], data[1], base.tokenizer, cfg)
    return model, result


def test_seeded_training_is_reproducible(tiny_base, site_data):
    a, ra = _fit(tiny_base, site_data)
    b, rb = _fit(tiny_base, site_data)
    assert ra.history == rb.history
    for name, t in a.adapter_state().items():
        assert torch.equal(t, b.adapter_state()[name])


def test_early_stopping_and_best_restored(tiny_base, site_data, tmp_path):

    model, result = _fit(tiny_base, site_data, epochs=6, early_stop_patience=1, lr=0.5)
    assert result.epochs_run < 6  # a huge lr makes val Dice stop improving; patience 1 stops early
    dices = [h["val_dice"] for h in result.history]
    assert result.best_val_dice == max(dices)
    assert result.best_epoch == dices.index(max(dices)) + 1


def test_fedprox_term_pulls_toward_reference(tiny_base, site_data):
    torch.manual_seed(0)
    start = build_model(tiny_base, "dense-vl").adapter_state()

    def distance(mu):
        model = build_model(tiny_base, "dense-vl")
        model.load_adapter_state(start)
        cfg = TrainConfig(epochs=2, batch_size=4, progress=False, prox_mu=mu, select_best=False)
        fit(model, site_data[0], None, tiny_base.tokenizer, cfg, prox_reference=start)
        return math.sqrt(sum((model.adapter_state()[n] - t).pow(2).sum().item() for n, t in start.items()))

    free, proximal = distance(0.0), distance(10.0)
    assert proximal < free


def test_none_variant_trains_nothing(tiny_base, site_data):
    model = build_model(tiny_base, "none")
    result = fit(model, site_data[0], site_data[1], tiny_base.tokenizer, TrainConfig(epochs=3, progress=False))
    assert result.steps == 0 and result.best_val_dice is not None


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="TrainConfig.epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="int8")


@pytest.mark.parametrize("name", ["lr", "grad_clip", "weight_decay", "prox_mu", "lambda_dice"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_setting_is_refused(name, value):
    # `nan < 0` is False: grad_clip NaN trained a NaN adapter, prox_mu NaN silently turned FedProx off
    with pytest.raises(ValueError, match=f"TrainConfig.{name} must be a finite number"):
        TrainConfig(**{name: value})


@pytest.mark.parametrize("patience", [0, -1])
def test_an_early_stop_patience_below_one_is_refused(patience):
    # It stopped every training after its first epoch, however much val Dice improved (`--patience 0`).
    with pytest.raises(ValueError, match="TrainConfig.early_stop_patience must be >= 1"):
        TrainConfig(early_stop_patience=patience)
    with pytest.raises(ValueError, match="TrainConfig.plateau_patience must be >= 0"):
        TrainConfig(plateau_patience=-1)


def test_seed_everything_seeds_like_torch_manual_seed():
    # On a CPU-only machine it seeds the CPU generator directly (torch.manual_seed formats the
    # caller's stack for each accelerator kind it seeds lazily): the generator state must be the same.
    import random

    import numpy as np

    from common.train import seed_everything

    for seed in (0, 7, 2**31 - 1):
        torch.manual_seed(seed)
        expected = torch.get_rng_state()
        torch.manual_seed(seed + 1)
        seed_everything(seed)
        assert torch.equal(torch.get_rng_state(), expected)
        assert random.random() == random.Random(seed).random()
        assert np.random.random() == np.random.RandomState(seed).random_sample()


@pytest.mark.parametrize("fast", ["off", "on"])
def test_a_diverged_training_is_refused_not_kept_as_best(tiny_base, site_data, tmp_path, fast, monkeypatch):
    # A NaN adapter predicts no foreground, so its val Dice (0) beat the initial -1: it was kept as
    # "best" and returned without a word. The weights go NaN in the first step, as a far too high
    # learning rate makes them (lr 1e3 did; lr is now capped at 1, where NaN depends on the draw).
    from common.fast import restore_fp32
    from common.train import TrainingDiverged

    real_step = torch.optim.AdamW.step

    def diverging_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", diverging_step)
    torch.manual_seed(0)
    model = build_model(tiny_base, "dense-vl")
    cfg = TrainConfig(epochs=2, batch_size=4, progress=False, lr=1e-3, fast=fast)
    try:
        with pytest.raises(TrainingDiverged, match="diverged in epoch 1.*lower the learning rate"):
            fit(model, site_data[0], site_data[1], tiny_base.tokenizer, cfg)
    finally:
        restore_fp32(model)  # the session's shared base: as the plain path left it, for later tests


# ---- the epoch loop's decisions, with validation scripted (a fake `evaluate`): fast and exact ----

def _scripted_fit(tiny_base, synth_sites, monkeypatch, dices, losses=None, tmp_path=None, **kw):
    """fit on 2 training items, with epoch k's validation giving dices[k] (and losses[k]).

    Returns (result, adapter state after each epoch, final adapter state)."""
    from types import SimpleNamespace

    import common.train as train_mod

    scripted = iter(zip(dices, losses or [1.0] * len(dices)))

    def fake_evaluate(*args, **kwargs):
        dice, loss = next(scripted)
        return SimpleNamespace(dice=dice, loss=loss, iou=dice)

    monkeypatch.setattr(train_mod, "evaluate", fake_evaluate)
    train = SegDataset(load_items(synth_sites[0], "train")[:2], tiny_base.image_size, train=True, seed=0)
    torch.manual_seed(0)
    model = build_model(tiny_base, "shallow-v")
    snapshots = []
    cfg = TrainConfig(**{"epochs": len(dices), "batch_size": 2, "progress": False, "lr": 1e-2, **kw})
    result = fit(model, train, train, tiny_base.tokenizer, cfg, out_dir=tmp_path,
                 on_epoch=lambda record: snapshots.append(model.adapter_state()))
    return result, snapshots, model.adapter_state()


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_the_best_epochs_weights_are_restored_and_saved_not_the_last(tiny_base, synth_sites, monkeypatch, tmp_path):
    # Val Dice 0.2, 0.1, 0.5 (best), 0.3, 0.4: patience 2 stops after epoch 5 (a stale count reset by
    # epoch 3's improvement); the model ends with epoch 3's weights, the saved adapter holds them too.
    from common.adapter_io import load_adapter, read_adapter_config

    result, snaps, final = _scripted_fit(tiny_base, synth_sites, monkeypatch, [0.2, 0.1, 0.5, 0.3, 0.4, 0.9, 0.9],
                                         early_stop_patience=2, tmp_path=tmp_path / "best")
    assert result.epochs_run == 5 and len(snaps) == 5
    assert result.best_epoch == 3 and result.best_val_dice == 0.5
    assert not _same(snaps[2], snaps[4])  # the weights did move after the best epoch
    assert _same(final, snaps[2])
    assert read_adapter_config(tmp_path / "best")["extra"] == {"epoch": 3, "val_dice": 0.5}
    saved = build_model(tiny_base, "shallow-v")
    load_adapter(saved, tmp_path / "best")
    assert _same(saved.adapter_state(), snaps[2])


def test_select_best_off_keeps_the_last_weights(tiny_base, synth_sites, monkeypatch):
    result, snaps, final = _scripted_fit(tiny_base, synth_sites, monkeypatch, [0.5, 0.1], select_best=False)
    assert result.best_epoch == 1 and _same(final, snaps[1]) and not _same(final, snaps[0])


def test_the_lr_drops_when_the_validation_loss_plateaus_not_the_dice(tiny_base, synth_sites, monkeypatch):
    # ReduceLROnPlateau on val loss, patience 1: epochs 3 and 4 bring no lower loss, so epoch 5 runs at
    # lr * factor. Val Dice improves every epoch (stepping on Dice in 'min' mode would drop it earlier).
    result, _, _ = _scripted_fit(tiny_base, synth_sites, monkeypatch, [0.1, 0.2, 0.3, 0.4, 0.5],
                                 losses=[1.0, 0.8, 0.9, 0.9, 0.9], plateau_patience=1, plateau_factor=0.5,
                                 early_stop_patience=3)
    assert [h["lr"] for h in result.history] == pytest.approx([1e-2, 1e-2, 1e-2, 1e-2, 5e-3])


def _train_items(tiny_base, synth_sites, n=4):
    return SegDataset(load_items(synth_sites[0], "train")[:n], tiny_base.image_size, train=True, seed=0)


def test_gradients_are_clipped_to_grad_clip(tiny_base, synth_sites):
    # Clipped to a norm of 1e-12, AdamW's steps are ~lr * 1e-12 / eps(1e-8): the adapter barely moves
    # (no weight decay here); unclipped, each step moves it by about lr.
    torch.manual_seed(0)
    model = build_model(tiny_base, "shallow-v")
    start = model.adapter_state()
    cfg = TrainConfig(epochs=1, batch_size=2, lr=1e-2, weight_decay=0.0, grad_clip=1e-12, progress=False)
    fit(model, _train_items(tiny_base, synth_sites, 2), None, tiny_base.tokenizer, cfg)
    moved = max((t - start[k]).abs().max().item() for k, t in model.adapter_state().items())
    assert 0 < moved < 1e-5


def test_the_proximal_term_is_half_mu_times_the_squared_distance(tiny_base, synth_sites):
    # One batch per epoch: the epoch's train loss is the loss at the start weights, so FedProx adds
    # exactly (mu / 2) * ||w - w_global||^2 to the same task loss.
    torch.manual_seed(0)
    start = build_model(tiny_base, "shallow-v").adapter_state()
    reference = {k: v + 0.01 for k, v in start.items()}
    squared = sum((start[k] - reference[k]).pow(2).sum().item() for k in start)

    def first_loss(mu):
        model = build_model(tiny_base, "shallow-v")
        model.load_adapter_state(start)
        cfg = TrainConfig(epochs=1, batch_size=2, lr=1e-3, prox_mu=mu, progress=False)
        return fit(model, _train_items(tiny_base, synth_sites, 2), None, tiny_base.tokenizer, cfg,
                   prox_reference=reference).train_loss

    assert first_loss(2.0) - first_loss(0.0) == pytest.approx(0.5 * 2.0 * squared, rel=1e-3)


def test_each_epoch_draws_its_own_prompts(tiny_base, synth_sites, monkeypatch):
    epochs = []
    monkeypatch.setattr(SegDataset, "set_epoch", lambda self, epoch: epochs.append(epoch))
    cfg = TrainConfig(epochs=3, batch_size=2, lr=1e-3, progress=False)
    fit(build_model(tiny_base, "shallow-v"), _train_items(tiny_base, synth_sites, 2), None, tiny_base.tokenizer, cfg)
    assert epochs == [0, 1, 2]


def test_a_single_non_finite_value_in_any_adapter_tensor_is_divergence(tiny_base, synth_sites, monkeypatch):
    # One NaN in the last trainable tensor is enough: it spreads through the next forward.
    from common.train import TrainingDiverged

    class PoisonLast(torch.optim.AdamW):
        def step(self, closure=None):
            out = super().step(closure)
            with torch.no_grad():
                self.param_groups[0]["params"][-1].view(-1)[0] = float("inf")
            return out

    monkeypatch.setattr(torch.optim, "AdamW", PoisonLast)
    cfg = TrainConfig(epochs=1, batch_size=2, lr=1e-3, progress=False)
    with pytest.raises(TrainingDiverged, match="diverged in epoch 1"):
        fit(build_model(tiny_base, "shallow-v"), _train_items(tiny_base, synth_sites, 2), None, tiny_base.tokenizer, cfg)


def test_the_seed_sets_the_shuffle(tiny_base, synth_sites):
    # Sites and rounds train with their own seeds (client/handlers.py): a constant seed inside fit would
    # give every site and round the same batch order.
    def trained(seed):
        torch.manual_seed(0)
        model = build_model(tiny_base, "shallow-v")
        cfg = TrainConfig(epochs=1, batch_size=1, lr=1e-2, seed=seed, progress=False)
        fit(model, _train_items(tiny_base, synth_sites, 2), None, tiny_base.tokenizer, cfg)
        return model.adapter_state()

    assert not _same(trained(3), trained(4))  # the same seed gives the same: test_seeded_training_is_reproducible


def test_without_validation_the_last_weights_are_saved(tiny_base, synth_sites, tmp_path):
    from common.adapter_io import load_adapter, read_adapter_config

    torch.manual_seed(0)
    model = build_model(tiny_base, "shallow-v")
    cfg = TrainConfig(epochs=2, batch_size=2, lr=1e-2, progress=False)
    fit(model, _train_items(tiny_base, synth_sites, 2), None, tiny_base.tokenizer, cfg, out_dir=tmp_path / "a")
    assert read_adapter_config(tmp_path / "a")["extra"] == {"epoch": 2}
    saved = build_model(tiny_base, "shallow-v")
    load_adapter(saved, tmp_path / "a")
    assert _same(saved.adapter_state(), model.adapter_state())
