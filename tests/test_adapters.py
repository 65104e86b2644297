"""Adapter variants: parameter counts from the architecture, what trains, what the forward computes."""

import pytest
import torch

from common.adapters import VARIANTS, AdapterSpec
from common.model import build_model


def adapter_params(d: int, r: int) -> int:
    """One adapter block: down (d*r + r) + up (r*d + d)."""
    return 2 * d * r + r + d


def expected_trainable(variant: str, cfg) -> int | None:
    """Trainable parameters of an adapter variant, derived from the base config and the paper's dims."""
    v, t, p = cfg.vision_config.hidden_size, cfg.text_config.hidden_size, cfg.projection_dim
    n, depth = len(cfg.extract_layers), max(cfg.extract_layers)
    family, scopes = variant.split("-")
    if family == "shallow":
        per = {"v": n * adapter_params(v, 512), "l": n * adapter_params(t, 512), "c": adapter_params(p, 256)}
    else:
        per = {"v": 2 * depth * adapter_params(v, 64), "l": 2 * depth * adapter_params(t, 64),
               "c": adapter_params(p, 256)}
    return sum(per[s] for s in scopes)


ADAPTER_VARIANTS = [v for v in VARIANTS if "-" in v]


@pytest.mark.parametrize("variant", VARIANTS)
def test_counts_on_full_architecture(full_arch_base, variant):
    model = build_model(full_arch_base, variant)
    counts = model.parameter_counts()
    base_total = sum(p.numel() for p in full_arch_base.model.parameters())
    assert 150_000_000 < base_total < 151_000_000  # CLIPSeg rd64-refined: about 150.7 M
    if variant in ADAPTER_VARIANTS:
        assert counts["trainable"] == expected_trainable(variant, full_arch_base.model.config)
        assert counts["total"] == base_total + counts["trainable"]
    elif variant == "none":
        assert counts == {"trainable": 0, "total": base_total}
    elif variant == "full":
        assert counts["trainable"] == base_total
    elif variant == "decoder":
        assert counts["trainable"] == sum(p.numel() for p in full_arch_base.model.decoder.parameters())
    elif variant == "lora":
        # r=8 on q and v of 12 vision (768) + 12 text (512) layers: A (r x d) + B (d x r).
        assert counts["trainable"] == 2 * 12 * (2 * 8 * 768) + 2 * 12 * (2 * 8 * 512)


def test_paper_counts(full_arch_base):
    """The paper: about 4.2 M for its shallow adapter (SA) and 3.0 M for its dense one (DA)."""
    shallow = build_model(full_arch_base, "shallow-vlc").parameter_counts()["trainable"]
    dense = build_model(full_arch_base, "dense-vl").parameter_counts()["trainable"]
    assert round(shallow / 1e6, 1) == 4.2
    assert round(dense / 1e6, 1) == 3.0


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_adapters_require_grad(tiny_base, variant):
    model = build_model(tiny_base, variant)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(model.adapter_names()) == trainable
    if variant in ADAPTER_VARIANTS:
        assert trainable and all(n.startswith("adapters.") for n in trainable)
    elif variant == "decoder":
        assert trainable and all(n.startswith("clipseg.decoder.") for n in trainable)
    elif variant == "lora":
        assert trainable and all("lora_" in n and ".encoder.layers." in n for n in trainable)
    elif variant == "none":
        assert not trainable
    # the shared, cached base itself is never made trainable
    assert not any(p.requires_grad for p in tiny_base.model.parameters())


def _batch(base, n=2):
    g = torch.Generator().manual_seed(0)
    px = torch.randn(n, 3, base.image_size, base.image_size, generator=g)
    tok = base.tokenizer(["round lesion", "a small bright polyp in the left of the image"][:n],
                         padding=True, return_tensors="pt")
    return px, tok["input_ids"], tok["attention_mask"]


def test_none_equals_stock_forward(tiny_base):
    px, ids, am = _batch(tiny_base)
    ours = build_model(tiny_base, "none")(px, ids, am).squeeze(1)
    stock = tiny_base.model(input_ids=ids, pixel_values=px, attention_mask=am).logits
    assert ours.shape == stock.shape
    assert (ours - stock).abs().max().item() <= 1e-5


