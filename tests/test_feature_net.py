"""Tests for ul_fast.eval.feature_net: the shipped Fashion-MNIST classifier whose features FD and KID use."""

from __future__ import annotations

import gzip
import importlib.util
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ul_fast.data import load_dataset
from ul_fast.eval import feature_net
from ul_fast.eval.feature_net import (
    FEATURE_DIM,
    WEIGHTS_PATH,
    WEIGHTS_SHA256,
    FashionMNISTClassifier,
    classifier_accuracy,
    load_fmnist_classifier,
)
from ul_fast.files import sha256_of_file

REPO = Path(__file__).resolve().parents[1]
# Measured with the shipped weights on the embedded 1000-image test subset (a class-balanced part of the
# 10000-image test set, on which the docstring of feature_net states the full accuracy).
EMBEDDED_TEST_ACCURACY = 0.940


@pytest.fixture(scope="module")
def model() -> FashionMNISTClassifier:
    return load_fmnist_classifier()


@pytest.fixture(scope="module")
def test_set():
    return load_dataset("fmnist-embedded", "test", 32)


def test_shipped_weights_verify_and_load_frozen(model):
    assert sha256_of_file(WEIGHTS_PATH) == WEIGHTS_SHA256
    assert WEIGHTS_PATH.stat().st_size < 2 * 2**20
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with safe_open(str(WEIGHTS_PATH), "pt") as f:
        assert float(f.metadata()["test_accuracy"]) >= 0.93


def test_corrupt_weights_give_the_hash_error(tmp_path, monkeypatch):
    corrupt = tmp_path / "fmnist_classifier.safetensors"
    shutil.copyfile(WEIGHTS_PATH, corrupt)
    raw = bytearray(corrupt.read_bytes())
    raw[-100] ^= 0xFF  # a byte of the last tensor's data: the file still parses, only the hash tells
    corrupt.write_bytes(bytes(raw))
    monkeypatch.setattr(feature_net, "WEIGHTS_PATH", corrupt)
    with pytest.raises(ValueError) as error:
        load_fmnist_classifier()
    message = str(error.value)
    assert str(corrupt) in message and WEIGHTS_SHA256 in message and sha256_of_file(corrupt) in message


def test_missing_weights_name_the_file(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere.safetensors"
    monkeypatch.setattr(feature_net, "WEIGHTS_PATH", missing)
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        load_fmnist_classifier()


def test_accuracy_on_embedded_test_subset(model, test_set):
    accuracy = classifier_accuracy(model, test_set.images, test_set.labels)
    assert accuracy >= 0.90
    assert accuracy == pytest.approx(EMBEDDED_TEST_ACCURACY, abs=0.002)  # the same weights, the same images


def test_features_shape_deterministic_and_batch_independent(model, test_set):
    images = test_set.images[:64]
    features = model.features(images)
    assert features.shape == (64, FEATURE_DIM) and features.dtype == torch.float32
    assert bool((features >= 0).all()) and float(features.std()) > 0
    assert torch.equal(features, model.features(images))
    torch.testing.assert_close(model.features(images[:5]), features[:5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(images), model.head(features))


def test_other_input_sizes(model, test_set):
    """28x28 (the original pixels) pads back to exactly the 32x32 input; 64x64 resizes back to a blurred one."""
    at_32 = model.features(test_set.images[:200])
    at_28 = load_dataset("fmnist-embedded", "test", 28)
    torch.testing.assert_close(model.features(at_28.images[:200]), at_32)
    at_64 = load_dataset("fmnist-embedded", "test", 64)
    assert model.features(at_64.images[:8]).shape == (8, FEATURE_DIM)
    assert classifier_accuracy(model, at_64.images, at_64.labels) >= 0.89  # measured 0.903


@pytest.mark.parametrize("shape,dtype,what", [
    ((4, 32, 32), torch.float32, "shape"),
    ((4, 3, 32, 32), torch.float32, "shape"),
    ((4, 1, 32, 28), torch.float32, "shape"),
    ((4, 1, 32, 32), torch.uint8, "float"),
])
def test_bad_input_is_a_clear_error(model, shape, dtype, what):
    with pytest.raises(ValueError, match=what):
        model.features(torch.zeros(shape, dtype=dtype))


def _write_idx_gz(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_training_script_writes_loadable_weights(tmp_path, capsys):
    """Two steps on a fake 64-image data set: the script writes weights the network loads, and the hash."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 32)):
        _write_idx_gz(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx_gz(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    spec = importlib.util.spec_from_file_location("train_fmnist_classifier",
                                                  REPO / "scripts" / "train_fmnist_classifier.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "weights.safetensors"
    threads = torch.get_num_threads()
    try:
        assert script.main(["--data", str(tmp_path), "--out", str(out), "--epochs", "1", "--batch-size", "16",
                            "--max-steps", "2", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    assert f'WEIGHTS_SHA256 = "{sha256_of_file(out)}"' in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        assert {"test_accuracy", "epochs", "seed", "torch", "date"} <= set(f.metadata())
    FashionMNISTClassifier().load_state_dict(load_file(out))
