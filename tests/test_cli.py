"""The command line in-process: every user error is one line and exit status 2 (tracebacks only with --debug),
bugs keep their traceback, sampling a run without a trained base model uses its prior, --help is complete."""

import argparse
import warnings

import numpy as np
import pytest

from ul_fast import cli
from ul_fast.config import preset_names
from ul_fast.train import Trainer

from cli_helpers import one_line_error
from micro import micro_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Micro runs: ``stage1`` (stage 1 only: no trained base model), ``full`` (both stages), and ``refined``
    (stage 1 only, initialised from ``full``: its base model is ``full``'s)."""
    folder = tmp_path_factory.mktemp("cli")
    for name, stage2_steps, init_from in (("stage1", 0, None), ("full", 1, None), ("refined", 0, "full")):
        config = micro_config(train={"stage1_steps": 2, "stage2_steps": stage2_steps, "eval_every": 1000,
                                     "checkpoint_every": 1000, "init_from": init_from and str(folder / init_from)})
        Trainer(config, folder / name).fit()
    return folder


def test_config_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  image_size: [16\n")
    out = str(tmp_path / "new")
    one_line_error(capsys, ["train", "--config", str(bad), "--out", out], "bad.yaml", "invalid YAML at line")
    one_line_error(capsys, ["train", "--out", out, "--set", "model.image_size=[1"], "model.image_size",
                    "invalid YAML")
    one_line_error(capsys, ["train", "--config", str(tmp_path / "nope.yaml"), "--out", out], "nope.yaml")
    one_line_error(capsys, ["train", "--config", "tinyy", "--out", out], "tinyy")
    one_line_error(capsys, ["train", "--out", out, "--set", "train.grad_clip=-1"], "train.grad_clip")
    one_line_error(capsys, ["train", "--out", out, "--set", "train.stage1_steps=0", "--set",
                             "train.stage2_steps=0"], "train.stage1_steps")
    one_line_error(capsys, ["train", "--config", "tiny"], "--out")
    assert not (tmp_path / "new" / "checkpoints").exists()


def test_data_errors_are_one_line(tmp_path, capsys):
    int64 = tmp_path / "int64.npy"
    np.save(int64, np.zeros((8, 16, 16), dtype=np.int64))
    micro = tmp_path / "micro.yaml"
    micro.write_text("extends: tiny\nmodel: {num_classes: 0}\n")
    out = str(tmp_path / "new")
    one_line_error(capsys, ["train", "--config", str(micro), "--out", out, "--set",
                             f"data.dataset=folder:{tmp_path / 'missing'}"], "missing")
    one_line_error(capsys, ["train", "--config", str(micro), "--out", out, "--set", "model.image_size=16",
                             "--set", f"data.dataset=array:{int64}"], "int64.npy", "dtype int64", "uint8")
    assert not (tmp_path / "new" / "checkpoints").exists()


@pytest.mark.parametrize("argv,words", [
    (["-n", "0"], ("argument -n", "positive integer", "got 0")),
    (["-n", "-3"], ("argument -n",)),
    (["-n", "many"], ("argument -n", "'many'")),
    (["--latent-steps", "0"], ("argument --latent-steps",)),
    (["--decoder-steps", "0"], ("argument --decoder-steps",)),
    (["--out", "grid.txt"], ("argument --out", "grid.txt", "image extension")),
    (["--out", "grid"], ("argument --out",)),
    (["--guidance", "-1"], ("argument --guidance", ">= 0")),
    (["--device", "gpu"], ("argument --device", "'gpu'")),
])
def test_sample_arguments_are_checked_before_anything_loads(tmp_path, capsys, argv, words):
    one_line_error(capsys, ["sample", "--run", str(tmp_path / "none"), *argv], *words)


def test_missing_runs_and_arguments_are_one_line(tmp_path, capsys):
    one_line_error(capsys, ["sample", "--run", str(tmp_path / "none")], "none", "not a ul_fast run folder")
    one_line_error(capsys, ["plot", str(tmp_path / "none")], "none")
    one_line_error(capsys, ["sample"], "--run")
    one_line_error(capsys, ["frobnicate"], "frobnicate")


def test_a_run_without_a_trained_base_model_samples_its_prior(runs, tmp_path, capsys):
    grid = tmp_path / "prior.png"
    cli.main(["sample", "--run", str(runs / "stage1"), "-n", "3", "--out", str(grid), "--no-progress"])
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        f"ul-fast: note: {runs / 'stage1'} has no trained base model (stage 2 has not run): sampling from its "
        "stage-1 prior, unconditionally"]
    assert grid.stat().st_size > 0
    one_line_error(capsys, ["sample", "--run", str(runs / "stage1"), "--label", "3", "--out", str(grid)],
                    "no trained base model", "--label")


def test_a_trained_run_samples_its_base_model_and_checks_the_label(runs, tmp_path, capsys):
    for run in ("full", "refined"):
        grid = tmp_path / f"{run}.jpg"
        cli.main(["sample", "--run", str(runs / run), "-n", "2", "--out", str(grid), "--label", "4", "--no-progress"])
        assert "note" not in capsys.readouterr().err
        assert grid.stat().st_size > 0
    one_line_error(capsys, ["sample", "--run", str(runs / "full"), "--label", "10"], "--label must be in [0, 10)")


def test_debug_shows_the_traceback_and_bugs_keep_theirs(monkeypatch, capsys):
    def user_error(_):
        raise ValueError("a bad value\nover two lines")

    monkeypatch.setattr(cli, "_info", user_error)
    assert one_line_error(capsys, ["info"]) == "ul-fast: error: a bad value over two lines"
    for argv in (["--debug", "info"], ["info", "--debug"]):
        with pytest.raises(ValueError, match="a bad value"):
            cli.main(argv)
    monkeypatch.setenv("UL_FAST_DEBUG", "1")
    with pytest.raises(ValueError, match="a bad value"):
        cli.main(["info"])
    monkeypatch.delenv("UL_FAST_DEBUG")

    def bug(_):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(cli, "_info", bug)
    with pytest.raises(RuntimeError, match="an internal bug"):
        cli.main(["info"])


def test_warnings_are_one_line(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_info", lambda _: warnings.warn("mind the gap", UserWarning, stacklevel=1))
    cli.main(["info"])
    assert capsys.readouterr().err.splitlines() == ["ul-fast: warning: mind the gap"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_help_describes_every_option_of_every_command():
    parser = cli.build_parser()
    commands = _subparsers(parser)
    assert set(commands) == {"train", "sample", "eval", "distill", "export", "prepare-shards", "encode", "plot", "info"}
    for name, command in [("ul-fast", parser), *commands.items()]:
        assert command.description, name
        for action in command._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, (name, action.option_strings or action.dest)
    config_help = next(a.help for a in commands["train"]._actions if "--config" in a.option_strings)
    assert all(preset in config_help for preset in preset_names())
    assert "extends" in config_help


def test_prepare_shards_then_encode_then_stage2_from_the_cache(runs, tmp_path, capsys):
    """The large-data path of the README on a micro run: images → shards → latent cache of the stage-1 run's
    encoder → stage 2 trained from the cache; a cache of another run's encoder is refused, naming the manifest."""
    from ul_fast.data import load_dataset

    shards, cache = tmp_path / "shards", tmp_path / "cache"
    cli.main(["prepare-shards", "--data", "fmnist-embedded", "--out", str(shards), "--image-size", "16",
              "--shard-size", "2000", "--no-progress"])
    assert len(load_dataset(f"shards:{shards}", "test")) == 1000
    cli.main(["encode", "--run", str(runs / "stage1"), "--data", f"shards:{shards}", "--out", str(cache),
              "--device", "cpu", "--no-progress"])
    assert f"latents:{cache}" in capsys.readouterr().out
    stage2 = ["--set", f"data.dataset=latents:{cache}", "--set", "train.stage1_steps=0", "--set",
              "train.stage2_steps=1", "--set", "train.eval_every=1000", "--set", "train.checkpoint_every=1000"]
    micro = tmp_path / "micro.yaml"
    micro.write_text(__import__("yaml").safe_dump(micro_config().to_dict()))
    cli.main(["train", "--config", str(micro), "--out", str(tmp_path / "base"), "--set",
              f"train.init_from={runs / 'stage1'}", *stage2, "--no-progress"])
    assert (tmp_path / "base" / "checkpoints").is_dir()
    one_line_error(capsys, ["train", "--config", str(micro), "--out", str(tmp_path / "other"), "--set",
                             f"train.init_from={runs / 'refined'}", *stage2], "manifest.json", "other encoder weights")


# ----------------------------------------------------------------------------- messages that pointed the wrong way
def fake_run(folder, stage: int = 2, **model):
    """A run folder holding an untrained micro model (checkpoint step 1, in ``stage``), with ``model`` overrides."""
    from ul_fast.config import save_config
    from ul_fast.model import UnifiedLatents
    from ul_fast.train.checkpoint import save_checkpoint

    config = micro_config(model=model)
    folder.mkdir(parents=True)
    save_config(config, folder / "config.yaml")
    network = UnifiedLatents(config.model)
    save_checkpoint(folder, 1, network, network, {"stage": stage, "stage_step": 1, "config": config.to_dict()})
    return folder


def test_label_on_a_run_without_classes_names_what_the_run_takes(tmp_path, capsys):
    """It said `--label must be in [0, 0)`."""
    text = fake_run(tmp_path / "text", context_dim=384, num_classes=0)
    one_line_error(capsys, ["sample", "--run", str(text), "--label", "3", "--prompt", "a bag"],
                   "is text-conditioned: it takes --prompt or --prompts, not --label")
    one_line_error(capsys, ["sample", "--run", str(text), "--label", "3"],
                   "it takes --prompt or --prompts, not --label")
    unconditional = fake_run(tmp_path / "unconditional", num_classes=0)
    one_line_error(capsys, ["sample", "--run", str(unconditional), "--label", "0"],
                   "is unconditional (model.num_classes: 0): drop --label")


def test_out_naming_a_file_and_options_beside_resume_are_one_line(runs, tmp_path, capsys):
    """--out onto a file gave a raw `[Errno 17] File exists`; --out and --config beside --resume were ignored."""
    file = tmp_path / "a-file"
    file.write_text("mine")
    one_line_error(capsys, ["train", "--out", str(file)], f"{file} is a file, not a folder")
    one_line_error(capsys, ["distill", "--run", str(runs / "full"), "--to-steps", "1", "--from-steps", "2", "--out",
                            str(file)], "is a file, not a folder")
    one_line_error(capsys, ["encode", "--run", str(runs / "full"), "--out", str(file)], "is a file, not a folder")
    assert file.read_text() == "mine"
    run = str(runs / "full")
    one_line_error(capsys, ["train", "--resume", run, "--out", str(tmp_path / "elsewhere")], "drop --out")
    one_line_error(capsys, ["train", "--resume", run, "--config", "tiny"], "drop --config tiny", "--set")
    assert not (tmp_path / "elsewhere").exists()


def test_an_empty_or_truncated_run_config_is_named_not_the_checkpoints(tmp_path, capsys):
    """An empty or cut config.yaml was completed with the paper-size defaults, and the error blamed the checkpoints.
    A key that the checkpoint's own config lacks too comes from an older version: its default is taken."""
    run = fake_run(tmp_path / "run")
    config = run / "config.yaml"
    text = config.read_text()
    config.write_text("")
    for argv in (["sample", "--run", str(run)], ["eval", "--run", str(run)], ["train", "--resume", str(run)]):
        one_line_error(capsys, argv, f"{config} is empty", "state.pt")
    config.write_text(text[:text.index("\ntrain:")])  # cut after the model section
    one_line_error(capsys, ["sample", "--run", str(run)], f"{config} lacks train.seed, train.device, train.batch_size "
                                                          "and ", "checkpoint step_00000001", "truncated")
    config.write_text(text.replace("  cuda_graph: false\n", ""))  # as a version before train/sample.cuda_graph
    from ul_fast.train.checkpoint import load_run_config, load_state

    state = load_state(run / "checkpoints" / "step_00000001")
    del state["config"]["sample"]["cuda_graph"], state["config"]["train"]["cuda_graph"]
    __import__("torch").save(state, run / "checkpoints" / "step_00000001" / "state.pt")
    (run / "checkpoints" / "step_00000001" / "checksums.json").unlink()
    config_read = load_run_config(run)
    assert config_read.sample.cuda_graph is False and config_read.train.cuda_graph is False


def test_init_from_a_run_of_another_image_size_is_refused(runs, tmp_path):
    """The weights fit (no shape depends on the image size) and were taken without a word."""
    from ul_fast.config import ConfigError

    config = micro_config(model={"image_size": 32}, train={"init_from": str(runs / "full"), "stage1_steps": 0,
                                                           "stage2_steps": 1})
    with pytest.raises(ConfigError, match=rf"train.init_from {runs / 'full'} was trained with model.image_size 16, "
                                          r"but this config has 32"):
        Trainer(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