def test_none_equals_stock_forward_full_architecture(full_arch_base):
    px, ids, am = _batch(full_arch_base, n=1)
    with torch.no_grad():
        ours = build_model(full_arch_base, "none")(px, ids, am).squeeze(1)
        stock = full_arch_base.model(input_ids=ids, pixel_values=px, attention_mask=am).logits
    assert (ours - stock).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", ADAPTER_VARIANTS)
def test_identity_init_starts_at_base_and_trains(tiny_base, variant):
    px, ids, am = _batch(tiny_base)
    model = build_model(tiny_base, AdapterSpec(variant, init="identity"))
    out = model(px, ids, am)
    stock = tiny_base.model(input_ids=ids, pixel_values=px, attention_mask=am).logits
    assert (out.squeeze(1) - stock).abs().max().item() <= 1e-5
    out.square().mean().backward()
    ups = [p.grad for n, p in model.named_parameters() if n.endswith("up.weight")]
    assert ups and all(g is not None and g.abs().sum() > 0 for g in ups)


@pytest.mark.parametrize("variant", ADAPTER_VARIANTS)
def test_paper_init_moves_away_from_base(tiny_base, variant):
    px, ids, am = _batch(tiny_base)
    torch.manual_seed(0)
    out = build_model(tiny_base, AdapterSpec(variant, init="paper"))(px, ids, am)
    stock = tiny_base.model(input_ids=ids, pixel_values=px, attention_mask=am).logits
    assert (out.squeeze(1) - stock).abs().max().item() > 1e-4
    up = next(m for m in build_model(tiny_base, variant).modules() if hasattr(m, "up")).up
    assert up.weight.abs().sum() > 0  # PyTorch default init, not zeros


@pytest.mark.parametrize("variant", ["dense-vl", "full", "lora"])
def test_gradients_reach_inside_the_towers(tiny_base, variant):
    px, ids, am = _batch(tiny_base)
    model = build_model(tiny_base, variant)
    model(px, ids, am).mean().backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0]
    assert any("vision" in n for n in names), "no gradient reached the vision tower's trainable parts"
    assert any("text" in n for n in names), "no gradient reached the text tower's trainable parts"


def test_vision_layers_after_last_extracted_are_skipped(tiny_base):
    model = build_model(tiny_base, "dense-vl")
    layers = model.clipseg.clip.vision_model.encoder.layers
    last = max(tiny_base.model.config.extract_layers)
    assert len(layers) > last + 1
    calls = [0] * len(layers)
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(layers)]
    # dense layers bypass the layer's own forward; count the attention modules instead
    hooks += [layer.self_attn.register_forward_pre_hook(lambda m, a, kw=None, i=i: calls.__setitem__(i, calls[i] + 1))
              for i, layer in enumerate(layers)]
    model(*_batch(tiny_base))
    for h in hooks:
        h.remove()
    assert all(c > 0 for c in calls[: last + 1])
    assert all(c == 0 for c in calls[last + 1:])


def test_frozen_weights_unchanged_after_a_training_step(tiny_base):
    model = build_model(tiny_base, "dense-vlc")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=1e-3)
    model(*_batch(tiny_base)).mean().backward()
    opt.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in frozen.items())
    assert any(not torch.equal(after[n], t) for n, t in adapters.items())


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown adapter variant"):
        AdapterSpec("dense-xyz")


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_side_does_not_change_the_prompt_embedding(tiny_base, side):
    """Right padding is dropped (causal attention never lets it reach end-of-text); left padding is kept."""
    import copy

    tok = copy.deepcopy(tiny_base.tokenizer)
    tok.padding_side = side
    prompts = ["lesion", "a small bright round polyp located in the left of the image"]
    batch = tok(prompts, padding=True, return_tensors="pt")
    model = build_model(tiny_base, "none")
    padded = model.encode_text(batch["input_ids"], batch["attention_mask"])
    alone = model.encode_text(**{k: v for k, v in tok(prompts[:1], return_tensors="pt").items()
                                 if k in ("input_ids", "attention_mask")})
    if side == "right":  # left padding shifts CLIP's absolute positions, for the stock model too
        assert (padded[0] - alone[0]).abs().max().item() <= 1e-5
    stock = tiny_base.model.clip.get_text_features(**batch).pooler_output
    assert (padded - stock).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", ["dense-vl", "lora"])
