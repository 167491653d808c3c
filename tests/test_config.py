"""Configuration: presets, overrides, strict validation with clear errors."""

import pytest

from ul_fast.config import ConfigError, load_config, preset_names, save_config


def test_presets_load_and_validate():
    names = preset_names()
    assert "tiny" in names
    for name in names:
        load_config(name)


def test_overrides_are_typed():
    config = load_config("tiny", ["train.stage1_steps=7", "model.loss_factor=2.5", "train.compile=true",
                                  "model.encoder.channels=[8, 16]"])
    assert config.train.stage1_steps == 7 and config.model.loss_factor == 2.5 and config.train.compile is True
    assert config.model.encoder.channels == [8, 16]


def test_user_yaml_file_and_round_trip(tmp_path):
    path = tmp_path / "mine.yaml"
    save_config(load_config("tiny", ["train.seed=42"]), path)
    assert load_config(str(path)).train.seed == 42


@pytest.mark.parametrize("override,match", [
    ("train.learning_rate=0.1", "unknown config key.*train.learning_rate"),
    ("model.encoder.width=3", "unknown config key.*model.encoder.width"),
    ("bogus=1", "unknown config key.*bogus"),
    ("train.stage1_steps=many", "train.stage1_steps: expected an integer"),
    ("model.loss_factor=0", "model.loss_factor must be > 0"),
    ("model.loss_factor=-1", "model.loss_factor must be > 0"),
    ("model.image_size=30", "model.image_size 30 must be divisible"),
    ("model.latent_schedule=sigmoid", "model.latent_schedule must be one of"),
    ("model.latent_logsnr_min=6", "latent_logsnr_min"),
    ("sample.sampler=euler", "sample.sampler"),
    ("train.compile=maybe", "train.compile: expected true or false"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", [override])


def test_unknown_preset_and_missing_file():
    with pytest.raises(ConfigError, match="unknown config 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/tmp/definitely/missing.yaml")
    with pytest.raises(ConfigError, match="must look like"):
        load_config("tiny", ["train.seed"])
