"""The training step (``ul_fast/train/step.py`` and the trainer's use of it): a step reads nothing back from the
device, a skipped step changes nothing, the metric window is read once per record, each stage's whole loss
compiles into one graph, FLOPs and MFU are logged, and on CUDA a captured step replays exactly (GPU tests)."""

from __future__ import annotations

import signal
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ul_fast.config import ConfigError
from ul_fast.model import UnifiedLatents
from ul_fast.train import Trainer, TrainingInterrupted
from ul_fast.train.flops import flops_per_example, peak_tflops
from ul_fast.train.metrics_log import read_metrics

from micro import MICRO, micro_config
from spies import record_host_reads

NO_EVAL = {"eval_every": 1000, "checkpoint_every": 1000, "log_every": 1000}
CASES = {
    "stage 1": ({}, {}, 1),
    "stage 2, class-conditional": ({}, {}, 2),
    "single stage, class-conditional": ({"mode": "single_stage"}, {"stage2_steps": 0}, 1),
    "normal prior and mse decoder": ({"latent_prior": "normal", "decoder_loss": "mse"}, {}, 1),
    "gradient accumulation": ({}, {"grad_accumulation": 2}, 1),
    "activation checkpointing": ({}, {"activation_checkpointing": True}, 1),
}


def make_trainer(tmp_path, model=None, train=None, stage: int = 1) -> Trainer:
    trainer = Trainer(micro_config(model=model or {}, train={**NO_EVAL, **(train or {})}), tmp_path / "run")
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    if stage == 2:
        trainer._start_stage(2)  # freezes stage 1 and evaluates its latents' rate (reads, before the steps)
    return trainer


@pytest.mark.parametrize("case", CASES)
def test_a_training_step_reads_nothing_back_from_the_device(tmp_path, case):
    """No ``item``/``tolist``/``float``/``int``/``bool`` of a tensor in a step (before: about 130 per tiny stage-1
    step: AdamW's step counters, the non-finite check, each metric, the pixels' finiteness, the KL constants):
    the GPU is never waited for; the metric window is then read with one ``tolist``."""
    model, train, stage = CASES[case]
    trainer = make_trainer(tmp_path, model, train, stage)
    trainer.train_step()  # the first step creates the optimiser's state and the window
    with record_host_reads() as reads:
        for _ in range(3):
            trainer.train_step()
    assert reads == []
    with record_host_reads() as reads:
        window = trainer.step.window.read()
    assert len(reads) == 1 and reads[0].startswith("tolist at step.py:"), reads
    assert window["applied_steps"] == 4 and window["skipped_steps"] == 0 and window["loss"] > 0


def test_the_training_loop_reads_the_device_only_at_records_and_checkpoints(tmp_path, monkeypatch):
    reads_per_step: list[list[str]] = []
    real_step = Trainer.train_step

    def recorded(self):
        with record_host_reads() as reads:
            real_step(self)
        reads_per_step.append(reads)

    monkeypatch.setattr(Trainer, "train_step", recorded)
    Trainer(micro_config(train={"stage1_steps": 6, "stage2_steps": 4, "log_every": 2, "checkpoint_every": 3,
                                "eval_every": 1000}), tmp_path / "run").fit()
    assert len(reads_per_step) == 10 and all(reads == [] for reads in reads_per_step), reads_per_step


def test_a_skipped_step_changes_nothing_on_the_device(tmp_path, monkeypatch):
    """A non-finite loss: weights, EMA and the optimiser's moments and step counts stay as they were (fused AdamW
    reads the flag on the device), the window counts the step as skipped and averages only the applied ones."""
    trainer = make_trainer(tmp_path)
    for _ in range(2):
        trainer.train_step()
    before = snapshot(trainer)
    real_loss = trainer._loss

    def poisoned(micro):
        out = real_loss(micro)
        return {**out, "loss": out["loss"] * float("inf")}

    monkeypatch.setattr(trainer, "_loss", poisoned)
    trainer.train_step()
    after = snapshot(trainer)
    assert before.keys() == after.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    window = trainer.step.window.read()
    assert window["applied_steps"] == 2 and window["skipped_steps"] == 1 and window["longest_skipped_run"] == 1
    monkeypatch.setattr(trainer, "_loss", real_loss)
    trainer.train_step()
    changed = snapshot(trainer)
    assert any(not torch.equal(changed[k], after[k]) for k in after if k.startswith("model.decoder."))
    assert trainer.step.window.read()["longest_skipped_run"] == 1  # the run of skips ended, the longest stays


def snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Weights, EMA weights and every optimiser state tensor, copied."""
    out = {f"model.{k}": v.clone() for k, v in trainer.model.state_dict().items()}
    out.update({f"ema.{k}": v.clone() for k, v in trainer.ema_model.state_dict().items()})
    for i, state in enumerate(trainer.optimizer.state.values()):
        out.update({f"optimizer.{i}.{k}": v.clone() for k, v in state.items()})
    return out


def test_the_metric_window_survives_a_resume_inside_it(tmp_path, monkeypatch):
    """A checkpoint inside a log window carries the window's sums: the run stopped (SIGINT) after step 3 and
    resumed logs the records of the uninterrupted run, including steps 3–4's (log_every 2)."""
    train = {"stage1_steps": 6, "stage2_steps": 0, "log_every": 2, "checkpoint_every": 1000, "eval_every": 1000}
    Trainer(micro_config(train=train), tmp_path / "reference").fit()
    victim = Trainer(micro_config(train=train), tmp_path / "victim")
    real_step = victim.train_step

    def interrupted_at_step_3():
        real_step()
        if victim.stage_step == 2:  # this is step 3
            victim._stop_signal = signal.SIGINT

    monkeypatch.setattr(victim, "train_step", interrupted_at_step_3)
    with pytest.raises(TrainingInterrupted, match="after step 3"):
        victim.fit()
    Trainer(micro_config(train=train), tmp_path / "victim").fit(resume=True)
    expected = [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(tmp_path / "reference")]
    got = [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(tmp_path / "victim")]
    assert got == expected


