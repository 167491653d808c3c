"""A run you can trust: no run overwritten, lost on SIGTERM/Ctrl-C, shared by two trainings, or resumed from a
corrupted checkpoint; resume changes only what may change; leftovers of a kill never block a resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from ul_fast.config import ConfigError, load_config
from ul_fast.eval.plot import read_metrics_file
from ul_fast.train import CheckpointError, RunFolderError, Trainer, TrainingAborted, TrainingInterrupted
from ul_fast.train import trainer as trainer_module
from ul_fast.train.checkpoint import (
    CheckpointWarning,
    NonFiniteWeightsError,
    _write_checksums,
    latest_checkpoint,
    load_trained_model,
    save_checkpoint,
)
from ul_fast.train.metrics_log import read_metrics
from ul_fast.train.run_folder import RunLock
from ul_fast.train.trainer import lr_factor

from micro import MICRO, micro_config

SHORT = {"stage1_steps": 4, "stage2_steps": 0, "checkpoint_every": 2, "eval_every": 1000}


def fit(run: Path, resume: bool = False, overwrite: bool = False, **train) -> list[dict]:
    Trainer(micro_config(train={**SHORT, **train}), run).fit(resume=resume, overwrite=overwrite)
    return read_metrics(run)


def cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ul_fast.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def one_line_error(process: subprocess.Popen, code: int, timeout: float = 300) -> str:
    """The process's stderr, checked to be one line after exit status ``code``."""
    assert process.wait(timeout=timeout) == code, process.stderr.read()
    lines = process.stderr.read().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


# ------------------------------------------------------------------------------- 1. --out onto an existing run
def test_an_existing_run_is_refused_unless_overwrite_replaces_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()  # an empty folder is fine
    fit(run, stage1_steps=6, checkpoint_every=3)
    assert checkpoints(run) == ["latest", "step_00000003", "step_00000006"]
    with pytest.raises(RunFolderError, match=rf"already holds a run .*--resume {run}"):
        fit(run, stage1_steps=2)
    refused = one_line_error(cli("train", "--config", "tiny", "--out", str(run)), 2, timeout=120)
    assert f"--resume {run}" in refused and "--overwrite" in refused

    metrics = fit(run, overwrite=True, stage1_steps=2, checkpoint_every=1)
    assert [m["step"] for m in metrics] == [1, 2]
    # The old step_00000006 would sort after the new checkpoints and have them pruned: it is gone.
    assert checkpoints(run) == ["latest", "step_00000001", "step_00000002"]
    assert latest_checkpoint(run).name == "step_00000002"
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["stage1_steps"] == 2


# ------------------------------------------------------------------------------- 2. SIGTERM and Ctrl-C
VICTIM = {"stage1_steps": 24, "stage2_steps": 6, "checkpoint_every": 1000, "eval_every": 1000, "batch_size": 8}


