"""Two processes with torchrun and gloo (DDP, and FSDP2) train like one process on the same global batch."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ul_fast.data import BatchStream, load_dataset
from ul_fast.model import UnifiedLatents
from ul_fast.train.checkpoint import latest_checkpoint
from ul_fast.train.logging import read_metrics
from ul_fast.train.trainer import STAGE_NETWORKS, lr_factor

from micro import MICRO, micro_config

TRAIN = {"stage1_steps": 1, "stage2_steps": 0, "batch_size": 8, "checkpoint_every": 1, "log_every": 1,
         "eval_every": 1000, "seed": 3}


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path, parallel):
    data = {k: dict(v) for k, v in MICRO.items()}
    data["train"].update(TRAIN, parallel=parallel)
    config_path = tmp_path / "micro.yaml"
    config_path.write_text(yaml.safe_dump(data))
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "ul_fast.cli", "train", "--config", str(config_path), "--out", str(run)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # One process, same initial weights, same global batch, each half with its rank's generator.
    config = micro_config(train=TRAIN)
    t = config.train
    torch.manual_seed(t.seed)
    model = UnifiedLatents(config.model)
    images, _ = BatchStream(load_dataset("fmnist-embedded", "train", 16), t.batch_size, t.seed).next_batch()
    half = t.batch_size // 2
    losses = [model(images[r * half:(r + 1) * half], generator=torch.Generator().manual_seed(t.seed * 1000 + r),
                    stage=1)["loss"] for r in (0, 1)]
    loss = torch.stack(losses).mean()
    assert read_metrics(run)[0]["loss"] == pytest.approx(loss.item(), rel=1e-5)

    params = [p for n, p in model.named_parameters() if n.startswith(STAGE_NETWORKS[1])]
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(STAGE_NETWORKS[1]))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
    optimizer = torch.optim.AdamW(params, lr=t.lr * lr_factor(0, t.warmup_steps, t.stage1_steps),
                                  weight_decay=t.weight_decay, betas=(0.9, 0.99))
    optimizer.step()
    trained = load_file(latest_checkpoint(run) / "model.safetensors")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-6, msg=name)


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
