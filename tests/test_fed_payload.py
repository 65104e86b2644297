"""What crosses the network: names, dtypes and sizes of the adapter payload."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from common.adapters import AdapterSpec
from common.model import build_model
from common.payload import (
    SCALE_SUFFIX,
    WIRE_HEADER_BYTES_MAX,
    PayloadError,
    check_personal_prefixes,
    decode_update,
    downlink_dtype,
    encode_update,
    expected_payload_bytes,
    expected_update_bytes,
    from_wire,
    payload_bytes,
    split_personal,
    to_wire,
)


@pytest.fixture(scope="module", params=["shallow-vlc", "dense-vl"])
def model(request, tiny_base):
    return build_model(tiny_base, AdapterSpec(variant=request.param, init="paper"))


@pytest.mark.parametrize("dtype,itemsize", [("fp32", 4), ("fp16", 2)])
def test_payload_holds_exactly_the_adapter_names_and_params_times_dtype_bytes(model, dtype, itemsize):
    wire = to_wire(model.adapter_state(), dtype)
    assert set(wire) == set(model.adapter_names())
    trainable = model.parameter_counts()["trainable"]
    assert payload_bytes(wire) == trainable * itemsize == expected_payload_bytes(trainable, dtype)
    assert {a.dtype for a in wire.values()} == {np.dtype(np.float16 if dtype == "fp16" else np.float32)}
    # What Flower actually ships: npy bytes = tensor bytes + a small header per tensor.
    record = ArrayRecord({k: Array(v) for k, v in wire.items()})
    assert set(record.keys()) == set(model.adapter_names())
    shipped = sum(len(a.data) for a in record.values())
    assert trainable * itemsize < shipped <= trainable * itemsize + WIRE_HEADER_BYTES_MAX * len(wire)


def test_fp16_wire_decodes_to_fp32_close_to_the_original(model):
    state = model.adapter_state()
    back = from_wire(to_wire(state, "fp16"))
    for name, t in state.items():
        assert back[name].dtype == np.float32
        np.testing.assert_allclose(back[name], t.numpy(), rtol=1e-3, atol=1e-4)
    exact = from_wire(to_wire(state, "fp32"))
    for name, t in state.items():
        np.testing.assert_array_equal(exact[name], t.numpy())


def test_fp16_conversions_give_numpys_bytes_subnormals_and_edges_included():
    # The wire casts through torch for speed (common.payload.cast); the bytes must be numpy's.
    rng = np.random.default_rng(0)
    scales = (1e-8, 1e-6, 1e-4, 1.0, 1e3)
    x = np.concatenate([rng.standard_normal(5000).astype(np.float32) * s for s in scales]
                       + [np.array([65504, 65519, -0.0, 6e-8, 3e-8, 2.9e-8, 0.0], np.float32)])
    assert to_wire({"t": x}, "fp16")["t"].tobytes() == x.astype(np.float16).tobytes()
    half = x.astype(np.float16)
    assert from_wire({"t": half})["t"].tobytes() == half.astype(np.float32).tobytes()
    assert decode_update({"t": half})["t"].tobytes() == half.astype(np.float32).tobytes()
    frozen = half.copy()
    frozen.flags.writeable = False  # e.g. an np.frombuffer view of a packed payload
    assert from_wire({"t": frozen})["t"].tobytes() == half.astype(np.float32).tobytes()


def test_fp16_overflow_is_refused_with_the_tensor_name():
    with pytest.raises(PayloadError, match="'big'.*fp16"):
        to_wire({"big": torch.tensor([1e6])}, "fp16")
    assert to_wire({"big": torch.tensor([1e6])}, "fp32")["big"][0] == 1e6


def test_a_whole_adapter_converts_like_each_tensor_alone():
    # to_wire/from_wire/decode_update convert an adapter's tensors as one buffer (per-call overhead):
    # each tensor must come out with the bytes, shape and order it has when converted alone.
    rng = np.random.default_rng(1)
    shapes = {"b.weight": (3, 5), "a.bias": (7,), "c.scalar": (), "d.empty": (0, 4), "e.big": (64, 33)}
    state = {k: np.asarray(rng.standard_normal(s) * 10.0 ** rng.integers(-8, 3), dtype=np.float32)
             for k, s in shapes.items()}
    for dtype, np_dtype in (("fp16", np.float16), ("fp32", np.float32)):
        wire = to_wire(state, dtype)
        assert list(wire) == sorted(state)
        for k, v in state.items():
            assert wire[k].shape == v.shape and wire[k].dtype == np_dtype and wire[k].flags.c_contiguous
            assert wire[k].tobytes() == v.astype(np_dtype).tobytes()
        for decoded in (from_wire(wire), decode_update(wire)):
            assert list(decoded) == list(wire)
            for k in wire:
                assert decoded[k].dtype == np.float32 and decoded[k].tobytes() == wire[k].astype(np.float32).tobytes()
    torch_state = {k: torch.from_numpy(v) for k, v in state.items()}
    assert {k: v.tobytes() for k, v in to_wire(torch_state, "fp16").items()} == \
        {k: v.astype(np.float16).tobytes() for k, v in state.items()}
    # Writing into one converted tensor leaves the others alone (views of one buffer do not overlap).
    wire = to_wire(state, "fp16")
    wire["a.bias"][:] = 0
    assert wire["b.weight"].tobytes() == state["b.weight"].astype(np.float16).tobytes()
    # A bad tensor among good ones is still named.
    with pytest.raises(PayloadError, match="'c.scalar'.*overflows fp16"):
        to_wire({**state, "c.scalar": np.array(1e6, np.float32)}, "fp16")
    with pytest.raises(PayloadError, match="'a.bias'.*NaN"):
        to_wire({**state, "a.bias": np.array([0.0, np.nan], np.float32)}, "fp16")
    # Mixed fp16/fp32/int8 updates decode each tensor as before.
    mixed = {"h": state["b.weight"].astype(np.float16), "f": state["e.big"], "q": np.array([3, -2], np.int8),
             "q" + SCALE_SUFFIX: np.array([0.5], np.float32)}
    decoded = decode_update(mixed)
    assert list(decoded) == ["h", "f", "q"]
    assert decoded["h"].tobytes() == mixed["h"].astype(np.float32).tobytes()
    assert decoded["f"].tobytes() == mixed["f"].tobytes() and decoded["q"].tolist() == [1.5, -1.0]


def test_the_fp16_finiteness_check_agrees_with_numpy_on_every_fp16_value():
    from common.payload import _all_finite

    every = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = every[np.isfinite(every)]
    assert finite.size == 2 ** 16 - 2048 and _all_finite(finite)  # all 63,488 finite values (subnormals, -0)
    assert not any(_all_finite(np.concatenate([finite[:3], [v]])) for v in every[~np.isfinite(every)])
    assert _all_finite(finite[::-2])  # a strided view


def test_unknown_wire_dtype_and_integer_tensors_are_refused():
    with pytest.raises(PayloadError, match="payload dtype"):
        to_wire({"x": torch.zeros(2)}, "bf16")
    with pytest.raises(PayloadError, match="'x'"):
        from_wire({"x": np.zeros(2, dtype=np.int64)})


def test_split_personal_keeps_prefixed_tensors_out_of_the_shared_part(model):
    state = model.adapter_state()
    shared, personal = split_personal(state, ["adapters.vision"])
    assert personal and shared
    assert all(k.startswith("adapters.vision") for k in personal)
    assert not any(k.startswith("adapters.vision") for k in shared)
    assert set(shared) | set(personal) == set(state)
    assert split_personal(state, []) == (state, {})


def test_personal_prefix_typos_are_caught(model):
    names = model.adapter_names()
    check_personal_prefixes(names, ["adapters.vision"])
    with pytest.raises(PayloadError, match="matches no adapter tensor"):
        check_personal_prefixes(names, ["adapter.vision"])
    with pytest.raises(PayloadError, match="nothing would be federated"):
        check_personal_prefixes(names, ["adapters"])


# ---------------------------------------------------------------- updates, int8
def test_int8_update_is_within_one_step_unbiased_and_seeded():
    rng = np.random.default_rng(0)
    update = {"a.weight": rng.normal(0, 0.01, (64, 32)).astype(np.float32),
              "b.bias": rng.normal(0, 1.0, (32,)).astype(np.float32),
              "c.zero": np.zeros((4,), np.float32)}
    wire = encode_update(update, "int8", seed=3)
    assert {k: v.dtype for k, v in wire.items() if not k.endswith(SCALE_SUFFIX)} == {
        "a.weight": np.int8, "b.bias": np.int8, "c.zero": np.int8}
    assert payload_bytes(wire) == expected_update_bytes(64 * 32 + 32 + 4, 3, "int8")
    back = decode_update(wire)
    for k, x in update.items():
        step = float(wire[k + SCALE_SUFFIX][0])
        assert np.abs(back[k] - x).max() <= step * (1 + 1e-6), k
    assert np.array_equal(back["c.zero"], update["c.zero"])
    # Symmetric: the largest |x| maps to +-127 exactly.
    assert np.abs(wire["a.weight"]).max() == 127
    # Seeded: the same seed rounds the same way, another seed differently.
    assert all(np.array_equal(wire[k], encode_update(update, "int8", seed=3)[k]) for k in wire)
    assert not np.array_equal(wire["a.weight"], encode_update(update, "int8", seed=4)["a.weight"])
    # Stochastic rounding is unbiased: 0.3049 is 30.49 quantisation steps, so
    # nearest rounding would be off by 0.49 steps on every element; the mean
    # over elements and draws of stochastic rounding is off by a few percent of a step.
    step = 1.27 / 127
    x = {"t": np.full((1000,), 30.49 * step, np.float32), "peak": np.array([1.27], np.float32)}
    draws = np.mean([decode_update(encode_update(x, "int8", seed=s))["t"] for s in range(20)])
    assert abs(float(draws) - 30.49 * step) < 0.05 * step


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_every_update_encoding_keeps_each_tensor_shape_a_0d_one_included(dtype):
    # The `full` variant trains CLIP's logit_scale, a 0-d tensor; int8 sent it as shape (1,),
    # which the server refused ("wrong shape"), so a full + int8 federation never aggregated.
    update = {"clipseg.clip.logit_scale": np.array(0.25, np.float32), "w": np.ones((2, 3), np.float32)}
    wire = encode_update(update, dtype, seed=0)
    back = decode_update(wire)
    for name, x in update.items():
        assert wire[name].shape == x.shape and back[name].shape == x.shape, (name, wire[name].shape)
        assert isinstance(back[name], np.ndarray) and back[name].dtype == np.float32
    np.testing.assert_allclose(back["clipseg.clip.logit_scale"], 0.25, rtol=1e-2)


def test_fp_updates_round_trip_like_weights():
    update = {"w": np.linspace(-1, 1, 10, dtype=np.float32)}
    np.testing.assert_array_equal(decode_update(encode_update(update, "fp32"))["w"], update["w"])
    np.testing.assert_allclose(decode_update(encode_update(update, "fp16"))["w"], update["w"], atol=1e-3)


@pytest.mark.parametrize("arrays,reason", [
    ({"w": np.zeros(3, np.int8)}, "without a valid float32 scale"),
    ({"w": np.zeros(3, np.int8), "w@scale": np.array([0.0], np.float32)}, "without a valid float32 scale"),
    ({"w": np.zeros(3, np.int8), "w@scale": np.array([np.nan], np.float32)}, "without a valid float32 scale"),
    ({"w@scale": np.array([1.0], np.float32)}, "without its tensor"),
    ({"w": np.zeros(3, np.float16), "w@scale": np.array([1.0], np.float32)}, "has an int8 scale"),
    ({"w": np.zeros(3, np.int32)}, "expected float16, float32 or int8"),
])
def test_malformed_updates_are_refused_with_a_short_reason(arrays, reason):
    with pytest.raises(PayloadError, match=reason):
        decode_update(arrays)


def test_downlink_never_sends_weights_in_int8():
    assert [downlink_dtype(d) for d in ("fp32", "fp16", "int8")] == ["fp32", "fp16", "fp16"]
