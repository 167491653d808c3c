"""The shipped pretrained model ``fmnist-tiny``: it loads by name with no training, its files are SHA-256 checked,
it encodes, decodes and samples, ``ul-fast sample --run fmnist-tiny`` works, it stays small; and the README's
"Python API" code block runs as written."""

import json
from importlib import resources
from pathlib import Path

import pytest
import torch

import ul_fast
from ul_fast import cli
from ul_fast.api import ExportError
from ul_fast.api.shipped import SHIPPED_MODELS, shipped_model_folder

from readme_blocks import run_block


@pytest.fixture(scope="module")
def model():
    return ul_fast.load("fmnist-tiny")


def test_it_loads_by_name_with_every_network_and_its_card(model):
    assert model.kind == "shipped" and model.networks == ("encoder", "prior", "decoder", "base")
    assert model.image_shape == (1, 32, 32) and model.latent_shape == (4, 8, 8) and model.num_classes == 10
    manifest = json.loads((shipped_model_folder("fmnist-tiny") / "manifest.json").read_text())
    assert manifest["base_model_trained"] and manifest["data"]["dataset"] == "fmnist"
    card = model.card
    assert "Fashion-MNIST" in card and "60,000" in card and "scripts/make_pretrained.py" in card
    evaluation = manifest["eval"]
    assert evaluation["samples"] == 1000 and evaluation["reference_images"] == 60000
    assert f"{evaluation['rfd']:.4g}" in card and f"{evaluation['gfd']:.4g}" in card


def test_it_encodes_decodes_and_samples_each_class(model):
    images = model.sample(10, labels=list(range(10)), steps=4, seed=0)
    assert images.shape == (10, 1, 32, 32) and images.abs().max() <= 1
    z = model.encode(images)
    assert z.shape == (10, 4, 8, 8) and bool(torch.isfinite(z).all())
    assert model.decode(model.encode(images, noisy=True), steps=4).shape == images.shape
    bits = model.bits_per_pixel(images)
    assert bits.shape == (10,) and bool((bits > 0).all())


def test_the_sha256_check_refuses_a_changed_manifest(monkeypatch):
    monkeypatch.setitem(SHIPPED_MODELS, "fmnist-tiny", "0" * 64)
    with pytest.raises(ExportError, match="SHA-256"):
        ul_fast.load("fmnist-tiny")


def test_the_cli_samples_it_by_name(tmp_path, capsys):
    out = tmp_path / "grid.png"
    cli.main(["sample", "--run", "fmnist-tiny", "-n", "10", "--latent-steps", "2", "--decoder-steps", "2",
              "--out", str(out), "--no-progress"])
    assert out.is_file() and "wrote 10 samples" in capsys.readouterr().out


def test_it_keeps_the_wheel_small():
    folder = Path(str(resources.files("ul_fast.api") / "pretrained" / "fmnist-tiny"))
    assert sum(p.stat().st_size for p in folder.iterdir()) < 2_500_000


def test_the_readme_python_api_block_runs(tmp_path, monkeypatch):
    run_block("## Python API", tmp_path, monkeypatch)
    assert (tmp_path / "reconstruction.png").is_file()
