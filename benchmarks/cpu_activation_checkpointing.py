"""What ``train.activation_checkpointing`` costs and saves on the CPU, per stage of the ``tiny`` preset (batch 64):
the bytes autograd keeps for one micro-batch's backward, and the step time (the trainer's real step, both
variants interleaved step by step in one process; the median of the per-step ratios).

Usage: OMP_NUM_THREADS=1 python benchmarks/cpu_activation_checkpointing.py [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ul_fast.config import load_config
from ul_fast.train import Trainer


def make_trainer(checkpointed: bool, stage: int, folder: Path) -> Trainer:
    """A tiny-preset trainer at the start of ``stage`` (stage 2: stage 1's fresh weights frozen), no evaluation."""
    config = load_config("tiny", ["train.batch_size=64", "train.eval_every=100000", "train.checkpoint_every=100000",
                                  "train.log_every=100000", "train.device=cpu",
                                  f"train.activation_checkpointing={str(checkpointed).lower()}"])
    trainer = Trainer(config, folder / f"stage{stage}-{checkpointed}")
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    if stage == 2:  # without the trainer's stage change, which evaluates
        trainer.stage, trainer.stage_step = 2, 0
        trainer._new_optimizer()
    return trainer


def saved_bytes(trainer: Trainer) -> int:
    """Bytes autograd keeps for the backward of one micro-batch's loss."""
    micro, sizes = trainer._micro_batch(), []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = trainer._loss(micro)["loss"]
    loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return sum(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant (default 8)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    for stage in (1, 2):
        trainers = {checkpointed: make_trainer(checkpointed, stage, folder) for checkpointed in (False, True)}
        saved = {checkpointed: saved_bytes(t) for checkpointed, t in trainers.items()}
        for trainer in trainers.values():  # warm-up: the optimiser's state
            trainer.train_step()
            trainer.train_step()
        seconds: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.steps):
            for checkpointed, trainer in trainers.items():
                start = time.perf_counter()
                trainer.train_step()
                seconds[checkpointed].append(time.perf_counter() - start)
        ratio = statistics.median(b / a for a, b in zip(seconds[False], seconds[True]))
        print(f"stage {stage}: saved MiB plain {saved[False] / 2**20:.1f}, checkpointed {saved[True] / 2**20:.1f} "
              f"({saved[True] / saved[False]:.2f}x); step ms plain {1e3 * statistics.median(seconds[False]):.0f}, "
              f"checkpointed {1e3 * statistics.median(seconds[True]):.0f}; time ratio {ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()
