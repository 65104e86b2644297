"""The fast path (common/fast.py, common/activation_cache.py) computes what the plain path computes.

On CPU, in fp32: logits equal to 1e-5 (relative to their largest), training
losses equal to 1e-4 (relative) and adapter weights to 1e-3 (absolute; see
the test) after 2 epochs, for dense-vl and shallow-vlc, with and without the
shallow activation cache. The bf16 cast of the frozen weights is checked
under CPU autocast against bf16 tolerance (5e-2 relative on logits).
"""

import copy
import dataclasses
import os

import pytest
import torch

from common import activation_cache, fast, resident_pixels
from common.config import TrainConfig
from common.data import SegDataset, load_items
from common.data.dataset import collate_fn
from common.evaluate import make_loss
from common.model import build_model
from common.resident_pixels import ResidentPixels
from common.train import fit


_GATHER = ResidentPixels.gather


@pytest.fixture(scope="module")
def site(synth_sites):
    return synth_sites[0]


def _ds(site, base, cache_dir=None, train=True):
    return SegDataset(load_items(site, "train"), base.image_size, train=train, seed=0, cache_dir=cache_dir,
                      prompt_index=None if train else 9)


def _tokens(base):
    return fast.PromptTokens(base.tokenizer, (16, 32, 77), 77)


def test_dice_ce_equals_monai():
    torch.manual_seed(0)
    logits = torch.randn(4, 1, 32, 32) * 3
    target = (torch.rand(4, 1, 32, 32) > 0.6).float()
    target[1] = 0  # an empty mask
    cfg = TrainConfig()
    ref = make_loss(cfg)(logits, target)
    ours = fast.dice_ce(logits, target, cfg.lambda_dice, cfg.lambda_ce)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-7)


def test_fixed_length_padding_gives_the_same_embeddings(tiny_base):
    model = build_model(tiny_base, "shallow-vlc").eval()
    prompts = ["a round lesion", "a dark square blob in the upper left corner of the image", "polyp"]
    batch = tiny_base.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    ids = _tokens(tiny_base)(prompts)
    assert ids.shape == (3, 16)  # the smallest bucket holding the longest prompt
    assert _tokens(tiny_base)(["a " * 20 + "lesion"]).shape[1] == 32
    with torch.no_grad():
        per_batch = model.encode_text(batch["input_ids"], batch["attention_mask"])
        fixed = model.encode_text(ids, None)
        fixed77 = model.encode_text(fast.PromptTokens(tiny_base.tokenizer, (77,))(prompts), None)
    assert torch.allclose(per_batch, fixed, atol=1e-5)
    assert torch.allclose(per_batch, fixed77, atol=1e-5)


@pytest.mark.parametrize("variant", ["dense-vl", "shallow-vlc"])
def test_fast_forward_logits_equal_plain(tiny_base, site, variant):
    ds = _ds(site, tiny_base, train=False)
    batch = collate_fn(tiny_base.tokenizer)([ds[i] for i in range(4)])
    model = build_model(tiny_base, variant).eval()
    with torch.no_grad():
        plain = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        fast.prepare_model(model, torch.device("cpu"), None)
        images = torch.stack([torch.tensor(ds.arrays(i)[0]) for i in range(4)])
        px = fast.normalize(images)
        assert torch.equal(px, batch["pixel_values"])  # uint8 -> float on the device = the host's maths
        quick = model(px, _tokens(tiny_base)(batch["prompts"]), None)
        again = model(px, _tokens(tiny_base)(batch["prompts"]), None)  # position table from the cache
        fast.restore_fp32(model)
    assert model.fast is None
    assert (plain - quick).abs().max() <= 1e-5 * plain.abs().max()
    assert torch.equal(quick, again)


