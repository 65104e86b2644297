"""The fast path's MLPs (common/fast_mlp.py): QuickGELU as SiLU with its constant folded into weights.

Checked against the stock CLIPSegMLP: values and input gradients in fp32 to
1e-5 of the largest, in bf16 to bf16 tolerance; the stock module's weights
are untouched (copies are scaled); a rebinding is noticed; weights that train
and other activations keep the stock forward; the class swap goes back; the
step dispatches fewer kernel-running operators.
"""

import copy

import pytest
import torch

from common import fast, fast_mlp
from common.bases import Base
from common.class_swap import swap_in
from common.model import build_model


@pytest.fixture()
def own_base(tiny_base):
    return Base(copy.deepcopy(tiny_base.model), tiny_base.tokenizer, tiny_base.base_id, tiny_base.image_size)


def _run(mlp, x, g):
    x = x.clone().requires_grad_(True)
    y = mlp(x)
    y.backward(g)
    return y.detach(), x.grad


def test_folded_mlp_equals_the_stock_one(own_base):
    torch.manual_seed(0)
    mlp = own_base.model.clip.vision_model.encoder.layers[0].mlp
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    x = torch.randn(2, 7, mlp.fc1.in_features) * 2
    g = torch.randn(2, 7, mlp.fc2.out_features)
    stock = _run(mlp, x, g)
    assert fast_mlp.use_folded_mlp(mlp, True) == 1 and isinstance(mlp, fast_mlp._FoldedForward)
    ours = _run(mlp, x, g)
    for a, b in zip(ours, stock):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert all(torch.equal(mlp.state_dict()[k], v) for k, v in before.items())  # copies were scaled
    assert fast_mlp.use_folded_mlp(mlp, False) == 1 and type(mlp).__name__ == "CLIPSegMLP"


def test_folded_mlp_in_bf16(own_base):
    torch.manual_seed(0)
    mlp = own_base.model.clip.text_model.encoder.layers[0].mlp
    x = torch.randn(2, 7, mlp.fc1.in_features)
    ref = mlp(x).detach()
    mlp.to(torch.bfloat16)
    fast_mlp.use_folded_mlp(mlp, True)
    w1, _, w2 = fast_mlp.folded(mlp)
    assert w1.dtype == w2.dtype == torch.bfloat16
    out = mlp(x.to(torch.bfloat16)).float()
    assert (out - ref).abs().max() / ref.abs().max() < 5e-2


