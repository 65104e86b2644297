"""The fast path's self-attention (common/fast_attention.py) is the stock one, with q/k/v in one matmul.

Checked against the stock CLIPSegAttention forward (values and input
gradients, fp32, to 1e-5 of the largest), for the vision tower (no mask),
the text tower (causal) and a text batch with a padding mask; that fusing
keeps one copy of the weights (the module's q/k/v weights become views of
the fused tensor) and the base's values; that a rebinding (a dtype cast, a
restore to fp32, a copy) is noticed and fused again rather than using a
stale tensor; that weights that train are not fused; and that a fast step
dispatches fewer operators (bench/host_step.py's count).
"""

import copy

import pytest
import torch
from transformers.masking_utils import create_causal_mask

from common import fast, fast_attention
from common.bases import Base
from common.config import TrainConfig
from common.model import build_model


@pytest.fixture()
def own_base(tiny_base):
    """A private copy of the tiny base: fusing rebinds its weights in place."""
    return Base(copy.deepcopy(tiny_base.model), tiny_base.tokenizer, tiny_base.base_id, tiny_base.image_size)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= 1e-5 * b.abs().max())


def _compare(module, x, mask, causal):
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    stock, _ = module(hidden_states=x1, attention_mask=mask, is_causal=causal)
    ours = fast_attention.attention(module, x2, mask, causal)
    g = torch.randn_like(stock)
    stock.backward(g)
    ours.backward(g)
    assert _close(ours, stock) and _close(x2.grad, x1.grad)


def test_fused_attention_equals_the_stock_module(own_base):
    torch.manual_seed(0)
    clip = own_base.model.clip
    vision, text = clip.vision_model.encoder.layers, clip.text_model.encoder.layers
    assert fast_attention.fuse_qkv([*vision, *text]) == len(vision) + len(text)
    v = vision[0].self_attn
    _compare(v, torch.randn(3, 17, v.embed_dim), None, False)
    t = text[1].self_attn
    x = torch.randn(3, 9, t.embed_dim)
    _compare(t, x, None, True)
    # A batch with padding before real tokens (left padding): the mask holds the causal part too.
    pad = torch.ones(3, 9, dtype=torch.long)
    pad[0, :4] = 0
    mask = create_causal_mask(clip.text_model.config, x, pad, None)
    assert mask is not None
    _compare(t, x, mask, True)


def test_fusing_keeps_one_copy_and_the_values(own_base):
    attn = own_base.model.clip.vision_model.encoder.layers[0].self_attn
    before = {k: v.clone() for k, v in attn.state_dict().items()}
    weight, bias = fast_attention.qkv(attn)
    d = attn.embed_dim
    assert weight.shape == (3 * d, d) and bias.shape == (3 * d,)
    for i, lin in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
        assert lin.weight.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()  # a view, no copy
        assert lin.weight.data_ptr() == weight[i * d].data_ptr() and lin.bias.data_ptr() == bias[i * d].data_ptr()
    after = attn.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert fast_attention.qkv(attn)[0] is weight  # checked, not fused again


def test_a_rebinding_is_noticed_and_fused_again(own_base):
    torch.manual_seed(0)
    attn = own_base.model.clip.vision_model.encoder.layers[0].self_attn
    x = torch.randn(2, 5, attn.embed_dim)
    first, _ = fast_attention.qkv(attn)
    attn.double()  # every weight rebound to a new fp64 tensor
    again, _ = fast_attention.qkv(attn)
    assert again is not first and again.dtype == torch.float64
    _compare(attn, x.double(), None, False)
    # A new value written into one weight in place reaches the fused tensor (it is a view of it).
    with torch.no_grad():
        attn.k_proj.weight.mul_(2)
    assert torch.equal(fast_attention.qkv(attn)[0][attn.embed_dim:2 * attn.embed_dim], attn.k_proj.weight)
    _compare(attn, x.double(), None, False)
    # A copy of the module has its own weights: its record points at the original's, so it fuses its own.
    twin = copy.deepcopy(attn)
    twin_w, _ = fast_attention.qkv(twin)
    assert twin_w.data_ptr() != fast_attention.qkv(attn)[0].data_ptr()
    assert twin.q_proj.weight.data_ptr() == twin_w.data_ptr()


def test_bf16_cast_then_fp32_restore_refuses_stale_weights(own_base):
    model = build_model(own_base, "dense-vl")
    attn = own_base.model.clip.text_model.encoder.layers[0].self_attn
    fast.prepare_model(model, torch.device("cpu"), torch.bfloat16)
    assert fast_attention.qkv(attn)[0].dtype == torch.bfloat16
    fast.restore_fp32(model)
    assert attn.q_proj.weight.dtype == torch.float32
    assert fast_attention.qkv(attn)[0].dtype == torch.float32  # fused again from the restored weights


def test_weights_that_train_are_not_fused(own_base):
    attn = own_base.model.clip.vision_model.encoder.layers[0].self_attn
    fast_attention.qkv(attn)
    attn.q_proj.weight.requires_grad_(True)
    assert fast_attention.qkv(attn) is None
    x = torch.randn(2, 5, attn.embed_dim)
    fast_attention.attention(attn, x, None, False).sum().backward()  # the stock forward: q's weight gets a gradient
    assert attn.q_proj.weight.grad is not None and attn.q_proj.weight.grad.abs().sum() > 0


