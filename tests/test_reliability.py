"""The CLI as a new user meets it: misuse, corruption, concurrent runs and kills, end to end.

Each case runs the real ``ul-fast`` command in a subprocess and asserts the two promises of a run you can
trust: no run is lost, overwritten or silently corrupted, and every user error is one line on stderr
(``ul-fast: error: …``, no traceback) with a non-zero exit code, before any training work is done.
The per-item unit tests live in ``test_run_safety.py``, ``test_fail_early.py`` and ``test_cli.py``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from micro import MICRO

pytestmark = pytest.mark.slow


def _run(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("UL_FAST_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "ul_fast.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def _spawn(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ul_fast.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _micro_yaml(folder: Path, **train) -> Path:
    data = {key: dict(value) for key, value in MICRO.items()}
    data["train"].update(train)
    path = folder / "micro.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _fingerprint(run: Path) -> dict[str, str]:
    """SHA-256 of every file under a run folder (the lock file aside), to show it was not touched."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


def _assert_one_line_error(done: subprocess.CompletedProcess, *words: str) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    # warnings (e.g. a deprecation note) may precede the error; the error itself is one line, no traceback
    errors = [line for line in lines if line.startswith("ul-fast: error:")]
    assert done.returncode != 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert len(errors) == 1, done.stderr
    for word in words:
        assert word in errors[0], (word, errors[0])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished micro run (stage 1 and stage 2) shared by the read-only cases."""
    folder = tmp_path_factory.mktemp("reliability")
    run = folder / "run"
    done = _run("train", "--config", str(_micro_yaml(folder, stage1_steps=4, stage2_steps=2, eval_every=4)),
                "--out", str(run), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def _misuse_cases(tmp: Path, run: Path) -> list[tuple[str, list[str], tuple[str, ...]]]:
    """``(name, argv, words the one-line error must contain)``."""
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("model:\n  image_size: [16\n")
    int64_array = tmp / "int64.npy"
    np.save(int64_array, np.zeros((8, 32, 32), dtype=np.int64))
    out = str(tmp / "new")
    return [
        ("no --out", ["train", "--config", "tiny"], ("--out",)),
        ("missing config file", ["train", "--config", str(tmp / "nope.yaml"), "--out", out], ("nope.yaml",)),
        ("unknown preset", ["train", "--config", "tinyy", "--out", out], ("tinyy",)),
        ("YAML syntax error in a file", ["train", "--config", str(bad_yaml), "--out", out], ("bad.yaml",)),
        ("YAML syntax error in --set", ["train", "--out", out, "--set", "model.image_size=[1"], ("model.image_size",)),
        ("unknown key", ["train", "--out", out, "--set", "model.loss_factr=2"], ("model.loss_factr",)),
        ("negative grad_clip", ["train", "--out", out, "--set", "train.grad_clip=-1"], ("train.grad_clip",)),
        ("negative warmup", ["train", "--out", out, "--set", "train.warmup_steps=-1"], ("train.warmup_steps",)),
        ("no eval images", ["train", "--out", out, "--set", "train.eval_images=0"], ("train.eval_images",)),
        ("no grid images", ["train", "--out", out, "--set", "sample.grid_images=0"], ("sample.grid_images",)),
        ("head_dim 0", ["train", "--out", out, "--set", "model.prior.head_dim=0"], ("head_dim",)),
        ("patch 0", ["train", "--out", out, "--set", "model.decoder.patch=0"], ("patch",)),
        ("no steps at all", ["train", "--out", out, "--set", "train.stage1_steps=0", "--set",
                             "train.stage2_steps=0"], ("stage1_steps",)),
        ("cuda without CUDA", ["train", "--out", out, "--set", "train.device=cuda"], ("train.device",)),
        ("missing data folder", ["train", "--out", out, "--set", f"data.dataset=folder:{tmp / 'none'}"],
         ("none",)),
        ("int64 image array", ["train", "--out", out, "--set", f"data.dataset=array:{int64_array}"], ("int64",)),
        ("resume of nothing", ["train", "--resume", str(tmp / "none")], ("none",)),
        ("sample from nothing", ["sample", "--run", str(tmp / "none")], ("none",)),
        ("sample -n 0", ["sample", "--run", str(run), "-n", "0"], ("-n",)),
        ("sample -n negative", ["sample", "--run", str(run), "-n", "-3"], ("-n",)),
        ("latent steps 0", ["sample", "--run", str(run), "--latent-steps", "0"], ("--latent-steps",)),
        ("decoder steps 0", ["sample", "--run", str(run), "--decoder-steps", "0"], ("--decoder-steps",)),
        ("--out not an image", ["sample", "--run", str(run), "--out", str(tmp / "grid.txt")], ("grid.txt",)),
        ("label out of range", ["sample", "--run", str(run), "--label", "99"], ("--label",)),
        ("plot of nothing", ["plot", str(tmp / "none")], ("none",)),
    ]


def test_every_misuse_is_one_line_and_nonzero_and_touches_no_run(trained_run, tmp_path):
    before = _fingerprint(trained_run)
    failures = []
    for name, argv, words in _misuse_cases(tmp_path, trained_run):
        done = _run(*argv, timeout=180, cwd=tmp_path)
        try:
            _assert_one_line_error(done, *words)
        except AssertionError as error:
            failures.append(f"{name}: {error}")
        assert not (tmp_path / "new" / "checkpoints").exists(), f"{name}: training started"
    assert not failures, "\n".join(failures)
    assert _fingerprint(trained_run) == before


def test_out_onto_an_existing_run_is_refused_and_the_run_kept(trained_run, tmp_path):
    before = _fingerprint(trained_run)
    done = _run("train", "--config", str(_micro_yaml(tmp_path)), "--out", str(trained_run), "--no-progress")
    _assert_one_line_error(done, "--resume")
    assert _fingerprint(trained_run) == before


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    """Random bytes in the newest checkpoint's tensor data: resume names the damaged file, takes the previous
    checkpoint, and retrains onto exactly the uninterrupted run's losses."""
    config = _micro_yaml(tmp_path, stage1_steps=6, stage2_steps=0, checkpoint_every=2, keep_last=2,
                         eval_every=1000, log_every=1)
    reference = _run("train", "--config", str(config), "--out", str(tmp_path / "reference"), "--no-progress")
    assert reference.returncode == 0, reference.stderr[-3000:]
    victim = tmp_path / "victim"
    first = _run("train", "--config", str(config), "--out", str(victim), "--no-progress")
    assert first.returncode == 0, first.stderr[-3000:]
    newest = sorted((victim / "checkpoints").glob("step_*"))[-1] / "model.safetensors"
    blob = bytearray(newest.read_bytes())
    middle = len(blob) // 2
    blob[middle:middle + 64] = os.urandom(64)
    newest.write_bytes(bytes(blob))
    resumed = _run("train", "--resume", str(victim), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "model.safetensors" in resumed.stderr  # the damaged file is named
    from ul_fast.train.metrics_log import read_metrics

    expected = [(m["step"], m["loss"]) for m in read_metrics(tmp_path / "reference") if "loss" in m]
    got = [(m["step"], m["loss"]) for m in read_metrics(victim) if "loss" in m]
    assert got == expected


def test_two_trainings_into_one_folder_the_second_fails_at_once(tmp_path):
    config = _micro_yaml(tmp_path, stage1_steps=400, stage2_steps=0, checkpoint_every=1000, eval_every=1000)
    run = tmp_path / "run"
    first = _spawn("train", "--config", str(config), "--out", str(run), "--no-progress")
    try:
        deadline = time.time() + 120
        while not (run / "config.yaml").exists() and time.time() < deadline:
            time.sleep(0.1)
        second = _run("train", "--resume", str(run), "--no-progress", timeout=120)
        _assert_one_line_error(second, str(first.pid))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def test_a_stale_lock_of_a_killed_run_does_not_block_resume(tmp_path):
    config = _micro_yaml(tmp_path, stage1_steps=40, stage2_steps=0, checkpoint_every=2, eval_every=1000)
    run = tmp_path / "run"
    victim = _spawn("train", "--config", str(config), "--out", str(run), "--no-progress")
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run ended before the kill"  # 137 in a shell
    resumed = _run("train", "--resume", str(run), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_sigterm_checkpoints_and_exits_with_one_line(tmp_path):
    config = _micro_yaml(tmp_path, stage1_steps=400, stage2_steps=0, checkpoint_every=1000, eval_every=1000,
                         log_every=1)
    run = tmp_path / "run"
    victim = _spawn("train", "--config", str(config), "--out", str(run), "--no-progress")
    deadline = time.time() + 600  # a loaded 2-core machine can take minutes to import torch and start
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and victim.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    else:  # a signal before the run has started would test nothing
        victim.kill()
        pytest.fail(f"the run logged no two steps before the deadline or exited (status {victim.poll()})")
    victim.send_signal(signal.SIGTERM)
    _, stderr = victim.communicate(timeout=120)
    assert victim.returncode == 128 + signal.SIGTERM, (victim.returncode, stderr[-2000:])  # 143: stopped mid-run
    assert "stopped by SIGTERM after step" in stderr
    assert "Traceback" not in stderr, stderr
    assert (run / "checkpoints" / "latest").exists(), "no checkpoint was written on SIGTERM"


# ----------------------------------------------------------------------------- issue 23: items 5, 6, 8, 10, 11
def _copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns(".lock"))
    return to


def _png_folder(root: Path, count: int, size: int = 1) -> Path:
    from PIL import Image

    root.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(np.full((size, size), 40 * (i % 6), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def test_values_that_cannot_train_are_refused_naming_the_key(tmp_path):
    """Item 8: `train.lr=.inf` trained to all-NaN checkpoints and `model.loss_factor=.inf` skipped all of stage 1,
    both with exit status 0."""
    out = tmp_path / "new"
    cases = [(["--set", "train.lr=.inf"], "train.lr must be a finite number"),
             (["--set", "train.base_lr=.nan"], "train.base_lr must be a finite number"),
             (["--set", "model.loss_factor=.inf"], "model.decoder_weighting.factor must be a finite number"),
             (["--set", "sample.guidance=.inf"], "sample.guidance must be a finite number"),
             (["--set", "train.ema_decay=.nan"], "train.ema_decay must be a finite number")]
    for options, words in cases:
        _assert_one_line_error(_run("train", "--out", str(out), *options, cwd=tmp_path), words)
    assert not out.exists()


def test_a_folder_too_large_for_memory_is_refused_pointing_to_folder_stream(tmp_path):
    """Item 5: folder: read every image into memory whatever its size. 1x1 images read at model.image_size 2048:
    enough of them to need more than half the available memory."""
    from ul_fast.devices import available_memory

    if available_memory() is None:
        pytest.skip("this system does not tell its available memory")
    per_image = 2048 * 2048 * 6  # one channel, 6 bytes per value while loading
    # 1.5x the refused amount: other processes freeing memory before the run starts must not make it fit
    count = int(0.75 * available_memory() / per_image) + 20
    if count > 20_000:
        pytest.skip(f"this machine has too much memory for a quick case ({count} images needed)")
    data = _png_folder(tmp_path / "data", count)
    config = _micro_yaml(tmp_path)
    done = _run("train", "--config", str(config), "--out", str(tmp_path / "run"), "--set", "model.image_size=2048",
                "--set", "model.num_classes=0", "--set", f"data.dataset=folder:{data}", "--no-progress")
    _assert_one_line_error(done, f"folder:{data} holds {count:,} images", f"data.dataset folder-stream:{data}")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_encode_follows_on_bad_image_and_two_encodes_exclude_each_other(trained_run, tmp_path):
    """Item 6: encode stopped at the first undecodable image; two encodes into one folder were not locked."""
    data = _png_folder(tmp_path / "data", 6, size=20)
    (data / "9_bad.png").write_bytes(b"not an image")
    skipped = _run("encode", "--run", str(trained_run), "--data", f"folder:{data}", "--out", str(tmp_path / "a"),
                   "--no-progress")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "ul-fast: warning: left an image that does not decode out of the cache" in skipped.stderr
    assert "9_bad.png" in skipped.stderr
    _assert_one_line_error(_run("encode", "--run", str(trained_run), "--data", f"folder:{data}", "--out",
                                str(tmp_path / "b"), "--on-bad-image", "fail", "--no-progress"),
                           "9_bad.png: cannot decode", "on_bad_image is fail")
    holder = subprocess.Popen([sys.executable, "-c", "import time; from ul_fast.train.run_folder import RunLock\n"
                               f"with RunLock({str(tmp_path / 'c')!r}, 'encode'):\n    print('locked', flush=True); "
                               "time.sleep(300)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = _run("encode", "--run", str(trained_run), "--data", f"folder:{data}", "--out", str(tmp_path / "c"),
                      "--no-progress")
        _assert_one_line_error(second, f"in use by another encode (pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()


def test_a_damaged_older_checkpoint_is_moved_aside_on_resume(tmp_path):
    """Item 10: a damaged checkpoint that is not the newest was reported but left in place."""
    config = _micro_yaml(tmp_path, stage1_steps=6, stage2_steps=0, checkpoint_every=2, keep_last=2, eval_every=1000)
    run = tmp_path / "run"
    assert _run("train", "--config", str(config), "--out", str(run), "--no-progress").returncode == 0
    older = run / "checkpoints" / "step_00000004" / "ema.safetensors"
    older.write_bytes(older.read_bytes()[:-64] + os.urandom(64))
    (run / "checkpoints" / "latest").write_text("step_00000004\n")  # as after a kill before latest moved on
    resumed = _run("train", "--resume", str(run), "--set", "train.stage1_steps=8", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping checkpoint step_00000004" in resumed.stderr
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["corrupt-step_00000004", "latest", "step_00000006", "step_00000008"]


def test_an_older_versions_checkpoint_of_nan_weights_is_never_taken(trained_run, tmp_path):
    """Item 7, the checkpoint side: a checkpoint of non-finite weights (as an older version wrote them when a run
    diverged) is skipped by sampling and moved to nonfinite-step_* by a resume."""
    import torch
    from safetensors.torch import load_file, save_file

    from ul_fast.train.checkpoint import _write_checksums

    run = _copy_run(trained_run, tmp_path / "run")
    newest = sorted((run / "checkpoints").glob("step_*"))[-1]
    for name in ("model.safetensors", "ema.safetensors"):
        weights = load_file(newest / name)
        save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in weights.items()},
                  newest / name, metadata={"format": "ul_fast.checkpoint.v1"})
    (newest / "checksums.json").unlink()
    _write_checksums(newest)
    sampled = _run("sample", "--run", str(run), "-n", "2", "--out", str(tmp_path / "s.png"), "--no-progress")
    assert sampled.returncode == 0 and f"skipping checkpoint {newest.name}" in sampled.stderr, sampled.stderr
    resumed = _run("train", "--resume", str(run), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / "checkpoints" / f"nonfinite-{newest.name}").is_dir()


def test_messages_that_pointed_the_wrong_way(trained_run, tmp_path):
    """Item 11: each case gave a misleading message (or none); now one line naming the real problem."""
    before = _fingerprint(trained_run)
    run = str(trained_run)
    empty = _copy_run(trained_run, tmp_path / "empty")
    (empty / "config.yaml").write_text("")
    cut = _copy_run(trained_run, tmp_path / "cut")
    text = (cut / "config.yaml").read_text()
    (cut / "config.yaml").write_text(text[:text.index("\ntrain:")])
    dots = _copy_run(trained_run, tmp_path / "dots")
    (dots / "checkpoints" / "latest").write_text("..\n")
    file = tmp_path / "a-file"
    file.write_text("keep me")
    bad_images = _png_folder(tmp_path / "bad", 3, size=16)
    (bad_images / "1.png").write_bytes(b"GIF89a garbage")
    unconditional = tmp_path / "unconditional"
    trained = _run("train", "--config", str(_micro_yaml(tmp_path, stage1_steps=2, stage2_steps=1, eval_every=1000)),
                   "--set", "model.num_classes=0", "--out", str(unconditional), "--no-progress")
    assert trained.returncode == 0, trained.stderr[-3000:]
    cases = [
        (["sample", "--run", str(empty)], (f"{empty / 'config.yaml'} is empty",)),
        (["train", "--resume", str(empty)], ("is empty",)),
        (["eval", "--run", str(cut)], ("lacks train.seed", "truncated")),
        (["train", "--resume", str(dots), "--set", "train.stage2_steps=3"], None),  # falls back, warns, trains
        (["train", "--out", str(file)], (f"{file} is a file, not a folder",)),
        (["encode", "--run", run, "--out", str(file)], ("is a file, not a folder",)),
        (["train", "--resume", run, "--out", str(tmp_path / "x")], ("drop --out",)),
        (["train", "--resume", run, "--config", "tiny"], ("drop --config tiny",)),
        (["train", "--out", str(tmp_path / "y"), "--config", str(_micro_yaml(tmp_path)), "--set",
          "model.num_classes=0", "--set", f"data.dataset=folder:{bad_images}"], (f"{bad_images / '1.png'}",)),
        (["sample", "--run", str(unconditional), "--label", "0"], ("is unconditional", "drop --label")),
        (["train", "--out", str(tmp_path / "z"), "--config", str(_micro_yaml(tmp_path)), "--set",
          f"train.init_from={run}", "--set", "train.stage1_steps=0", "--set", "model.image_size=32"],
         (f"train.init_from {run} was trained with model.image_size 16",)),
    ]
    failures = []
    for argv, words in cases:
        done = _run(*argv, cwd=tmp_path)
        try:
            if words is None:
                assert done.returncode == 0, done.stderr[-2000:]
                assert "holds '..', not the name of a checkpoint folder" in done.stderr
            else:
                _assert_one_line_error(done, *words)
                assert "BytesIO" not in done.stderr
        except AssertionError as error:
            failures.append(f"{argv}: {error}")
    assert not failures, "\n".join(failures)
    assert file.read_text() == "keep me" and _fingerprint(trained_run) == before
