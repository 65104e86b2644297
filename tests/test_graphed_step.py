"""TrainConfig.compile='cuda-graph' (common/graphed_step.py): its bookkeeping, on the CPU.

CUDA graphs need a GPU, which the test machine lacks. What a CPU can check is
everything around the capture: a stand-in "graph" whose replay runs the step
on the static buffers (what a real replay computes), so a step that forgot
to copy a batch into them, a wrong warm-up count or outputs read at the
wrong time change the training and fail here. Whether capture itself works
on a card is bench/gpu.sh's `cuda-graph` part.
"""

import copy
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common import fast, resident_pixels
from common.bases import Base
from common.config import TrainConfig
from common.data import SegDataset, load_items
from common.graphed_step import GraphedStep, LrTensor
from common.model import build_model


class ReplayOnCpu(GraphedStep):
    """Eager stand-in for the CUDA parts: 'capture' keeps the static inputs, 'replay' steps on them."""

    captures = 0

    def _eager(self, inputs):
        loss, dice = self.step(*inputs)
        self.update(loss)
        return loss, dice

    def _capture(self, static):
        self.captures += 1
        outputs = (torch.zeros(()), torch.zeros(()))

        def replay():
            loss, dice = self.step(*static)
            self.update(loss)
            outputs[0].copy_(loss.detach())
            outputs[1].copy_(dice)

        return replay, outputs

    def _replay(self, graph):
        graph()


class CaptureFails(ReplayOnCpu):
    """A card whose library cannot record the step: every capture raises, as torch.cuda.graph would."""

    def _capture(self, static):
        self.captures += 1
        try:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        finally:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    def _recover(self):
        self.optimizer.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def ds(synth_sites, tiny_base):
    return SegDataset(load_items(synth_sites[0], "train"), tiny_base.image_size, train=True, seed=0)


def _runner(tiny_base, ds, variant, graphed: bool, warmup: int = 1, stand_in=ReplayOnCpu):
    torch.manual_seed(0)
    model = build_model(tiny_base, variant)
    params = model.trainable_parameters()
    cpu = torch.device("cpu")
    # one prompt bucket: one batch shape, so most steps replay a graph captured on another batch
    cfg = TrainConfig(batch_size=4, progress=False, fast="on", prompt_buckets=(77,))
    runner = fast.FastEpochs(model, ds, tiny_base.tokenizer, cfg, cpu, fast.make_optimizer(params, 1e-3, 0.0, cpu),
                             torch.amp.GradScaler("cpu", enabled=False), params, torch.Generator().manual_seed(0), None)
    runner.drop_last = True  # as compile='cuda-graph' does: one batch shape per prompt bucket
    if graphed:
        runner.graphed = stand_in(runner.step, runner._update, runner.optimizer, warmup=warmup)
    return model, runner


@pytest.mark.parametrize("variant", ["dense-vl", "shallow-vlc"])
def test_replayed_steps_train_what_eager_steps_train(tiny_base, ds, variant):
    resident_pixels.clear()
    results = {}
    for graphed in (False, True):
        model, runner = _runner(tiny_base, ds, variant, graphed)
        losses = []
        for epoch in range(2):
            ds.set_epoch(epoch)
            loss, _, steps = runner.run_epoch(lambda it: it)
            losses.append(loss)
        results[graphed] = (losses, model.adapter_state(), runner)
        fast.restore_fp32(model)
    (eager_losses, eager_state, _), (losses, state, runner) = results[False], results[True]
    assert losses == pytest.approx(eager_losses, rel=1e-6)
    for name, tensor in eager_state.items():
        assert torch.allclose(state[name], tensor, rtol=0, atol=1e-6), name
    g = runner.graphed
    assert len(g.graphs) == 1 and g.captures == 1
    assert g.replays == 2 * (len(ds) // 4) - g.warmup >= 4  # every step after the warm-up one
    assert runner.describe() == {"fast": True, "compile": "off", "amp": None, "graphs": 1, "replays": g.replays,
                                 "capture_failures": []}


def test_failed_capture_trains_that_shape_eagerly(tiny_base, ds):
    """A capture that fails costs speed, not the run: a warning with the reason, then eager steps
    that train exactly what eager training does (no batch lost or applied twice), and no retry."""
    resident_pixels.clear()
    states = {}
    for stand_in in (None, CaptureFails):
        model, runner = _runner(tiny_base, ds, "dense-vl", stand_in is not None, stand_in=stand_in or ReplayOnCpu)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses = [runner.run_epoch(lambda it: it)[0] for _ in range(2)]
        states[stand_in] = (losses, model.adapter_state(), runner, caught)
        fast.restore_fp32(model)
    (eager_losses, eager_state, _, _), (losses, state, runner, caught) = states[None], states[CaptureFails]
    assert losses == pytest.approx(eager_losses, rel=1e-6)
    for name, tensor in eager_state.items():
        assert torch.equal(state[name], tensor), name
    g = runner.graphed
    assert g.captures == 1 and not g.graphs and g.replays == 0  # tried once for the one shape
    (reason,) = g.failures.values()
    assert "not permitted when stream is capturing" in reason and "previous error during capture" in reason
    messages = [str(w.message) for w in caught if "CUDA graph capture failed" in str(w.message)]
    assert len(messages) == 1 and "trains eagerly" in messages[0]
    described = runner.describe()  # what fit returns as FitResult.path and fedvlsm train records
    assert described["graphs"] == 0 and described["capture_failures"] == [reason]


def test_cuda_graph_needs_cuda(tiny_base, ds):
    model = build_model(tiny_base, "dense-vl")
    params = model.trainable_parameters()
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="cuda-graph.*CUDA"):
        fast.FastEpochs(model, ds, tiny_base.tokenizer, TrainConfig(fast="on", compile="cuda-graph"), cpu,
                        fast.make_optimizer(params, 1e-3, 0.0, cpu), torch.amp.GradScaler("cpu", enabled=False),
                        params, torch.Generator(), None)
    assert model.fast is None  # refused before the model was touched