def test_a_stage_whose_every_step_was_skipped_fails(tmp_path, monkeypatch):
    from ul_fast.train import TrainingDiverged

    trainer = Trainer(micro_config(train={"stage1_steps": 3, "stage2_steps": 2, "max_bad_steps": 10,
                                          **{k: v for k, v in NO_EVAL.items() if k != "log_every"}}),
                      tmp_path / "run")
    real_loss = trainer._loss
    def poisoned(micro):
        out = real_loss(micro)
        return {**out, "loss": out["loss"] * float("nan")}

    monkeypatch.setattr(trainer, "_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="every one of the 3 steps of stage 1 was skipped"):
        trainer.fit()
    assert trainer.stage == 1  # stage 2 never started on an untrained stage 1


def test_an_update_that_made_the_weights_non_finite_stops_the_run_and_writes_nothing(tmp_path, monkeypatch):
    """Issue 23 item 7, the trainer's side: a diverged update (finite loss and gradient, non-finite weights after
    it) never reaches a checkpoint; the run stops at the next checkpoint and the newest good one stays newest."""
    from ul_fast.train import TrainingDiverged
    from ul_fast.train.checkpoint import latest_checkpoint

    trainer = Trainer(micro_config(train={"stage1_steps": 8, "stage2_steps": 0, "checkpoint_every": 2,
                                          "log_every": 1, "eval_every": 1000, "keep_last": 1}), tmp_path / "run")
    real_step = trainer.train_step

    def diverging_step():
        real_step()
        if trainer.stage_step == 2:  # step 3's update blows a weight up
            with torch.no_grad():
                next(trainer.model.decoder.parameters()).fill_(float("inf"))

    monkeypatch.setattr(trainer, "train_step", diverging_step)
    with pytest.raises(TrainingDiverged, match="the weights are no longer finite at step 4 .*holds NaN or inf"):
        trainer.fit()
    assert latest_checkpoint(tmp_path / "run").name == "step_00000002"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["latest", "step_00000002"]


# ------------------------------------------------------------------------------- one compiled loss
@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c != "gradient accumulation"])
def test_each_stages_whole_loss_traces_into_one_graph(tmp_path, case):
    """torch.compile(fullgraph=True) of the loss the trainer calls (networks, ops and losses, with the step's
    draws as inputs): dynamo finds no graph break (CI checks it on the CPU with torch._dynamo.explain)."""
    model, train, stage = CASES[case]
    trainer = make_trainer(tmp_path, model, train, stage)
    micro = trainer._micro_batch()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(trainer.model)(micro.images, micro.labels, micro.context, micro.pooled,
                                                       stage=stage, z_clean=micro.z_clean, draws=micro.draws)
    assert explanation.graph_break_count == 0, [r.reason.splitlines()[0] for r in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_train_compile_compiles_the_whole_loss_with_fullgraph(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(UnifiedLatents, "compile", lambda self, **kwargs: calls.append(kwargs))
    Trainer(micro_config(train={"compile": True}), tmp_path / "run")
    assert calls == [{"fullgraph": True}]


# ------------------------------------------------------------------------------- activation checkpointing
def _saved_bytes(trainer: Trainer) -> int:
    """Bytes that autograd keeps for the backward of one micro-batch's loss (the activations)."""
    micro, saved = trainer._micro_batch(), []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        loss = trainer._loss(micro)["loss"]
    loss.backward()
    return sum(saved)


@pytest.mark.parametrize("model", [{"num_classes": 10}, {"num_classes": 10, "mode": "single_stage"},
                                   {"num_classes": 10, "decoder": {**MICRO["model"]["decoder"], "dropout": 0.2},
                                    "base": {**MICRO["model"]["base"], "dropout": 0.2}}],
                         ids=["two stages", "single stage", "dropout"])
def test_activation_checkpointing_stores_less_and_computes_the_same(tmp_path, model):
    """train.activation_checkpointing: every transformer and residual block recomputes its activations in the
    backward pass. The step's losses, gradient norms, weights, EMA and AdamW state equal those of the step that
    stores them (the same ops on the same inputs; with dropout, the RNG state restored for the recomputation), and
    autograd keeps a fraction of the bytes."""
    train = {} if model.get("mode") != "single_stage" else {"stage2_steps": 0}
    stored, stored_state = _train_steps(tmp_path, "stored", 3, device="cpu", model=model, **train)
    recomputed, recomputed_state = _train_steps(tmp_path, "recomputed", 3, device="cpu", model=model,
                                                activation_checkpointing=True, **train)
    assert recomputed == stored
    assert [k for k in stored_state if not torch.equal(stored_state[k], recomputed_state[k])] == []
    for stage in (1, 2) if "mode" not in model else (1,):
        plain = make_trainer(tmp_path / f"plain{stage}", model, train, stage)
        checkpointed = make_trainer(tmp_path / f"checkpointed{stage}", model,
                                    {**train, "activation_checkpointing": True}, stage)
        assert _saved_bytes(checkpointed) < 0.5 * _saved_bytes(plain)  # micro sizes: 0.30 (stage 1), 0.15 (2)


def test_activation_checkpointing_leaves_evaluation_and_the_ema_model_alone(tmp_path, monkeypatch):
    from ul_fast.nets import layers

    trainer = make_trainer(tmp_path, train={"activation_checkpointing": True})
    blocks = [m for m in trainer.model.modules() if isinstance(m, layers.CheckpointedBlock)]
    assert len(blocks) > 4 and all(b.checkpointed for b in blocks)
    assert not any(m.checkpointed for m in trainer.ema_model.modules() if isinstance(m, layers.CheckpointedBlock))
    calls = []
    monkeypatch.setattr(layers, "checkpoint", lambda fn, *args, **kwargs: calls.append(fn) or fn(*args))
    images = torch.rand(2, *trainer.model.image_shape) * 2 - 1
    with torch.no_grad():  # nothing recorded, nothing to recompute: the plain forward runs
        trainer.model.encode(images)
    assert calls == []
    trainer.model.encode(images).sum().backward()
    assert len(calls) == sum(isinstance(m, layers.CheckpointedBlock) for m in trainer.model.encoder.modules()) > 0


@pytest.mark.slow
def test_a_checkpointed_loss_still_traces_into_one_graph(tmp_path):
    trainer = make_trainer(tmp_path, {"num_classes": 10}, {"activation_checkpointing": True})
    micro = trainer._micro_batch()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(trainer.model)(micro.images, micro.labels, micro.context, micro.pooled,
                                                       stage=1, z_clean=micro.z_clean, draws=micro.draws)
    assert explanation.graph_break_count == 0, [r.reason.splitlines()[0] for r in explanation.break_reasons]
    assert explanation.graph_count == 1


# ------------------------------------------------------------------------------- FLOPs and MFU
def test_flops_are_counted_on_the_meta_device_as_on_real_tensors():
    config = micro_config(model={"num_classes": 10}).model
    for stage in (1, 2):
        torch.manual_seed(0)
        model = UnifiedLatents(config)
        prefixes = tuple(f"{n}." for n in model.trained_networks(stage))
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(prefixes))
        x = torch.rand(4, *model.image_shape) * 2 - 1
        labels = torch.arange(4) if stage == 2 else None
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):  # attention as matmuls
            model(x, labels, stage=stage)["loss"].backward()
        assert flops_per_example(config, stage) == counter.get_total_flops() / 4