@pytest.mark.parametrize("variant", ["dense-vl", "shallow-vlc"])
def test_fast_gradients_are_as_accurate_as_plain(tiny_base, variant):
    """One step's adapter gradients, fast path (fp32) and plain path (fp32), each against the plain
    path in fp64: the fast path's worst relative error is no worse than 1.5x the plain one's (its
    kernels round differently: fused q/k/v, SiLU for QuickGELU; that must not cost accuracy)."""
    from common.bases import Base

    base = Base(copy.deepcopy(tiny_base.model), tiny_base.tokenizer, tiny_base.base_id, tiny_base.image_size)
    torch.manual_seed(0)
    model = build_model(base, variant)
    px = torch.randn(4, 3, 64, 64)
    ids = _tokens(base)(["a round polyp", "polyp", "a small dark lesion", "x"])
    target = (torch.rand(4, 1, 64, 64) > 0.5).float()
    loss_fn = make_loss(TrainConfig())

    def grads(m, dtype):
        m.zero_grad(set_to_none=True)
        loss_fn(m(px.to(dtype), ids, None), target.to(dtype)).backward()
        return {n: p.grad.double() for n, p in m.named_parameters() if p.requires_grad}

    truth = grads(copy.deepcopy(model).double(), torch.float64)
    plain = grads(model, torch.float32)
    fast.prepare_model(model, torch.device("cpu"), None)
    quick = grads(model, torch.float32)
    fast.restore_fp32(model)

    def worst(g):
        return max(float((g[n] - truth[n]).norm() / truth[n].norm()) for n in truth)

    assert worst(quick) <= 1.5 * worst(plain) + 1e-6, (worst(quick), worst(plain))


@pytest.mark.parametrize("variant,cache,pixels", [("dense-vl", "off", "resident"), ("dense-vl", "off", "loader"),
                                                  ("shallow-vlc", "off", "resident"), ("shallow-vlc", "on", None)])
def test_fast_fit_matches_plain_fit(tiny_base, site, tmp_path, monkeypatch, variant, cache, pixels):
    activation_cache.clear_memory()
    resident_pixels.clear()
    gathers = []
    monkeypatch.setattr(ResidentPixels, "gather", lambda self, rows: (gathers.append(len(rows)),
                                                                       _GATHER(self, rows))[1])
    if pixels == "loader":  # a site whose pixels exceed the budget trains from the loader
        monkeypatch.setenv("FEDVLSM_RESIDENT_PIXELS_GB", "0")
    results = {}
    for mode in ("off", "on"):
        torch.manual_seed(0)
        model = build_model(tiny_base, variant)
        cfg = TrainConfig(epochs=2, batch_size=4, progress=False, fast=mode, activation_cache=cache,
                          select_best=False, early_stop_patience=10**6)
        res = fit(model, _ds(site, tiny_base, tmp_path / "cache"), None, tiny_base.tokenizer, cfg)
        results[mode] = (res, model.adapter_state())
        fast.restore_fp32(model)
    (plain, plain_state), (quick, quick_state) = results["off"], results["on"]
    assert quick.steps == plain.steps
    for a, b in zip(plain.history, quick.history):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    # Weights: each within 5e-3 absolute, 5e-5 on average. The forward agrees
    # to ~1e-7 relative, but Adam's normalised step (lr 1e-3) turns such
    # noise into up to a step's size where a gradient is near zero, and 2
    # epochs are 8 steps: observed at most 4.2e-4 (mean 5e-7) before the
    # folded MLPs (common/fast_mlp.py), 2.4e-3 (mean 5.1e-6) since, whose
    # fp32 rounding differs from QuickGELU's in every layer. That this is
    # rounding, not error: test_fast_gradients_are_as_accurate_as_plain.
    diffs = [(quick_state[name] - tensor).abs() for name, tensor in plain_state.items()]
    for name, diff in zip(plain_state, diffs):
        assert diff.max() <= 5e-3, name
    assert sum(d.sum() for d in diffs) / sum(d.numel() for d in diffs) <= 5e-5
    if cache == "on":
        assert (tmp_path / "cache" / "activations").is_dir()
    # resident: epoch 1 trains on the loader's batches and keeps them, epoch 2 takes every batch from the store
    assert sum(gathers) == (len(_ds(site, tiny_base)) if pixels == "resident" else 0)


