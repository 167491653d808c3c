"""One optimiser step of a training stage that never reads the device: run eagerly, or replayed from a CUDA graph.

The step: for each micro-batch the stage's loss and its backward (gradients accumulate), gradient clipping,
AdamW, the EMA update and the running sums of the logged metrics. Every decision that depends on a value is
taken on the device:

* a non-finite loss or gradient norm skips the update: fused AdamW reads the flag ``found_inf`` on the device
  (its parameters and step counts stay as they were), and the EMA's weight is multiplied by the same flag;
* the metrics are summed into one device tensor (:class:`MetricWindow`), which the host reads once per log
  record, together with the count of skipped steps and the longest run of them.

So the host queues steps ahead of the GPU, and a whole step can be captured once into a CUDA graph and replayed
(``train.cuda_graph``): its inputs (the batch, the random draws of
:meth:`~ul_fast.model.UnifiedLatents.draw_loss_randomness`, the learning rate and the EMA weight) are device
tensors refilled in place before each replay, so a replay computes exactly what the eager step computes.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.utils._pytree import tree_leaves, tree_map

from ul_fast.model.draws import LossDraws
from ul_fast.sampling.cuda_graph import release_generator_from_failed_capture
from ul_fast.train.ema import EmaUpdater

__all__ = ["MetricWindow", "MicroBatch", "TrainStep"]


class MicroBatch(NamedTuple):
    """The inputs of one micro-step's loss, on the model's device."""

    images: torch.Tensor | None
    """``[b, C, H, W]`` in [−1, 1], or None when training from a latent cache."""
    z_clean: torch.Tensor | None
    """``[b, C_z, h, w]``: a latent cache's clean latents (stage 2), or None."""
    labels: torch.Tensor | None
    """int64 ``[b]`` class labels of a class-conditional model, or None."""
    context: torch.Tensor | None
    """``[b, T, E]`` caption token states of a text model, or None."""
    pooled: torch.Tensor | None
    """``[b, E]`` pooled caption embeddings of a text model, or None."""
    null_context: torch.Tensor | None
    """``[T, E]``: the null caption's token states that caption dropout puts in (None: zeros)."""
    null_pooled: torch.Tensor | None
    """``[E]``: the null caption's pooled embedding (None: zeros)."""
    draws: LossDraws
    """Every random number the loss uses (drawn before the step, from the trainer's generator)."""


