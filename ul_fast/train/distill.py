"""Progressive distillation (Salimans & Ho 2022) of the decoder: a student learns one DDIM step where its
teacher takes two, halving the decoder's step count each round (e.g. 32 → 16 → 8 → 4).

A round distils a teacher that samples in ``2N`` steps into a student that samples in ``N``. The student
starts from the teacher's weights. Each training step draws images ``x``, their noisy latents ``z_0`` (at the
log-SNR the decoder sees at sampling), a point ``i`` of the student's ``N``-step grid — the grid
:meth:`~ul_fast.model.UnifiedLatents.decode` uses, so the result is used by a plain ``decode(z_0, N)`` — and
``z_t = α_i·x + σ_i·ε``. The teacher takes two DDIM steps on its ``2N``-step grid, ``λ_i → λ_mid → λ_{i+1}``
(the time and log-SNR grids are nested: every other point of the ``2N`` grid is the ``N`` grid), landing on
``z''``. The target ``x̃`` is the data prediction for which one DDIM step ``λ_i → λ_{i+1}`` lands on ``z''``
(:func:`student_target`); the loss is ``max(SNR(λ_i), 1)·mean‖x̂ − x̃‖²``, the paper's truncated-SNR weighting.
The student's EMA becomes the next round's teacher.

The final denoising step (``decode``'s ``x̂(x, λ_max)`` after the last grid point) is not distilled: the
teacher's two steps and the student's one end at the same ``λ_max`` (the last point of both grids), and at
``λ_max`` the prediction moves the state by O(σ_max) (``x̂ = α·x_t − σ·v̂`` or ``(x_t − σ·ε̂)/α``): with the
default ``λ_max = 15``, ``σ_max ≈ 5.5e-4``, a 14th of one 8-bit grey level (2/255) per unit of ``v̂``.

The student is right under DDIM only (its target is what one DDIM step must predict), on its grid: the output
records ``sample.decoder_sampler: ddim`` and :func:`distilled_decoder` tells ``ul-fast sample`` and ``eval`` to
refuse another sampler for it.

The output is a run folder like any other: ``config.yaml`` (the teacher's, with ``sample.decoder_steps`` set
to the final step count and ``sample.decoder_sampler`` to ``ddim``) and checkpoints in the trainer's format
holding the teacher's weights with the student's decoder; plus ``distill.json`` (the settings, the decoder's
sampler, rounds and final losses) and ``metrics.jsonl`` (the loss per logged step). A killed distillation
resumes from its newest checkpoint (round, step, optimiser, EMA, random state): the result equals an
uninterrupted run's.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ul_fast import ops
from ul_fast.config import save_config
from ul_fast.data import STREAMED_IMAGES_IN_MEMORY, load_images
from ul_fast.diffusion import coefficients
from ul_fast.files import write_json_atomically
from ul_fast.model import UnifiedLatents
from ul_fast.sampling import logsnr_grid
from ul_fast.train.checkpoint import (
    CheckpointError,
    load_run_config,
    load_state,
    newest_readable_checkpoint,
    read_weights,
    save_checkpoint,
)
from ul_fast.train.ema import EmaUpdater, ema_decay_at, make_ema_model
from ul_fast.train.metrics_log import MetricsLog
from ul_fast.train.run_folder import RunLock, check_new_run, clear_run

DISTILL_FILE = "distill.json"
DECODER_SAMPLER = "ddim"
"""The only sampler a distilled decoder is right under: the one its targets were made for."""
STAGE = "distill"
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DistillSettings:
    """What a distillation does; recorded in ``distill.json`` and checked on resume.

    from_steps: the teacher's decoder steps; to_steps: the student's after the last round (``from_steps / 2^R``
    for ``R >= 1`` rounds). steps_per_round: optimiser steps per round. lr: Adam's learning rate (constant).
    ema_decay: the student's EMA (warmed up as in training). spacing: the step grid (the run's
    ``sample.spacing``: distilled steps are only good on the grid they were distilled on).
    """

    teacher: str
    from_steps: int = 32
    to_steps: int = 4
    steps_per_round: int = 200
    batch_size: int = 64
    lr: float = 1e-4
    seed: int = 0
    ema_decay: float = 0.99
    spacing: str = "time"
    grad_clip: float = 1.0
    log_every: int = 10
    checkpoint_every: int = 100


def round_steps(from_steps: int, to_steps: int) -> list[int]:
    """The student's step count of each round, ``[from/2, from/4, …, to]``; ValueError (one line) unless
    ``to_steps`` is ``from_steps`` divided by a power of two >= 2."""
    if from_steps < 2 or to_steps < 1:
        raise ValueError(f"--from-steps must be >= 2 and --to-steps >= 1, got {from_steps} and {to_steps}")
    ratio = from_steps // to_steps
    if to_steps >= from_steps or from_steps % to_steps or ratio & (ratio - 1):
        raise ValueError(f"--to-steps must be --from-steps ({from_steps}) divided by a power of two >= 2 "
                         f"(e.g. {from_steps // 2} or {max(1, from_steps // 8)}), got {to_steps}")
    return [from_steps >> r for r in range(1, ratio.bit_length())]


# ----------------------------------------------------------------------------- the distillation target
def ddim_step(x_s: torch.Tensor, denoised: torch.Tensor, lam_s: torch.Tensor, lam_t: torch.Tensor) -> torch.Tensor:
    """One DDIM step ``λ_s → λ_t`` with per-example log-SNRs ``[B]``: ``α_t·x̂ + σ_t·(x_s − α_s·x̂)/σ_s``
    (:func:`~ul_fast.sampling.sample_ddim`'s step, with a different ``λ`` per example)."""
    alpha_s, sigma_s = coefficients(lam_s, x_s)
    alpha_t, sigma_t = coefficients(lam_t, x_s)
    return alpha_t * denoised + sigma_t * (x_s - alpha_s * denoised) / sigma_s


def student_target(z_t: torch.Tensor, z_next: torch.Tensor, lam_s: torch.Tensor, lam_t: torch.Tensor) -> torch.Tensor:
    """The ``x̃`` for which one DDIM step ``λ_s → λ_t`` from ``z_t`` lands on ``z_next``:
    ``x̃ = (z_next − (σ_t/σ_s)·z_t) / (α_t − (σ_t/σ_s)·α_s)`` (the denominator is > 0 for ``λ_t > λ_s``)."""
    alpha_s, sigma_s = coefficients(lam_s, z_t)
    alpha_t, sigma_t = coefficients(lam_t, z_t)
    ratio = sigma_t / sigma_s
    return (z_next - ratio * z_t) / (alpha_t - ratio * alpha_s)


def _denoiser(model: UnifiedLatents, decoder: nn.Module, z_0: torch.Tensor) -> Denoiser:
    """``(x_t, λ [B]) → x̂`` of ``decoder`` given latents ``z_0``, as ``decode`` calls it."""
    latent_logsnr = None
    if model.single_stage:  # the decoder is told the latent's log-SNR, as in decode
        latent_logsnr = torch.full((z_0.shape[0],), model.sample_logsnr, device=z_0.device)

    def denoise(x_t: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        return model._to_denoised(x_t, decoder(x_t, logsnr, z_0, latent_logsnr), logsnr)

    return denoise


def distillation_loss(model: UnifiedLatents, student: nn.Module, teacher: nn.Module, x: torch.Tensor,
                      student_grid: torch.Tensor, teacher_grid: torch.Tensor,
                      generator: torch.Generator) -> torch.Tensor:
    """The round's loss on images ``x [B, C, H, W]``: ``mean_b max(SNR(λ_i), 1)·mean‖x̂_student − x̃‖²``.

    student_grid: the ``N + 1`` log-SNRs of the student's grid; teacher_grid: the ``2N + 1`` of the teacher's
    (``teacher_grid[2i] == student_grid[i]``). ``model`` supplies the encoder and the prediction type.
    """
    device = x.device
    with torch.no_grad():
        # Every draw on the CPU from the CPU ``generator`` (device-independent, restorable), then moved.
        seed = ops.draw_seed("cpu", generator).to(device)
        z_0 = model.noisy_latent(model.encode(x), seed=seed, logsnr=model.sample_logsnr)
        i = torch.randint(len(student_grid) - 1, (x.shape[0],), generator=generator, device="cpu")
        lam_s, lam_mid, lam_t = (g.to(device) for g in (student_grid[i], teacher_grid[2 * i + 1], student_grid[i + 1]))
        alpha_s, sigma_s = coefficients(lam_s, x)
        eps = torch.randn(x.shape, generator=generator, device="cpu").to(device)
        z_t = alpha_s * x + sigma_s * eps
        teach = _denoiser(model, teacher, z_0)
        z_mid = ddim_step(z_t, teach(z_t, lam_s), lam_s, lam_mid)
        z_next = ddim_step(z_mid, teach(z_mid, lam_mid), lam_mid, lam_t)
        target = student_target(z_t, z_next, lam_s, lam_t)
        weight = lam_s.float().exp().clamp(min=1.0)
    denoised = _denoiser(model, student, z_0)(z_t, lam_s)
    return (weight * (denoised.float() - target.float()).square().flatten(1).mean(1)).mean()


# ----------------------------------------------------------------------------- a distilled run, read back
def distilled_decoder(run_dir: str | Path, seen: tuple[Path, ...] = ()) -> dict[str, Any] | None:
    """``{"sampler", "steps", "spacing", "run"}`` of the distilled decoder a run samples with, or None: the run's
    own ``distill.json``, or that of the run its stage 2 started from (``train.init_from`` with no stage 1 of its
    own, so the decoder is that run's)."""
    run_dir = Path(run_dir)
    record = run_dir / DISTILL_FILE
    if record.is_file():
        settings = json.loads(record.read_text())
        return {"sampler": settings.get("decoder_sampler", DECODER_SAMPLER), "steps": settings["to_steps"],
                "spacing": settings["spacing"], "run": str(run_dir)}
    try:
        train = load_run_config(run_dir).train
    except (CheckpointError, ValueError):  # no run folder (e.g. an init_from run since removed)
        return None
    source = Path(train.init_from).resolve() if train.init_from else None
    if source is None or train.stage1_steps > 0 or source in seen:
        return None
    return distilled_decoder(source, (*seen, run_dir.resolve()))


# ----------------------------------------------------------------------------- the run folder
def _read_teacher(run_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(training state, raw weights, EMA weights) of the teacher run's newest readable checkpoint."""
    model = UnifiedLatents(load_run_config(run_dir).model)
    return newest_readable_checkpoint(run_dir, lambda folder: (load_state(folder),
                                                               read_weights(model, folder / "model.safetensors"),
                                                               read_weights(model, folder / "ema.safetensors")))[1]


def _decoder_weights(weights: dict[str, torch.Tensor], decoder: nn.Module) -> dict[str, torch.Tensor]:
    """``weights`` (a whole model's) with the ``decoder.*`` entries replaced by ``decoder``'s."""
    return {**weights, **{f"decoder.{k}": v.detach().cpu() for k, v in decoder.state_dict().items()}}


class Distiller:
    """Distil the decoder of the run ``settings.teacher`` into the run folder ``out``; :meth:`run` does it.

    The raw and EMA weights of the student's decoder go into the checkpoints' ``model.safetensors`` and
    ``ema.safetensors`` in place of the teacher's decoder; every other network keeps the teacher's weights.
    """

    def __init__(self, settings: DistillSettings, out: str | Path, device: torch.device | str = "cpu",
                 progress: bool = True):
        self.settings, self.out, self.device, self.progress = settings, Path(out), torch.device(device), progress
        self.rounds = round_steps(settings.from_steps, settings.to_steps)
        teacher_dir = Path(settings.teacher)
        self.config = load_run_config(teacher_dir)
        if self.config.model.decoder_loss == "mse":
            raise ValueError(f"{teacher_dir} has a deterministic decoder (model.decoder_loss: mse): it decodes in "
                             f"one pass already; there are no sampling steps to distil")
        self.teacher_state, self.raw_weights, self.ema_weights = _read_teacher(teacher_dir)
        self.model = UnifiedLatents(self.config.model)
        self.model.load_state_dict(self.ema_weights)
        self.model.to(self.device).eval().requires_grad_(False)
        m = self.config.model
        self.data = load_images(self.config.data.dataset, "train", m.image_size, m.image_channels,
                                stream_limit=STREAMED_IMAGES_IN_MEMORY)

    # ------------------------------------------------------------------ state
    def _start(self) -> None:
        """A fresh start: round 0, step 0, the teacher's EMA decoder as teacher and student."""
        self.round, self.round_step = 0, 0
        self.teacher = copy.deepcopy(self.model.decoder).requires_grad_(False).eval()
        self._new_student(self.teacher.state_dict())
        self.generator = torch.Generator().manual_seed(self.settings.seed)
        torch.manual_seed(self.settings.seed)
        self.losses: list[float | None] = [None] * len(self.rounds)

    def _new_student(self, weights: dict[str, torch.Tensor]) -> None:
        """Student, its EMA and a fresh Adam, all from ``weights`` (a decoder's state dict)."""
        self.student = copy.deepcopy(self.model.decoder)
        self.student.load_state_dict(weights)
        self.student.requires_grad_(True).train()
        self.ema = make_ema_model(self.student)
        self.optimizer = torch.optim.Adam(self.student.parameters(), lr=self.settings.lr)

    def _state(self) -> dict[str, Any]:
        return {"stage": self.teacher_state["stage"], "stage_step": self.teacher_state["stage_step"],
                "config": self._run_config().to_dict(),
                STAGE: {"settings": asdict(self.settings), "round": self.round, "round_step": self.round_step,
                        "losses": self.losses, "teacher": self.teacher.state_dict(),
                        "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                        "torch_rng": torch.get_rng_state()}}

    @property
    def global_step(self) -> int:
        return self.round * self.settings.steps_per_round + self.round_step

    def save(self) -> None:
        save_checkpoint(self.out, self.global_step, _decoder_weights(self.raw_weights, self.student),
                        _decoder_weights(self.ema_weights, self.ema), self._state())

    def _resume(self) -> None:
        """Restore round, step, teacher, student, EMA, Adam and random state from the newest checkpoint."""
        def read(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
            return (load_state(folder), read_weights(self.model, folder / "model.safetensors"),
                    read_weights(self.model, folder / "ema.safetensors"))

        _, (state, raw, ema) = newest_readable_checkpoint(self.out, read, repair=True)
        saved = state.get(STAGE)
        if saved is None:
            raise CheckpointError(f"{self.out} holds no distillation checkpoint (a run of ul-fast train?)")
        if saved["settings"] != asdict(self.settings):
            raise ValueError(f"{self.out} was distilled with other settings ({saved['settings']}); resume it with "
                             f"the same ones, or start again with --overwrite")
        self.round, self.round_step, self.losses = saved["round"], saved["round_step"], saved["losses"]
        prefix = "decoder."
        self.teacher = copy.deepcopy(self.model.decoder).requires_grad_(False).eval()
        self.teacher.load_state_dict(saved["teacher"])
        self._new_student({k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)})
        self.ema.load_state_dict({k[len(prefix):]: v for k, v in ema.items() if k.startswith(prefix)})
        self.optimizer.load_state_dict(saved["optimizer"])
        self.generator = torch.Generator().manual_seed(0)
        self.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])

    def _record(self, status: str) -> None:
        """``distill.json``: settings, rounds (teacher → student steps, final losses), status."""
        rounds = [{"round": r, "teacher_steps": 2 * n, "student_steps": n, "final_loss": self.losses[r]}
                  for r, n in enumerate(self.rounds)]
        write_json_atomically(self.out / DISTILL_FILE, {"status": status, **asdict(self.settings),
                                                        "decoder_sampler": DECODER_SAMPLER, "rounds": rounds,
                                                        "step": self.global_step}, indent=1)

    def _run_config(self):
        """The output run's config: the teacher's, sampling the distilled decoder as it was distilled."""
        config = copy.deepcopy(self.config)
        config.sample.decoder_steps = self.settings.to_steps
        config.sample.spacing = self.settings.spacing
        config.sample.decoder_sampler = DECODER_SAMPLER
        return config

    # ------------------------------------------------------------------ the loop
    def train_step(self, student_grid: torch.Tensor, teacher_grid: torch.Tensor) -> float:
        """One optimiser step of the student and its EMA; returns the loss."""
        x = self.data.images[torch.randint(len(self.data), (self.settings.batch_size,), generator=self.generator)]
        loss = distillation_loss(self.model, self.student, self.teacher, x.to(self.device), student_grid,
                                 teacher_grid, self.generator)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"distillation loss is {loss.item()} at round {self.round} step "
                                     f"{self.round_step}: lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        EmaUpdater(self.ema, self.student, ("",))(1.0 - ema_decay_at(self.round_step, self.settings.ema_decay))
        return loss.item()

    def run(self, resume: bool = False, overwrite: bool = False) -> Path:
        """Distil round by round into ``out`` (resuming its newest checkpoint with ``resume``); returns ``out``."""
        s = self.settings
        if not resume:
            check_new_run(self.out, overwrite)
        self.out.mkdir(parents=True, exist_ok=True)
        with RunLock(self.out):
            log = MetricsLog(self.out, tensorboard=False)
            if resume:
                self._resume()
                log.truncate_after(self.global_step)
            else:
                clear_run(self.out)
                (self.out / DISTILL_FILE).unlink(missing_ok=True)
                self._start()
                save_config(self._run_config(), self.out / "config.yaml")
                self._record("running")
            schedule = self.model.pixel_schedule
            while True:
                n = self.rounds[self.round]
                self._train_round(log, logsnr_grid(schedule, n, s.spacing), logsnr_grid(schedule, 2 * n, s.spacing))
                if self.round == len(self.rounds) - 1:
                    break
                # Hand-over: the student's EMA teaches the next round and starts its student (with a new Adam).
                self.round, self.round_step = self.round + 1, 0
                self.teacher.load_state_dict(self.ema.state_dict())
                self._new_student(self.ema.state_dict())
            self._record("done")
            log.close()
        return self.out

    def _train_round(self, log: MetricsLog, student_grid: torch.Tensor, teacher_grid: torch.Tensor) -> None:
        """The current round from ``round_step`` to its end, logging and checkpointing (always at its end)."""
        s, n = self.settings, len(student_grid) - 1
        bar = tqdm(total=s.steps_per_round, initial=self.round_step, disable=not self.progress,
                   desc=f"distil {2 * n}→{n} steps", leave=False)
        recent: list[float] = []
        while self.round_step < s.steps_per_round:
            recent.append(self.train_step(student_grid, teacher_grid))
            self.round_step += 1
            bar.update(1)
            if self.round_step % s.log_every == 0 or self.round_step == s.steps_per_round:
                mean = sum(recent) / len(recent)
                log.write({"step": self.global_step, "stage": STAGE, "round": self.round,
                           "round_step": self.round_step, "student_steps": n, "loss": mean})
                bar.set_postfix(loss=f"{mean:.4g}")
                self.losses[self.round], recent = mean, []
            if self.round_step % s.checkpoint_every == 0 or self.round_step == s.steps_per_round:
                self.save()
        bar.close()