def test_a_fast_step_dispatches_fewer_operators(own_base, host_step):
    """bench/host_step.py's count on arch:tiny: the fused attention saves operators in every tower layer."""
    counts = host_step.compare_counts(*host_step.runner(own_base, "off", 2, 32))
    clip = own_base.model.clip
    layers = max(own_base.model.config.extract_layers) + 1 + len(clip.text_model.encoder.layers) \
        + len(own_base.model.decoder.layers)  # the towers' layers this step runs, and the decoder's
    for phase in ("forward_loss", "backward"):
        assert counts["fused"][phase]["ops"] <= counts["stock"][phase]["ops"] - 5 * layers, phase
    # q, k, v: one matmul instead of three in the forward; one instead of three (and two adds) backward.
    fwd = (counts["stock"]["forward_loss"]["by_op"], counts["fused"]["forward_loss"]["by_op"])
    assert fwd[1]["addmm"] == fwd[0]["addmm"] - 2 * layers
    assert counts["fused"]["clip_update"] == counts["stock"]["clip_update"]
    assert TrainConfig().fast == "auto"  # on by default on CUDA: what the count is for


def test_the_decoder_attention_runs_fused_on_the_fast_path_only(own_base):
    """The decoder's layers are called by transformers' code: their attention modules change class
    (same parameters and names) while the fast path is on, and back for the plain one."""
    torch.manual_seed(0)
    model = build_model(own_base, "shallow-vlc").eval()
    decoder = own_base.model.decoder
    attns = [layer.self_attn for layer in decoder.layers]
    keys = set(decoder.state_dict())
    acts = [torch.randn(2, 5, own_base.model.config.vision_config.hidden_size) for _ in model.extract_layers]
    cond = torch.randn(2, own_base.model.config.projection_dim)
    with torch.no_grad():
        plain = model.head(acts, cond, [])
        fast.prepare_model(model, torch.device("cpu"), None)
        assert all(isinstance(a, fast_attention._FusedForward) for a in attns)
        assert set(decoder.state_dict()) == keys
        fused = model.head(acts, cond, [])
    assert _close(fused, plain)
    fast.restore_fp32(model)
    assert not any(isinstance(m, fast_attention._FusedForward) for m in decoder.modules())
    # A swapped module whose weights train runs its class's stock forward (no fused tensor, no recursion).
    fast_attention.use_fused_attention(decoder, True)
    attns[0].v_proj.weight.requires_grad_(True)
    x = torch.randn(2, 5, attns[0].embed_dim)
    out, _ = attns[0](hidden_states=x)
    out.sum().backward()
    assert attns[0].v_proj.weight.grad is not None
    fast_attention.use_fused_attention(decoder, False)


@pytest.mark.parametrize("variant", ["lora", "decoder", "full", "dense-vlc", "shallow-vlc"])
def test_every_variant_computes_the_same_on_the_fast_path(own_base, variant):
    """With trained-looking adapters (random, not their zero-ish init: a LoRA whose B is zero would hide a
    fused path that skips it), fast logits equal plain ones: LoRA's wrapped projections, a trainable decoder
    and the `full` baseline's trainable towers keep their stock forwards."""
    torch.manual_seed(0)
    model = build_model(own_base, variant).eval()
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    s = own_base.image_size
    px = torch.randn(2, 3, s, s)
    ids = fast.PromptTokens(own_base.tokenizer, (16,))(["a polyp", "a round lesion"])
    with torch.no_grad():
        plain = model(px, ids, None)
        fast.prepare_model(model, torch.device("cpu"), None)
        quick = model(px, ids, None)
        fast.restore_fp32(model)
    assert _close(quick, plain)


def test_prepare_leaves_current_fused_tensors_for_a_compiled_step(own_base, monkeypatch):
    """A compiled step takes the fused tensors as it finds them (checking pointers would break its
    graph), so prepare_model must leave them current when it runs again on a model prepared before:
    fp32 first, then bf16 (the cast rebinds every frozen weight), then with some q/k/v set to train.
    The decoder's modules were already swapped the second time; they were refreshed only lazily, at
    their next eager call (a compiled step would have read the stale fp32 tensors)."""
    model = build_model(own_base, "shallow-vlc")
    cpu = torch.device("cpu")
    attns = [layer.self_attn for layer in own_base.model.decoder.layers] + \
        [layer.self_attn for layer in own_base.model.clip.vision_model.encoder.layers]
    fast.prepare_model(model, cpu, None)
    fast.prepare_model(model, cpu, torch.bfloat16)
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        for attn in attns:
            weight, _ = fast_attention.qkv(attn)
            assert weight.dtype == torch.bfloat16 and weight.data_ptr() == attn.q_proj.weight.data_ptr()
    decoder_attn, tower_attn = attns[0], attns[-1]
    decoder_attn.q_proj.weight.requires_grad_(True)
    tower_attn.v_proj.bias.requires_grad_(True)
    fast.prepare_model(model, cpu, torch.bfloat16)
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert fast_attention.qkv(decoder_attn) is None and fast_attention.qkv(tower_attn) is None
        assert fast_attention.qkv(attns[1]) is not None


def test_restore_drops_the_stale_fused_copies(own_base):
    # After the cast back to fp32 the bf16 fused q/k/v tensors are copies nothing reads.
    import weakref

    model = build_model(own_base, "dense-vl")
    attn = own_base.model.clip.vision_model.encoder.layers[0].self_attn
    fast.prepare_model(model, torch.device("cpu"), torch.bfloat16)
    fused = weakref.ref(fast_attention.qkv(attn)[0])
    fast.restore_fp32(model)
    assert fused() is None
    assert not any(fast_attention._ATTR in m.__dict__ for m in own_base.model.modules())
    model.fast = None  # the plain forward still runs (and fuses nothing on its own)
    fast.prepare_model(model, torch.device("cpu"), None)  # and the fast path fuses again when asked
    assert fast_attention.qkv(attn)[0].dtype == torch.float32
