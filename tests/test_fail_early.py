"""Fail early: every bad setting is an error naming its key before any training work (config.validate for what
the config decides, ul_fast.train.preflight for what needs the data or the machine); ``extends`` in user YAMLs."""

import warnings

import numpy as np
import pytest
import torch
import yaml

from ul_fast.config import Config, ConfigError, ViTConfig, load_config
from ul_fast.data import ImageArrayDataset, load_dataset
from ul_fast.model import UnifiedLatents
from ul_fast.train import Trainer
from ul_fast.train.preflight import check_device, check_run_inputs, parameter_count

from micro import MICRO, micro_config


@pytest.mark.parametrize("override,key", [
    ("train.grad_clip=-1", "train.grad_clip must be > 0"),
    ("train.grad_clip=0", "train.grad_clip must be > 0"),
    ("train.warmup_steps=-1", "train.warmup_steps must be >= 0"),
    ("train.eval_images=0", "train.eval_images must be > 0"),
    ("sample.grid_images=0", "sample.grid_images must be > 0"),
    ("sample.grid_images=-4", "sample.grid_images must be > 0"),
    ("train.weight_decay=-0.1", "train.weight_decay must be >= 0"),
    ("train.max_bad_steps=0", "train.max_bad_steps must be >= 1"),
    ("train.seed=-1", "train.seed must be >= 0"),
    ("train.device=gpu", "train.device must be auto, cpu, cuda, cuda:N or mps"),
    ("train.device=cuda:x", "train.device must be"),
    ("sample.guidance=-1", "sample.guidance must be >= 0"),
    ("sample.guidance_interval=[5, -5]", "sample.guidance_interval"),
    ("model.decoder.head_dim=0", "model.decoder.head_dim must be >= 1"),
    ("model.base.head_dim=0", "model.base.head_dim must be >= 1"),
    ("model.decoder.patch=0", "model.decoder.patch must be >= 1"),
    ("model.base.patch=0", "model.base.patch must be >= 1"),
    ("model.prior.patch=3", "model.prior.patch 3 must divide the latent grid 8"),
    ("model.base.dropout=1", "model.base.dropout must be in"),
    ("model.prior.mlp_ratio=0", "model.prior.mlp_ratio must be > 0"),
    ("model.base.widths=[96, 96]", "model.base.widths and depths must be non-empty and of the same length"),
    ("model.decoder.width=-32", "model.decoder.width must be a positive multiple of 4"),
    ("model.encoder.channels=[32, 0]", "model.encoder.channels must be > 0"),
])
def test_bad_values_are_refused_when_loaded_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config("tiny", [override])


@pytest.mark.parametrize("base,key", [
    ({"widths": [96, 96], "depths": [3, 3]}, "model.base.depths must be even"),
    ({"widths": [32, 32, 32, 32], "depths": [2, 2, 2, 2], "patch": 2}, "model.base: its token grid 2 cannot be halved"),
    ({"widths": [98], "depths": [3], "head_dim": 49}, "model.base.widths.0. must be a multiple of 4"),
])
def test_network_shapes_that_would_fail_when_built_name_the_key(base, key):
    with pytest.raises(ConfigError, match=key):
        micro_config(model={"base": {**MICRO["model"]["base"], **base}})
    unchecked = micro_config()  # the check mirrors a real failure of the network, not a stricter taste
    unchecked.model.base = ViTConfig(**{**MICRO["model"]["base"], **base})
    with pytest.raises(ValueError):
        UnifiedLatents(unchecked.model)


def test_no_steps_at_all_is_refused():
    with pytest.raises(ConfigError, match="train.stage1_steps and stage2_steps are both 0"):
        micro_config(train={"stage1_steps": 0, "stage2_steps": 0})


def test_infinite_grad_clip_means_no_clipping():
    assert load_config("tiny", ["train.grad_clip=.inf"]).train.grad_clip == float("inf")


def test_yaml_syntax_errors_name_the_file_or_override_and_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  image_size: 32\n  num_classes: [10\ntrain: {}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML at line \d+"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match=r"override 'model.encoder.channels=\[8, 16': the value of "
                                          r"model.encoder.channels is invalid YAML"):
        load_config("tiny", ["model.encoder.channels=[8, 16"])