def test_resident_pixels_are_read_once_per_process(tiny_base, site, tmp_path, monkeypatch):
    """A 3-epoch fit reads each item from the site cache once (3 times without the store), a next
    fit on the same data (a warm worker's next round) none, and one on changed data its items again."""
    import shutil

    resident_pixels.clear()
    data = tmp_path / "site"
    shutil.copytree(site, data)

    def reads() -> int:
        ds = _ds(data, tiny_base, tmp_path / "cache")
        arrays, count = ds.arrays, [0]
        ds.arrays = lambda i: (count.__setitem__(0, count[0] + 1), arrays(i))[1]
        cfg = TrainConfig(epochs=3, batch_size=4, progress=False, fast="on", select_best=False)
        fit(build_model(tiny_base, "dense-vl"), ds, None, tiny_base.tokenizer, cfg)
        return count[0]

    n = len(_ds(data, tiny_base))
    assert reads() == n
    assert reads() == 0
    image = _ds(data, tiny_base).items[0].image
    st = os.stat(image)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # one file changed: a new site key
    assert reads() == n
    monkeypatch.setenv("FEDVLSM_RESIDENT_PIXELS_GB", "0")
    assert reads() == 3 * n


def test_resident_pixels_budget(tiny_base, site, monkeypatch):
    resident_pixels.clear()
    ds = _ds(site, tiny_base)
    cpu = torch.device("cpu")
    need = ResidentPixels.nbytes(len(ds), tiny_base.image_size)
    monkeypatch.setenv("FEDVLSM_RESIDENT_PIXELS_GB", str(need / 2**30))
    assert ResidentPixels.for_site(ds, cpu) is not None
    monkeypatch.setenv("FEDVLSM_RESIDENT_PIXELS_GB", str((need - 1) / 2**30))
    assert ResidentPixels.for_site(ds, cpu) is None
    monkeypatch.setenv("FEDVLSM_RESIDENT_PIXELS_GB", "lots")
    with pytest.raises(ValueError, match="FEDVLSM_RESIDENT_PIXELS_GB"):
        ResidentPixels.for_site(ds, cpu)


def test_activation_cache_hit_miss_invalidation(tiny_base, site, tmp_path):
    import shutil

    activation_cache.clear_memory()
    data = tmp_path / "site"
    shutil.copytree(site, data)
    ds = _ds(data, tiny_base, tmp_path / "cache")
    model = build_model(tiny_base, "shallow-vlc").eval()
    fast.prepare_model(model, torch.device("cpu"), None)
    cpu = torch.device("cpu")
    batches = fast.index_batches(len(ds), 4, torch.Generator().manual_seed(0))
    loader = lambda b: torch.utils.data.DataLoader(fast.PixelItems(ds), batch_sampler=b)  # noqa: E731

    def fresh():
        return activation_cache.ShallowFeatures.for_site(model, ds, _tokens(tiny_base), cpu, None)

    first = fresh()
    first.fill(batches, loader)
    n = len(ds)
    assert first.stats["misses"] == n and first.stats["disk_writes"] == n
    second = fresh()
    second.fill(batches, loader)
    assert second.stats["memory_hits"] == n and second.stats["misses"] == 0
    activation_cache.clear_memory()  # a new process: the disk entries are read
    third = fresh()
    third.fill(batches, loader)
    assert third.stats["disk_hits"] == n and third.stats["misses"] == 0
    # cached features are the trunk's own outputs
    acts, cond, taps, masks = third.batch([0, 1], [ds.prompt_for(0), ds.prompt_for(1)])
    with torch.no_grad():
        px = fast.normalize(torch.stack([torch.tensor(ds.arrays(i)[0]) for i in (0, 1)]))
        direct = model.vision_trunk(px)
        dcond, dtaps = model.text_trunk(_tokens(tiny_base)([ds.prompt_for(0), ds.prompt_for(1)]), None)
    for a, b in zip(acts, direct):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(cond, dcond, atol=1e-5) and len(taps) == len(dtaps)
    assert torch.equal(masks[0], torch.tensor(ds.arrays(0)[1]))
    # data change: the item's file changes -> its key changes -> a miss
    image = ds.items[0].image
    st = os.stat(image)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fourth = fresh()
    fourth.fill(batches, loader)
    assert fourth.stats["misses"] == 1 and fourth.stats["memory_hits"] == n - 1
    # preprocessing change (image size) -> every key changes
    other = SegDataset(ds.items, tiny_base.image_size + 16, train=True, seed=0, cache_dir=tmp_path / "cache")
    assert all(other.cache_key(i) != ds.cache_key(i) for i in range(n))
    # base change -> another namespace
    assert activation_cache.namespace("0" * 16, torch.float32, model.extract_layers, model.image_size) != \
        activation_cache.namespace(model.base_fingerprint, torch.float32, model.extract_layers, model.image_size)
    # a damaged disk entry is a miss, never trusted
    # (a live entry: item 0's old entry is orphaned on disk since its key
    # changed, and damaging that one would test nothing)
    activation_cache.clear_memory()
    fifth = fresh()
    victim = fifth._path(fifth._key(1))
    assert victim.is_file()
    victim.write_bytes(b"not a tensor file")
    fifth.fill(batches, loader)
    assert fifth.stats["misses"] == 1 and fifth.stats["disk_hits"] == n - 1