def test_learning_rate_tensor_follows_the_scheduler():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    lr = LrTensor(opt, torch.device("cpu"))
    held = opt.param_groups[0]["lr"]
    assert isinstance(held, torch.Tensor) and opt.param_groups[0]["capturable"]
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=0)
    sched.step(1.0)
    sched.step(2.0)  # no improvement: halved
    lr.sync()
    assert opt.param_groups[0]["lr"] is held and float(held) == pytest.approx(5e-4)
    opt.param_groups[0]["lr"] = 1e-4  # what an older scheduler does: a float replaces the tensor
    lr.sync()
    assert opt.param_groups[0]["lr"] is held and float(held) == pytest.approx(1e-4)


# ---------------------------------------------------------------------------
# Capture safety: what a CUDA graph cannot hold, checked without a GPU.
#
# A captured step may not read device data on the host (.item(), bool(t),
# nonzero, ...: a sync, illegal while capturing) and may not bring host tensors
# in (torch.tensor(..., device=...) inside the step is a blocking copy that a
# replay would never repeat). On the "meta" device a tensor has no data at all:
# the first kind raises, and the second shows up as a CPU tensor entering an
# operator. So the real step (forward, loss, backward, clipping) runs on meta
# here. Not covered: the optimizer (AdamW has no meta kernels; the graphed step
# uses fused AdamW with capturable=True, PyTorch's graph-safe path, see
# LrTensor) and autocast (no meta backend; amp is off, which compile='cuda-graph'
# accepts): the bf16 forward is checked on the CPU below against the same list.

# Operators that make the host wait for (or read) device data.
HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "equal", "unique",
              "_unique", "_unique2", "unique_consecutive", "unique_dim", "masked_scatter", "repeat_interleave",
              "_assert_async", "bincount", "histc", "argwhere"}


class Audit(TorchDispatchMode):
    """Records operators that read device data on the host, tensors from another device, and tensors
    made from Python data (torch.tensor(..., device=...) copies below the dispatcher: patched)."""

    MAKERS = ("tensor", "as_tensor", "from_numpy")

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device, self.ops, self.host_reads, self.foreign, self.made = device, 0, [], [], []

    def __enter__(self):
        self._saved = {name: getattr(torch, name) for name in self.MAKERS}
        for name, maker in self._saved.items():
            setattr(torch, name, self._recording(name, maker))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, maker in self._saved.items():
            setattr(torch, name, maker)
        return super().__exit__(*exc)

    def _recording(self, name, maker):
        def make(*args, **kwargs):
            self.made.append(name)
            return maker(*args, **kwargs)
        return make

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        name = func.overloadpacket.__name__
        if name in HOST_READS:
            self.host_reads.append(name)
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        if any(isinstance(t, torch.Tensor) and t.device != self.device for t in leaves):
            self.foreign.append((name, [tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor)]))
        return func(*args, **kwargs)


class NoData:
    """A dataset stand-in: FastEpochs needs a length only when nothing is loaded."""

    def __len__(self) -> int:
        return 8