def test_tflops_and_mfu_are_logged(tmp_path):
    train = {"stage1_steps": 2, "stage2_steps": 0, "log_every": 1, "eval_every": 1000, "checkpoint_every": 1000}
    Trainer(micro_config(train=train), tmp_path / "no-peak").fit()
    records = read_metrics(tmp_path / "no-peak")
    assert all(r["tflops"] > 0 and "mfu" not in r for r in records)  # a CPU has no entry in the peak table
    Trainer(micro_config(train={**train, "peak_tflops": 0.5}), tmp_path / "peak").fit()
    for record in read_metrics(tmp_path / "peak"):
        assert record["mfu"] == pytest.approx(record["tflops"] / 0.5)
        per_example = flops_per_example(micro_config().model, 1)
        assert record["tflops"] == pytest.approx(per_example * record["images_per_s"] / 1e12, rel=1e-6)


def test_peak_table():
    assert peak_tflops(torch.device("cpu")) is None
    assert peak_tflops(torch.device("cpu"), 123.0) == 123.0
    with pytest.raises(ConfigError, match="train.peak_tflops must be >= 0"):
        micro_config(train={"peak_tflops": -1.0})


# ------------------------------------------------------------------------------- CUDA graphs
def test_cuda_graph_needs_cuda_and_one_process(tmp_path):
    with pytest.warns(UserWarning, match="train.cuda_graph needs a CUDA device: on cpu the step runs eagerly"):
        trainer = Trainer(micro_config(train={"cuda_graph": True, "device": "cpu"}), tmp_path / "run")
    assert trainer.step.graphs is None
    with pytest.raises(ConfigError, match="train.cuda_graph captures the step of one process"):
        Trainer(micro_config(train={"cuda_graph": True}), tmp_path / "ddp", rank=0, world_size=2)


def _train_steps(tmp_path, name: str, steps: int, device: str = "cuda", model: dict | None = None,
                 **train) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Both stages' first ``steps`` steps: each step's metric window, and every weight and optimiser tensor."""
    config = micro_config(model=model or {}, train={**NO_EVAL, "device": device, **train})
    trainer = Trainer(config, tmp_path / name)
    windows = []
    for stage in (1,) if trainer.model.single_stage else (1, 2):
        if stage == 2:
            trainer._start_stage(2)
        for _ in range(steps):
            trainer.train_step()
            windows.append(trainer.step.window.read())
            trainer.step.window.reset()
    return windows, snapshot(trainer)


@pytest.mark.gpu
def test_a_replayed_step_equals_the_eager_step_for_step(tmp_path):
    """train.cuda_graph: 3 warm-up steps, a capture, then replays; losses, gradient norms, weights, EMA and the
    optimiser's state equal the eager run's exactly (the same kernels on the same inputs, replayed)."""
    eager, eager_state = _train_steps(tmp_path, "eager", 8)
    graphed, graphed_state = _train_steps(tmp_path, "graphed", 8, cuda_graph=True)
    assert graphed == eager
    assert [k for k in eager_state if not torch.equal(eager_state[k], graphed_state[k])] == []


@pytest.mark.gpu
def test_a_replayed_checkpointed_step_equals_the_eager_step(tmp_path):
    """Activation checkpointing inside a captured step: the recomputation is part of the graph."""
    eager, eager_state = _train_steps(tmp_path, "eager", 6)
    graphed, graphed_state = _train_steps(tmp_path, "graphed", 6, cuda_graph=True, activation_checkpointing=True)
    assert graphed == eager
    assert [k for k in eager_state if not torch.equal(eager_state[k], graphed_state[k])] == []


@pytest.mark.gpu
def test_a_failed_capture_warns_once_and_trains_eagerly(tmp_path, monkeypatch):
    from ul_fast.train import step as step_module

    class Refused:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("capture refused for the test")

    monkeypatch.setattr(step_module.torch.cuda, "graph", Refused)
    eager, eager_state = _train_steps(tmp_path, "eager", 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed, graphed_state = _train_steps(tmp_path, "graphed", 6, cuda_graph=True)
    messages = [str(w.message) for w in caught if "CUDA-graph capture of the training step failed" in str(w.message)]
    assert len(messages) == 2 and "capture refused for the test" in messages[0]  # once per stage's step
    assert graphed == eager
    assert [k for k in eager_state if not torch.equal(eager_state[k], graphed_state[k])] == []