class MetricWindow:
    """The sums of one log window's metrics, kept on the device so that the host reads them once per record.

    :attr:`totals` (float64) holds the sum of each metric over the window's applied steps, then the number of
    applied steps, the number of skipped steps, the current run of consecutive skipped steps (carried across
    windows) and the longest run seen in this window. The metric names are fixed by the first step.
    """

    EXTRA = ("applied_steps", "skipped_steps", "skipped_run", "longest_skipped_run")

    def __init__(self, device: torch.device):
        self.device = device
        self.names: tuple[str, ...] | None = None
        self.totals: torch.Tensor | None = None
        self._restored: dict[str, Any] | None = None

    def add(self, values: dict[str, torch.Tensor], applied: torch.Tensor) -> None:
        """Add one step's scalar ``values`` if ``applied`` (a bool device scalar), else count a skipped step."""
        if self.totals is None:
            self._start(tuple(values))
        n = len(self.names)
        stacked = torch.stack([values[name].detach().to(torch.float64) for name in self.names])
        applied = applied.to(torch.float64)
        skipped = 1.0 - applied
        counts = torch.stack([applied, skipped])
        # where(), not a product: a skipped step's values are NaN or inf, and 0·NaN is NaN
        self.totals[:n + 2] += torch.cat([torch.where(applied > 0, stacked, 0.0), counts])
        run = (self.totals[n + 2] + 1.0) * skipped
        self.totals[n + 2:].copy_(torch.stack([run, torch.maximum(self.totals[n + 3], run)]))

    def _start(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.totals = torch.zeros(len(names) + len(self.EXTRA), dtype=torch.float64, device=self.device)
        if self._restored is not None and tuple(self._restored["names"]) == names:
            self.totals.copy_(torch.tensor(self._restored["totals"], dtype=torch.float64))
        self._restored = None

    def read(self) -> dict[str, float]:
        """The window so far, with one read of the device: each metric's mean over the applied steps (absent
        when none was applied), ``applied_steps``, ``skipped_steps`` and ``longest_skipped_run``."""
        if self.totals is None:
            return {"applied_steps": 0, "skipped_steps": 0, "longest_skipped_run": 0}
        values = self.totals.tolist()
        n = len(self.names)
        applied = values[n]
        record = {name: value / applied for name, value in zip(self.names, values)} if applied else {}
        record.update(applied_steps=int(applied), skipped_steps=int(values[n + 1]),
                      longest_skipped_run=int(values[n + 3]))
        return record

    def reset(self) -> None:
        """Start a new window (the current run of skipped steps carries over)."""
        if self.totals is not None:
            n = len(self.names)
            self.totals[:n + 2].zero_()
            self.totals[n + 3].copy_(self.totals[n + 2])

    def state_dict(self) -> dict[str, Any]:
        """The open window (for a checkpoint, so that a resumed run logs the window an uninterrupted one does)."""
        if self.totals is None:
            return {"names": [], "totals": []}
        return {"names": list(self.names), "totals": self.totals.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the window of :meth:`state_dict`, from the first step on (the names are known by then)."""
        self.names, self.totals = None, None
        self._restored = state if state.get("names") else None


class TrainStep:
    """One optimiser step over a list of micro-batches: :meth:`__call__`.

    loss: ``MicroBatch → {"loss": scalar, other scalar metrics}``, the stage's loss (already under autocast);
    parameters: the trained parameters; optimizer: a fused AdamW over them (it reads ``found_inf``);
    ema: the EMA update of the trained networks; grad_clip: the maximum gradient norm (inf: none).
    gradient_sync(last): a context for each micro-step's backward (DDP's ``no_sync`` except on the last);
    reduce_metrics: the mean over ranks of the stacked metrics (a collective, no host read), or None;
    full_norm: the full value of a (sharded) gradient norm; cuda_graph: capture and replay the step on CUDA.
    """

    def __init__(self, loss: Callable[[MicroBatch], dict[str, torch.Tensor]], parameters: list[torch.nn.Parameter],
                 optimizer: torch.optim.Optimizer, ema: EmaUpdater, grad_clip: float, device: torch.device, *,
                 gradient_sync: Callable[[bool], contextlib.AbstractContextManager] | None = None,
                 reduce_metrics: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 full_norm: Callable[[torch.Tensor], torch.Tensor] = lambda norm: norm,
                 cuda_graph: bool = False, warmup_steps: int = 3):
        self.loss, self.parameters, self.optimizer, self.ema = loss, parameters, optimizer, ema
        self.grad_clip, self.device = grad_clip, device
        self.gradient_sync = gradient_sync or (lambda last: contextlib.nullcontext())
        self.reduce_metrics, self.full_norm = reduce_metrics, full_norm
        self.window = MetricWindow(device)
        # (1 − EMA decay) of the coming step, refilled on the host: a device tensor, so a graph reads it
        self.ema_weight = torch.zeros((), device=device)
        self.graphs = None
        if cuda_graph and device.type == "cuda":
            self.graphs = _StepGraphs(self._compute, lambda: optimizer.zero_grad(set_to_none=True), warmup_steps)

    def __call__(self, micro_batches: list[MicroBatch], ema_decay: float) -> None:
        """Run one step on ``micro_batches`` (their gradients accumulate; each loss is divided by their number)
        with EMA decay ``ema_decay``. Nothing is read back from the device."""
        self.ema_weight.fill_(1.0 - ema_decay)
        if self.graphs is None or not self.graphs.run(micro_batches):
            self._compute(micro_batches)
            self.optimizer.zero_grad(set_to_none=True)

    @property
    def graph_failure(self) -> str | None:
        """Why CUDA-graph capture failed (the step then runs eagerly), or None."""
        return None if self.graphs is None else self.graphs.failure

    def _compute(self, micro_batches: list[MicroBatch]) -> None:
        """Forward and backward of every micro-batch, clipping, the (masked) optimiser and EMA updates and the
        metric sums: the part a CUDA graph captures. Leaves the gradients in place."""
        count = len(micro_batches)
        names, totals = None, None
        for index, micro in enumerate(micro_batches):
            with self.gradient_sync(index == count - 1):
                out = self.loss(micro)
                (out["loss"] / count).backward()
            names = names or tuple(out)
            values = torch.stack([out[name].detach().float() for name in names]) / count
            totals = values if totals is None else totals + values
        if self.reduce_metrics is not None:  # the global batch's means, identical on every rank
            totals = self.reduce_metrics(totals)
        grad_norm = self.full_norm(torch.nn.utils.clip_grad_norm_(self.parameters, self.grad_clip, foreach=True))
        applied = torch.isfinite(totals[names.index("loss")]) & torch.isfinite(grad_norm)
        self.optimizer.found_inf = (~applied).float()  # fused AdamW: no update, step counts kept
        self.optimizer.step()
        self.ema(self.ema_weight * applied)
        self.window.add({**dict(zip(names, totals.unbind())), "grad_norm": grad_norm}, applied)


class _Captured(NamedTuple):
    graph: torch.cuda.CUDAGraph
    inputs: list[MicroBatch]  # static buffers, refilled before each replay


class _StepGraphs:
    """CUDA graphs of a step function, one per input signature (shapes and dtypes of the micro-batches).

    The first ``warmup_steps`` steps run eagerly on a side stream (the optimiser creates its state, cuBLAS its
    workspaces, compiled code its kernels: none of which may happen inside a capture); the next step is captured
    and replayed, and every later step replays. A failed capture warns once and leaves the step eager.
    """

    def __init__(self, step: Callable[[list[MicroBatch]], None], zero_grad: Callable[[], None], warmup_steps: int):
        self.step, self.zero_grad, self.warmup_steps = step, zero_grad, warmup_steps
        self.graphs: dict[tuple, _Captured] = {}
        self.eager_steps = 0
        self.failure: str | None = None
        self.pool = None

    def run(self, micro_batches: list[MicroBatch]) -> bool:
        """Run the step as a graph (True), or leave it to the caller to run eagerly (False)."""
        if self.failure is not None:
            return False
        key = _signature(micro_batches)
        captured = self.graphs.get(key)
        if captured is None:
            if self.eager_steps < self.warmup_steps:
                self._warm_up(micro_batches)
                return True
            captured = self._capture(micro_batches)
            if captured is None:
                return False
            self.graphs[key] = captured
        for static, value in zip(tree_leaves(captured.inputs), tree_leaves(micro_batches)):
            static.copy_(value, non_blocking=True)
        captured.graph.replay()
        return True

    def _warm_up(self, micro_batches: list[MicroBatch]) -> None:
        """An eager step on a side stream (as PyTorch's whole-network capture recipe requires)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step(micro_batches)
            self.zero_grad()
        torch.cuda.current_stream().wait_stream(side)
        self.eager_steps += 1

    def _capture(self, micro_batches: list[MicroBatch]) -> _Captured | None:
        inputs = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, micro_batches)
        device = next(t for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)).device
        self.zero_grad()  # the captured backward allocates the gradients: they then stay the graph's
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: DataLoader's pin-memory thread may use CUDA while the main thread captures
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self.step(inputs)
        except Exception as error:  # capture is an optimisation: fall back, say why once
            torch.cuda.synchronize(device)
            release_generator_from_failed_capture(device)
            self.zero_grad()  # whatever the capture allocated is not a gradient
            self.failure = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            warnings.warn(f"ul_fast: CUDA-graph capture of the training step failed ({self.failure}); training "
                          "continues eagerly", RuntimeWarning, stacklevel=4)
            return None
        graph.replay()  # the capture recorded this step without running it
        return _Captured(graph, inputs)


def _signature(micro_batches: list[MicroBatch]) -> tuple:
    """What a graph is specific to: the number of micro-batches and each tensor's shape, dtype and device (a
    None field stays None), and the autocast mode."""
    leaves = tuple(None if t is None else (tuple(t.shape), t.dtype, t.device)
                   for micro in micro_batches for t in _fields(micro))
    return (len(micro_batches), torch.is_autocast_enabled("cuda"), *leaves)


def _fields(micro: MicroBatch) -> list[torch.Tensor | None]:
    """Every tensor slot of a micro-batch in a fixed order, None where absent (for the signature)."""
    d = micro.draws
    terms = [t for term in (d.rate, d.decoder) for t in ((None, None) if term is None else term)]
    return [micro.images, micro.z_clean, micro.labels, micro.context, micro.pooled, micro.null_context,
            micro.null_pooled, d.latent_seed, d.latent_level, d.keep, *terms]
