"""Progressive distillation of the decoder (``ul_fast.train.distill``, ``ul-fast distill``): the target makes one
DDIM step land on the teacher's two; a micro distillation writes a run folder that sample and eval load, with the
teacher's other networks unchanged; an interrupted distillation resumes to the same weights; misuse is one line."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ul_fast import cli
from ul_fast.config import load_config, save_config
from ul_fast.data import load_dataset
from ul_fast.diffusion import make_schedule
from ul_fast.sampling import logsnr_grid, sample_ddim
from ul_fast.train import Trainer, load_trained_model
from ul_fast.train.checkpoint import latest_checkpoint
from ul_fast.train.distill import (
    DISTILL_FILE,
    Distiller,
    DistillSettings,
    ddim_step,
    round_steps,
    student_target,
)

from cli_helpers import one_line_error
from micro import micro_config


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A micro run (2 + 2 steps) on 64 training and 16 test images of the embedded Fashion-MNIST."""
    folder = tmp_path_factory.mktemp("distill")
    arrays = {}
    for split, count in (("train", 64), ("test", 16)):
        data = load_dataset("fmnist-embedded", split, image_size=16)
        arrays[f"{split}_images"] = ((data.images[:count, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
        arrays[f"{split}_labels"] = data.labels[:count].numpy()
    np.savez(folder / "small.npz", **arrays)
    config = micro_config(data={"dataset": f"array:{folder / 'small.npz'}"},
                          train={"stage1_steps": 2, "stage2_steps": 2, "eval_every": 1000, "checkpoint_every": 1000})
    Trainer(config, folder / "teacher").fit()
    return folder / "teacher"


def settings(run, **changes) -> DistillSettings:
    """Micro settings: 4 → 1 decoder steps (two rounds of 3 steps), batch 4, a checkpoint every 2 steps."""
    values = {"teacher": str(run), "from_steps": 4, "to_steps": 1, "steps_per_round": 3, "batch_size": 4,
              "lr": 1e-3, "log_every": 1, "checkpoint_every": 2}
    return DistillSettings(**{**values, **changes})


# ----------------------------------------------------------------------------- the target
@pytest.mark.parametrize("lams", [(-12.0, -7.0, -2.5), (-1.0, 0.5, 3.0), (4.0, 9.0, 15.0)])
def test_target_makes_one_ddim_step_land_on_two_teacher_steps(lams):
    generator = torch.Generator().manual_seed(0)
    z_t = torch.randn(3, 2, 4, 4, generator=generator)
    weight = torch.randn(2, 2, generator=generator)

    def teacher(x, logsnr):  # any data prediction that depends on the state and the level
        return torch.tanh(torch.einsum("bchw,cd->bdhw", x, weight) * (1 + logsnr.view(-1, 1, 1, 1) / 20))

    lam_s, lam_mid, lam_t = torch.tensor(lams)
    z_next = sample_ddim(teacher, z_t, torch.tensor(lams), disable=True)
    target = student_target(z_t, z_next, lam_s.expand(3), lam_t.expand(3))
    one_step = sample_ddim(lambda x, logsnr: target, z_t, torch.stack([lam_s, lam_t]), disable=True)
    torch.testing.assert_close(one_step, z_next, rtol=1e-4, atol=1e-5)
    # and the teacher's own x̂ at λ_s would not do it: two steps are not one
    direct = sample_ddim(teacher, z_t, torch.stack([lam_s, lam_t]), disable=True)
    assert (direct - z_next).abs().max() > 1e-3


def test_ddim_step_is_the_sampler_step_with_per_example_levels():
    generator = torch.Generator().manual_seed(1)
    x, denoised = torch.randn(2, 1, 3, 3, generator=generator), torch.randn(2, 1, 3, 3, generator=generator)
    grids = [torch.tensor([-3.0, 1.0]), torch.tensor([2.0, 6.0])]
    stepped = ddim_step(x, denoised, torch.tensor([-3.0, 2.0]), torch.tensor([1.0, 6.0]))
    for b, grid in enumerate(grids):
        expected = sample_ddim(lambda x_t, logsnr, b=b: denoised[b:b + 1], x[b:b + 1], grid, disable=True)
        torch.testing.assert_close(stepped[b:b + 1], expected)


@pytest.mark.parametrize("spacing", ["time", "logsnr"])
def test_the_teacher_grid_holds_the_student_grid(spacing):
    """The teacher's two steps from λ_i end on the student's λ_{i+1}, the final one on λ_max as in decode."""
    schedule = make_schedule("shifted_cosine", -15.0, 15.0, 32, 64, 32)
    for steps in (1, 2, 4, 16):
        teacher_grid, student_grid = logsnr_grid(schedule, 2 * steps, spacing), logsnr_grid(schedule, steps, spacing)
        torch.testing.assert_close(teacher_grid[::2], student_grid)


def test_round_steps():
    assert round_steps(32, 4) == [16, 8, 4] and round_steps(32, 2) == [16, 8, 4, 2] and round_steps(2, 1) == [1]
    for to in (3, 12, 32, 64, 0):
        with pytest.raises(ValueError, match="--to-steps"):
            round_steps(32, to)


# ----------------------------------------------------------------------------- a micro distillation
def test_cli_distills_into_a_run_that_sample_and_eval_load(teacher, tmp_path, capsys):
    out = tmp_path / "fast"
    cli.main(["distill", "--run", str(teacher), "--out", str(out), "--from-steps", "4", "--to-steps", "1",
              "--steps-per-round", "2", "--batch", "4", "--no-progress", "--device", "cpu"])
    assert "written to" in capsys.readouterr().out
    config, model = load_trained_model(out)
    _, original = load_trained_model(teacher)
    assert config.model == original.config and config.sample.decoder_steps == 1
    record = json.loads((out / DISTILL_FILE).read_text())
    assert record["status"] == "done" and [r["student_steps"] for r in record["rounds"]] == [2, 1]
    assert all(r["final_loss"] > 0 for r in record["rounds"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["round"], m["round_step"]) for m in metrics] == [(0, 2), (1, 2)]  # log_every 10: each round's end
    # every network but the decoder is the teacher's, in both weight files; the decoder has moved
    for name in ("model.safetensors", "ema.safetensors"):
        distilled = load_file(latest_checkpoint(out) / name)
        source = load_file(latest_checkpoint(teacher) / name)
        assert distilled.keys() == source.keys()
        for key in distilled:
            if not key.startswith("decoder."):
                assert torch.equal(distilled[key], source[key]), key
        assert any(not torch.equal(distilled[k], source[k]) for k in distilled if k.startswith("decoder."))
    x = load_dataset(config.data.dataset, "test", 16).images[:2]
    z_0 = model.noisy_latent(model.encode(x), generator=torch.Generator().manual_seed(0))
    images = model.decode(z_0, config.sample.decoder_steps)
    assert images.shape == (2, 1, 16, 16) and bool(torch.isfinite(images).all())
    cli.main(["sample", "--run", str(out), "-n", "2", "--latent-steps", "2", "--out", str(tmp_path / "s.png"),
              "--no-progress", "--device", "cpu"])
    assert (tmp_path / "s.png").is_file()
    capsys.readouterr()
    one_line_error(capsys, ["train", "--resume", str(out)], "distillation checkpoint", "ul-fast distill --resume")


@pytest.fixture(scope="module")
def uninterrupted(teacher, tmp_path_factory):
    return Distiller(settings(teacher), tmp_path_factory.mktemp("whole"), progress=False).run()


@pytest.mark.parametrize("stop_at", [3, 4, 6])
def test_an_interrupted_distillation_resumes_to_the_same_weights(teacher, uninterrupted, tmp_path, monkeypatch,
                                                                 stop_at):
    """Killed at optimiser step ``stop_at`` (3: after the mid-round checkpoint at step 2; 4: after the round's end;
    6: after the second round's mid-round checkpoint), then resumed: the checkpoints' weights, the metrics and
    distill.json equal those of one uninterrupted run."""
    whole = uninterrupted
    calls = {"n": 0}
    step = Distiller.train_step

    def dying_step(self, *args):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt
        return step(self, *args)

    monkeypatch.setattr(Distiller, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        Distiller(settings(teacher), tmp_path / "cut", progress=False).run()
    monkeypatch.setattr(Distiller, "train_step", step)
    assert json.loads((tmp_path / "cut" / DISTILL_FILE).read_text())["status"] == "running"
    cut = Distiller(settings(teacher), tmp_path / "cut", progress=False).run(resume=True)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(latest_checkpoint(whole) / name), load_file(latest_checkpoint(cut) / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert (whole / "metrics.jsonl").read_text() == (cut / "metrics.jsonl").read_text()
    assert json.loads((whole / DISTILL_FILE).read_text()) == json.loads((cut / DISTILL_FILE).read_text())


def test_a_distilled_decoder_samples_with_ddim_only(teacher, uninterrupted, tmp_path, capsys):
    """The student learns what one DDIM step must predict: under another sampler it is wrong (`--sampler` used to
    apply to both chains). The run records the decoder's sampler, sample and eval refuse another for it, and
    --decoder-sampler lets the base model use one; a stage 2 started from the distilled run inherits the rule."""
    config = load_config(str(uninterrupted / "config.yaml"))
    assert config.sample.decoder_sampler == "ddim" and config.sample.decoder_steps == 1
    assert json.loads((uninterrupted / DISTILL_FILE).read_text())["decoder_sampler"] == "ddim"
    base = ["sample", "--run", str(uninterrupted), "-n", "2", "--latent-steps", "2", "--no-progress", "--out",
            str(tmp_path / "s.png")]
    one_line_error(capsys, [*base, "--sampler", "heun"], "is distilled for 1 ddim steps on the time grid",
                   "--sampler heun would apply to it too", "add --decoder-sampler ddim")
    one_line_error(capsys, [*base, "--decoder-sampler", "dpmpp_2m"], "drop --decoder-sampler dpmpp_2m")
    one_line_error(capsys, ["eval", "--run", str(uninterrupted), "--samples", "4", "--sampler", "ancestral"],
                   "--sampler ancestral would apply to it too")
    cli.main([*base, "--sampler", "dpmpp_2m", "--decoder-sampler", "ddim"])
    capsys.readouterr()
    cli.main([*base, "--decoder-steps", "2"])
    assert "at 2 steps on the time grid its quality is unknown" in capsys.readouterr().err
    cli.main(["eval", "--run", str(uninterrupted), "--samples", "4", "--latent-steps", "2", "--sampler", "heun",
              "--decoder-sampler", "ddim", "--no-progress"])
    result = json.loads((uninterrupted / "eval.json").read_text())
    assert (result["sampler"], result["decoder_sampler"], result["decoder_steps"]) == ("heun", "ddim", 1)
    assert "heun (latent) and ddim (decoder) sampler" in capsys.readouterr().out

    stage2 = micro_config(data={"dataset": load_config(str(teacher / "config.yaml")).data.dataset},
                          train={"init_from": str(uninterrupted), "stage1_steps": 0, "stage2_steps": 1,
                                 "eval_every": 1000, "checkpoint_every": 1000})
    Trainer(stage2, tmp_path / "stage2").fit()
    one_line_error(capsys, ["sample", "--run", str(tmp_path / "stage2"), "--sampler", "heun"],
                   f"(from {uninterrupted}) is distilled")


def test_resume_refuses_other_settings(teacher, tmp_path):
    Distiller(settings(teacher, steps_per_round=1), tmp_path / "d", progress=False).run()
    with pytest.raises(ValueError, match="other settings"):
        Distiller(settings(teacher, steps_per_round=2), tmp_path / "d", progress=False).run(resume=True)


# ----------------------------------------------------------------------------- misuse
def test_misuse_is_one_line(teacher, tmp_path, capsys):
    base = ["distill", "--run", str(teacher), "--out", str(tmp_path / "d"), "--no-progress", "--device", "cpu"]
    one_line_error(capsys, [*base, "--to-steps", "3"], "--to-steps", "power of two")
    one_line_error(capsys, [*base, "--to-steps", "32"], "--to-steps")
    one_line_error(capsys, [*base, "--to-steps", "0"], "--to-steps", "positive")
    one_line_error(capsys, [*base, "--to-steps", "2", "--lr", "-1"], "--lr")
    one_line_error(capsys, [*base, "--to-steps", "2", "--resume", "--overwrite"], "--overwrite", "--resume")
    one_line_error(capsys, [*base[:2], str(tmp_path / "nothing"), *base[3:], "--to-steps", "2"], "config.yaml")
    mse = tmp_path / "mse"
    mse.mkdir()
    config = load_config(str(teacher / "config.yaml"))
    config.model.decoder_loss = "mse"
    save_config(config, mse / "config.yaml")
    one_line_error(capsys, [*base[:2], str(mse), *base[3:], "--to-steps", "2"], "decoder_loss: mse")
    # an existing run is refused without --overwrite, replaced with it
    fast = [*base, "--from-steps", "2", "--to-steps", "1", "--steps-per-round", "1", "--batch", "2"]
    cli.main(fast)
    one_line_error(capsys, fast, "already holds a run", "--overwrite")
    cli.main([*fast, "--overwrite"])
    assert json.loads((tmp_path / "d" / DISTILL_FILE).read_text())["status"] == "done"


# ----------------------------------------------------------------------------- the quality benchmark
def test_distill_quality_rows_match_eval_and_resume(teacher, uninterrupted, tmp_path, monkeypatch):
    """benchmarks/distill_quality.py on the micro runs: the reference row's rFD and PSNR are ul-fast eval's at
    the same steps; each undistilled row's fidelity is the PSNR of its own reconstructions against the
    reference's; a second call reuses the finished rows and only writes the report."""
    import importlib.util
    import sys
    from pathlib import Path

    from ul_fast.eval import evaluate_model, psnr

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "distill_quality.py"
    spec = importlib.util.spec_from_file_location("distill_quality", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "dq"
    argv = ["distill_quality.py", "--teacher", str(teacher), "--students", str(uninterrupted), "--steps", "2,1",
            "--teacher-steps", "4", "--samples", "16", "--latent-steps", "2", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    script.main()
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["decoder"], r["steps"]) for r in rows] == [("teacher", 4), ("teacher", 2), ("teacher", 1),
                                                          ("distilled", 1)]
    config, model = load_trained_model(teacher)
    test = load_dataset(config.data.dataset, "test", config.model.image_size)
    train = load_dataset(config.data.dataset, "train", config.model.image_size)
    official = evaluate_model(model, train, test, samples=16, decoder_steps=4, latent_steps=2, progress=False)
    assert rows[0]["rfd"] == pytest.approx(official["rfd"], rel=1e-9)
    assert rows[0]["psnr"] == pytest.approx(official["psnr"], rel=1e-9)

    def reconstruct(steps):
        return model.reconstruct(test.images[:16], steps, "ddim", torch.Generator().manual_seed(0)).float()

    reference = reconstruct(4)
    assert rows[2]["fidelity_psnr"] == pytest.approx(float(psnr(reconstruct(1), reference).mean()), rel=1e-6)
    assert rows[2]["fidelity_psnr"] < 100 and rows[3]["fidelity_psnr"] != rows[2]["fidelity_psnr"]
    table = out.with_suffix(".md").read_text()
    assert "| teacher (reference) | 4 |" in table and "| distilled | 1 |" in table
    monkeypatch.setattr(script, "frechet_distance", None)  # any new row would fail: every row is reused
    out.with_suffix(".md").unlink()
    script.main()
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == rows
    assert out.with_suffix(".md").read_text() == table
