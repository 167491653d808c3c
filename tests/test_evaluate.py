"""``ul-fast eval`` on micro runs: eval.json holds every metric, finite; the same --seed gives the same numbers;
a run without a trained base model still gets rFD, PSNR and prior bits/pixel; misuse is one line."""

import json
import math

import numpy as np
import pytest
import torch

from ul_fast import cli
from ul_fast.data import load_dataset
from ul_fast.eval.evaluate import EVAL_FILE
from ul_fast.train import Trainer

from cli_helpers import one_line_error
from micro import micro_config

EVAL = ["--samples", "16", "--latent-steps", "2", "--decoder-steps", "2", "--no-progress"]
KEYS = {"run", "dataset", "samples", "sampler", "decoder_sampler", "latent_steps", "decoder_steps", "spacing",
        "guidance", "seed", "features", "feature_dim", "reference_images", "rfd", "rkid", "rkid_se", "psnr", "gfd",
        "gkid", "gkid_se", "bits_per_pixel_prior", "bits_per_pixel_base", "base_model_trained", "held_out", "notes",
        "versions", "elapsed_s", "rkid_subsets", "gkid_subsets", "prompts", "negative_prompt", "adherence"}
METRICS = ("rfd", "rkid", "rkid_se", "psnr", "gfd", "gkid", "gkid_se", "bits_per_pixel_prior",
           "bits_per_pixel_base")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Micro runs on 400 training and 64 test images of the embedded Fashion-MNIST (so the training set's
    features are quick): ``full`` (both stages) and ``stage1`` (stage 2 never ran: no trained base model)."""
    folder = tmp_path_factory.mktemp("eval")
    splits = {split: load_dataset("fmnist-embedded", split, image_size=16) for split in ("train", "test")}
    arrays = {}
    for split, count in (("train", 400), ("test", 64)):
        arrays[f"{split}_images"] = ((splits[split].images[:count, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
        arrays[f"{split}_labels"] = splits[split].labels[:count].numpy()
    np.savez(folder / "small.npz", **arrays)
    train_run(folder / "full", stage2_steps=2)
    train_run(folder / "stage1", stage2_steps=0)
    return folder


def train_run(run, stage2_steps: int, **model) -> None:
    """A 2-step micro run in ``run`` on ``run.parent / "small.npz"``."""
    config = micro_config(model=model, data={"dataset": f"array:{run.parent / 'small.npz'}"},
                          train={"stage1_steps": 2, "stage2_steps": stage2_steps, "eval_every": 1000,
                                 "checkpoint_every": 1000})
    Trainer(config, run).fit()


def evaluate(run, capsys, *options: str) -> tuple[dict, str, str]:
    """``ul-fast eval --run RUN EVAL OPTIONS`` → (eval.json, stdout, stderr)."""
    cli.main(["eval", "--run", str(run), *EVAL, *options])
    out, err = capsys.readouterr()
    return json.loads((run / EVAL_FILE).read_text()), out, err


def test_eval_writes_every_metric(runs, capsys):
    result, out, err = evaluate(runs / "full", capsys, "--seed", "3")
    assert set(result) == KEYS
    for key in METRICS:
        assert isinstance(result[key], float) and math.isfinite(result[key]), (key, result[key])
    assert result["rfd"] >= 0 and result["gfd"] >= 0 and result["bits_per_pixel_prior"] > 0
    assert (result["samples"], result["latent_steps"], result["decoder_steps"], result["seed"]) == (16, 2, 2, 3)
    assert result["sampler"] == result["decoder_sampler"] == "ddim"
    assert result["reference_images"] == 400 and result["base_model_trained"] and result["notes"] == []
    assert result["held_out"] and "HELD-OUT" not in out
    # KID over 8 disjoint subsets of 2 samples (of 50 training images for gKID), so the standard errors say
    # something (not 0)
    assert result["rkid_subsets"] == [8, 2, 2] and result["gkid_subsets"] == [8, 50, 2]
    assert result["rkid_se"] > 0 and result["gkid_se"] > 0
    assert set(result["versions"]) == {"ul_fast", "torch", "python"}
    assert "gFD" in out and "wrote" in out and err == ""
    assert [p.name for p in runs.joinpath("full").iterdir() if p.name.startswith(f".{EVAL_FILE}")] == []


@pytest.mark.slow
def test_eval_is_deterministic_under_its_seed(runs, capsys):
    first, _, _ = evaluate(runs / "full", capsys, "--seed", "5")
    again, _, _ = evaluate(runs / "full", capsys, "--seed", "5")
    other, _, _ = evaluate(runs / "full", capsys, "--seed", "6")
    assert {k: first[k] for k in METRICS} == {k: again[k] for k in METRICS}
    assert first["gfd"] != other["gfd"] and first["psnr"] != other["psnr"]


def test_a_run_without_a_trained_base_model_gets_reconstruction_metrics_and_a_note(runs, capsys):
    result, out, err = evaluate(runs / "stage1", capsys)
    assert result["gfd"] is None and result["gkid"] is None and result["bits_per_pixel_base"] is None
    assert all(math.isfinite(result[k]) for k in ("rfd", "rkid", "psnr", "bits_per_pixel_prior"))
    assert not result["base_model_trained"] and "stage 2 has not run" in result["notes"][0]
    assert err.startswith("ul-fast: note: ") and "stage 2 has not run" in err
    assert "n/a" in out


@pytest.mark.slow
def test_a_single_stage_run_gets_base_model_bits_and_a_note(runs, capsys):
    train_run(runs / "single", stage2_steps=0, mode="single_stage")
    result, _, err = evaluate(runs / "single", capsys)
    assert result["bits_per_pixel_prior"] is None and "single-stage" in result["notes"][0] and "single-stage" in err
    assert all(math.isfinite(result[k]) for k in ("rfd", "psnr", "gfd", "gkid", "bits_per_pixel_base"))


def test_data_without_a_test_split_is_never_called_held_out(runs, capsys):
    """A .npy serves its images as both splits: eval.json says held_out false, the notes and the table say that
    every number is on training images, and training warns at its start."""
    images = np.load(runs / "small.npz")["train_images"][:64]
    np.save(runs / "one-set.npy", images)
    config = micro_config(model={"num_classes": 0}, data={"dataset": f"array:{runs / 'one-set.npy'}"},
                          train={"stage1_steps": 2, "stage2_steps": 0, "eval_every": 1000, "checkpoint_every": 1000})
    with pytest.warns(UserWarning, match="serves the same images as its training and test splits"):
        Trainer(config, runs / "one-set").fit()
    result, out, err = evaluate(runs / "one-set", capsys)
    assert result["held_out"] is False and "none of these numbers is held-out" in result["notes"][0]
    assert "one-set.npy serves the same images" in err and "NOT HELD-OUT" in out


def test_misuse_is_one_line(runs, tmp_path, capsys):
    run = str(runs / "stage1")
    one_line_error(capsys, ["eval", "--run", run, "--samples", "65"], "--samples 65", "64 held-out")
    one_line_error(capsys, ["eval", "--run", run, "--samples", "3"], "at least 4")
    one_line_error(capsys, ["eval", "--run", run, "--features", "inception:/x.pth"], "no such file")
    one_line_error(capsys, ["eval", "--run", run, "--features", "inception"], "needs the weights' path")
    one_line_error(capsys, ["eval", "--run", run, "--features", "clip"], "unknown --features 'clip'")
    one_line_error(capsys, ["eval", "--run", str(tmp_path / "nothing")], "not a ul_fast run folder")
    one_line_error(capsys, ["eval", "--run", run, "--samples", "0"], "--samples")
