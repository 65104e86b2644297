"""TrainConfig.compile='cuda-graph' (common/graphed_step.py): its bookkeeping, on the CPU.

CUDA graphs need a GPU, which the test machine lacks. What a CPU can check is
everything around the capture: a stand-in "graph" whose replay runs the step
on the static buffers (what a real replay computes), so a step that forgot
to copy a batch into them, a wrong warm-up count or outputs read at the
wrong time change the training and fail here. Whether capture itself works
on a card is bench/gpu.sh's `cuda-graph` part.
"""

import pytest
import torch

from common import fast, resident_pixels
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


@pytest.fixture(scope="module")
def ds(synth_sites, tiny_base):
    return SegDataset(load_items(synth_sites[0], "train"), tiny_base.image_size, train=True, seed=0)


def _runner(tiny_base, ds, variant, graphed: bool, warmup: int = 1):
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
        runner.graphed = ReplayOnCpu(runner.step, runner._update, runner.optimizer, warmup=warmup)
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