@pytest.fixture(scope="module")
def signal_runs(tmp_path_factory):
    """The micro config as YAML, and an uninterrupted run of it through the CLI (the reference)."""
    root = tmp_path_factory.mktemp("signals")
    data = {k: dict(v) for k, v in MICRO.items()}
    data["train"].update(VICTIM)
    config = root / "micro.yaml"
    config.write_text(yaml.safe_dump(data))
    reference = cli("train", "--config", str(config), "--out", str(root / "reference"))
    assert reference.wait(timeout=600) == 0, reference.stderr.read()
    return config, root / "reference"


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(run) / "model.safetensors")


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_checkpoints_the_step_and_resume_continues_exactly(tmp_path, signal_runs, signum, code):
    config, reference = signal_runs
    victim = tmp_path / "victim"
    process = cli("train", "--config", str(config), "--out", str(victim))
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if (victim / "metrics.jsonl").exists() and len((victim / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    process.send_signal(signum)
    message = one_line_error(process, code)
    stopped_at = max(m["step"] for m in read_metrics(victim))
    assert stopped_at < 30, "the run finished before the signal"
    assert message == (f"ul-fast: stopped by {signal.Signals(signum).name} after step {stopped_at}, checkpoint "
                       f"written; continue with: ul-fast train --resume {victim}")
    assert latest_checkpoint(victim).name == f"step_{stopped_at:08d}"  # no periodic checkpoint before step 1000
    assert read_metrics(victim, events=True)[-1] == {"step": stopped_at, "event": "interrupted",
                                                     "signal": signal.Signals(signum).name}

    resumed = cli("train", "--resume", str(victim))
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert [(m["step"], m["loss"]) for m in read_metrics(victim)] == [
        (m["step"], m["loss"]) for m in read_metrics(reference)]
    expected, got = final_weights(reference), final_weights(victim)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def _signal_at_step(trainer: Trainer, monkeypatch, step: int, times: int) -> None:
    """Send this process SIGINT ``times`` times during training step ``step``."""
    real_step = trainer.train_step

    def train_step():
        out = real_step()
        if trainer.global_step + 1 == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(trainer, "train_step", train_step)


def test_a_second_ctrl_c_aborts_without_a_checkpoint_and_handlers_are_restored(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "REPEAT_GRACE_S", 0.0)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    once = Trainer(micro_config(train=SHORT), tmp_path / "once")
    _signal_at_step(once, monkeypatch, 3, times=1)
    with pytest.raises(TrainingInterrupted, match="stopped by SIGINT after step 3"):
        once.fit()
    assert latest_checkpoint(tmp_path / "once").name == "step_00000003"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before

    twice = Trainer(micro_config(train=SHORT), tmp_path / "twice")
    _signal_at_step(twice, monkeypatch, 3, times=2)
    with pytest.raises(TrainingAborted, match="second SIGINT"):
        twice.fit()
    assert latest_checkpoint(tmp_path / "twice").name == "step_00000002"  # the periodic one only
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# ------------------------------------------------------------------------------- 3. one training per run folder
def test_a_locked_run_folder_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ul_fast.train.run_folder import RunLock\n"
                               f"with RunLock({str(run)!r}):\n    print('locked', flush=True); time.sleep(300)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=rf"in use by another training \(pid {holder.pid} on "):
            fit(run)
        assert not (run / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    assert (run / ".lock").exists()  # left behind by the killed holder: it must not block
    fit(run)
    with RunLock(run), pytest.raises(RunFolderError, match=rf"pid {os.getpid()} "):
        fit(run, resume=True, stage1_steps=6)  # resume takes the lock too


# ------------------------------------------------------------------------------- 4. verified checkpoints
def corrupt_tensor_data(path: Path) -> None:
    """Overwrite 64 bytes in the middle of a safetensors file's tensor data (after its JSON header)."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    middle = (start + len(raw)) // 2
    raw[middle:middle + 64] = os.urandom(64)
    path.write_bytes(bytes(raw))


def test_a_corrupted_checkpoint_is_detected_and_the_newest_good_one_resumed(tmp_path):
    run = tmp_path / "run"
    fit(run, stage1_steps=6)  # checkpoints at steps 4 and 6 (keep_last: 2)
    corrupt_tensor_data(run / "checkpoints/step_00000006/model.safetensors")
    with pytest.warns(CheckpointWarning) as caught:
        metrics = fit(run, resume=True, stage1_steps=6)
    assert [str(w.message).split(": ", 1)[0] for w in caught] == ["skipping checkpoint step_00000006",
                                                                   f"resuming from {run}/checkpoints/step_00000004, "
                                                                   "the newest readable checkpoint"]
    assert "step_00000006/model.safetensors fails its SHA-256 check" in str(caught[0].message)
    assert (run / "checkpoints/corrupt-step_00000006").is_dir()  # moved aside, not deleted
    assert latest_checkpoint(run).name == "step_00000006"  # written anew from step 4's state
    fresh = fit(tmp_path / "fresh", stage1_steps=6)
    assert [(m["step"], m["loss"]) for m in metrics] == [(m["step"], m["loss"]) for m in fresh]

    corrupt_tensor_data(run / "checkpoints/step_00000006/ema.safetensors")
    with pytest.warns(CheckpointWarning) as caught:
        load_trained_model(run)  # sampling verifies too, and takes step 4's weights
    assert "step_00000006/ema.safetensors fails" in str(caught[0].message)
    corrupt_tensor_data(run / "checkpoints/step_00000004/ema.safetensors")
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="no readable checkpoint"):
        load_trained_model(run)


def test_an_older_damaged_checkpoint_is_moved_aside_too(tmp_path):
    """Damage that resume meets on its way (``latest`` still naming the older checkpoint, as after a kill between
    the rename of a new checkpoint and the update of ``latest``), and damage it does not need (an older checkpoint
    behind an intact newest): both are reported and moved to corrupt-step_*, out of the next resume and pruning."""
    run = tmp_path / "run"
    fit(run, stage1_steps=6)  # checkpoints at steps 4 and 6
    (run / "checkpoints/latest").write_text("step_00000004\n")
    corrupt_tensor_data(run / "checkpoints/step_00000004/model.safetensors")
    with pytest.warns(CheckpointWarning, match="skipping checkpoint step_00000004"):
        fit(run, resume=True, stage1_steps=8, checkpoint_every=100)  # takes step 6, writes step 8
    assert checkpoints(run) == ["corrupt-step_00000004", "latest", "step_00000006", "step_00000008"]

    corrupt_tensor_data(run / "checkpoints/step_00000006/ema.safetensors")
    with pytest.warns(CheckpointWarning, match=r"checkpoint step_00000006 is damaged .*moved aside to "
                                               r"corrupt-step_00000006"):
        fit(run, resume=True, stage1_steps=10, checkpoint_every=100)  # takes step 8, never needs step 6
    assert checkpoints(run) == ["corrupt-step_00000004", "corrupt-step_00000006", "latest", "step_00000008",
                                "step_00000010"]


def test_a_latest_pointer_that_names_no_checkpoint_is_refused(tmp_path):
    """`..` or an empty line in checkpoints/latest was taken for a checkpoint folder."""
    run = tmp_path / "run"
    fit(run, stage1_steps=6)
    for pointer in ("..", "", ".", "step_00000004/..", "../../etc"):
        (run / "checkpoints/latest").write_text(pointer + "\n")
        with pytest.raises(CheckpointError, match=rf"latest holds {re.escape(repr(pointer))}, not the name of a "
                                                  r"checkpoint folder \(step_N\)"):
            latest_checkpoint(run)
    (run / "checkpoints/latest").write_text("..\n")
    with pytest.warns(CheckpointWarning, match="trying the checkpoint folders instead"):
        fit(run, resume=True, stage1_steps=8)  # takes step 6, the newest folder
    assert latest_checkpoint(run).name == "step_00000008"


def test_non_finite_weights_are_never_written_and_the_checkpoints_there_are_kept(tmp_path):
    """A diverged update (weights NaN although that step's loss and gradient were finite): save_checkpoint
    refuses before it writes or prunes anything, naming the tensor, even with keep_last 1."""
    run = tmp_path / "run"
    fit(run, stage1_steps=4, keep_last=1)
    before = {p.name: p.read_bytes() for p in (latest_checkpoint(run)).iterdir()}
    model = load_trained_model(run)[1]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    name = next(k for k, v in weights.items() if v.is_floating_point())
    for bad in ("model", "ema"):
        broken = {**weights, name: torch.full_like(weights[name], float("nan" if bad == "model" else "inf"))}
        with pytest.raises(NonFiniteWeightsError, match=rf"not writing checkpoint step_00000005: "
                                                        rf"{'weight' if bad == 'model' else 'EMA weight'} {name} holds "
                                                        r"NaN or inf"):
            save_checkpoint(run, 5, broken if bad == "model" else weights, broken if bad == "ema" else weights,
                            {}, keep_last=1)
    assert checkpoints(run) == ["latest", "step_00000004"]
    assert {p.name: p.read_bytes() for p in (latest_checkpoint(run)).iterdir()} == before


def test_a_checkpoint_with_non_finite_weights_is_never_taken(tmp_path):
    """As an older version wrote them: intact files (checksums match) of NaN weights. Sampling and resume take the
    checkpoint before it; resume moves it to nonfinite-step_*, out of pruning."""
    run = tmp_path / "run"
    fit(run, stage1_steps=6)
    folder = run / "checkpoints/step_00000006"
    for file in ("model.safetensors", "ema.safetensors"):
        weights = load_file(folder / file)
        save_file({k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in weights.items()},
                  folder / file, metadata={"format": "ul_fast.checkpoint.v1"})
    (folder / "checksums.json").unlink()
    _write_checksums(folder)
    with pytest.warns(CheckpointWarning, match=r"skipping checkpoint step_00000006: .*holds NaN or inf"):
        assert torch.isfinite(torch.cat([p.flatten() for p in load_trained_model(run)[1].parameters()])).all()
    with pytest.warns(CheckpointWarning, match="skipping checkpoint step_00000006"):
        fit(run, resume=True, stage1_steps=7, checkpoint_every=100)
    assert checkpoints(run) == ["latest", "nonfinite-step_00000006", "step_00000004", "step_00000007"]


def test_a_checkpoint_without_checksums_loads_unverified(tmp_path):
    run = tmp_path / "run"
    fit(run)
    (latest_checkpoint(run) / "checksums.json").unlink()  # as written before checksums
    with pytest.warns(CheckpointWarning, match="unverified"):
        load_trained_model(run)


# ------------------------------------------------------------------------------- 5. --resume --set
def test_resume_applies_allowed_changes_records_them_and_refuses_the_rest(tmp_path):
    run = tmp_path / "run"
    fit(run, stage1_steps=3, checkpoint_every=3)
    with pytest.raises(ConfigError, match=r"cannot change on --resume: model\.decoder_weighting\.factor, "
                                          r"train\.batch_size"):
        Trainer(micro_config(train={**SHORT, "stage1_steps": 3, "batch_size": 8},
                             model={"decoder_weighting": {"factor": 2.0, "bias": 0.0}}), run).fit(resume=True)
    refused = one_line_error(cli("train", "--resume", str(run), "--set", "train.seed=5"), 2, timeout=120)
    assert "train.seed" in refused

    metrics = fit(run, resume=True, stage1_steps=6, checkpoint_every=3, lr=2e-3)
    # The new LR takes effect (the restored optimiser state used to keep the old one), on the new schedule.
    assert [m["lr"] for m in metrics if m["step"] > 3] == pytest.approx(
        [2e-3 * lr_factor(step, 2, 6) for step in (4, 5, 6)], rel=1e-12)
    event = [m for m in read_metrics(run, events=True) if "event" in m]
    assert event == [{"step": 3, "event": "config_change",
                      "changes": {"train.lr": {"from": 1e-3, "to": 2e-3}, "train.stage1_steps": {"from": 3, "to": 6}}}]
    assert load_config(str(run / "config.yaml")).train.lr == 2e-3


# ------------------------------------------------------------------------------- 6. staging folders
def test_staging_folders_of_interrupted_checkpoint_writes_are_removed_on_start(tmp_path):
    run = tmp_path / "run"
    fit(run)
    staging = run / "checkpoints" / ".step_00000006.k2j4"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"half written")
    fit(run, resume=True, stage1_steps=6)
    assert checkpoints(run) == ["latest", "step_00000004", "step_00000006"]


# ------------------------------------------------------------------------------- 7. one tolerant metrics reader
def test_a_torn_last_metrics_line_does_not_block_resume(tmp_path):
    run = tmp_path / "run"
    fit(run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "stage": 1, "lo')  # killed mid-write
    metrics = fit(run, resume=True, stage1_steps=6)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert len(read_metrics_file(run / "metrics.jsonl")) == 6  # ul-fast plot reads through the same reader

    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([*lines[:2], "{torn", *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match=rf"{run / 'metrics.jsonl'}:3: not valid JSON"):
        fit(run, resume=True, stage1_steps=8)


def test_event_records_are_read_only_on_request(tmp_path):
    records = [{"step": 1, "stage": 1, "loss": 2.0}, {"step": 1, "event": "config_change", "changes": {}},
               {"step": 2, "stage": 1, "loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_metrics(tmp_path) == [records[0], records[2]]
    assert read_metrics(tmp_path, events=True) == records
    assert read_metrics_file(tmp_path / "metrics.jsonl") == [records[0], records[2]]


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_on_sigterm(tmp_path):
    """torchrun, 2 gloo processes: SIGTERM to the whole process group (as a scheduler sends it) stops both
    ranks after the same step with one checkpoint; the resumed run ends on the uninterrupted run's losses."""
    data = {k: dict(v) for k, v in MICRO.items()}
    data["train"].update(VICTIM, stage1_steps=40, stage2_steps=0, seed=3)
    config = tmp_path / "micro.yaml"
    config.write_text(yaml.safe_dump(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def torchrun(*args: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", "-m", "ul_fast.cli", "train", *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, **kwargs)

    reference = torchrun("--config", str(config), "--out", str(tmp_path / "reference"))  # runs meanwhile
    victim = torchrun("--config", str(config), "--out", str(tmp_path / "victim"), start_new_session=True)
    metrics = tmp_path / "victim" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGTERM)
    assert victim.wait(timeout=300) != 0
    stopped_at = max(m["step"] for m in read_metrics(tmp_path / "victim"))
    assert stopped_at < 40, "the run finished before the signal"
    assert f"stopped by SIGTERM after step {stopped_at}, checkpoint written" in victim.stderr.read()
    assert checkpoints(tmp_path / "victim") == ["latest", f"step_{stopped_at:08d}"]
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]

    resumed = torchrun("--resume", str(tmp_path / "victim"))
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    expected = [(m["step"], m["loss"]) for m in read_metrics(tmp_path / "reference")]
    assert [(m["step"], m["loss"]) for m in read_metrics(tmp_path / "victim")] == expected