def test_bf16_frozen_weights_keep_logits_and_fingerprint(site):
    from common.bases import load_base

    base = load_base("arch:tiny")  # private: the cast is in place on the shared base
    ds = _ds(site, base, train=False)
    batch = collate_fn(base.tokenizer)([ds[i] for i in range(4)])
    model = build_model(base, "dense-vl").eval()
    fingerprint = model.base_fingerprint
    with torch.no_grad():
        plain = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        fast.prepare_model(model, torch.device("cpu"), torch.bfloat16)
        q = base.model.clip.vision_model.encoder.layers[0].self_attn.q_proj
        assert q.weight.dtype == torch.bfloat16
        assert base.model.clip.vision_model.encoder.layers[0].layer_norm1.weight.dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in model.trainable_parameters())  # fp32 master weights
        with torch.autocast("cpu", dtype=torch.bfloat16):
            quick = model(batch["pixel_values"], _tokens(base)(batch["prompts"]), None).float()
    assert build_model(base, "dense-vl").base_fingerprint == fingerprint
    scale = plain.abs().max()
    assert (quick - plain).abs().max() / scale < 5e-2
    fast.restore_fp32(model)
    assert q.weight.dtype == torch.float32
    with torch.no_grad():  # the base as it was, exactly: the fp32 originals were kept, not rounded
        again = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    assert torch.equal(again, plain)


def test_fast_config_is_validated():
    with pytest.raises(ValueError):
        TrainConfig(fast="yes")
    with pytest.raises(ValueError):
        TrainConfig(compile="fast")
    with pytest.raises(ValueError):
        TrainConfig(num_workers=-2)
    assert TrainConfig(prompt_buckets=[77, 16]).prompt_buckets == (16, 77)
    assert not fast.fast_enabled(TrainConfig(), torch.device("cpu"))
    assert fast.fast_enabled(TrainConfig(fast="on"), torch.device("cpu"))


@pytest.mark.parametrize("variant", ["dense-vl", "shallow-vlc"])
def test_compiled_step_drops_the_short_batch_and_matches_eager(tiny_base, site, variant):
    """`compile` (here Inductor's default mode on CPU; CUDA graphs need a GPU) trains the same batches
    as the eager fast path when that one drops the same last short batch: one compile, static shapes."""
    ds = _ds(site, tiny_base)
    batch = 4
    assert len(ds) % batch, "the test needs a last short batch"
    losses, steps = {}, {}
    for mode in ("off", "default"):
        activation_cache.clear_memory()
        torch.manual_seed(0)
        model = build_model(tiny_base, variant)
        cfg = TrainConfig(batch_size=batch, progress=False, fast="on", compile=mode)
        params = model.trainable_parameters()
        opt = fast.make_optimizer(params, 1e-3, cfg.weight_decay, torch.device("cpu"))
        runner = fast.FastEpochs(model, ds, tiny_base.tokenizer, cfg, torch.device("cpu"), opt,
                                 torch.amp.GradScaler("cpu", enabled=False), params, torch.Generator().manual_seed(0),
                                 None)
        assert runner.drop_last == (mode != "off")
        runner.drop_last = True  # the eager reference drops the same batch
        losses[mode], _, steps[mode] = runner.run_epoch(lambda it: it)
        fast.restore_fp32(model)
    assert steps["off"] == steps["default"] == len(ds) // batch
    assert losses["default"] == pytest.approx(losses["off"], rel=1e-4)


