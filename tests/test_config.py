"""Configuration: presets, overrides, strict validation with clear errors."""

import dataclasses
import math
import re
import typing

import pytest
import yaml

from ul_fast.config import (
    INFINITY_ALLOWED,
    Config,
    ConfigError,
    LossWeighting,
    config_from_dict,
    load_config,
    preset_names,
    save_config,
)


def test_presets_load_and_validate():
    names = preset_names()
    assert "tiny" in names
    for name in names:
        load_config(name)


def test_overrides_are_typed():
    config = load_config("tiny", ["train.stage1_steps=7", "model.decoder_weighting.factor=2.5", "train.compile=true",
                                  "model.encoder.channels=[8, 16]"])
    assert config.train.stage1_steps == 7 and config.model.decoder_weighting.factor == 2.5
    assert config.train.compile is True
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
    ("model.decoder_weighting.factor=0", "model.decoder_weighting.factor must be > 0"),
    ("model.decoder_weighting.factor=-1", "model.decoder_weighting.factor must be > 0"),
    ("model.decoder_weighting.scale=2", "unknown config key.*model.decoder_weighting.scale"),
    ("model.image_size=30", "model.image_size 30 must be divisible"),
    ("model.latent_schedule=sigmoid", "model.latent_schedule must be one of"),
    ("model.latent_logsnr_min=6", "latent_logsnr_min"),
    ("sample.sampler=euler", "sample.sampler must be one of"),
    ("model.prediction=x0", "model.prediction must be one of"),
    ("model.mode=three_stage", "model.mode must be one of"),
    ("model.encoder.channels=[]", "model.encoder.channels and blocks_per_stage must be non-empty"),
    ("model.encoder.patch=0", "model.encoder.patch must be >= 1"),
    ("model.prior.head_dim=0", "model.prior.head_dim must be >= 1"),
    ("model.decoder.conv_channels=[]", "model.decoder.conv_channels must be non-empty"),
    ("model.decoder.width=40", "model.decoder.width 40 must be a multiple of head_dim 32"),
    ("train.compile=maybe", "train.compile: expected true or false"),
    ("model.latent_prior=laplace", "model.latent_prior must be one of"),
    ("model.decoder_loss=l1", "model.decoder_loss must be one of"),
    ("model.mse_decoder_scale=0", "model.mse_decoder_scale must be a finite number > 0"),
    ("model.kl_weight=0", "model.kl_weight must be a finite number > 0"),
    ("train.base_lr=0", "train.base_lr must be > 0, got 0"),
    ("model.kl_weight=.inf", "model.kl_weight must be a finite number"),
    ("model.prior_stop_grad=perhaps", "model.prior_stop_grad: expected true or false"),
    ("model.single_stage_sample_logsnr=3", "model.single_stage_sample_logsnr applies to model.mode single_stage"),
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


def test_deprecated_weighting_keys_still_work_as_overrides():
    with pytest.warns(FutureWarning) as warned:
        config = load_config("tiny", ["model.loss_factor=3", "model.bias=-1"])
    assert [str(w.message) for w in warned] == ["model.loss_factor is deprecated: use model.decoder_weighting.factor",
                                                "model.bias is deprecated: use model.decoder_weighting.bias"]
    assert config.model.decoder_weighting == LossWeighting(factor=3.0, bias=-1.0)
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match="model.decoder_weighting.factor must be > 0"):
        load_config("tiny", ["model.loss_factor=0"])


def test_an_old_run_folder_config_loads_and_is_saved_in_the_new_form(tmp_path):
    data = load_config("tiny").to_dict()
    weighting = data["model"].pop("decoder_weighting")
    data["model"]["loss_factor"], data["model"]["bias"] = 2.5, weighting["bias"] - 1.0
    old = tmp_path / "config.yaml"
    old.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.warns(FutureWarning) as warned:
        config = load_config(str(old), ["train.stage1_steps=3"])
    assert len(warned) == 2 and "model.bias is deprecated: use model.decoder_weighting.bias" in str(warned[1].message)
    assert config.model.decoder_weighting == LossWeighting(factor=2.5, bias=-1.0)
    save_config(config, tmp_path / "new.yaml")
    saved = yaml.safe_load((tmp_path / "new.yaml").read_text())["model"]
    assert "loss_factor" not in saved and "bias" not in saved
    assert saved["decoder_weighting"] == {"factor": 2.5, "bias": -1.0}
    # An override of the new key replaces the old key's value from the file.
    with pytest.warns(FutureWarning):
        assert load_config(str(old), ["model.decoder_weighting.factor=4"]).model.decoder_weighting.factor == 4.0


