"""Adapter files hold only adapter tensors, round-trip exactly, and refuse what does not belong."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.adapter_io import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from common.adapters import AdapterSpec
from common.bases import load_base
from common.model import AdapterStateError, build_model


def _trained(base, variant="dense-vl", seed=1):
    torch.manual_seed(seed)
    return build_model(base, variant)


def test_round_trip(tiny_base, tmp_path):
    model = _trained(tiny_base)
    save_adapter(model, tmp_path / "a")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == [CONFIG_NAME, WEIGHTS_NAME]
    stored = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    assert set(stored) == set(model.adapter_names())  # only adapter tensors, never the base
    cfg = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert cfg["base"] == "arch:tiny" and cfg["adapter"]["variant"] == "dense-vl"
    assert cfg["format_version"] == 1 and cfg["adapter"]["dense_dim"] == 64
    other = _trained(tiny_base, seed=2)
    assert any(not torch.equal(a, b) for a, b in zip(other.adapter_state().values(), model.adapter_state().values()))
    load_adapter(other, tmp_path / "a")
    for name, t in model.adapter_state().items():
        assert torch.equal(other.adapter_state()[name], t)


def test_refuses_other_variant(tiny_base, tmp_path):
    save_adapter(_trained(tiny_base, "dense-vl"), tmp_path / "a")
    with pytest.raises(AdapterStateError, match="variant: file 'dense-vl' vs model 'shallow-v'"):
        load_adapter(build_model(tiny_base, "shallow-v"), tmp_path / "a")


def test_refuses_other_base(tiny_base, tmp_path):
    save_adapter(_trained(tiny_base, "dense-vl"), tmp_path / "a")
    # same architecture and shapes, different weights: only the fingerprint tells them apart
    other_base = load_base("arch:tiny")
    with torch.no_grad():
        other_base.model.clip.text_projection.weight.add_(0.1)
    with pytest.raises(AdapterStateError, match="trained on base 'arch:tiny'.*fingerprint"):
        load_adapter(build_model(other_base, "dense-vl"), tmp_path / "a")


def test_refuses_wrong_shapes_and_dtypes(tiny_base, tmp_path):
    model = _trained(tiny_base)
    save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / WEIGHTS_NAME
    state = load_file(str(weights))
    name = sorted(state)[0]
    bad = dict(state)
    bad[name] = state[name].to(torch.float16)
    save_file(bad, str(weights))
    with pytest.raises(AdapterStateError, match="dtype torch.float16"):
        load_adapter(build_model(tiny_base, "dense-vl"), tmp_path / "a")
    bad = dict(state)
    bad[name] = torch.zeros(3, 3)
    save_file(bad, str(weights))
    with pytest.raises(AdapterStateError, match="disagree|shape"):
        load_adapter(build_model(tiny_base, "dense-vl"), tmp_path / "a")
    bad = dict(state)
    del bad[name]
    save_file(bad, str(weights))
    with pytest.raises(AdapterStateError, match="missing 1 tensor"):
        load_adapter(build_model(tiny_base, "dense-vl"), tmp_path / "a")


def test_refuses_different_dims(tiny_base, tmp_path):
    save_adapter(build_model(tiny_base, AdapterSpec("dense-vl", dense_dim=16)), tmp_path / "a")
    with pytest.raises(AdapterStateError, match="dense_dim: file 16 vs model 64"):
        load_adapter(build_model(tiny_base, "dense-vl"), tmp_path / "a")


def test_overwrite_is_atomic_swap(tiny_base, tmp_path):
    save_adapter(_trained(tiny_base, seed=1), tmp_path / "a")
    second = _trained(tiny_base, seed=2)
    save_adapter(second, tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary folders left behind
    fresh = build_model(tiny_base, "dense-vl")
    load_adapter(fresh, tmp_path / "a")
    assert all(torch.equal(fresh.adapter_state()[n], t) for n, t in second.adapter_state().items())


@pytest.mark.parametrize("variant", ["lora", "decoder", "shallow-vlc"])
def test_round_trip_baselines(tiny_base, tmp_path, variant):
    model = _trained(tiny_base, variant)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.01)
    save_adapter(model, tmp_path / variant)
    fresh = build_model(tiny_base, variant)
    load_adapter(fresh, tmp_path / variant)
    assert all(torch.equal(fresh.adapter_state()[n], t) for n, t in model.adapter_state().items())