def test_trainable_parameters_follow_conversions_that_make_new_parameters(tiny_base, variant):
    """The model indexes its trainable parameters once; a .to() that replaces them (torch's
    overwrite-on-conversion flag here; a move to "meta" does the same) must not leave the index,
    hence training and the adapter state, on the old tensors."""
    import copy

    from common.bases import Base

    base = Base(copy.deepcopy(tiny_base.model), tiny_base.tokenizer, tiny_base.base_id, tiny_base.image_size)
    model = build_model(base, variant)
    before = model.trainable_parameters()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    own = dict(model.named_parameters())
    after = model.trainable_parameters()
    assert len(after) == len(before) and all(p is not q for p, q in zip(after, before))  # really new objects
    assert all(own[name] is p for name, p in model._trainable_index.items())
    assert all(t.dtype == torch.float64 for t in model.adapter_state().values())


@pytest.mark.parametrize("field", ["lora_alpha", "lora_rank", "dense_dim"])
def test_a_zero_size_or_lora_alpha_is_refused(field):
    # lora_alpha = 0 scales the LoRA update by 0: a model that never changes and never trains.
    with pytest.raises(ValueError, match=f"{field} must be >= 1, got 0"):
        AdapterSpec("lora", **{field: 0})


def test_the_adapter_block_computes_the_papers_formula():
    # paper: x + relu(up(relu(down(x)))); identity: x + up(relu(down(x))) (no trailing ReLU, see block.py)
    from common.adapters.block import Adapter

    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    paper = Adapter(8, 4, "paper")
    inner = paper.up(torch.relu(paper.down(x)))
    assert (inner < 0).any() and (inner > 0).any()  # the trailing ReLU changes the result here
    assert torch.allclose(paper(x), x + torch.relu(inner))
    identity = Adapter(8, 4, "identity")
    with torch.no_grad():
        identity.up.weight.normal_()
        identity.up.bias.fill_(-0.3)
    assert torch.allclose(identity(x), x + identity.up(torch.relu(identity.down(x))))


@pytest.mark.parametrize("init", ["paper", "identity"])
def test_shallow_condition_is_the_cond_adapter_plus_the_text_tap_adapters(tiny_base, init):
    # C on the projected text feature first, then each L adapter's output added: with its residual
    # (paper) or its branch alone (identity, where the residual would add the raw hidden state).
    torch.manual_seed(0)
    adapters = build_model(tiny_base, AdapterSpec("shallow-vlc", init=init)).adapters
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(0.05 * torch.randn_like(p))
    config = tiny_base.model.config
    cond = torch.randn(2, config.projection_dim)
    taps = [torch.randn(2, config.text_config.hidden_size) for _ in config.extract_layers]
    out = adapters.adapt_condition(cond, taps)
    added = [a(h) if init == "paper" else a.branch(h) for a, h in zip(adapters.text, taps)]
    assert torch.allclose(out, adapters.cond(cond) + sum(added), atol=1e-6)


def test_lora_scales_its_update_by_alpha_over_rank_without_dropout(tiny_base):
    model = build_model(tiny_base, AdapterSpec("lora", lora_rank=4, lora_alpha=12))
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "scaling")]
    assert layers and all(m.scaling["default"] == 3.0 for m in layers)
    assert all(isinstance(m.lora_dropout["default"], torch.nn.Identity) for m in layers)


def test_a_bool_is_not_a_size_in_a_saved_spec():
    spec = AdapterSpec("dense-vl").to_dict()
    with pytest.raises(ValueError, match="dense_dim has the wrong type"):
        AdapterSpec.from_dict({**spec, "dense_dim": True})