@pytest.mark.parametrize("warm", [True, False])
def test_the_fast_step_compiles_as_one_graph(tiny_base, site, warm):
    """No graph break in the step torch.compile takes (forward, loss): one graph, so CUDA graphs (mode
    reduce-overhead) hold the whole of it. The position-table cache's key (data_ptr, _version) broke it
    into 6 graphs until the compiled step read the table by image size."""
    ds = _ds(site, tiny_base)
    model = build_model(tiny_base, "dense-vl")
    params = model.trainable_parameters()
    cpu = torch.device("cpu")
    runner = fast.FastEpochs(model, ds, tiny_base.tokenizer, TrainConfig(fast="on", batch_size=2), cpu,
                             fast.make_optimizer(params, 1e-3, 0.0, cpu), torch.amp.GradScaler("cpu", enabled=False),
                             params, torch.Generator(), None)
    if warm:  # as FastEpochs does when it compiles
        model.fast.warm_positions(model.clipseg.clip.vision_model.embeddings, model.image_size)
    images = torch.stack([torch.tensor(ds.arrays(i)[0]) for i in range(2)])
    masks = torch.stack([torch.tensor(ds.arrays(i)[1]) for i in range(2)])
    ids = runner.tokens([ds.prompt_for(i) for i in range(2)])
    torch._dynamo.reset()
    explained = torch._dynamo.explain(runner._step)(images, masks, ids)
    fast.restore_fp32(model)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("cin,cout,k", [(64, 32, 4), (32, 1, 4), (8, 3, 2)])
def test_patch_transposed_conv_is_the_same_maths(cin, cout, k):
    """kernel == stride: a matmul and a pixel shuffle give the convolution's output and gradients."""
    torch.manual_seed(0)
    conv = torch.nn.ConvTranspose2d(cin, cout, k, stride=k)
    x = torch.randn(2, cin, 5, 7, requires_grad=True)
    ref = conv(x)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    expected = (x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone())
    x.grad = conv.weight.grad = conv.bias.grad = None
    assert fast.use_patch_transposed_convs(conv, True) == 1
    assert type(conv) is fast.PatchConvTranspose2d
    out = conv(x)
    out.backward(grad)
    assert torch.allclose(out, ref, rtol=0, atol=1e-6)
    for got, want in zip((x.grad, conv.weight.grad, conv.bias.grad), expected):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert fast.use_patch_transposed_convs(conv, False) == 1 and type(conv) is torch.nn.ConvTranspose2d
    # not eligible: overlapping kernels stay cuDNN's
    assert fast.use_patch_transposed_convs(torch.nn.ConvTranspose2d(4, 4, 3, stride=2), True) == 0


def test_compiled_fast_path_swaps_the_decoder_transposed_convs_and_back(tiny_base, site):
    model = build_model(tiny_base, "dense-vl")
    names = {n for n, m in model.clipseg.decoder.named_modules() if isinstance(m, torch.nn.ConvTranspose2d)}
    assert names, "the tiny base's decoder has transposed convolutions"
    keys = set(model.clipseg.state_dict())
    params = model.trainable_parameters()
    cpu = torch.device("cpu")
    fast.FastEpochs(model, _ds(site, tiny_base), tiny_base.tokenizer, TrainConfig(fast="on", compile="default"), cpu,
                    fast.make_optimizer(params, 1e-3, 0.0, cpu), torch.amp.GradScaler("cpu", enabled=False), params,
                    torch.Generator(), None)
    swapped = {n for n, m in model.clipseg.decoder.named_modules() if type(m) is fast.PatchConvTranspose2d}
    assert swapped == names
    assert set(model.clipseg.state_dict()) == keys  # same parameter names: state dicts, fingerprints unchanged
    fast.restore_fp32(model)
    assert not any(type(m) is fast.PatchConvTranspose2d for m in model.clipseg.modules())


def test_cached_epoch_encodes_new_prompts_once_before_its_steps(tiny_base, site):
    """warm_text: the epoch's new prompts go through the text trunk in one pass, not batch by batch."""
    activation_cache.clear_memory()
    ds = _ds(site, tiny_base)
    model = build_model(tiny_base, "shallow-vlc")
    params = model.trainable_parameters()
    cpu = torch.device("cpu")
    runner = fast.FastEpochs(model, ds, tiny_base.tokenizer, TrainConfig(fast="on", batch_size=2), cpu,
                             fast.make_optimizer(params, 1e-3, 0.0, cpu), torch.amp.GradScaler("cpu", enabled=False),
                             params, torch.Generator().manual_seed(0), None)
    calls = []
    encode = runner.cache._encode_text
    runner.cache._encode_text = lambda todo: (calls.append(set(todo)), encode(todo))[1]
    before: set[str] = set()
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        calls.clear()
        drawn = {ds.prompt_for(i) for i in range(len(ds))}
        _, _, steps = runner.run_epoch(lambda it: it)
        assert steps > 1
        new = drawn - before
        # all of the epoch's new prompts in one pass (the site is small: one chunk), none batch by batch
        assert calls == ([new] if new else []), (epoch, calls, new)
        before |= drawn
    fast.restore_fp32(model)


