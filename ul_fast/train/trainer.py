"""The training loop: stage 1 (encoder + prior + decoder), then stage 2 (base model on frozen latents).

One ``Trainer`` owns the model, its EMA copy, the optimiser and LR schedule of the current stage, the
data stream and the training generator; all of it is checkpointed, so ``--resume`` continues a killed
run exactly where its last checkpoint left it.

While :meth:`Trainer.fit` runs, rank 0 holds an exclusive lock on the run folder, and SIGINT/SIGTERM stop the
run cleanly: the current step finishes, a checkpoint is written and :class:`TrainingInterrupted` is raised
(every rank stops at the same step); a second signal aborts at once.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ul_fast.config import Config, ConfigError, config_from_dict, save_config
from ul_fast.data import (
    BatchStream,
    CaptionBatch,
    Conditioning,
    ImageArrayDataset,
    ImageTransform,
    LatentCache,
    StreamingBatches,
    load_dataset,
    load_images,
    spec_kind,
)
from ul_fast.data.conditioning import NULL_KEYS
from ul_fast.data.latent_cache import check_cache_for_model
from ul_fast.devices import resolve_device
from ul_fast.eval import psnr, save_grid, side_by_side
from ul_fast.model import UnifiedLatents
from ul_fast.nets import set_activation_checkpointing
from ul_fast.train.checkpoint import (
    CheckpointError,
    NonFiniteWeightsError,
    clean_staging,
    load_state,
    newest_readable_checkpoint,
    read_weights,
    save_checkpoint,
)
from ul_fast.train.ema import EmaUpdater, copy_weights, ema_decay_at, make_ema_model
from ul_fast.train.flops import FlopsMeter
from ul_fast.train.metrics_log import MetricsLog
from ul_fast.train.parallel import (
    full,
    gather_optimizer,
    gather_weights,
    load_optimizer,
    load_weights,
    shard_networks,
)
from ul_fast.train.preflight import check_device, check_latent_training, check_run_inputs
from ul_fast.train.resume_policy import check_resume_changes, config_changes
from ul_fast.train.run_folder import RunFolderError, RunLock, check_new_run, clear_run
from ul_fast.train.step import MicroBatch, TrainStep

# Keys whose change on resume alters the learning rate or weight decay of the restored optimiser.
OPTIMIZER_KEYS = ("train.lr", "train.base_lr", "train.warmup_steps", "train.weight_decay", "train.stage1_steps",
                  "train.stage2_steps")
# Held-out images of a streaming data set kept in memory for evaluation (evaluate() reads up to 1,024).
HELDOUT_IMAGES = 1024
# RUN/<DATA_CACHE>: the file index of a read-only image folder (folder-stream:), rebuilt when missing.
DATA_CACHE = "data-cache"
# A repeat of the stop signal this soon after the first is the same request delivered twice (a terminal's
# Ctrl-C reaches torchrun's workers directly and again through torchrun), not a second Ctrl-C.
REPEAT_GRACE_S = 1.0


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses, or a whole stage of them."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the run after a step; a checkpoint of that step was written."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class TrainingAborted(KeyboardInterrupt):
    """A second SIGINT/SIGTERM aborted the run at once, without a checkpoint."""

    def __init__(self, signum: int):
        super().__init__(f"aborted by a second {signal.Signals(signum).name}: nothing saved since the last "
                         "checkpoint")
        self.signum = signum


def parameter_prefixes(networks: tuple[str, ...]) -> tuple[str, ...]:
    """Parameter-name prefixes of the named networks: ``("encoder", "prior")`` → ``("encoder.", "prior.")``."""
    return tuple(f"{name}." for name in networks)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at ``total`` (``step`` counts from 0)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """Trains a :class:`UnifiedLatents` model as described by a :class:`Config` into ``run_dir``."""

    def __init__(self, config: Config, run_dir: str | Path, rank: int = 0, world_size: int = 1):
        self.config = config
        self.run_dir = Path(run_dir)
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        t = config.train
        check_device(t.device)  # before anything is moved there
        self.device = resolve_device(t.device)
        if t.cuda_graph and world_size > 1:
            raise ConfigError("train.cuda_graph captures the step of one process: set it false under torchrun")
        if t.cuda_graph and self.device.type != "cuda":
            warnings.warn(f"train.cuda_graph needs a CUDA device: on {self.device.type} the step runs eagerly",
                          UserWarning, stacklevel=2)
        self.autocast_dtype = torch.bfloat16 if (t.precision == "bf16" or (
            t.precision == "auto" and self.device.type == "cuda")) else None
        torch.manual_seed(t.seed)
        self.model = UnifiedLatents(config.model).to(self.device)
        if t.init_from:  # e.g. stage 2 alone, from a finished stage-1 run
            _, weights = newest_readable_checkpoint(
                t.init_from, lambda folder: read_weights(self.model, folder / "ema.safetensors"))
            self.model.load_state_dict(weights)
        self.from_latents = spec_kind(config.data.dataset) == "latents"  # stage 2 from a latent cache
        self.train_data, self.test_data = self._load_data()
        if self.from_latents:  # the latents must come from this encoder: checked before FSDP shards its weights
            for cache in (self.train_data, self.test_data):
                check_cache_for_model(cache, self.model)
        self.ema_model = make_ema_model(self.model)
        # after the EMA copy: it never computes gradients, so it has nothing to recompute
        set_activation_checkpointing(self.model, t.activation_checkpointing)
        self.ddp_model: torch.nn.parallel.DistributedDataParallel | None = None
        # FSDP2: model and EMA sharded alike, so EMA updates are shard-local; evaluation then runs on
        # every rank (a sharded forward is a collective) and checkpoints gather full weights.
        self.sharded = world_size > 1 and t.parallel == "fsdp"
        if self.sharded:
            shard_networks(self.model, world_size, self.device.type)
            shard_networks(self.ema_model, world_size, self.device.type)
        if t.compile:  # the whole loss, networks and ops, as one graph per stage (after the EMA copy is made)
            self.model.compile(fullgraph=True)
        check_run_inputs(config, self.train_data, self.test_data)
        self.stream = self._batch_stream()
        # Per-rank generators, saved with the checkpoint: times, noise seeds and label dropout here, the
        # caption drawn per label (text models) in the conditioning's own CPU generator.
        self.generator = torch.Generator(self.device).manual_seed(t.seed * 1000 + rank)
        self.conditioning = Conditioning(config.model, self.device, self.train_data, self.run_dir / "text-cache",
                                         seed=t.seed * 1000 + rank + 500)
        self.stage, self.stage_step = 1, 0
        self._bad_images_logged = 0
        # Skipped (non-finite) steps before the open metric window, and steps applied in this stage before it:
        # the open window's own counts live on the device (TrainStep.window) and are read once per record.
        self.skipped_steps = 0
        self.stage_applied_steps = 0
        self.window_elapsed_s = 0.0  # wall time of the open window before this process (set on resume)
        self._window_start = time.perf_counter()
        self.flops = FlopsMeter(config, self.device, self.from_latents)
        self.frozen_bits_per_pixel: float | None = None
        self.log = MetricsLog(self.run_dir, enabled=self.is_main)
        self._stop_signal: int | None = None
        self._new_optimizer()
        # Reconstructions need pixels: none in a latent cache (stage 2 from latents never reconstructs).
        self.eval_images = None if self.from_latents else \
            self.test_data.images[:min(t.eval_images, len(self.test_data))].to(self.device)

    # ----------------------------------------------------------------------------- data
    def _load_data(self) -> tuple[ImageArrayDataset | Any, ImageArrayDataset | LatentCache]:
        """``(train, test)``: in memory; or for a streaming image spec the training source and, in memory, its
        first :data:`HELDOUT_IMAGES` test images (center crop, no flip) for evaluation; or both splits of a
        latent cache (stage 2 only)."""
        d, m = self.config.data, self.config.model
        captions = d.caption_policy if m.context_dim else None  # a text model needs every training image's caption
        if self.from_latents:
            check_latent_training(self.config)
            return load_dataset(d.dataset, "train", caption_policy=captions), load_dataset(d.dataset, "test")
        cache_dir = self.run_dir / DATA_CACHE  # where a read-only image folder's file index is kept
        train = load_dataset(d.dataset, "train", m.image_size, m.image_channels, cache_dir=cache_dir,
                             caption_policy=captions)
        test = load_images(d.dataset, "test", m.image_size, m.image_channels, stream_limit=HELDOUT_IMAGES,
                           cache_dir=cache_dir, on_bad_image=d.on_bad_image)
        return train, test

    def _batch_stream(self) -> BatchStream | StreamingBatches:
        """The training batches: gathered from memory, or decoded and augmented in DataLoader workers."""
        d, m, t = self.config.data, self.config.model, self.config.train
        if isinstance(self.train_data, ImageArrayDataset):
            return BatchStream(self.train_data, t.batch_size, t.seed, self.rank, self.world_size)
        transform = None if self.from_latents else ImageTransform(m.image_size, m.image_channels, d.crop, d.flip)
        return StreamingBatches(self.train_data, transform, t.batch_size, t.seed, self.rank, self.world_size,
                                num_workers=d.num_workers, prefetch_factor=d.prefetch_factor, device=self.device,
                                on_bad_image=d.on_bad_image)

    def _bad_images_since_last_log(self) -> int:
        """Undecodable images the streaming loader skipped since the last log record, summed over the ranks."""
        count = self.stream.bad_images - self._bad_images_logged
        self._bad_images_logged = self.stream.bad_images
        if self.world_size == 1:
            return count
        value = torch.tensor([count], device=self.device)
        torch.distributed.all_reduce(value)
        return int(value.item())

    # ----------------------------------------------------------------------------- set-up per stage
    @property
    def stage_steps(self) -> int:
        t = self.config.train
        return t.stage1_steps if self.stage == 1 else t.stage2_steps

    @property
    def stage_networks(self) -> tuple[str, ...]:
        """Parameter-name prefixes of the networks the current stage trains."""
        return parameter_prefixes(self.model.trained_networks(self.stage))

    @property
    def uses_base(self) -> bool:
        return self.stage == 2 or self.model.single_stage

    def _stage_parameters(self) -> list[torch.nn.Parameter]:
        return [p for name, p in self.model.named_parameters() if name.startswith(self.stage_networks)]

    def _new_optimizer(self) -> None:
        """The current stage's optimiser, LR schedule and :class:`TrainStep`.

        Fused AdamW on every device: it skips a step whose ``found_inf`` flag is set on the device, so a
        non-finite loss needs no read of the device. With ``train.cuda_graph`` its learning rate is a device
        tensor (the scheduler refills it in place) and it is capturable."""
        t = self.config.train
        for name, p in self.model.named_parameters():
            p.requires_grad_(name.startswith(self.stage_networks))
        lr = t.lr if self.stage == 1 else t.base_lr
        graphed = self.uses_cuda_graph
        self.optimizer = torch.optim.AdamW(self._stage_parameters(),
                                           lr=torch.tensor(lr, device=self.device) if graphed else lr,
                                           weight_decay=t.weight_decay, betas=(0.9, 0.99), fused=True,
                                           capturable=graphed)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, t.warmup_steps, self.stage_steps))
        if self.world_size > 1 and not self.sharded:
            # Wrapped per stage, after requires_grad is set, so DDP syncs exactly the trained networks.
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.model.train()
        self.step = TrainStep(lambda micro: self._loss(micro), self._stage_parameters(), self.optimizer,
                              EmaUpdater(self.ema_model, self.model, self.stage_networks), t.grad_clip, self.device,
                              gradient_sync=self._gradient_sync,
                              reduce_metrics=self._mean_over_ranks if self.world_size > 1 else None,
                              full_norm=full, cuda_graph=graphed)

    @property
    def uses_cuda_graph(self) -> bool:
        """``train.cuda_graph`` on a CUDA device (one process: preflight refuses it under torchrun)."""
        return self.config.train.cuda_graph and self.device.type == "cuda"

    def _mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """The mean of ``values`` over the ranks (an all-reduce; nothing is read on the host)."""
        values = values.clone()
        torch.distributed.all_reduce(values)
        return values / self.world_size

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # a CUDA graph must not keep autocast's cache of cast weights (made, then freed, inside the capture)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=not self.uses_cuda_graph)

    # ----------------------------------------------------------------------------- checkpoints
    @property
    def global_step(self) -> int:
        return self.stage_step + (self.config.train.stage1_steps if self.stage == 2 else 0)

    def _rng_states(self) -> list[dict[str, Any]]:
        """Every rank's generator states (each rank draws its own times, noise and dropout)."""
        state = {"generator": self.generator.get_state(),
                 "caption_generator": self.conditioning.generator.get_state(),
                 "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        if self.world_size == 1:
            return [state]
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, state)
        return gathered

    def training_state(self) -> dict[str, Any]:
        return {
            "stage": self.stage, "stage_step": self.stage_step,
            "optimizer": gather_optimizer(self.model, self.optimizer, self.sharded),
            "scheduler": self.scheduler.state_dict(), "stream": self.stream.state_dict(),
            "rng": self._rng_states(), "world_size": self.world_size,
            "skipped_steps": self.skipped_steps, "stage_applied_steps": self.stage_applied_steps,
            "window": {**self.step.window.state_dict(), "elapsed_s": self.window_elapsed_s + self._window_clock()},
            "frozen_bits_per_pixel": self.frozen_bits_per_pixel, "config": self.config.to_dict(),
        }

    def save(self) -> None:
        """Checkpoint (a collective under DDP/FSDP: every rank calls it, rank 0 writes).

        Weights that are no longer finite (an update diverged although its loss and gradient were finite, e.g. a
        learning rate far too high) are never written: the run stops with :class:`TrainingDiverged`, every rank
        alike, and the newest checkpoint stays the newest."""
        state = self.training_state()
        weights = gather_weights(self.model, self.sharded)
        ema_weights = gather_weights(self.ema_model, self.sharded)
        error: NonFiniteWeightsError | None = None
        if self.is_main:
            try:
                save_checkpoint(self.run_dir, self.global_step, weights, ema_weights, state,
                                self.config.train.keep_last)
            except NonFiniteWeightsError as caught:
                error = caught
        if self._any_rank(int(error is not None)):
            raise TrainingDiverged(f"the weights are no longer finite at step {self.global_step} ({error or 'rank 0'}):"
                                   " training diverged; nothing was written and the newest checkpoint is untouched; "
                                   "resume it with a lower train.lr (or base_lr)")

    def _read_checkpoint(self, folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(training state, weights, EMA weights) of a checkpoint folder, each validated."""
        return (load_state(folder), read_weights(self.model, folder / "model.safetensors"),
                read_weights(self.ema_model, folder / "ema.safetensors"))

    def resume(self) -> None:
        """Restore weights, EMA, optimiser, LR schedule, data position and RNG states from the newest checkpoint
        that reads back intact; apply the config changes a resume allows (refusing the others)."""
        folder, (state, weights, ema_weights) = newest_readable_checkpoint(self.run_dir, self._read_checkpoint,
                                                                           repair=self.is_main)
        if "distill" in state:  # written by ul-fast distill: no trainer state to continue from
            raise CheckpointError(f"{folder} is a distillation checkpoint: continue it with `ul-fast distill "
                                  f"--resume`, or sample and evaluate it as it is")
        if state["world_size"] != self.world_size:
            raise CheckpointError(f"{folder} was written by {state['world_size']} processes; resume it with the "
                                  f"same number (got {self.world_size}) to continue exactly")
        changes = config_changes(config_from_dict(state["config"]).to_dict(), self.config.to_dict())
        check_resume_changes(changes, state["stage"])
        if self.from_latents:  # the checkpoint's (frozen) encoder must be the cache's
            check_cache_for_model(self.train_data, self.model, weights=weights)
        load_weights(self.model, weights, self.sharded)
        load_weights(self.ema_model, ema_weights, self.sharded)
        self.stage = state["stage"]
        self._new_optimizer()
        self.stage_step = state["stage_step"]
        load_optimizer(self.model, self.optimizer, state["optimizer"], self.sharded)
        self.scheduler.load_state_dict(state["scheduler"])
        if any(key in changes for key in OPTIMIZER_KEYS):
            self._apply_optimizer_settings()
        self.stream.load_state_dict(state["stream"])
        rng = state["rng"][self.rank]
        self.generator.set_state(rng["generator"])
        self.conditioning.generator.set_state(rng["caption_generator"])
        torch.set_rng_state(rng["torch_rng"])
        if rng["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda_rng"])
        self.skipped_steps = state["skipped_steps"]
        # the open log window: a resumed run logs the record an uninterrupted one does (older checkpoints: none)
        window = state.get("window", {"names": [], "totals": [], "elapsed_s": 0.0})
        self.step.window.load_state_dict(window)
        self.window_elapsed_s = window["elapsed_s"]
        self.stage_applied_steps = state.get("stage_applied_steps", 0)
        self.frozen_bits_per_pixel = state["frozen_bits_per_pixel"]
        self.log.truncate_after(self.global_step)
        if changes and self.is_main:  # recorded where they take effect: config.yaml and the metrics
            self._write_config()
            self.log.write({"step": self.global_step, "event": "config_change", "changes": changes})

    def _apply_optimizer_settings(self) -> None:
        """Give the restored optimiser the config's LR, warm-up, stage length and weight decay (its saved
        state would otherwise keep the old ones): the LR of the next step is what the schedule gives now."""
        t = self.config.train
        lr = t.lr if self.stage == 1 else t.base_lr
        step = self.scheduler.last_epoch
        for group in self.optimizer.param_groups:
            group.update(initial_lr=lr, weight_decay=t.weight_decay)
            _set_lr(group, lr * lr_factor(step, t.warmup_steps, self.stage_steps))
        self.scheduler.base_lrs = [lr] * len(self.optimizer.param_groups)

    def _write_config(self) -> None:
        """``RUN/config.yaml``, replaced atomically."""
        temporary = self.run_dir / ".config.yaml.tmp"
        save_config(self.config, temporary)
        os.replace(temporary, self.run_dir / "config.yaml")

    # ----------------------------------------------------------------------------- one step
    def _loss(self, micro: MicroBatch) -> dict[str, torch.Tensor]:
        """The stage's losses of a micro-batch (images, or clean latents ``z_clean`` from a latent cache), with
        the random draws it carries: nothing is drawn or read back here."""
        model = self.ddp_model if self.ddp_model is not None else self.model
        with self._autocast():
            return model(micro.images, micro.labels, micro.context, micro.pooled, stage=self.stage,
                         z_clean=micro.z_clean, draws=micro.draws, null_context=micro.null_context,
                         null_pooled=micro.null_pooled)

    def _micro_batch(self) -> MicroBatch:
        """The next micro-batch on the device: its examples, conditioning (stage 2 and single-stage) and the
        loss's random draws from this rank's generator (drawn in the order the losses always consumed them)."""
        examples, targets = self.stream.next_batch()  # targets: labels [b], or a CaptionBatch
        examples = self._to_device(examples)
        if isinstance(targets, CaptionBatch):
            targets = CaptionBatch(self._to_device(targets.labels), targets.captions)
        else:
            targets = self._to_device(targets)
        conditioning = self.conditioning.for_batch(targets) if self.uses_base else {}
        conditional = any(conditioning.get(key) is not None for key in ("labels", "context", "pooled"))
        draws = self.model.draw_loss_randomness(self.stage, examples.shape[0], self.device, self.generator,
                                                conditional)
        images, z_clean = (None, examples) if self.from_latents else (examples, None)
        inputs = (conditioning.get(key) for key in ("labels", "context", "pooled", *NULL_KEYS))
        return MicroBatch(images, z_clean, *inputs, draws)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the training device without waiting for it: a copy from pageable host memory would block
        the host until the GPU has run everything queued before it, so a CPU batch is pinned first."""
        if self.device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def _gradient_sync(self, last_micro_step: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces gradients in backward; with gradient accumulation only the last micro-step's
        backward needs to (the others accumulate locally under ``no_sync``), for the same summed gradient."""
        if self.ddp_model is None or last_micro_step:
            return contextlib.nullcontext()
        return self.ddp_model.no_sync()

    def train_step(self) -> None:
        """Queue one optimiser step (with gradient accumulation) without reading the device: a non-finite loss
        or gradient skips the update on the device and is counted in the metric window (:attr:`step`), which
        the loop reads at each log record and checkpoint."""
        t = self.config.train
        if not self.model.training:
            self.model.train()
        micro_batches = [self._micro_batch() for _ in range(t.grad_accumulation)]
        self.step(micro_batches, ema_decay_at(self.stage_step, t.ema_decay))
        self.scheduler.step()

    # ----------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, grid_paths: tuple[Path, ...] = ()) -> dict[str, float]:
        """Held-out bits/pixel (fixed noise) and PSNR of reconstructions (EMA weights); the (original,
        reconstruction) pairs are written to each of ``grid_paths``.

        Bits/pixel are the rate of the latent the decoder receives at sampling, :meth:`UnifiedLatents.latent_nats`
        of up to 1,024 test images: under the prior (two-stage), or under the (unconditional) base model in
        single-stage mode, whose training ``bits_per_pixel`` is truncated at each example's random ``λ_max``;
        so both modes report the same quantity."""
        model, s = self.ema_model, self.config.sample
        generator = torch.Generator(self.device).manual_seed(1234)
        pixels = self.config.model.image_size ** 2
        with self._autocast():
            nats = self._heldout_nats(model, generator)
            if self.eval_images is None:  # a latent cache: the rate only
                return {"heldout_bits_per_pixel": float(nats.mean()) / math.log(2.0) / pixels}
            recon = model.reconstruct(self.eval_images, s.decoder_steps, s.sampler, generator,
                                      spacing=s.spacing, cuda_graph=s.cuda_graph).float()
        for path in grid_paths:
            save_grid(side_by_side(self.eval_images, recon), path, columns=8)
        return {"heldout_bits_per_pixel": float(nats.mean()) / math.log(2.0) / pixels,
                "psnr": float(psnr(recon, self.eval_images).mean())}

    def _heldout_nats(self, model: UnifiedLatents, generator: torch.Generator) -> torch.Tensor:
        """Nats of up to :data:`HELDOUT_IMAGES` held-out latents (fp32 ``[n]``), images or cached latents."""
        network = "base" if model.single_stage else "prior"
        n = min(len(self.test_data), HELDOUT_IMAGES)
        nats = []
        for i in range(0, n, 256):
            if self.from_latents:
                z = self.test_data.batch(range(i, min(i + 256, n)))[0].to(self.device)
                nats.append(model.latent_nats(None, network, generator=generator, z_clean=z))
            else:
                nats.append(model.latent_nats(self.test_data.images[i:i + 256].to(self.device), network,
                                              generator=generator))
        return torch.cat(nats)

    @torch.no_grad()
    def write_samples(self, grid_paths: tuple[Path, ...]) -> None:
        """A grid of generated images (EMA weights; one column per class for conditional models)."""
        model, s = self.ema_model, self.config.sample
        generator = torch.Generator(self.device).manual_seed(4321)
        conditioning, columns = self.conditioning.for_grid(s.grid_images)
        with self._autocast():
            images = model.sample(s.grid_images, s.latent_steps, s.decoder_steps, s.sampler, generator,
                                  spacing=s.spacing, cuda_graph=s.cuda_graph, guidance=s.guidance,
                                  guidance_interval=tuple(s.guidance_interval), **conditioning)
        for path in grid_paths:
            save_grid(images.float(), path, columns=columns)

    def _evaluate_and_draw(self) -> dict[str, float]:
        """Stage 1: metrics and ``reconstructions.png``; stage 2: ``samples.png``. Dated copies go to grids/."""
        step = f"step_{self.global_step:08d}.png"
        grids = self.run_dir / "grids"
        metrics = {}
        if self.stage == 1:
            paths = (grids / f"reconstructions_{step}", self.run_dir / "reconstructions.png")
            metrics = self.evaluate(paths if self.is_main else ())
        if self.uses_base:
            self.write_samples((grids / f"samples_{step}", self.run_dir / "samples.png") if self.is_main else ())
        return metrics

    # ----------------------------------------------------------------------------- the loop
    def _log(self, record: dict[str, Any]) -> None:
        self.log.write({"step": self.global_step, "stage": self.stage, "stage_step": self.stage_step, **record})

    def _start_stage(self, stage: int) -> None:
        self.stage, self.stage_step, self.stage_applied_steps = stage, 0, 0
        if stage == 2:
            # Stage 2 uses the stage-1 EMA weights of the networks stage 1 trained, frozen from here on.
            copy_weights(self.model, self.ema_model, parameter_prefixes(self.model.trained_networks(1)))
            self.frozen_bits_per_pixel = self.evaluate()["heldout_bits_per_pixel"]
        self._new_optimizer()

    def fit(self, resume: bool = False, overwrite: bool = False) -> None:
        """Run (or continue) stage 1 then stage 2, logging, evaluating and checkpointing as configured.

        A new run (``resume`` False) refuses a folder that already holds a run unless ``overwrite``, which
        first removes that run's outputs. Raises :class:`TrainingInterrupted` after a clean stop on SIGINT or
        SIGTERM, :class:`~ul_fast.train.run_folder.RunFolderError` when another training holds the folder."""
        t = self.config.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            with self._claim_run_folder(resume, overwrite), self._stop_on_signals():
                if resume:
                    self.resume()
                elif self.is_main:
                    self._write_config()
                if self.stage == 1 and self.stage_step >= t.stage1_steps and t.stage2_steps > 0:
                    self._start_stage(2)  # stage 1 finished before the checkpoint, or is skipped (stage1_steps: 0)
                while True:
                    self._run_stage()
                    if self.stage == 1 and t.stage2_steps > 0:
                        self._start_stage(2)
                        continue
                    break
        finally:
            self.log.close()
            if isinstance(self.stream, StreamingBatches):
                self.stream.close()  # stop the decoding workers

    def _any_rank(self, flag: int) -> int:
        """The largest ``flag`` over the ranks (itself in one process): one all-reduced int."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([flag], device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return int(value.item())

    @contextlib.contextmanager
    def _claim_run_folder(self, resume: bool, overwrite: bool):
        """Rank 0 locks the run folder for the duration, refuses (or, with ``overwrite``, clears) an existing run
        when starting a new one, and removes the staging folders of interrupted checkpoint writes; every rank
        fails alike when it cannot."""
        with contextlib.ExitStack() as stack:
            error: RunFolderError | None = None
            if self.is_main:
                try:
                    stack.enter_context(RunLock(self.run_dir))
                    if not resume:
                        check_new_run(self.run_dir, overwrite)
                    if overwrite and not resume:
                        clear_run(self.run_dir)
                    clean_staging(self.run_dir)
                except RunFolderError as caught:
                    error = caught
            if self._any_rank(int(error is not None)):
                raise error or RunFolderError(f"rank 0 could not claim {self.run_dir}")
            yield

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGINT and SIGTERM ask the loop to stop after the current step (see :meth:`_stop_requested`); a
        second one aborts at once. The previous handlers are restored on exit."""
        self._stop_signal = None
        if threading.current_thread() is not threading.main_thread():  # handlers only work in the main thread
            yield
            return
        first_at = 0.0

        def handler(signum: int, frame: Any) -> None:
            nonlocal first_at
            if self._stop_signal is None:
                self._stop_signal, first_at = signum, time.monotonic()
            elif time.monotonic() - first_at >= REPEAT_GRACE_S:
                raise TrainingAborted(signum)

        previous = {number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for number, old in previous.items():
                signal.signal(number, old)

    def _stop_requested(self, agree: bool) -> int:
        """The signal that asked to stop (0: none). Under torchrun the ranks agree on it (a collective read
        back on the host) only where ``agree`` (log and checkpoint steps), so that they stop at the same step
        without a read of the device in every step; one process stops after any step."""
        if self.world_size == 1:
            return self._stop_signal or 0
        return self._any_rank(self._stop_signal or 0) if agree else 0

    def _stop(self, signum: int, saved: bool) -> None:
        """Checkpoint this step (unless just done), record the stop and raise :class:`TrainingInterrupted`."""
        if not saved:
            self.save()
        name = signal.Signals(signum).name
        self.log.write({"step": self.global_step, "event": "interrupted", "signal": name})
        raise TrainingInterrupted(f"stopped by {name} after step {self.global_step}, checkpoint written; continue "
                                  f"with: ul-fast train --resume {self.run_dir}", signum)

    def _window_clock(self) -> float:
        """Seconds since the open metric window started in this process."""
        return time.perf_counter() - self._window_start

    def _read_window(self) -> dict[str, float]:
        """The open metric window (one read of the device), after checking it for divergence: a run of
        ``train.max_bad_steps`` skipped steps raises :class:`TrainingDiverged` before anything is saved."""
        window = self.step.window.read()
        t = self.config.train
        if window["longest_skipped_run"] >= t.max_bad_steps:
            raise TrainingDiverged(f"{window['longest_skipped_run']} non-finite losses in a row by step "
                                   f"{self.global_step}; stopping (the last checkpoint is untouched)")
        return window

    def _log_window(self, window: dict[str, float]) -> None:
        """Write the log record of the open window (and evaluate, when due), then start a new window."""
        t = self.config.train
        steps = window["applied_steps"] + window["skipped_steps"]
        elapsed = self.window_elapsed_s + self._window_clock()
        self.skipped_steps += window["skipped_steps"]
        self.stage_applied_steps += window["applied_steps"]
        record = {k: v for k, v in window.items()
                  if k not in ("applied_steps", "skipped_steps", "longest_skipped_run")}
        images = steps * t.batch_size * t.grad_accumulation
        record.update(lr=float(self.scheduler.get_last_lr()[0]), skipped_steps=self.skipped_steps,
                      step_time_s=elapsed / max(steps, 1), images_per_s=images / max(elapsed, 1e-9),
                      **self.flops.rates(self.stage, images / self.world_size, elapsed))
        if self.stage == 2:
            record["bits_per_pixel"] = self.frozen_bits_per_pixel  # the frozen latents' bitrate
        if isinstance(self.stream, StreamingBatches):
            record["bad_images"] = self._bad_images_since_last_log()
        at_eval = self.stage_step % t.eval_every == 0 or self.stage_step == self.stage_steps
        if at_eval and (self.is_main or self.sharded):
            record.update(self._evaluate_and_draw())
        self._log(record)
        self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.1f}",
                             bpp=f"{record.get('bits_per_pixel') or 0:.4f}")
        self.step.window.reset()
        self.window_elapsed_s, self._window_start = 0.0, time.perf_counter()

    def _run_stage(self) -> None:
        t = self.config.train
        self._window_start = time.perf_counter()
        self.bar = tqdm(total=self.stage_steps, initial=self.stage_step, disable=not (t.progress and self.is_main),
                        desc=f"stage {self.stage}")
        while self.stage_step < self.stage_steps:
            self.train_step()
            self.stage_step += 1
            self.bar.update(1)
            at_log = self.stage_step % t.log_every == 0 or self.stage_step == self.stage_steps
            saved = self.stage_step % t.checkpoint_every == 0 or self.stage_step == self.stage_steps
            if at_log or saved:
                window = self._read_window()
                if at_log:
                    self._log_window(window)
            if self.stage_step == self.stage_steps and self.stage_applied_steps == 0:
                raise TrainingDiverged(f"every one of the {self.stage_steps} steps of stage {self.stage} was skipped "
                                       "(non-finite loss or gradient): nothing was trained; check the learning rate "
                                       "and the loss weights")
            if saved:
                self.save()
            if signum := self._stop_requested(agree=at_log or saved):
                self.bar.close()
                self._stop(signum, saved)
        self.bar.close()


def _set_lr(group: dict[str, Any], lr: float) -> None:
    """Set a param group's learning rate: in place where it is a device tensor (a CUDA graph reads it there)."""
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr
