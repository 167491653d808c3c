"""Two processes with gloo (DDP, and FSDP2) train like one process on the same global batch."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from ul_fast.config import config_from_dict
from ul_fast.data import BatchStream, load_dataset
from ul_fast.model import UnifiedLatents
from ul_fast.train import Trainer
from ul_fast.train.metrics_log import read_metrics
from ul_fast.train.parallel import full
from ul_fast.train.trainer import parameter_prefixes

from micro import MICRO

TRAIN = {"stage1_steps": 1, "stage2_steps": 0, "batch_size": 8, "checkpoint_every": 1, "log_every": 1,
         "eval_every": 1000, "seed": 3}
WORLD_SIZE = 2


def _config_dict(**train) -> dict:
    data = {k: dict(v) for k, v in MICRO.items()}
    data["train"].update(TRAIN, **train)
    return data


def _gradient_worker(rank: int, data: dict, run_dir: str, store: str, out: str) -> None:
    """One rank: a real Trainer takes one step; rank 0 saves the gradients handed to the optimiser (all-reduced
    over the ranks), the logged metrics and, under DDP with accumulation, the index of every gradient bucket
    all-reduced (through the default all-reduce, wrapped to count)."""
    torch.set_num_threads(1)  # as the one-process reference: the same kernels compute each rank's share
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    try:
        trainer = Trainer(config_from_dict(data), run_dir, rank, WORLD_SIZE)
        names = {id(p): n for n, p in trainer.model.named_parameters()}
        grads: dict[str, torch.Tensor] = {}

        def record(optimizer, args, kwargs):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    grads[names[id(p)]] = full(p.grad).detach().clone()  # a collective under FSDP

        trainer.optimizer.register_step_pre_hook(record)
        buckets: list[int] = []
        if trainer.ddp_model is not None and trainer.config.train.grad_accumulation > 1:
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def counted_allreduce(state, bucket):
                buckets.append(bucket.index())
                return allreduce_hook(state, bucket)

            trainer.ddp_model.register_comm_hook(None, counted_allreduce)
        trainer.train_step()
        metrics = trainer.step.window.read()
        if rank == 0:
            torch.save({"grads": grads, "metrics": metrics, "buckets": buckets}, out)
    finally:
        dist.destroy_process_group()


def _per_rank_shares(data: dict) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
    """One process, the same initial weights and global batches: the loss and gradient of every (micro-step,
    rank) share of the accumulated global batch, each rank's shares drawing from that rank's generator."""
    config = config_from_dict(data)
    t = config.train
    torch.manual_seed(t.seed)
    model = UnifiedLatents(config.model)
    trained = {n: p for n, p in model.named_parameters() if n.startswith(parameter_prefixes(
        model.trained_networks(1)))}
    m = config.model
    stream = BatchStream(load_dataset(config.data.dataset, "train", m.image_size, m.image_channels), t.batch_size,
                         t.seed)
    generators = [torch.Generator().manual_seed(t.seed * 1000 + r) for r in range(WORLD_SIZE)]
    share = t.batch_size // WORLD_SIZE
    losses, grads = [], {n: [] for n in trained}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(t.grad_accumulation):
            images, _ = stream.next_batch()
            for r in range(WORLD_SIZE):
                loss = model(images[r * share:(r + 1) * share], generator=generators[r], stage=1)["loss"]
                for n, g in zip(trained, torch.autograd.grad(loss, list(trained.values()))):
                    grads[n].append(g)
                losses.append(loss.detach())
    finally:
        torch.set_num_threads(threads)
    return losses, grads


def _mean_rounding_bound(shares: list[torch.Tensor]) -> torch.Tensor:
    """Bound on the difference of two fp32 evaluations of the mean of ``shares`` (k tensors) that add them in
    different orders (one process: autograd accumulates the shares; two processes: each rank sums its
    micro-steps, then the all-reduce sums the ranks). Each share is computed by the same operations on the
    same inputs in both (same shapes, one thread), so only this summation differs. Summing k terms in any
    order errs by at most (k − 1)·u·Σ|a_i| (u = eps/2, the unit roundoff; the scaling by 1/k, a power of
    two here, is exact), so two orders differ by at most (k − 1)·eps·Σ|a_i|, and their means by that / k.
    The factor 2 is slack for the rounding of the scaling on non-power-of-two paths."""
    k = len(shares)
    eps = torch.finfo(torch.float32).eps
    return 2 * (k - 1) * eps * torch.stack(shares).abs().sum(0) / k


@pytest.mark.slow
@pytest.mark.parametrize("parallel, grad_accumulation", [("ddp", 1), ("fsdp", 1), ("ddp", 2)])
def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path, parallel, grad_accumulation):
    """The gradients the optimiser gets (the all-reduced mean over ranks and micro-steps) equal the one-process
    gradient of the global batch up to the rounding of that mean. Gradients, not weights after a step: Adam's
    first step is ≈ lr·sign(g), which turns the rounding noise of a near-zero gradient into a full update.
    With accumulation, DDP all-reduces each gradient bucket once per step (``no_sync`` on the other
    micro-steps), and the gradients are unchanged."""
    # grad_clip far above the gradient norm: clipping multiplies by exactly 1, so the recorded gradients
    # are the all-reduced ones.
    data = _config_dict(parallel=parallel, grad_accumulation=grad_accumulation, grad_clip=1e9)
    out = tmp_path / "rank0.pt"
    mp.spawn(_gradient_worker, args=(data, str(tmp_path / "run"), str(tmp_path / "store"), str(out)),
             nprocs=WORLD_SIZE)
    got = torch.load(out)

    losses, shares = _per_rank_shares(data)
    assert got["metrics"]["loss"] == pytest.approx(float(torch.stack(losses).mean()),
                                                   abs=float(_mean_rounding_bound(losses)))
    assert sorted(got["grads"]) == sorted(shares)
    for name, parts in shares.items():
        expected = torch.stack(parts).mean(0)
        error = (got["grads"][name] - expected).abs()
        bound = _mean_rounding_bound(parts)
        assert bool((error <= bound).all()), (f"{name}: |Δ| up to {error.max():.3g} where the rounding of the "
                                              f"mean allows {bound.flatten()[error.argmax()]:.3g}")
    if parallel == "ddp" and grad_accumulation > 1:
        assert got["buckets"] and len(got["buckets"]) == len(set(got["buckets"])), got["buckets"]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ul_fast.cli",
            "train", *args]


@pytest.mark.slow
def test_killed_fsdp_run_resumes_exactly(tmp_path):
    """FSDP2 checkpoints hold full weights and optimiser state: a SIGKILLed 2-process run resumes onto the
    uninterrupted run's losses."""
    data = {k: dict(v) for k, v in MICRO.items()}
    data["train"].update(TRAIN, parallel="fsdp", stage1_steps=14, checkpoint_every=3)
    config_path = tmp_path / "micro.yaml"
    config_path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    reference = subprocess.run(_torchrun("--config", str(config_path), "--out", str(tmp_path / "reference")),
                               env=env, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    victim = subprocess.Popen(_torchrun("--config", str(config_path), "--out", str(tmp_path / "victim")), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = tmp_path / "victim" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert max(m["step"] for m in read_metrics(tmp_path / "victim")) < 14, "finished before it was killed"

    resumed = subprocess.run(_torchrun("--resume", str(tmp_path / "victim")), env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = [(m["step"], m["loss"]) for m in read_metrics(tmp_path / "reference")]
    got = [(m["step"], m["loss"]) for m in read_metrics(tmp_path / "victim")]
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=1e-6)