def test_fit_lets_go_of_the_fast_epochs(tiny_base, site, monkeypatch):
    """The fast path's epochs hold captured graphs (GB of memory pools on a GPU), a compiled step and
    persistent loader workers; they are in reference cycles, so without FastEpochs.close they outlived
    fit until a full garbage collection (torch does not force one after graphs). Checked with the
    collector off: one FastEpochs object per fit left alive and its worker processes running."""
    import gc
    import multiprocessing
    import weakref

    made = []
    init = fast.FastEpochs.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    monkeypatch.setattr(fast.FastEpochs, "__init__", spy)
    resident_pixels.clear()
    monkeypatch.setenv("FEDVLSM_RESIDENT_PIXELS_GB", "0")  # epochs from the persistent loader
    model = build_model(tiny_base, "dense-vl")
    cfg = TrainConfig(epochs=2, batch_size=4, progress=False, fast="on", num_workers=1, select_best=False,
                      early_stop_patience=10**6)
    gc.collect()
    before = set(multiprocessing.active_children())
    gc.disable()
    try:
        res = fit(model, _ds(site, tiny_base), None, tiny_base.tokenizer, cfg)
        alive = [ref for ref in made if ref() is not None]
        workers = set(multiprocessing.active_children()) - before
    finally:
        gc.enable()
        fast.restore_fp32(model)
    assert res.path["fast"] is True and res.steps > 0  # it did train on the fast path, with workers
    assert len(made) == 1
    assert not alive
    assert not workers


def test_a_plain_fit_stays_plain_across_its_validations(site, monkeypatch):
    """On a device where the fast path is on, a training set it cannot take (a Subset) trains on the
    plain loop. fit's validation used to prepare the model for the fast path (bf16 frozen weights on
    a GPU), so every later plain epoch ran the fast forward on the cast weights. bf16 autocast is
    forced here on the CPU to show what a GPU does."""
    import importlib

    from common import config
    from common.bases import load_base

    # by module path: `common.evaluate` / `common.train` as attributes of the package are the functions
    evaluate_module, train_module = (importlib.import_module(f"common.{m}") for m in ("evaluate", "train"))

    base = load_base("arch:tiny")  # private: casts are in place on the base
    for module in (config, evaluate_module, train_module, fast):
        monkeypatch.setattr(module, "autocast_dtype", lambda amp, device: torch.bfloat16)
    seen = []
    plain_loss = train_module.batch_loss

    def spy(model, *args, **kwargs):
        seen.append((model.fast is None, model.clipseg.clip.vision_model.encoder.layers[0].mlp.fc1.weight.dtype))
        return plain_loss(model, *args, **kwargs)

    monkeypatch.setattr(train_module, "batch_loss", spy)
    model = build_model(base, "dense-vl")
    train = torch.utils.data.Subset(_ds(site, base), range(8))
    cfg = TrainConfig(epochs=3, batch_size=4, progress=False, fast="on", select_best=False,
                      early_stop_patience=10**6)
    res = fit(model, train, _ds(site, base, train=False), base.tokenizer, cfg)
    assert res.path == {"fast": False} and len(res.history) == 3 and len(seen) == 6
    assert seen == [(True, torch.float32)] * 6  # every plain step: stock forward, fp32 frozen weights
    assert model.clipseg.clip.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.float32


