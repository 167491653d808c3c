"""Training end to end on the embedded Fashion-MNIST data (micro model, CPU)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ul_fast.config import ConfigError
from ul_fast.train import Trainer
from ul_fast.train.metrics_log import read_metrics

from micro import MICRO, micro_config


def train(tmp_path: Path, name: str, **sections) -> list[dict]:
    config = micro_config(**sections)
    Trainer(config, tmp_path / name).fit()
    return read_metrics(tmp_path / name)


def test_short_training_lowers_the_loss_and_writes_the_run(tmp_path):
    metrics = train(tmp_path, "run", train={"stage1_steps": 40, "stage2_steps": 6, "eval_every": 40,
                                            "checkpoint_every": 20, "ema_decay": 0.9})
    stage1 = [m["loss"] for m in metrics if m["stage"] == 1]
    assert sum(stage1[-5:]) / 5 < 0.8 * sum(stage1[:5]) / 5
    for m in metrics:
        assert {"step", "stage", "loss", "bits_per_pixel"} <= m.keys()
    assert any("psnr" in m for m in metrics)
    run = tmp_path / "run"
    for name in ("config.yaml", "reconstructions.png", "samples.png", "checkpoints/latest"):
        assert (run / name).exists(), name
    assert (run / "checkpoints" / (run / "checkpoints/latest").read_text().strip() / "ema.safetensors").exists()


@pytest.mark.slow
def test_higher_loss_factor_gives_a_higher_bitrate(tmp_path):
    """c_lf sets the price of decoder detail: a higher one pushes more information into the latent.
    Held-out bits/pixel after 150 steps here: about 0.04 (c_lf 1.1) vs 0.13 (c_lf 6)."""
    results = {}
    for loss_factor in (1.1, 6.0):
        weighting = {"factor": loss_factor, "bias": 0.0}
        metrics = train(tmp_path, f"clf{loss_factor}", model={"decoder_weighting": weighting},
                        train={"stage1_steps": 150, "stage2_steps": 0, "eval_every": 150, "log_every": 50,
                               "checkpoint_every": 1000, "batch_size": 32})
        results[loss_factor] = metrics[-1]["heldout_bits_per_pixel"]
    assert results[6.0] > 1.5 * results[1.1], results


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "ul_fast.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.mark.slow
def test_killed_run_resumes_exactly(tmp_path):
    """SIGKILL a run after its first checkpoint; the resumed run's losses equal an uninterrupted run's
    step for step, through the stage change."""
    data = {k: dict(v) for k, v in MICRO.items()}
    data["train"].update(stage1_steps=30, stage2_steps=10, checkpoint_every=5, eval_every=1000, batch_size=8)
    config = tmp_path / "micro.yaml"
    config.write_text(yaml.safe_dump(data))

    reference = _cli("train", "--config", str(config), "--out", str(tmp_path / "reference"))
    assert reference.wait(timeout=600) == 0, reference.stdout.read()

    victim = _cli("train", "--config", str(config), "--out", str(tmp_path / "victim"))
    latest = tmp_path / "victim" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "victim" / "samples.png").exists(), "the run finished before it could be killed"
    killed_at = max(m["step"] for m in read_metrics(tmp_path / "victim"))
    assert killed_at < 40

    resumed = _cli("train", "--resume", str(tmp_path / "victim"))
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()
    expected = [(m["step"], m["loss"]) for m in read_metrics(tmp_path / "reference")]
    got = [(m["step"], m["loss"]) for m in read_metrics(tmp_path / "victim")]
    assert got == expected


def test_cli_train_then_sample(tmp_path):
    data = {k: dict(v) for k, v in MICRO.items()}
    config = tmp_path / "micro.yaml"
    config.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    done = _cli("train", "--config", str(config), "--out", str(run), "--set", "train.stage1_steps=3",
                "--set", "train.stage2_steps=2")
    assert done.wait(timeout=600) == 0, done.stdout.read()
    grid = tmp_path / "grid.png"
    sampled = _cli("sample", "--run", str(run), "-n", "4", "--out", str(grid), "--no-progress", "--label", "7")
    assert sampled.wait(timeout=600) == 0, sampled.stdout.read()
    assert grid.stat().st_size > 0
    info = subprocess.run([sys.executable, "-m", "ul_fast.cli", "info"], capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert "noise_inject[cpu]" in json.loads(info.stdout)["ops"]


def test_cli_errors_are_clear(tmp_path):
    bad = _cli("train", "--config", "tiny", "--out", str(tmp_path / "x"), "--set", "model.decoder_weighting.factor=0")
    assert bad.wait(timeout=120) == 2
    assert "model.decoder_weighting.factor must be > 0" in bad.stdout.read()
    missing = _cli("sample", "--run", str(tmp_path / "nothing"))
    assert missing.wait(timeout=120) == 2
    assert "not a ul_fast run folder" in missing.stdout.read()


@pytest.mark.slow
def test_tiny_text_conditioned_run_and_prompt_sampling(tmp_path):
    pytest.importorskip("tokenizers", reason="needs the text extra: pip install 'ul-fast[text]'")
    data = {k: dict(v) for k, v in MICRO.items()}
    data["model"].update(num_classes=0, context_dim=384, text_max_tokens=16)
    config = tmp_path / "micro-text.yaml"
    config.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    done = _cli("train", "--config", str(config), "--out", str(run))
    assert done.wait(timeout=600) == 0, done.stdout.read()
    assert (run / "samples.png").exists() and any((run / "text-cache").rglob("*.safetensors"))
    grid = tmp_path / "sneakers.png"
    sampled = _cli("sample", "--run", str(run), "-n", "3", "--out", str(grid), "--prompt", "a photo of a sneaker",
                   "--no-progress")
    assert sampled.wait(timeout=600) == 0, sampled.stdout.read()
    assert grid.stat().st_size > 0
    without = _cli("sample", "--run", str(run), "-n", "3", "--out", str(grid))
    assert without.wait(timeout=600) == 2 and "give --prompt" in without.stdout.read()


def test_plot_command(tmp_path):
    pytest.importorskip("matplotlib", reason="needs the plot extra: pip install 'ul-fast[plot]'")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "stage": 1, "loss": 100.0 / s,
                                                            "bits_per_pixel": 0.1, "psnr": 10 + s}) + "\n"
                                               for s in range(1, 6)))
    done = subprocess.run([sys.executable, "-m", "ul_fast.cli", "plot", str(run)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert (run / "curves.png").stat().st_size > 0


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    from ul_fast.train import TrainingDiverged
    from ul_fast.train.checkpoint import latest_checkpoint

    config = micro_config(train={"stage1_steps": 20, "stage2_steps": 0, "checkpoint_every": 2, "eval_every": 1000,
                                 "max_bad_steps": 3})
    trainer = Trainer(config, tmp_path / "run")
    real_loss = trainer._loss
    calls = {"n": 0}

    def poisoned(micro):
        calls["n"] += 1
        out = real_loss(micro)
        if calls["n"] in (3, 6, 7, 8):  # one isolated bad step, then three in a row
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(trainer, "_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="3 non-finite losses in a row by step 8"):
        trainer.fit()
    # The device counts the skipped steps; the host reads the count at the record of step 8 (log_every 1) and
    # stops before that step's checkpoint. Step 6 was skipped but its weights (those of step 5) are good.
    assert trainer.stage_step == 8
    assert latest_checkpoint(tmp_path / "run").name == "step_00000006"
    metrics = read_metrics(tmp_path / "run")
    assert all(m["loss"] == m["loss"] for m in metrics if "loss" in m)  # nothing NaN was logged
    assert [m["step"] for m in metrics if "loss" not in m] == [3, 6, 7]  # windows of skipped steps only
    assert [m["skipped_steps"] for m in metrics] == [0, 0, 1, 1, 1, 2, 3]


@pytest.mark.slow
def test_compiled_networks_train_like_eager(tmp_path):
    """train.compile: true (inductor on the four networks) gives the eager run's losses."""
    sections = {"train": {"stage1_steps": 3, "stage2_steps": 2, "eval_every": 1000, "checkpoint_every": 1000}}
    eager = train(tmp_path, "eager", **sections)
    sections["train"]["compile"] = True
    compiled = train(tmp_path, "compiled", **sections)
    assert [m["step"] for m in compiled] == [m["step"] for m in eager]
    assert [m["loss"] for m in compiled] == pytest.approx([m["loss"] for m in eager], rel=2e-3)