def _meta_runner(tiny_base, variant):
    """A FastEpochs on a private copy of the tiny base, moved to meta (the shared base stays put)."""
    meta = torch.device("meta")
    base = Base(copy.deepcopy(tiny_base.model), tiny_base.tokenizer, tiny_base.base_id, tiny_base.image_size)
    model = build_model(base, variant).to(meta)
    params = model.trainable_parameters()
    assert params and all(p.device == meta for p in params)  # the index follows .to() (new Parameters on meta)
    opt = torch.optim.AdamW(params, lr=1e-3)
    opt.step = lambda *a, **k: None  # no meta kernels (see above)
    cfg = TrainConfig(batch_size=4, progress=False, fast="on", amp="off", prompt_buckets=(16,),
                      activation_cache="off")
    runner = fast.FastEpochs(model, NoData(), base.tokenizer, cfg, meta, opt,
                             torch.amp.GradScaler("cpu", enabled=False), params, torch.Generator(), None)
    runner.device = torch.device("cpu")  # only names autocast's backend; autocast is off (meta has none)
    s = base.image_size
    images = torch.empty(4, s, s, 3, dtype=torch.uint8, device=meta)
    masks = torch.empty(4, s, s, dtype=torch.uint8, device=meta)
    ids = runner.tokens(["a round polyp", "polyp", "a small round polyp in the colon", "x"]).to(meta)
    return model, runner, params, (images, masks, ids)


def _audited_step(runner, inputs, cached: bool) -> Audit:
    """One warm-up step (as GraphedStep runs before capturing: it fills the caches), then one audited."""
    step = runner._step_cached if cached else runner.step
    runner._update(step(*inputs)[0])
    with Audit(torch.device("meta")) as audit:
        loss, _ = step(*inputs)
        runner._update(loss)
    return audit


@pytest.mark.parametrize("variant", ["dense-vl", "dense-v", "shallow-vlc", "full"])
def test_training_step_needs_no_host_data(tiny_base, variant):
    _, runner, params, inputs = _meta_runner(tiny_base, variant)
    audit = _audited_step(runner, inputs, cached=False)
    assert audit.ops > 100  # the step really ran under the audit
    assert audit.host_reads == [], audit.host_reads
    assert audit.foreign == [], audit.foreign[:5]
    assert audit.made == [], audit.made
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and all(g.device == torch.device("meta") for g in grads)
    # Backward reached every adapter. The full baseline's last vision layers feed nothing (model.py).
    assert len(grads) == len(params) or variant == "full"


def test_cached_shallow_step_needs_no_host_data(tiny_base):
    model, runner, params, (images, masks, ids) = _meta_runner(tiny_base, "shallow-vlc")
    with torch.no_grad():  # what the activation cache hands the step: frozen trunk outputs
        acts = model.vision_trunk(fast.normalize(images))
        cond, taps = model.text_trunk(ids, None)
    audit = _audited_step(runner, (acts, cond, taps, masks), cached=True)
    assert audit.ops > 100
    assert audit.host_reads == [], audit.host_reads
    assert audit.foreign == [], audit.foreign[:5]
    assert audit.made == [], audit.made
    assert all(p.grad is not None and p.grad.device == torch.device("meta") for p in params)  # every adapter


def _frozen_casts(runner, model, inputs) -> tuple[Audit, int]:
    """Audit one step (after a warm-up); also count casts of the frozen base's weights in it."""
    runner._update(runner.step(*inputs)[0])  # warm-up, as before a capture
    # Taken after the warm-up: its first forward fuses the decoder's q/k/v (their old storage is
    # freed, and an activation may be allocated at a freed weight's address: a false cast once).
    # The storages are held, so no address in the set can be reused during the audit.
    storages = [p.untyped_storage() for p in model.clipseg.parameters() if not p.requires_grad]
    frozen = {s.data_ptr() for s in storages} - {0}  # 0: an empty storage's, shared by all of them
    casts = []

    class Casts(Audit):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if (func.overloadpacket.__name__ == "_to_copy" and args
                    and args[0].untyped_storage().data_ptr() in frozen):
                casts.append(tuple(args[0].shape))
            return super().__torch_dispatch__(func, types, args, kwargs)

    with Casts(torch.device("cpu")) as audit:
        loss, _ = runner.step(*inputs)
        runner._update(loss)
    return audit, len(casts)