def test_cached_text_features_know_whether_they_hold_taps(tiny_base, site):
    """A shallow-v fit stores text features without the taps (its model collects none); a shallow-vl
    fit in the same process (a warm site worker serving another run) used to take them: its text
    adapters got no input and did not train, and a batch mixing such entries with new ones failed."""
    activation_cache.clear_memory()
    cfg = TrainConfig(epochs=1, batch_size=4, progress=False, fast="on", activation_cache="on",
                      select_best=False, early_stop_patience=10**6)
    model = build_model(tiny_base, "shallow-v")
    try:
        fit(model, _ds(site, tiny_base), None, tiny_base.tokenizer, cfg)
        torch.manual_seed(0)
        model = build_model(tiny_base, "shallow-vl")
        before = {n: t for n, t in model.adapter_state().items() if n.startswith("adapters.text.")}
        assert before
        fit(model, _ds(site, tiny_base), None, tiny_base.tokenizer, cfg)
        after = model.adapter_state()
        moved = max(float((after[n] - t).abs().max()) for n, t in before.items())
        assert moved > 0, "the text adapters did not train"
        # and a second epoch (new prompt draws beside cached ones) trains too
        fit(model, _ds(site, tiny_base), None, tiny_base.tokenizer, dataclasses.replace(cfg, epochs=2))
    finally:
        activation_cache.clear_memory()
        fast.restore_fp32(model)


def test_cached_activations_are_keyed_by_all_of_the_base(site, tmp_path):
    """Two bases that the adapters' old fingerprint (a few sampled slices) could not tell apart, as a
    fine-tuned checkpoint of the same architecture may be: the second used to read the first one's cached
    activations from disk and train on another base's features."""
    from common.bases import legacy_fingerprint, load_base

    base_a, base_b = load_base("arch:tiny"), load_base("arch:tiny")
    with torch.no_grad():  # outside every sampled slice
        base_b.model.clip.vision_model.encoder.layers[1].mlp.fc1.weight.mul_(1.5)
    assert legacy_fingerprint(base_a.model) == legacy_fingerprint(base_b.model)
    assert _cache_namespaces_after_training_on(site, tmp_path / "cache", base_a, base_b) == 2


def _cache_namespaces_after_training_on(site, cache, *bases) -> int:
    """One cached epoch of shallow-vlc on each base in turn; how many activation namespaces the disk cache holds."""
    cfg = TrainConfig(epochs=1, batch_size=4, progress=False, fast="on", activation_cache="on",
                      select_best=False, early_stop_patience=10**6)
    for base in bases:
        activation_cache.clear_memory()
        fit(build_model(base, "shallow-vlc"), _ds(site, base, cache), None, base.tokenizer, cfg)
    activation_cache.clear_memory()
    return len(list((cache / "activations").iterdir()))


def test_the_weights_digest_names_the_base_not_its_storage():
    from common.bases import load_base, weights_digest

    plain, cast = load_base("arch:tiny"), load_base("arch:tiny")
    fast.prepare_model(build_model(cast, "shallow-vlc"), torch.device("cpu"), torch.bfloat16)
    assert weights_digest(cast.model) == weights_digest(plain.model)  # read from the kept fp32 originals
    other = load_base("arch:tiny")
    with torch.no_grad():
        other.model.clip.text_model.encoder.layers[-1].mlp.fc2.bias.add_(1e-6)
    assert weights_digest(other.model) != weights_digest(plain.model)


def test_a_long_lived_process_keeps_compiling(tiny_base, site, monkeypatch):
    """Every fit compiles the same step function, so each new configuration a process meets (adapter
    variant, prompt bucket, base, dtype: a site worker serving several runs) is a recompile of it. The
    step used to compile twice in its first fit (normalize's constants, made during the first trace,
    failed Dynamo's guard on the second call), and once Dynamo's recompile limit (8 by default, 1
    here) was reached, a fit silently trained eagerly while its record said compiled."""
    import dataclasses as dc

    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    fast._NORM.clear()
    cfg = TrainConfig(epochs=1, batch_size=4, progress=False, fast="on", compile="default", select_best=False,
                      early_stop_patience=10**6)
    graphs = {}
    try:
        for variant in ("dense-vl", "dense-v"):
            before = counters["stats"]["unique_graphs"]
            model = build_model(tiny_base, variant)
            fit(model, _ds(site, tiny_base), None, tiny_base.tokenizer, dc.replace(cfg, seed=1))
            graphs[variant] = counters["stats"]["unique_graphs"] - before
            fast.restore_fp32(model)
    finally:
        torch._dynamo.reset()
    # one graph per prompt bucket the epoch meets (this site's prompts fall in two: 16 and 32 tokens)
    assert graphs == {"dense-vl": 2, "dense-v": 2}


