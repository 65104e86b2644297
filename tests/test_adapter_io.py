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


@pytest.mark.parametrize("edit", ["decoder", "vision layer"])
def test_refuses_a_base_that_differs_outside_the_old_sampled_slices(tiny_base, tmp_path, edit):
    # The fingerprint hashed a few slices of five tensors: a base differing anywhere else (its decoder,
    # a deeper vision layer: a fine-tuned checkpoint) had the same one and took the adapter silently.
    save_adapter(_trained(tiny_base, "dense-vl"), tmp_path / "a")
    other_base = load_base("arch:tiny")
    with torch.no_grad():
        if edit == "decoder":
            other_base.model.decoder.layers[0].mlp.fc1.weight.add_(0.5)
        else:
            other_base.model.clip.vision_model.encoder.layers[1].mlp.fc1.weight.add_(0.3)
    with pytest.raises(AdapterStateError, match="trained on base 'arch:tiny'.*fingerprint"):
        load_adapter(build_model(other_base, "dense-vl"), tmp_path / "a")


def test_an_adapter_saved_with_the_old_fingerprint_still_loads_on_its_base(tiny_base, tmp_path):
    from common.bases import legacy_fingerprint

    model = _trained(tiny_base, "dense-vl")
    save_adapter(model, tmp_path / "a")
    config_path = tmp_path / "a" / CONFIG_NAME
    cfg = json.loads(config_path.read_text())
    assert len(cfg["base_fingerprint"]) == 32  # every weight of the base
    cfg["base_fingerprint"] = legacy_fingerprint(tiny_base.model)  # as adapters were saved before
    config_path.write_text(json.dumps(cfg))
    load_adapter(build_model(tiny_base, "dense-vl"), tmp_path / "a")
    other_base = load_base("arch:tiny")
    with torch.no_grad():
        other_base.model.clip.text_projection.weight.add_(0.1)  # inside the old slices: refused as before
    with pytest.raises(AdapterStateError, match="fingerprint"):
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


# ---- damaged files: one line naming the file, never a raw traceback or a silent all-black model ----

from common.adapter_io import AdapterFileError, save_adapter_state  # noqa: E402


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_damaged_weights_file_is_one_line_naming_it(tiny_base, tmp_path, damage):
    save_adapter(_trained(tiny_base), tmp_path / "a")
    weights = tmp_path / "a" / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00" * 64}[damage])
    with pytest.raises(AdapterFileError) as err:
        load_adapter(_trained(tiny_base), tmp_path / "a")
    message = str(err.value)
    assert str(weights) in message and "\n" not in message
    assert ("empty file" if damage == "empty" else "not a readable safetensors file") in message
    assert isinstance(err.value, ValueError) and isinstance(err.value, AdapterStateError)


def test_damaged_config_is_one_line_naming_it(tiny_base, tmp_path):
    save_adapter(_trained(tiny_base), tmp_path / "a")
    (tmp_path / "a" / CONFIG_NAME).write_text('{"format_version": 1, "ba')
    with pytest.raises(AdapterFileError, match=str(tmp_path / "a" / CONFIG_NAME)):
        load_adapter(_trained(tiny_base), tmp_path / "a")


def test_nan_or_inf_adapter_is_refused_at_load(tiny_base, tmp_path):
    save_adapter(_trained(tiny_base), tmp_path / "a")
    weights = tmp_path / "a" / WEIGHTS_NAME
    state = load_file(str(weights))
    name = sorted(state)[0]
    state[name] = state[name].clone()
    state[name].view(-1)[:2] = torch.tensor([float("nan"), float("inf")])
    save_file(state, str(weights))
    with pytest.raises(AdapterFileError, match=f"non-finite values: {name} \\(1 NaN, 1 Inf"):
        load_adapter(_trained(tiny_base), tmp_path / "a")