def test_metrics_are_mirrored_to_tensorboard(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    train(tmp_path, "run", train={"stage1_steps": 3, "stage2_steps": 2, "eval_every": 3, "checkpoint_every": 1000})
    events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"1/loss", "1/bits_per_pixel", "1/psnr", "2/loss", "2/images_per_s"} <= tags, tags
    logged = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "run") if m["stage"] == 1}
    assert {e.step: e.value for e in events.Scalars("1/loss")} == pytest.approx(logged)


def test_either_stage_alone(tmp_path):
    """Stage 1 alone, then stage 2 alone initialised from it (train.init_from)."""
    train(tmp_path, "stage1", train={"stage1_steps": 4, "stage2_steps": 0, "eval_every": 1000})
    assert not (tmp_path / "stage1" / "samples.png").exists()
    metrics = train(tmp_path, "stage2", train={"stage1_steps": 0, "stage2_steps": 3, "eval_every": 1000,
                                               "init_from": str(tmp_path / "stage1")})
    assert [m["stage"] for m in metrics] == [2, 2, 2]
    assert (tmp_path / "stage2" / "samples.png").exists()
    from safetensors.torch import load_file

    from ul_fast.train.checkpoint import latest_checkpoint
    first = load_file(latest_checkpoint(tmp_path / "stage1") / "ema.safetensors")
    second = load_file(latest_checkpoint(tmp_path / "stage2") / "ema.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first if k.startswith(("encoder.", "decoder.")))
    with pytest.raises(ConfigError, match="init_from"):
        micro_config(train={"stage1_steps": 0, "stage2_steps": 3})