def test_a_dropped_short_batch_is_still_made_resident(tiny_base, site):
    """Compiled steps drop an epoch's short last batch (static shapes); its items were never loaded, so
    the store stayed incomplete and every epoch went through the loader again."""
    resident_pixels.clear()
    ds = _ds(site, tiny_base)
    arrays, count = ds.arrays, [0]
    ds.arrays = lambda i: (count.__setitem__(0, count[0] + 1), arrays(i))[1]
    model = build_model(tiny_base, "dense-vl")
    cpu = torch.device("cpu")
    cfg = TrainConfig(batch_size=4, progress=False, fast="on", activation_cache="off")
    params = model.trainable_parameters()
    runner = fast.FastEpochs(model, ds, tiny_base.tokenizer, cfg, cpu, fast.make_optimizer(params, 1e-3, 0.0, cpu),
                             torch.amp.GradScaler("cpu", enabled=False), params, torch.Generator().manual_seed(0),
                             None)
    runner.drop_last = True  # as compile modes set it
    assert len(ds) % 4, "the test needs a short last batch"
    steps = [runner.run_epoch(lambda it: it)[2] for _ in range(3)]
    runner.close()
    fast.restore_fp32(model)
    assert steps == [len(ds) // 4] * 3
    assert count[0] == len(ds)  # every item read once, in epoch 1; epochs 2 and 3 from the store


def test_a_site_just_over_the_memory_budget_trains_without_the_cache(tiny_base, site, monkeypatch):
    # Without a cache folder, a site whose features do not fit the memory budget trains uncached.
    # The estimate left out each entry's mask: a site whose activations alone fitted, and not
    # with their masks, evicted its own entries while filling and failed ("item 2 vanished").
    activation_cache.clear_memory()
    ds = _ds(site, tiny_base)
    model = build_model(tiny_base, "shallow-vlc")
    vc = model.clipseg.config.vision_config
    acts = len(model.extract_layers) * ((model.image_size // vc.patch_size) ** 2 + 1) * vc.hidden_size * 4
    monkeypatch.setenv("FEDVLSM_ACTIVATION_CACHE_GB", str(acts * len(ds) / 2**30))
    cfg = TrainConfig(epochs=1, batch_size=4, progress=False, fast="on", select_best=False)
    try:
        assert fit(model, ds, None, tiny_base.tokenizer, cfg).steps == 5
        assert activation_cache._VISION.bytes == 0  # trained uncached
    finally:
        fast.restore_fp32(model)  # the session's shared base, as later tests expect it


def test_cached_activations_are_keyed_by_the_towers_config_too(site, tmp_path):
    """Same weights, another tower config (a base folder whose config.json sets another layer-norm eps):
    other activations. The namespace hashed the weights only, so the second base trained on the
    first one's cached features."""
    from common.bases import load_base, weights_digest

    base_a, base_b = load_base("arch:tiny"), load_base("arch:tiny")
    base_b.model.config.vision_config.layer_norm_eps = 0.5  # as from_pretrained builds it from such a config
    for m in base_b.model.clip.vision_model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 0.5
    assert weights_digest(base_a.model) == weights_digest(base_b.model)
    assert _cache_namespaces_after_training_on(site, tmp_path / "cache", base_a, base_b) == 2
    # where a config was loaded from is no part of it: the same base from another path shares the cache
    base_c = load_base("arch:tiny")
    base_c.model.config._name_or_path = "/elsewhere/clipseg"
    ns = [activation_cache.trunk_identity(build_model(b, "shallow-v")) for b in (base_a, base_c)]
    assert ns[0] == ns[1]


def test_activation_namespaces_differ_by_dtype_layers_and_size():
    """Entries computed in bf16, or from other tapped layers, or at another size, are other activations:
    a site that trained in bf16 on a GPU and then in fp32 must not read the bf16 entries (nor the reverse)."""
    ns = activation_cache.namespace
    same = ns("f" * 16, torch.float32, [3, 6, 9], 352)
    assert same == ns("f" * 16, torch.float32, [3, 6, 9], 352)
    others = [ns("f" * 16, torch.bfloat16, [3, 6, 9], 352), ns("f" * 16, torch.float16, [3, 6, 9], 352),
              ns("f" * 16, torch.float32, [3, 6], 352), ns("f" * 16, torch.float32, [3, 6, 9], 224),
              ns("e" * 16, torch.float32, [3, 6, 9], 352)]
    assert len({same, *others}) == 6
