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
def test_a_diverged_training_is_refused_not_kept_as_best(tiny_base, site_data, tmp_path, fast):
    # lr 1e3 makes the weights NaN in the first epoch. A NaN adapter predicts no foreground, so its
    # val Dice (0) beat the initial -1: it was kept as "best" and returned without a word.
    from common.fast import restore_fp32
    from common.train import TrainingDiverged

    torch.manual_seed(0)
    model = build_model(tiny_base, "dense-vl")
    cfg = TrainConfig(epochs=2, batch_size=4, progress=False, lr=1e3, fast=fast)
    try:
        with pytest.raises(TrainingDiverged, match="diverged in epoch 1.*lower the learning rate"):
            fit(model, site_data[0], site_data[1], tiny_base.tokenizer, cfg)
    finally:
        restore_fp32(model)  # the session's shared base: as the plain path left it, for later tests