def test_a_rebinding_makes_the_copies_again(own_base):
    torch.manual_seed(0)
    mlp = own_base.model.clip.vision_model.encoder.layers[1].mlp
    fast_mlp.use_folded_mlp(mlp, True)
    first = fast_mlp.folded(mlp)
    assert fast_mlp.folded(mlp)[0] is first[0]  # remembered
    mlp.double()
    again = fast_mlp.folded(mlp)
    assert again[0].dtype == torch.float64 and again[0] is not first[0]
    x = torch.randn(3, mlp.fc1.in_features, dtype=torch.float64)
    expected = mlp.fc2(mlp.activation_fn(mlp.fc1(x)))
    assert torch.allclose(mlp(x), expected, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # a new value written in place into a weight: its pointer is the same...
        mlp.fc1.weight.mul_(2)
    # ...so the copy is not remade: weights are frozen, and in-place writes are not how a base changes.
    assert fast_mlp.folded(mlp)[0] is again[0]


def test_what_is_not_folded(own_base):
    decoder_mlp = own_base.model.decoder.layers[0].mlp  # ReLU: already one kernel
    assert not fast_mlp.eligible(decoder_mlp)
    mlp = own_base.model.clip.vision_model.encoder.layers[2].mlp
    assert fast_mlp.eligible(mlp)
    swap_in(mlp, fast_mlp._FoldedForward)
    mlp.fc2.weight.requires_grad_(True)
    assert not fast_mlp.eligible(mlp) and fast_mlp.folded(mlp) is None
    mlp(torch.randn(2, mlp.fc1.in_features)).sum().backward()  # the stock forward: fc2's weight trains
    assert mlp.fc2.weight.grad is not None and mlp.fc2.weight.grad.abs().sum() > 0


def test_prepare_and_restore_switch_every_eligible_mlp(own_base):
    model = build_model(own_base, "dense-vl")
    eligible = [m for m in own_base.model.modules() if fast_mlp.eligible(m)]
    assert len(eligible) == len(own_base.model.clip.vision_model.encoder.layers) + \
        len(own_base.model.clip.text_model.encoder.layers)
    fast.prepare_model(model, torch.device("cpu"), None)
    assert all(isinstance(m, fast_mlp._FoldedForward) for m in eligible)
    fast.restore_fp32(model)
    assert not any(isinstance(m, fast_mlp._FoldedForward) for m in own_base.model.modules())


def test_a_fast_step_runs_one_activation_kernel_per_mlp(own_base, host_step):
    """bench/host_step.py's count: forward, one SiLU per tower layer run and no QuickGELU multiply."""
    counts = host_step.compare_counts(*host_step.runner(own_base, "off", 2, 32))
    layers = max(own_base.model.config.extract_layers) + 1 + len(own_base.model.clip.text_model.encoder.layers)
    stock, ours = counts["stock"]["forward_loss"]["by_op"], counts["fused"]["forward_loss"]["by_op"]
    assert ours["silu"] == layers and "silu" not in stock
    assert ours.get("mul", 0) <= stock["mul"] - 2 * layers  # QuickGELU's two multiplies per layer
    back_s, back_o = counts["stock"]["backward"]["by_op"], counts["fused"]["backward"]["by_op"]
    assert back_o["silu_backward"] == layers and back_o["mul"] <= back_s["mul"] - 3 * layers


def test_restoring_an_unswapped_base_does_not_walk_it(own_base, monkeypatch):
    """Every plain fit and evaluate calls restore_fp32 (per federated message): with nothing swapped
    it must not walk the whole base (the class swaps remember whether any module is swapped)."""
    model = build_model(own_base, "dense-vl")
    fast.prepare_model(model, torch.device("cpu"), None)
    fast.restore_fp32(model)  # walks once, to swap back

    walks = []

    def walked():
        walks.append(1)
        raise AssertionError("restore_fp32 walked an unswapped base")

    monkeypatch.setattr(own_base.model, "modules", walked)
    monkeypatch.setattr(own_base.model.decoder, "modules", walked)
    fast.restore_fp32(model)
    assert walks == []


def test_prepare_leaves_current_copies_for_a_compiled_step(own_base, monkeypatch):
    """A compiled step takes the folded copies as it finds them (checking pointers would break its
    graph), so prepare_model must leave them current when it runs again on a model prepared before:
    fp32 first, then bf16 (the cast rebinds the weights), then with one MLP set to train. The MLPs were
    already swapped the second time; their copies used to be remade only at their next eager call."""
    model = build_model(own_base, "dense-vl")
    cpu = torch.device("cpu")
    mlps = [m for m in own_base.model.modules() if fast_mlp.eligible(m)]
    fast.prepare_model(model, cpu, None)
    fast.prepare_model(model, cpu, torch.bfloat16)
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        for mlp in mlps:
            w1, _, w2 = fast_mlp.folded(mlp)
            assert w1.dtype == w2.dtype == torch.bfloat16
            assert torch.equal(w2, (mlp.fc2.weight.float() / fast_mlp.SCALE).bfloat16())
    mlps[0].fc1.weight.requires_grad_(True)
    fast.prepare_model(model, cpu, torch.bfloat16)
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert fast_mlp.folded(mlps[0]) is None and fast_mlp.folded(mlps[1]) is not None


def test_restore_frees_the_folded_copies(own_base):
    # They are a second set of the towers' MLP weights (~156 MiB in bf16 at full size) that the
    # plain forward never reads: held after restore_fp32, they were memory for nothing.
    import weakref

    model = build_model(own_base, "dense-vl")
    mlp = own_base.model.clip.vision_model.encoder.layers[0].mlp
    fast.prepare_model(model, torch.device("cpu"), torch.bfloat16)
    copies = [weakref.ref(t) for t in fast_mlp.folded(mlp) if t is not None]
    assert copies and all(ref() is not None for ref in copies)
    fast.restore_fp32(model)
    assert all(ref() is None for ref in copies)  # freed by refcount, no gc needed
    assert not any(fast_mlp._ATTR in m.__dict__ for m in own_base.model.modules())
