"""The latent cache for stage 2: ``encode_dataset`` writes it, ``LatentCache`` reads it back, and the stage-2 loss
from it is the loss with on-the-fly encoding.

A run folder here is a fresh micro model saved as a checkpoint (nothing trained): the cache only needs the
encoder's weights. Its EMA weights differ from its raw weights, so the tests see which ones were used.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ul_fast.config import save_config
from ul_fast.data import BadImageError, BadImageWarning, load_dataset
from ul_fast.data.latent_cache import (
    MANIFEST,
    PROGRESS,
    LatentCache,
    LatentCacheError,
    check_cache_for_model,
    encoder_sha256,
)
from ul_fast.model import UnifiedLatents
from ul_fast.train import load_trained_model
from ul_fast.train.checkpoint import save_checkpoint
from ul_fast.train.encode import EncodeError, encode_dataset
from ul_fast.train.run_folder import RunFolderError, RunLock

from micro import micro_config

TRAIN, TEST = 24, 8
ENCODE = {"batch_size": 8, "shard_size": 16, "progress": False}  # train: shards of 16 + 8 images


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``(run folder, data spec)``: a micro run on 24 training and 8 test images of the embedded Fashion-MNIST."""
    folder = tmp_path_factory.mktemp("latent_cache")
    arrays = {}
    for split, count in (("train", TRAIN), ("test", TEST)):
        data = load_dataset("fmnist-embedded", split, image_size=16)
        arrays[f"{split}_images"] = ((data.images[:count, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
        arrays[f"{split}_labels"] = data.labels[:count].numpy()
    np.savez(folder / "small.npz", **arrays)
    spec = f"array:{folder / 'small.npz'}"
    config = micro_config(data={"dataset": spec})
    (folder / "run").mkdir()
    save_config(config, folder / "run" / "config.yaml")
    torch.manual_seed(1)
    raw, ema = UnifiedLatents(config.model), UnifiedLatents(config.model)
    save_checkpoint(folder / "run", 0, raw, ema, {})
    return folder / "run", spec


@pytest.fixture(scope="module")
def caches(run, tmp_path_factory):
    """An fp32 and a bf16 cache (both flipped) of the run's data."""
    folder = tmp_path_factory.mktemp("caches")
    for dtype in ("fp32", "bf16"):
        encode_dataset(*run, folder / dtype, dtype=dtype, flip=True, **ENCODE)
    return folder


def trained(run) -> UnifiedLatents:
    return load_trained_model(run[0])[1]


def pixels(run, split="train") -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset(run[1], split, image_size=16)
    return data.images, data.labels


# ----------------------------------------------------------------------------- the model from given latents
def test_stage2_loss_from_the_fp32_cache_is_the_loss_from_pixels(run, caches):
    """Same generator seed, same draws: bit for bit equal loss and base-model gradients (the batches are the
    encode's own batches of 8, so the encoder sees the same batches in both)."""
    model = trained(run)
    model.train()
    cache = LatentCache(caches / "fp32", expected_encoder_hash=encoder_sha256(model.encoder),
                        expected_latent_shape=model.latent_shape)
    images, labels = pixels(run)
    for rows in (range(0, 8), range(16, 24)):
        z_clean, cached_labels = cache.batch(rows)
        assert torch.equal(cached_labels, labels[rows.start:rows.stop])
        results = []
        for inputs in ({"x": images[rows.start:rows.stop]}, {"x": None, "z_clean": z_clean}):
            model.zero_grad(set_to_none=True)
            out = model(labels=cached_labels, generator=torch.Generator().manual_seed(7), stage=2, **inputs)
            out["loss"].backward()
            results.append((out["loss"], [p.grad.clone() for p in model.base.parameters()]))
        (from_pixels, pixel_grads), (from_cache, cache_grads) = results
        assert torch.equal(from_pixels, from_cache) and from_pixels > 0
        assert all(torch.equal(a, b) for a, b in zip(pixel_grads, cache_grads))
        assert model.encoder.stem.weight.grad is None  # the frozen encoder got nothing either way


def test_the_bf16_cache_is_the_fp32_cache_rounded_once(run, caches):
    """bf16 rounds each latent to nearest: relative error ≤ 2⁻⁸ (8 significant bits), and the loss from the bf16
    cache is exactly the loss from pixels with the encoder's output rounded to bf16. Measured on this batch the
    loss moves by far less than 1 % (it is a sum of squared errors over the latent)."""
    model = trained(run)
    fp32, bf16 = LatentCache(caches / "fp32"), LatentCache(caches / "bf16")
    z, z_bf16 = fp32.batch(range(len(fp32)))[0], bf16.batch(range(len(bf16)))[0]
    assert torch.equal(z_bf16, z.to(torch.bfloat16).float())
    assert ((z_bf16 - z).abs() <= 2.0**-8 * z.abs()).all()
    images, labels = pixels(run)
    with torch.no_grad():
        rounded = model.encode(images[:8]).to(torch.bfloat16).float()

    def loss(z_clean):
        return model.stage2_loss(None, labels[:8], generator=torch.Generator().manual_seed(3), z_clean=z_clean)["loss"]

    assert torch.equal(loss(z_bf16[:8]), loss(rounded))
    assert abs(float(loss(z_bf16[:8]).detach() / loss(z[:8]).detach()) - 1) < 1e-2


def test_latent_nats_from_given_latents(run):
    model = trained(run)
    images = pixels(run, "test")[0]
    with torch.no_grad():
        z = model.encode(images)
        for network in ("prior", "base"):
            from_pixels = model.latent_nats(images, network, generator=torch.Generator().manual_seed(5))
            given = model.latent_nats(None, network, generator=torch.Generator().manual_seed(5), z_clean=z)
            assert torch.equal(from_pixels, given)


def test_given_latents_are_checked(run):
    model = trained(run)
    images = pixels(run, "test")[0][:2]
    z = torch.zeros(2, *model.latent_shape)
    with pytest.raises(ValueError, match="exactly one of x"):
        model.stage2_loss(images, z_clean=z)
    with pytest.raises(ValueError, match="exactly one of x"):
        model(None, stage=2)
    with pytest.raises(ValueError, match=r"z_clean must have shape \[B, 4, 4, 4\]"):
        model.stage2_loss(None, z_clean=torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="non-finite"):  # the evaluation entry points read the values
        model.latent_nats(None, z_clean=torch.full_like(z, float("nan")))
    with pytest.raises(ValueError, match="stage 1 trains the encoder"):
        model(images, stage=1, z_clean=z)


# ----------------------------------------------------------------------------- what the cache holds
def test_the_manifest_names_the_run_and_its_ema_encoder(run, caches):
    manifest = json.loads((caches / "bf16" / MANIFEST).read_text())
    model = trained(run)  # the EMA weights
    raw = load_file(next((run[0] / "checkpoints").glob("step_*")) / "model.safetensors")
    assert manifest["encoder_sha256"] == encoder_sha256(model.encoder) != encoder_sha256(raw, prefix="encoder.")
    assert manifest["run"] == str(run[0].resolve()) and manifest["data"] == run[1]
    assert manifest["latent_shape"] == [4, 4, 4] and manifest["dtype"] == "bf16" and manifest["flip"]
    assert {s: e["count"] for s, e in manifest["splits"].items()} == {"train": TRAIN, "test": TEST}
    assert [len(e["shards"]) for e in manifest["splits"].values()] == [2, 1]
    assert not (caches / "bf16" / PROGRESS).exists()


def test_flip_doubles_the_train_items_with_the_flipped_images_latents(run, caches):
    model = trained(run)
    train, test = LatentCache(caches / "fp32"), LatentCache(caches / "fp32", split="test")
    assert (len(train), len(test)) == (2 * TRAIN, TEST) and train.flipped and not test.flipped
    images, labels = pixels(run)
    with torch.no_grad():
        flipped = model.encode(images[16:24].flip(-1))
    z, cached_labels = train.batch(range(TRAIN + 16, TRAIN + 24))
    assert torch.equal(z, flipped) and torch.equal(cached_labels, labels[16:24])
    item, label = train[TRAIN + 17]
    assert torch.equal(item, flipped[1]) and label == int(labels[17]) and item.dtype == torch.float32
    item += 1  # a copy, not a view of the read-only memory map
    assert torch.equal(train[TRAIN + 17][0], flipped[1]) and torch.equal(train[-7][0], flipped[1])
    with pytest.raises(IndexError, match="out of range"):
        train[2 * TRAIN]


def test_the_cache_pickles_for_dataloader_workers(caches):
    cache = LatentCache(caches / "bf16")
    cache.batch([0, 30])  # maps two shards in this process
    copy = pickle.loads(pickle.dumps(cache))
    assert copy._mapped == {} and torch.equal(copy.batch([3, 40])[0], cache.batch([3, 40])[0])


# ----------------------------------------------------------------------------- mismatches and damage
def test_a_cache_from_other_weights_or_of_another_shape_is_refused(run, caches):
    manifest = caches / "bf16" / MANIFEST
    recorded = json.loads(manifest.read_text())["encoder_sha256"]
    other = UnifiedLatents(trained(run).config)  # fresh weights: another encoder
    other_hash = encoder_sha256(other.encoder)
    cache = LatentCache(caches / "bf16")
    for check in (lambda: LatentCache(caches / "bf16", expected_encoder_hash=other_hash),
                  lambda: check_cache_for_model(cache, other),
                  lambda: check_cache_for_model(cache, trained(run), weights=other.state_dict())):
        with pytest.raises(LatentCacheError) as error:
            check()
        assert str(manifest) in str(error.value) and recorded in str(error.value) and other_hash in str(error.value)
    check_cache_for_model(cache, trained(run))  # its own run passes
    shape_error = rf"{re.escape(str(manifest))} holds latents of shape \[4, 4, 4\], the model expects \[8, 4, 4\]"
    with pytest.raises(LatentCacheError, match=shape_error):
        LatentCache(caches / "bf16", expected_latent_shape=(8, 4, 4))


def test_damaged_shards_are_errors_naming_the_file(caches, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(caches / "bf16", cache)
    latents = cache / "train-00001.latents.npy"
    original = latents.read_bytes()

    # same bytes, another shape: the header says so
    np.save(latents, np.load(latents).reshape(8, 4, 2, 8))
    assert latents.stat().st_size == len(original)
    name = re.escape(str(latents))
    with pytest.raises(LatentCacheError, match=rf"{name} holds uint16 \[8, 4, 2, 8\], .* says uint16 \[8, 4, 4, 4\]"):
        LatentCache(cache)
    # a flipped byte: found by the SHA-256 check only
    damaged = bytearray(original)
    damaged[-1] ^= 0xFF
    latents.write_bytes(bytes(damaged))
    LatentCache(cache)
    with pytest.raises(LatentCacheError, match=rf"{name} fails its SHA-256 check"):
        LatentCache(cache, verify_hashes=True)
    # truncated, missing
    latents.write_bytes(original[:-16])
    with pytest.raises(LatentCacheError, match=rf"{name} has {len(original) - 16} bytes"):
        LatentCache(cache)
    latents.unlink()
    with pytest.raises(LatentCacheError, match=rf"{name} is missing"):
        LatentCache(cache)
    LatentCache(cache, split="test")  # the other split is intact
    (cache / MANIFEST).unlink()
    with pytest.raises(LatentCacheError, match=rf"{re.escape(str(cache / MANIFEST))} does not exist"):
        LatentCache(cache)


def test_a_non_finite_latent_is_an_error_naming_the_item(caches, tmp_path):
    """The training step does not read its input back to check it: the cache reader checks each batch on the CPU."""
    cache = tmp_path / "cache"
    shutil.copytree(caches / "fp32", cache)
    latents = cache / "train-00000.latents.npy"
    values = np.load(latents)
    values[3, 1, 2, 2] = np.inf
    np.save(latents, values)
    reader = LatentCache(cache)
    reader.batch([0, 1, 2])  # the items around it read as before
    with pytest.raises(LatentCacheError, match=r"the latent of item 3 is not finite"):
        reader.batch([0, 3, 5])
    with pytest.raises(LatentCacheError, match=r"the latent of item 3 is not finite"):
        reader[3]


# ----------------------------------------------------------------------------- interrupted and repeated encodes
def test_an_interrupted_encode_never_looks_complete_and_resumes(run, caches, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    encode = UnifiedLatents.encode
    calls, fail_at = [], [5]  # shard 0 takes 4 calls (2 batches, each also flipped): die inside shard 1

    def failing_encode(self, x):
        calls.append(len(x))
        if len(calls) in fail_at:
            fail_at.clear()
            raise RuntimeError("killed")
        return encode(self, x)

    monkeypatch.setattr(UnifiedLatents, "encode", failing_encode)
    with pytest.raises(RuntimeError, match="killed"):
        encode_dataset(*run, out, dtype="bf16", flip=True, **ENCODE)
    assert not (out / MANIFEST).exists() and not list(out.glob(".*.tmp"))
    assert sorted(p.name for p in out.glob("*.npy")) == [f"train-00000.{k}.npy" for k in ("flipped", "labels",
                                                                                         "latents")]
    with pytest.raises(LatentCacheError, match="its encode did not finish"):
        LatentCache(out)
    # other settings cannot resume it
    folder = re.escape(str(out))
    with pytest.raises(EncodeError, match=rf"{folder} holds an unfinished encode with other settings .* in dtype"):
        encode_dataset(*run, out, dtype="fp16", flip=True, **ENCODE)
    # the same encode resumes after shard 0 (a temporary file of a killed write is removed)
    (out / ".train-00001.latents.npy.tmp").write_bytes(b"half")
    calls.clear()
    encode_dataset(*run, out, dtype="bf16", flip=True, **ENCODE)
    assert calls == [8, 8, 8]  # shard 1, flipped; test; and the manifest matches an uninterrupted encode's
    assert (out / MANIFEST).read_bytes() == (caches / "bf16" / MANIFEST).read_bytes()
    assert [p.name for p in out.glob(".*")] == [".lock"]  # the lock's file (released; flock locks die with it)
    # a finished cache is not overwritten unless asked
    with pytest.raises(EncodeError, match=rf"{folder} already holds a latent cache"):
        encode_dataset(*run, out, **ENCODE)
    encode_dataset(*run, out, dtype="fp16", overwrite=True, **ENCODE)
    assert LatentCache(out).dtype == "fp16" and len(LatentCache(out)) == TRAIN
    assert not list(out.glob("*.flipped.npy"))  # the replaced cache's files are gone


def test_a_streamed_folder_encodes_as_the_same_folder_in_memory(run, tmp_path):
    """``folder-stream:`` (decoded image by image, center-cropped) gives the latents of ``folder:`` (in memory)."""
    write_image_folder(run, tmp_path / "data")
    hashes = []
    for kind in ("folder-stream", "folder"):
        manifest = encode_dataset(run[0], f"{kind}:{tmp_path / 'data'}", tmp_path / kind, dtype="fp32",
                                  splits=("train",), batch_size=4, progress=False)
        record = json.loads(manifest.read_text())
        assert record["class_names"] == ["class0", "class1"] and record["splits"]["train"]["count"] == 6
        hashes.append([f["sha256"] for f in record["splits"]["train"]["shards"][0]["files"].values()])
    assert hashes[0] == hashes[1]
    assert LatentCache(tmp_path / "folder-stream").batch(range(6))[1].tolist() == [0, 0, 0, 1, 1, 1]


def write_image_folder(run, root, count: int = 6) -> list:
    """``root/class<k>/<i>.png``: the run's first ``count`` training images; returns them as uint8 arrays."""
    images = ((pixels(run)[0][:count, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    for i, image in enumerate(images):
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(root / f"class{i % 2}" / f"{i}.png")
    return images


@pytest.mark.parametrize("kind", ["folder", "folder-stream"])
def test_encode_follows_on_bad_image(run, tmp_path, kind):
    """skip: an undecodable image is left out, with a warning and its name in the manifest, and the others are
    the latents of a folder without it; fail: the encode stops, naming the file. (It stopped at the first bad
    image whatever data.on_bad_image said; a folder: spec also failed from inside the in-memory loader.)"""
    write_image_folder(run, tmp_path / "data")
    clean = encode_dataset(run[0], f"{kind}:{tmp_path / 'data'}", tmp_path / "clean", dtype="fp32", splits=("train",),
                           batch_size=4, progress=False)
    bad = tmp_path / "data" / "class1" / "2_bad.png"
    bad.write_bytes(b"not an image")
    options = {"dtype": "fp32", "splits": ("train",), "batch_size": 4, "progress": False}
    with pytest.warns(BadImageWarning, match=r"2_bad\.png"):
        skipped = encode_dataset(run[0], f"{kind}:{tmp_path / 'data'}", tmp_path / "skip", on_bad_image="skip",
                                 **options)
    record = json.loads(skipped.read_text())["splits"]["train"]
    assert record["count"] == 6 and record["skipped"] == [str(bad.resolve())]
    assert torch.equal(LatentCache(tmp_path / "skip").batch(range(6))[0],
                       LatentCache(tmp_path / "clean").batch(range(6))[0])
    assert json.loads(clean.read_text())["splits"]["train"]["skipped"] == []
    with pytest.raises(BadImageError, match=r"2_bad\.png: cannot decode.*on_bad_image is fail"):
        encode_dataset(run[0], f"{kind}:{tmp_path / 'data'}", tmp_path / "fail", on_bad_image="fail", **options)
    assert not (tmp_path / "fail" / MANIFEST).exists()


def test_two_encodes_into_one_folder_the_second_stops_at_once(run, tmp_path):
    (tmp_path / "cache").mkdir()
    with RunLock(tmp_path / "cache", "encode"), pytest.raises(RunFolderError,
                                                              match=rf"in use by another encode \(pid {os.getpid()} "):
        encode_dataset(*run, tmp_path / "cache", **ENCODE)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".lock"]  # nothing written
    (tmp_path / "file").write_text("")
    with pytest.raises(EncodeError, match="is a file, not a folder"):
        encode_dataset(*run, tmp_path / "file", **ENCODE)


# ----------------------------------------------------------------------------- the trainer from a cache
def stage2_records(config, folder) -> list[dict]:
    from ul_fast.train import Trainer

    Trainer(config, folder).fit()
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "loss", "grad_norm", "bits_per_pixel") if k in r} for r in records
            if "loss" in r]


# The cache encodes images in batches of 8, the pixel run in its random training batches of 16: a CPU's conv and
# matmul kernels may round an image's latent differently in another batch (a few ulps, ~1e-7 relative), which three
# AdamW steps carry through at that order. 1e-5 leaves that a wide margin; a latent off by 1e-4 fails.
RTOL = 1e-5


def test_stage2_trains_from_the_cache_as_from_pixels(run, tmp_path):
    """The trainer's stage 2 from an fp32 cache (data.dataset latents:DIR) logs the same losses, gradient norms and
    frozen bits/pixel, step for step, and ends with the same base-model weights as stage 2 from the pixels (to
    fp32 rounding: see RTOL)."""
    encode_dataset(*run, tmp_path / "cache", dtype="fp32", **ENCODE)
    stage2 = {"init_from": str(run[0]), "stage1_steps": 0, "stage2_steps": 3, "eval_every": 3, "log_every": 1}
    from_pixels = stage2_records(micro_config(data={"dataset": run[1]}, train=stage2), tmp_path / "pixels")
    from_cache = stage2_records(micro_config(data={"dataset": f"latents:{tmp_path / 'cache'}"}, train=stage2),
                                tmp_path / "latents")
    assert len(from_cache) == 3 and [r.keys() for r in from_cache] == [r.keys() for r in from_pixels]
    for cached, pixel in zip(from_cache, from_pixels):
        assert all(math.isclose(cached[k], pixel[k], rel_tol=RTOL) for k in cached), (cached, pixel)
    weights = [load_file(tmp_path / name / "checkpoints" / "step_00000003" / "ema.safetensors")
               for name in ("pixels", "latents")]
    assert all(torch.allclose(weights[0][k], weights[1][k], rtol=RTOL, atol=RTOL * weights[0][k].abs().max())
               for k in weights[0] if k.startswith("base."))


def test_a_cache_run_must_skip_stage1_and_name_its_encoder_run(run, tmp_path):
    from ul_fast.config import ConfigError
    from ul_fast.train import Trainer

    encode_dataset(*run, tmp_path / "cache", dtype="fp32", **ENCODE)
    spec = {"dataset": f"latents:{tmp_path / 'cache'}"}
    with pytest.raises(ConfigError, match="train.stage1_steps: 0 and train.init_from"):
        Trainer(micro_config(data=spec), tmp_path / "a")
    with pytest.raises(ConfigError, match="data.flip"):
        Trainer(micro_config(data={**spec, "flip": True}, train={"init_from": str(run[0]), "stage1_steps": 0}),
                tmp_path / "b")


def test_a_cache_spec_loads_the_images_it_was_encoded_from(run, caches):
    """Evaluation and distillation of a run trained from a cache need pixels: load_images follows the manifest."""
    from ul_fast.data import load_images

    for split in ("train", "test"):
        images = load_images(f"latents:{caches / 'fp32'}", split, 16, 1)
        assert torch.equal(images.images, pixels(run, split)[0])


def test_a_cache_holds_its_splits_apart_when_its_images_do(run, caches, tmp_path):
    from ul_fast.data import splits_apart

    assert splits_apart(f"latents:{caches / 'fp32'}")  # encoded from an .npz with train_images and test_images
    np.save(tmp_path / "one-set.npy", np.load(run[1].partition(":")[2])["train_images"])
    encode_dataset(run[0], f"array:{tmp_path / 'one-set.npy'}", tmp_path / "cache", **ENCODE)
    assert not splits_apart(f"latents:{tmp_path / 'cache'}")
