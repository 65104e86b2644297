"""What crosses the network: names, dtypes and sizes of the adapter payload."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from common.adapters import AdapterSpec
from common.model import build_model
from common.payload import (
    WIRE_HEADER_BYTES_MAX,
    PayloadError,
    check_personal_prefixes,
    expected_payload_bytes,
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


def test_fp16_overflow_is_refused_with_the_tensor_name():
    with pytest.raises(PayloadError, match="'big'.*fp16"):
        to_wire({"big": torch.tensor([1e6])}, "fp16")
    assert to_wire({"big": torch.tensor([1e6])}, "fp32")["big"][0] == 1e6


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