def test_bf16_step_reads_no_device_data_and_casts_no_frozen_weight(tiny_base, ds):
    """The bf16 fast step (frozen weights in bf16 once, one cast for q/k/v) under CPU autocast, with
    autocast's cast cache off as in a captured step: no operator reads data on the host, and no
    frozen weight is cast in the step (autocast re-cast every fp32 one at every forward: ~318 casts
    per step on the full-size model). Checked to count them when the weights are left in fp32."""
    base = Base(copy.deepcopy(tiny_base.model), tiny_base.tokenizer, tiny_base.base_id, tiny_base.image_size)
    model = build_model(base, "dense-vl")
    params = model.trainable_parameters()
    cpu = torch.device("cpu")
    opt = torch.optim.AdamW(params, lr=1e-3)
    opt.step = lambda *a, **k: None  # CPU AdamW reads its step count on the host; the graph's is fused+capturable
    cfg = TrainConfig(batch_size=4, progress=False, fast="on", prompt_buckets=(16,), activation_cache="off")
    runner = fast.FastEpochs(model, NoData(), base.tokenizer, cfg, cpu, opt,
                             torch.amp.GradScaler("cpu", enabled=False), params, torch.Generator(), None)
    runner.amp, runner._autocast_cache = torch.bfloat16, False  # what FastEpochs does on CUDA with bf16 graphs
    s = base.image_size
    inputs = (torch.randint(0, 256, (4, s, s, 3), dtype=torch.uint8), torch.randint(0, 2, (4, s, s), dtype=torch.uint8),
              runner.tokens(["a round polyp"] * 4))

    model.fast = fast.FastForward(torch.bfloat16)  # the fast forward over fp32 frozen weights: autocast casts them
    _, fp32_casts = _frozen_casts(runner, model, inputs)
    assert fp32_casts > 20

    fast.prepare_model(model, cpu, torch.bfloat16)  # the fast path: frozen weights cast once, here
    audit, casts = _frozen_casts(runner, model, inputs)
    assert audit.ops > 100 and audit.host_reads == [], audit.host_reads
    assert audit.made == [], audit.made
    assert casts == 0
    assert any(p.dtype == torch.bfloat16 for p in model.clipseg.parameters())  # the bf16 path really ran


def test_validation_between_epochs_keeps_what_a_captured_step_reads(tiny_base, ds, synth_sites, monkeypatch):
    """A captured step reads tensors by address, among them, outside the graph's own memory, the fast
    forward's cached position table. fit validates after each epoch, and evaluate prepares the model for
    the fast path again: it used to make a new FastForward, dropping the table, so a later replay would
    read freed memory (garbage once reused). The steps of every epoch must see the same object and table."""
    from common.train import fit

    seen = []
    train_step = fast.FastEpochs.train_step

    def spy(self, *args):
        out = train_step(self, *args)
        seen.append((self.model.fast, tuple(t.data_ptr() for t in self.model.fast._pos.values())))
        return out

    monkeypatch.setattr(fast.FastEpochs, "train_step", spy)
    model = build_model(tiny_base, "dense-vl")
    val = SegDataset(load_items(synth_sites[0], "val"), tiny_base.image_size, train=False)
    cfg = TrainConfig(epochs=3, batch_size=8, progress=False, fast="on", prompt_buckets=(77,))
    result = fit(model, ds, val, tiny_base.tokenizer, cfg)
    assert len(result.history) == 3 and all("val_dice" in r for r in result.history)
    assert len(seen) >= 6 and len({id(f) for f, _ in seen}) == 1 and len({p for _, p in seen}) == 1, \
        [(id(f), p) for f, p in seen]
    fast.restore_fp32(model)


def test_a_replaced_fast_state_stops_graphed_training(tiny_base, ds):
    """If the fast-path state is replaced anyway (restore_fp32, a prepare with another dtype), the
    graphs' tensors are gone: training with them stops with the reason instead of replaying garbage."""
    resident_pixels.clear()
    own = Base(copy.deepcopy(tiny_base.model), tiny_base.tokenizer, tiny_base.base_id, tiny_base.image_size)
    model, runner = _runner(own, ds, "dense-vl", graphed=True)  # a private base: the bf16 cast is in place
    runner.run_epoch(lambda it: it)
    state = model.fast
    fast.prepare_model(model, torch.device("cpu"), None)  # as evaluate does: the same dtype keeps it
    assert model.fast is state
    runner.run_epoch(lambda it: it)
    fast.prepare_model(model, torch.device("cpu"), torch.bfloat16)
    assert model.fast is not state and model.fast.dtype == torch.bfloat16
    bf16 = model.fast
    fast.prepare_model(model, torch.device("cpu"), torch.bfloat16)
    assert model.fast is bf16
    with pytest.raises(RuntimeError, match="fast-path state was replaced"):
        runner.run_epoch(lambda it: it)