def test_nan_adapter_is_never_written(tiny_base, tmp_path):
    good = _trained(tiny_base, seed=1)
    save_adapter(good, tmp_path / "a")
    before = (tmp_path / "a" / WEIGHTS_NAME).read_bytes()
    broken = _trained(tiny_base, seed=2)
    with torch.no_grad():
        next(iter(broken.trainable_parameters()))[...] = float("nan")
    with pytest.raises(AdapterFileError, match="refusing to save"):
        save_adapter(broken, tmp_path / "a")
    assert (tmp_path / "a" / WEIGHTS_NAME).read_bytes() == before  # the previous adapter is kept
    with pytest.raises(AdapterFileError, match="refusing to save"):
        save_adapter(broken, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    # the server's checkpoints go through save_adapter_state: same guard
    state = {"x": torch.tensor([1.0, float("inf")])}
    with pytest.raises(AdapterFileError, match="x \\(0 NaN, 1 Inf of 2\\)"):
        save_adapter_state(state, {}, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_cli_eval_and_predict_on_a_damaged_adapter_exit_with_one_line(tiny_base, tmp_path, synth_sites):
    import os
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("fedvlsm") is None:
        pytest.skip("the fedvlsm console script is not installed")
    save_adapter(build_model(tiny_base, "shallow-v"), tmp_path / "a")
    weights = tmp_path / "a" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])
    image = sorted((synth_sites[0] / "images").iterdir())[0]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for argv in (["eval", str(synth_sites[0]), "--adapter-dir", str(tmp_path / "a")],
                 ["predict", "--adapter-dir", str(tmp_path / "a"), "--image", str(image), "--prompt", "lesion",
                  "--out", str(tmp_path / "p")]):
        proc = subprocess.run(["fedvlsm", *argv], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 2, proc.stderr
        lines = [li for li in proc.stderr.splitlines() if li.strip()]
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[0].startswith(f"fedvlsm {argv[0]}: error: {weights}") and "truncated" in lines[0]


@pytest.mark.parametrize("edit,field", [
    # a missing init read as "paper" changed an identity-init adapter's forward, with no error
    (lambda c: c["adapter"].pop("init"), "'adapter': adapter spec lacks init"),
    (lambda c: c["adapter"].pop("variant"), "'adapter': adapter spec lacks variant"),
    (lambda c: c["adapter"].update(scale=2.0), "'adapter': adapter spec has unknown scale"),
    (lambda c: c["adapter"].update(dense_dim="64"), "'adapter': adapter spec field dense_dim has the wrong type"),
    # these raised TypeError/AttributeError: a traceback from the CLI
    (lambda c: c.update(format_version="1"), "'format_version' must be a whole number"),
    (lambda c: c.update(adapter=["dense-vl"]), "'adapter' must be a JSON object"),
    (lambda c: c.update(tensors=[]), "'tensors' must be a JSON object"),
    (lambda c: c.update(base=None), "'base' must be a non-empty string"),
    (lambda c: c["tensors"].update({"adapters.cond.up.bias": "64"}), "'tensors.adapters.cond.up.bias' must be"),
])
def test_a_config_with_a_missing_unknown_or_wrong_typed_field_is_refused_naming_it(tiny_base, tmp_path, edit, field):
    from common.api import load_adapted

    save_adapter(_trained(tiny_base, "dense-vlc"), tmp_path / "a")
    path = tmp_path / "a" / CONFIG_NAME
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError) as err:
        load_adapted(tmp_path / "a", tiny_base)
    assert str(err.value).startswith(f"{path}: {field}"), err.value


def test_an_adapter_dir_that_is_a_file_is_named_as_such(tmp_path):
    from common.api import load_adapted

    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(AdapterFileError, match=f"{tmp_path / 'a.png'}: is a file; give the adapter folder"):
        load_adapted(tmp_path / "a.png", "arch:tiny")


def test_a_personalised_runs_shared_only_adapter_says_where_its_personal_tensors_are(tiny_base, tmp_path):
    # README's load_adapted("runs/<run>/final/adapter") on a personalised run failed with
    # "missing 4 tensor(s)" and no word of why (final/ holds the shared tensors only).
    from common.adapter_io import adapter_config
    from common.api import load_adapted
    from common.payload import split_personal

    model = _trained(tiny_base, "shallow-vlc")
    shared, _ = split_personal(model.adapter_state(), ["adapters.cond"])
    save_adapter_state(shared, adapter_config(model, shared, extra={"personal": ["adapters.cond"], "shared_only": True}),
                       tmp_path / "final")
    with pytest.raises(AdapterStateError, match=r"missing 4 tensor.*shared tensors only: its personal ones "
                                                r"\(prefixes \['adapters.cond'\]\) are at each site"):
        load_adapted(tmp_path / "final", tiny_base)


def test_an_adapter_of_a_newer_format_is_refused_naming_both_versions(tiny_base, tmp_path):
    save_adapter(_trained(tiny_base), tmp_path / "a")
    path = tmp_path / "a" / CONFIG_NAME
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "format_version": 2}))
    with pytest.raises(AdapterStateError, match=r"format_version 2 is newer than this fedvlsm supports \(1\)"):
        load_adapter(_trained(tiny_base), tmp_path / "a")


def test_a_negative_shape_in_the_config_is_refused(tiny_base, tmp_path):
    save_adapter(_trained(tiny_base), tmp_path / "a")
    path = tmp_path / "a" / CONFIG_NAME
    cfg = json.loads(path.read_text())
    name = sorted(cfg["tensors"])[0]
    cfg["tensors"][name]["shape"] = [-1] + cfg["tensors"][name]["shape"][1:]
    path.write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match=f"'tensors.{name}' must be"):
        load_adapter(_trained(tiny_base), tmp_path / "a")


def test_the_non_finite_summary_names_three_tensors_and_counts_the_rest():
    from common.adapter_io import nonfinite_summary

    state = {f"t{i}": torch.tensor([1.0, float("nan")]) for i in range(5)} | {"ok": torch.ones(2)}
    assert nonfinite_summary(state) == ("t0 (1 NaN, 0 Inf of 2), t1 (1 NaN, 0 Inf of 2), t2 (1 NaN, 0 Inf of 2)"
                                        " and 2 more tensor(s)")
    assert nonfinite_summary({"ok": torch.ones(2), "i": torch.tensor([1, 2])}) is None