# ----------------------------------------------------------------------------- extends
def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_yaml_extends_a_preset_and_sets_only_what_differs(tmp_path):
    mine = _write(tmp_path / "mine.yaml", {"extends": "tiny", "train": {"stage1_steps": 5},
                                           "model": {"prior": {"depths": [4]}}})
    config = load_config(str(mine))
    expected = load_config("tiny", ["train.stage1_steps=5", "model.prior.depths=[4]"])
    assert config == expected
    assert config.model.prior.widths == [64]  # the rest of the section is the preset's
    assert config != load_config("tiny")


def test_extends_chains_resolve_relative_to_the_file_and_deprecated_keys_in_a_parent(tmp_path):
    (tmp_path / "presets").mkdir()
    with pytest.warns(FutureWarning, match="model.loss_factor"):
        _write(tmp_path / "presets" / "base.yaml", {"extends": "tiny", "model": {"loss_factor": 4.0},
                                                    "train": {"seed": 7}})
        _write(tmp_path / "child.yaml", {"extends": "presets/base.yaml", "train": {"stage1_steps": 9}})
        config = load_config(str(tmp_path / "child.yaml"), ["train.lr=0.01"])
    assert (config.train.seed, config.train.stage1_steps, config.train.lr) == (7, 9, 0.01)
    assert config.model.decoder_weighting.factor == 4.0
    assert config.model.encoder.channels == [32, 64]


def test_extends_errors(tmp_path):
    _write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    _write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(ConfigError, match="extends makes a cycle: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_config(str(tmp_path / "a.yaml"))
    _write(tmp_path / "c.yaml", {"extends": "tinyy"})
    with pytest.raises(ConfigError, match="unknown config 'tinyy'"):
        load_config(str(tmp_path / "c.yaml"))
    _write(tmp_path / "d.yaml", {"extends": ["tiny"]})
    with pytest.raises(ConfigError, match="extends must be a preset name or a YAML path"):
        load_config(str(tmp_path / "d.yaml"))


# ----------------------------------------------------------------------------- preflight (needs the data)
def _data(n=8, size=16, channels=1, labels=None):
    images = torch.zeros(n, channels, size, size)
    return ImageArrayDataset(images, None if labels is None else torch.as_tensor(labels))


LABELS = np.arange(8) % 10


@pytest.mark.parametrize("model,data,key", [
    ({}, _data(), "model.num_classes is 10 .class-conditional. but .* has no labels"),
    ({}, _data(labels=np.arange(8) + 5), "model.num_classes is 10 but .* has label 12 .13 classes.: set "
                                         "model.num_classes: 13"),
    ({"num_classes": 0, "context_dim": 384}, _data(), "model.context_dim is set .a text model. but"),
    ({"num_classes": 0, "context_dim": 384}, _data(labels=np.arange(8) % 3), "model.context_dim is set"),
    ({}, _data(size=32, labels=LABELS), "model.image_size is 16 but .* has 32x32 images"),
    ({}, _data(channels=3, labels=LABELS), "model.image_channels is 1 but .* has 3-channel images"),
])
def test_data_that_does_not_fit_the_model_is_refused(model, data, key):
    config = micro_config(model=model)
    with pytest.raises(ConfigError, match=key):
        check_run_inputs(config, data, data)


def test_data_that_fits_passes_quietly():
    config = micro_config()
    data = load_dataset("fmnist-embedded", "test", 16, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_run_inputs(config, data, data)
        check_run_inputs(micro_config(model={"num_classes": 0}), _data(), _data())  # unconditional, no labels


def test_cuda_asked_for_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="train.device is 'cuda' but CUDA is not available"):
        check_run_inputs(micro_config(train={"device": "cuda"}), _data(labels=LABELS), _data(labels=LABELS))
    with pytest.raises(ConfigError, match="--device is 'cuda:1'"):
        check_device("cuda:1", "--device")
    check_device("cpu")
    check_device("auto")


def test_paper_size_networks_on_a_small_data_set_warn_once():
    """A YAML that sets a few keys gets the dataclass defaults: the paper's 720 M-parameter networks."""
    config = Config().validate()
    assert parameter_count(config) > 500e6
    with pytest.warns(UserWarning, match=r"\d+ M parameters for 8 training images of 32x32: .*'extends: tiny'") as w:
        check_run_inputs(config, _data(size=32), _data(size=32))
    assert len(w) == 1 and "\n" not in str(w[0].message)


def test_a_trainer_refuses_mismatched_data_before_any_step(tmp_path):
    images = tmp_path / "unlabelled.npy"
    np.save(images, np.zeros((8, 16, 16), dtype=np.uint8))
    config = micro_config(data={"dataset": f"array:{images}"})
    with pytest.raises(ConfigError, match="model.num_classes is 10"):
        Trainer(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
