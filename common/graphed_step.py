"""The whole fast training step (forward, loss, backward, clipping, AdamW) replayed as one CUDA graph.

Why: on a GPU the fast dense-vl step is host-bound. An H200 profile measured
116.6 ms of wall time per step against 28.7 ms of GPU kernels, 1,960 kernel
launches and 9,191 ATen operators per step (bench/results/h200-gpu_sh-run2-*);
Python and the dispatcher cannot launch faster than that. A CUDA graph
launches the whole recorded step at once. ``torch.compile(mode=
"reduce-overhead")`` is the usual way there, but on that card Inductor
failed on the decoder's transposed-convolution backward, so this is the
direct route (PyTorch's "whole network capture"): ``TrainConfig.compile =
"cuda-graph"``.

How (per input shape, i.e. per prompt bucket; the last short batch is dropped):

- the first ``warmup`` steps of a shape run eagerly on a side stream (they
  are real training steps; they initialise cuBLAS/cuDNN, the optimizer state
  and every cache the forward fills, so the capture only hits caches);
- then the step is captured once (with grads set to None first, so the
  backward allocates them in the graph's memory and each replay writes
  fresh ones) and replayed for that batch and every later one of the shape,
  its inputs copied into the graph's static buffers.

What the graph needs, and FastEpochs gives it: no host syncs in the step
(normalize's constants are made once per device), autocast without its
weight cache, AdamW fused and ``capturable`` with the learning rate as a
device tensor (``LrTensor``: a scheduler's change is written into it),
no GradScaler (bf16 or fp32: fp16's scaler checks for infs on the host).
Outputs (loss, Dice sum) are the graph's static tensors: read them before
the next call. Each shape's graph keeps its own memory pool (its
activations: some GB at batch 32 on the full-size model).

If a capture fails (an operator a card's library cannot record, say), that
shape trains eagerly from then on, with a warning that names the reason
(``failures``): the same maths, only without the replay's speed. Nothing ran
during the failed capture (capturing records kernels, it does not run them),
so no batch is lost or applied twice.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any, Callable

import torch

Inputs = tuple[Any, ...]  # tensors or lists of tensors


def _flat(args: Inputs) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for a in args:
        out.extend(a if isinstance(a, (list, tuple)) else [a])
    return out


def _shape_key(args: Inputs) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in _flat(args))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _clone_like(args: Inputs) -> Inputs:
    return tuple([t.clone() for t in a] if isinstance(a, (list, tuple)) else a.clone() for a in args)


class GraphedStep:
    """``step(*inputs) -> (loss, dice)`` + ``update(loss)``, captured whole and replayed per input shape."""

    def __init__(self, step: Callable[..., tuple[torch.Tensor, torch.Tensor]], update: Callable[[torch.Tensor], None],
                 optimizer: torch.optim.Optimizer, warmup: int = 3) -> None:
        self.step, self.update, self.optimizer, self.warmup = step, update, optimizer, warmup
        self.seen: Counter = Counter()
        self.graphs: dict[tuple, tuple[Any, Inputs, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.replays = 0
        self.failures: dict[tuple, str] = {}  # shape -> why its capture failed (it trains eagerly)
        self._side: Any = None

    def __call__(self, *inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        key = _shape_key(inputs)
        if key not in self.graphs:
            self.seen[key] += 1
            if self.seen[key] <= self.warmup or key in self.failures:
                return self._eager(inputs)
            static = _clone_like(inputs)
            try:
                graph, outputs = self._capture(static)
            except RuntimeError as exc:  # CUDA and cuDNN/cuBLAS errors are RuntimeErrors
                reason = _first_line(exc)
                if exc.__context__ is not None:  # capture_end's error hides the one inside the step
                    reason += f" (after {_first_line(exc.__context__)})"
                self.failures[key] = reason
                self._recover()
                warnings.warn(f"CUDA graph capture failed for input shapes {[s for s, _ in key]} ({reason}); "
                              "this shape trains eagerly (same results, host-bound speed)", stacklevel=2)
                return self._eager(inputs)
            self.graphs[key] = (graph, static, outputs)
        graph, static, outputs = self.graphs[key]
        for dst, src in zip(_flat(static), _flat(inputs)):
            dst.copy_(src, non_blocking=True)
        self._replay(graph)
        self.replays += 1
        return outputs

    # -- the CUDA parts (a CPU test swaps these for an eager stand-in)
    def _eager(self, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """A warm-up step, on a side stream as capture needs (lazy cuBLAS/cuDNN set-up off the main one)."""
        if self._side is None:
            self._side = torch.cuda.Stream()
        side = self._side
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loss, dice = self.step(*inputs)
            self.update(loss)
        torch.cuda.current_stream().wait_stream(side)
        return loss, dice

    def _capture(self, static: Inputs) -> tuple[Any, tuple[torch.Tensor, torch.Tensor]]:
        """Record (not run) one step on the static inputs: (graph, its static outputs)."""
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        # thread_local: the first epoch's loader pins batches in a thread of its own meanwhile
        # (cudaHostAlloc); "global" would fail the capture for it.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            loss, dice = self.step(*static)
            self.update(loss)
        return graph, (loss, dice)

    def _replay(self, graph: Any) -> None:
        graph.replay()

    def _recover(self) -> None:
        """After a failed capture: grads recorded into the dead graph's memory are dropped; the device
        is synchronised so that an error the capture left behind surfaces here, not later."""
        self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()


class LrTensor:
    """Each param group's learning rate as a device tensor a captured AdamW reads at every replay.

    Schedulers of recent PyTorch ``fill_`` a tensor learning rate; older ones
    assign a float, which a graph would never see: ``sync()`` (once per
    epoch) copies such a float into the tensor and puts the tensor back.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.optimizer = optimizer
        self.tensors = []
        for group in optimizer.param_groups:
            group["capturable"] = True
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
            self.tensors.append(group["lr"])

    def sync(self) -> None:
        for group, tensor in zip(self.optimizer.param_groups, self.tensors):
            if group["lr"] is not tensor:
                tensor.fill_(float(group["lr"]))
                group["lr"] = tensor