def test_old_and_new_weighting_keys_with_different_values_are_an_error():
    data = {"model": {"loss_factor": 3.0, "decoder_weighting": {"factor": 4.0}}}
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match=r"model.loss_factor \(3.0\) and "
                                                                          r"model.decoder_weighting.factor \(4.0\)"):
        config_from_dict(data)
    assert data == {"model": {"loss_factor": 3.0, "decoder_weighting": {"factor": 4.0}}}, "input not modified"
    data["model"]["loss_factor"] = 4
    with pytest.warns(FutureWarning):
        assert config_from_dict(data).model.decoder_weighting.factor == 4.0


@pytest.mark.parametrize("overrides,match", [
    (["model.latent_prior=normal", "model.prior_stop_grad=true"], "model.prior_stop_grad needs model.latent_prior"),
    (["model.latent_prior=normal", "model.mode=single_stage", "train.stage2_steps=0"],
     "model.mode single_stage needs model.latent_prior diffusion"),
    (["model.mode=single_stage", "train.stage2_steps=0", "model.single_stage_sample_logsnr=6"],
     r"model.single_stage_sample_logsnr \(6.0\) must be in \(latent_logsnr_min, latent_logsnr_0\]"),
    (["model.mode=single_stage", "train.stage2_steps=0", "model.single_stage_sample_logsnr=-15"],
     r"model.single_stage_sample_logsnr \(-15.0\) must be in"),
])
def test_inconsistent_ablation_switches_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", overrides)


def test_a_config_saved_before_the_ablation_switches_loads_with_them_off(tmp_path):
    data = load_config("tiny").to_dict()
    new_keys = ("latent_prior", "decoder_loss", "mse_decoder_scale", "prior_stop_grad", "kl_weight",
                "single_stage_sample_logsnr")
    for key in new_keys:
        del data["model"][key]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    model = load_config(str(tmp_path / "config.yaml")).model
    assert (model.latent_prior, model.decoder_loss, model.prior_stop_grad, model.kl_weight,
            model.single_stage_sample_logsnr) == ("diffusion", "diffusion", False, 1.0, None)


def float_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, bool]]:
    """``(key, is a list)`` of every float field of the config dataclasses (``float``, ``float | None``,
    ``list[float]``), read from their type hints: a float key added later is covered too."""
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += float_keys(hint, f"{prefix}{name}.")
        elif hint is float or float in typing.get_args(hint) or hint == list[float]:
            keys.append((prefix + name, hint == list[float]))
    return keys


def test_every_float_key_is_checked_for_nan_and_infinity():
    """`train.lr=.inf` trained to all-NaN weights and `model.decoder_weighting.factor=.inf` skipped every stage-1
    step, both with exit status 0: every float must be a number, and finite where infinity means nothing."""
    keys = float_keys()
    assert len(keys) >= 24 and ("train.lr", False) in keys and ("sample.guidance_interval", True) in keys
    for key, is_list in keys:
        for bad in (".nan", ".inf", "-.inf"):
            value = f"[{bad}, 1.0]" if is_list else bad
            if float(bad.replace(".", "")) in INFINITY_ALLOWED.get(key, ()):
                continue
            with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be a finite number"):
                load_config("tiny", [f"{key}={value}"])
    assert load_config("tiny", ["train.grad_clip=.inf"]).train.grad_clip == math.inf
    assert load_config("tiny", ["sample.guidance_interval=[-.inf, .inf]"]).sample.guidance_interval == [-math.inf,
                                                                                                        math.inf]


def test_the_deprecated_loss_factor_key_is_checked_too():
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match="model.decoder_weighting.factor must be a "
                                                                         "finite number, got inf"):
        load_config("tiny", ["model.loss_factor=.inf"])
