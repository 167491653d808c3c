"""The FID Inception-v3 feature network (ul_fast/eval/inception.py): architecture, conventions, weights checks,
and, where pytorch-fid and torchvision import (not beside this package's pinned torch; the GPU image has both),
equality with pytorch-fid's ``InceptionV3([3])`` on the same random weights."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from ul_fast.eval import inception
from ul_fast.eval.evaluate import GRAYSCALE_INCEPTION_NOTE, check_features, load_feature_network
from ul_fast.eval.inception import FEATURE_DIM, FIDInceptionV3, check_fid_inception_file, load_fid_inception
from ul_fast.files import sha256_of_file

# torchvision's inception_v3(num_classes=1000, aux_logits=True) has 27,161,264 parameters (its weights' metadata);
# without the auxiliary head (3,326,696) and with the TensorFlow graph's 1008 classes (+16,392) that leaves:
FID_INCEPTION_PARAMETERS = 23_850_960


def random_state(seed: int) -> dict[str, torch.Tensor]:
    """Random weights with sane activations: He-scaled convolutions, BatchNorm statistics near identity."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in FIDInceptionV3().state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = tensor
        elif name.endswith("running_var"):
            state[name] = 0.5 + torch.rand(tensor.shape, generator=generator)
        elif name.endswith(("running_mean", "bn.bias")):
            state[name] = 0.1 * torch.randn(tensor.shape, generator=generator)
        elif name.endswith("bn.weight"):
            state[name] = 0.8 + 0.4 * torch.rand(tensor.shape, generator=generator)
        else:  # conv and fc weights, fc bias
            fan_in = tensor[0].numel() if tensor.dim() > 1 else 1
            state[name] = torch.randn(tensor.shape, generator=generator) * (2.0 / fan_in) ** 0.5
    return state


@pytest.fixture(scope="module")
def network() -> FIDInceptionV3:
    model = FIDInceptionV3()
    model.load_state_dict(random_state(0))
    return model.eval()


def test_architecture_matches_the_tensorflow_graph_parameter_count():
    assert sum(p.numel() for p in FIDInceptionV3().parameters()) == FID_INCEPTION_PARAMETERS


def test_features_are_2048_values_per_image_at_any_input_size(network):
    with torch.no_grad():
        for size in (28, 32, 75):
            images = torch.rand(2, 3, size, size) * 2 - 1
            assert network.features(images).shape == (2, FEATURE_DIM)


def test_images_are_read_as_8_bit_pixels_and_grayscale_as_rgb(network):
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    levels = ((images + 1) / 2 * 255).round() / 255 * 2 - 1  # the same image after an 8-bit round trip
    prepared = network.prepare(images)
    assert prepared.shape == (2, 3, 299, 299)
    assert torch.equal(prepared, network.prepare(levels))
    assert torch.equal(prepared, network.prepare(images.expand(-1, 3, -1, -1)))
    by_hand = 2 * F.interpolate(((levels + 1) / 2).expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear",
                                align_corners=False) - 1
    torch.testing.assert_close(prepared, by_hand, rtol=0, atol=1e-6)


@pytest.mark.parametrize("images, message", [
    (torch.zeros(2, 2, 8, 8), "1 or 3"),
    (torch.zeros(2, 8, 8), "1 or 3"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "float images"),
])
def test_bad_images_are_named(network, images, message):
    with pytest.raises(ValueError, match=message):
        network.prepare(images)


def test_weights_file_must_exist_and_carry_the_standard_hash(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file.*nothing is downloaded"):
        check_fid_inception_file(tmp_path / "missing.pth")
    other = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(random_state(1), other)  # the right name, the wrong contents
    with pytest.raises(ValueError, match="does not start with 6726825d"):
        load_fid_inception(other)


def test_weights_load_strictly(tmp_path, monkeypatch):
    path = tmp_path / "weights.pth"
    state = random_state(2)
    torch.save(state, path)
    monkeypatch.setattr(inception, "WEIGHTS_SHA256_PREFIX", sha256_of_file(path)[:8])
    model = load_fid_inception(path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert torch.equal(model.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])
    del state["fc.bias"]
    torch.save(state, path)
    monkeypatch.setattr(inception, "WEIGHTS_SHA256_PREFIX", sha256_of_file(path)[:8])
    with pytest.raises(RuntimeError, match="fc.bias"):
        load_fid_inception(path)


def test_eval_feature_choice(tmp_path, monkeypatch):
    path = tmp_path / "weights.pth"
    torch.save(random_state(3), path)
    monkeypatch.setattr(inception, "WEIGHTS_SHA256_PREFIX", sha256_of_file(path)[:8])
    assert check_features(f"inception:{path}", 3) == []
    assert check_features(f"inception:{path}", 1) == [GRAYSCALE_INCEPTION_NOTE]
    assert isinstance(load_feature_network(f"inception:{path}", torch.device("cpu")), FIDInceptionV3)
    assert check_features("fmnist", 1) == []
    with pytest.raises(ValueError, match="inception:PATH"):
        check_features("fmnist", 3)
    with pytest.raises(ValueError, match="needs the weights' path"):
        check_features("inception", 3)


@pytest.mark.skipif(importlib.util.find_spec("pytorch_fid") is None or importlib.util.find_spec("torchvision") is None,
                    reason="pytorch-fid and torchvision do not install beside this torch (they run on the GPU image)")
def test_equals_pytorch_fid_on_the_same_weights(network, monkeypatch):
    from pytorch_fid import inception as pytorch_fid_inception

    state = random_state(0)  # the fixture's weights
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *args, **kwargs: state)
    theirs = pytorch_fid_inception.InceptionV3([3]).eval()
    images = torch.rand(4, 3, 48, 40) * 2 - 1
    with torch.no_grad():
        # pytorch-fid takes [0, 1] images as read from 8-bit files
        expected = theirs(((images + 1) / 2 * 255).round() / 255)[0].flatten(1)
        ours = network.features(images)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
