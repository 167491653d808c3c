"""Tests for the WebDataset shards: ul_fast.data.shard_writer (writing) and ul_fast.data.shards (reading)."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset
from PIL import Image
from torch.utils.data import DataLoader

from ul_fast.data import (
    BatchStream,
    ImageArrayDataset,
    ImageTransform,
    StreamingBatches,
    load_dataset,
    uint8_to_float,
)
from ul_fast.data import shards as shards_module
from ul_fast.data.errors import BadImageError
from ul_fast.data.shard_writer import prepare_shards, write_shards
from ul_fast.data.shards import INDEX_NAME, ShardSource

from archives import write_tar


def _pixels(n: int, channels: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    """uint8 ``[n, channels, size, size]`` random pixels."""
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def _dataset(n: int = 25, channels: int = 3, labeled: bool = True, seed: int = 0) -> ImageArrayDataset:
    labels = torch.arange(n) % 3 if labeled else None
    names = ["ant", "bee", "cat"] if labeled else None
    return ImageArrayDataset(uint8_to_float(_pixels(n, channels, seed=seed)), labels, names, source="tiny")


def _hwc(image: Image.Image) -> np.ndarray:
    """uint8 ``[H, W, C]`` pixels of a Pillow image."""
    a = np.array(image)
    return a[:, :, None] if a.ndim == 2 else a


def _png_bytes(value: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (value, value, value)).save(buffer, "PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- round trip and layout


@pytest.mark.parametrize("channels,labeled", [(3, True), (1, False)])
def test_round_trip_is_pixel_exact(tmp_path, channels, labeled):
    data = _dataset(channels=channels, labeled=labeled)
    write_shards(data, tmp_path / "out", split="train")
    source = ShardSource(tmp_path / "out")  # channels from the manifest
    assert len(source) == 25 and source.channels == channels
    expected = _pixels(25, channels).permute(0, 2, 3, 1).numpy()
    for i in range(25):
        image, label = source[i]
        assert image.mode == ("RGB" if channels == 3 else "L") and image.size == (8, 8)
        np.testing.assert_array_equal(_hwc(image), expected[i])
        assert label == (i % 3 if labeled else -1)
    assert source.class_names == (["ant", "bee", "cat"] if labeled else None)
    assert (tmp_path / "out" / "classes.json").is_file() == labeled
    manifest = json.loads((tmp_path / "out" / "shards.json").read_text())
    assert manifest["count"] == 25 and manifest["channels"] == channels and manifest["split"] == "train"
    assert manifest["labeled"] == labeled and manifest["image_format"] == "png"


def test_jpeg_shards_decode_close_to_the_source(tmp_path):
    ramp = torch.linspace(-1, 1, 16).expand(4, 3, 16, 16).contiguous()  # smooth: JPEG keeps it well
    write_shards(ImageArrayDataset(ramp, torch.tensor([0, 1, 0, 1])), tmp_path / "out", image_format="jpg",
                 quality=95)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["shard-000000.tar"]
    source = ShardSource(tmp_path / "out", channels=3)
    image, label = source[1]
    assert label == 1 and source.encoded(1)[1] == "jpg"
    reference = ((ramp[1] + 1) * 127.5).round().permute(1, 2, 0).numpy()
    assert np.abs(_hwc(image).astype(np.float64) - reference).max() <= 8


def test_max_count_and_max_bytes_split_the_shards(tmp_path):
    write_shards(_dataset(), tmp_path / "count", max_count=10)
    manifest = json.loads((tmp_path / "count" / "shards.json").read_text())
    assert [(s["name"], s["count"]) for s in manifest["shards"]] == [
        ("shard-000000.tar", 10), ("shard-000001.tar", 10), ("shard-000002.tar", 5)]
    source = ShardSource(tmp_path / "count")
    assert [Path(p).name for p in source.shard_paths] == [s["name"] for s in manifest["shards"]]
    assert source.member_name(10).endswith("shard-000001.tar:00000010.png")
    # A shard closes once it holds max_bytes of images: here after every sample.
    write_shards(_dataset(n=4), tmp_path / "bytes", max_bytes=1)
    assert len(list((tmp_path / "bytes").glob("*.tar"))) == 4


def test_webdataset_reads_the_shards(tmp_path):
    data = _dataset()
    write_shards(data, tmp_path / "out", max_count=10)
    ours = ShardSource(tmp_path / "out")
    urls = [str(p) for p in sorted((tmp_path / "out").glob("*.tar"))]
    samples = list(webdataset.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(25)]
    assert [int(s["cls"]) for s in samples] == ours.labels.tolist()
    for i, sample in enumerate(samples):
        np.testing.assert_array_equal(_hwc(Image.open(io.BytesIO(sample["png"]))), _hwc(ours[i][0]))


# ---------------------------------------------------------------- index cache and fingerprint


def test_index_cache_is_reused_and_rebuilt_when_a_shard_changes(tmp_path, monkeypatch):
    write_shards(_dataset(), tmp_path / "out", max_count=10)
    out = tmp_path / "out"
    assert (out / INDEX_NAME).is_file()  # the writer indexed (and so checked) what it wrote
    first = ShardSource(out)

    calls = []
    real_index_shard = shards_module._index_shard
    monkeypatch.setattr(shards_module, "_index_shard", lambda path: calls.append(path) or real_index_shard(path))
    again = ShardSource(out)
    assert calls == [] and again.fingerprint() == first.fingerprint()

    # Rewrite the last shard with other content (5 -> 2 samples): the cache no longer matches.
    write_shards(_dataset(n=2, seed=1), tmp_path / "other")
    os.replace(tmp_path / "other" / "shard-000000.tar", out / "shard-000002.tar")
    calls.clear()
    changed = ShardSource(out)
    assert calls == [out / "shard-000002.tar"]  # the unchanged shards keep their cached records
    assert len(changed) == 22 and changed.fingerprint() != first.fingerprint()
    assert ShardSource(out).fingerprint() == changed.fingerprint() and len(calls) == 1  # cached again
    np.testing.assert_array_equal(_hwc(changed[21][0]), _pixels(2, 3, seed=1)[1].permute(1, 2, 0).numpy())

    # Touching a shard (same bytes, new mtime) also changes the fingerprint; a removed shard too.
    os.utime(out / "shard-000000.tar", ns=(0, 10**9))
    assert ShardSource(out).fingerprint() not in (first.fingerprint(), changed.fingerprint())
    (out / "shard-000001.tar").unlink()
    assert len(ShardSource(out)) == 12


def test_read_only_folder_indexes_in_memory(tmp_path, monkeypatch):
    write_shards(_dataset(n=3), tmp_path / "out")
    (tmp_path / "out" / INDEX_NAME).unlink()

    def refuse(path, record, **_):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shards_module, "write_json_atomically", refuse)
    with pytest.warns(UserWarning, match="cannot cache the shard index"):
        source = ShardSource(tmp_path / "out")
    assert len(source) == 3 and source[2][1] == 2


# ---------------------------------------------------------------- bad input


def test_undecodable_member_raises_bad_image_error_naming_shard_and_key(tmp_path):
    good = _png_bytes(200)
    shard = write_tar(tmp_path / "s" / "a.tar", [
        ("k0.png", good), ("k0.cls", b"1"),
        ("k1.png", b"not an image"), ("k1.cls", b"0"),
        ("k2.png", good[: len(good) // 2]),  # truncated
    ])
    source = ShardSource(tmp_path / "s", channels=1)
    image, label = source[0]
    assert label == 1 and image.mode == "L" and _hwc(image).min() == 200
    for index, key in [(1, "k1.png"), (2, "k2.png")]:
        with pytest.raises(BadImageError) as info:
            source[index]
        assert info.value.where == f"{shard}:{key}"
    assert source[-3][1] == 1  # negative indices count from the end, like a list
    with pytest.raises(IndexError):
        source[3]


@pytest.mark.parametrize("members,match", [
    ([("k0.png", b"x"), ("k1.cls", b"2")], r"a\.tar: sample 'k1' has no image member"),
    ([("k0.png", b"x"), ("k0.jpg", b"y")], r"a\.tar: sample 'k0' has two images"),
    ([("k0.png", b"x"), ("k0.cls", b"dog")], r"a\.tar: k0\.cls must hold a class index"),
])
def test_malformed_shards_name_the_file(tmp_path, members, match):
    write_tar(tmp_path / "s" / "a.tar", members)
    with pytest.raises(ValueError, match=match):
        ShardSource(tmp_path / "s", channels=3)


def test_missing_empty_and_tarless_folders_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere is not a folder"):
        ShardSource(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.* is empty"):
        ShardSource(tmp_path / "empty")
    (tmp_path / "notars").mkdir()
    (tmp_path / "notars" / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"notars holds no \*\.tar shards"):
        ShardSource(tmp_path / "notars")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.tar").write_bytes(b"\x01" * 1000)
    with pytest.raises(ValueError, match=r"x\.tar: not a readable tar file"):
        ShardSource(tmp_path / "broken")
    write_tar(tmp_path / "labels" / "a.tar", [("k0.png", _png_bytes(1)), ("k0.cls", b"3")])
    (tmp_path / "labels" / "classes.json").write_text('["a", "b"]')
    with pytest.raises(ValueError, match="label 3 .* has no name"):
        ShardSource(tmp_path / "labels")


def test_interrupted_write_leaves_no_shard_set(tmp_path):
    source = ShardSource(write_shards(_dataset(n=6), tmp_path / "src"))

    class Failing:
        """A source whose fifth image fails to read."""
        channels, class_names, source = 3, None, "failing"

        def __len__(self):
            return 6

        def __getitem__(self, i):
            if i == 4:
                raise OSError("disk gone")
            return source[i]

    with pytest.raises(OSError, match="disk gone"):
        write_shards(Failing(), tmp_path / "out")
    assert not (tmp_path / "out").exists() and (tmp_path / "out.partial").is_dir()
    write_shards(_dataset(n=2), tmp_path / "out")  # the next run starts over
    assert len(ShardSource(tmp_path / "out")) == 2 and not (tmp_path / "out.partial").exists()
    with pytest.raises(FileExistsError, match="out already exists"):
        write_shards(_dataset(n=2), tmp_path / "out")


# ---------------------------------------------------------------- workers


def test_pickled_source_and_dataloader_workers_read_the_same_items(tmp_path):
    source = ShardSource(write_shards(_dataset(n=12), tmp_path / "out", max_count=5))
    expected = [(_hwc(source[i][0]), source[i][1]) for i in range(12)]  # opens descriptors in this process
    copy = pickle.loads(pickle.dumps(source))
    assert copy._files == {} and copy.fingerprint() == source.fingerprint()
    assert all(np.array_equal(_hwc(copy[i][0]), expected[i][0]) for i in range(12))

    loader = DataLoader(source, batch_size=None, num_workers=2, collate_fn=lambda item: (_hwc(item[0]), item[1]))
    got = list(loader)
    assert [label for _, label in got] == [label for _, label in expected]
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(got, expected))


def test_streamed_shards_give_the_batches_of_the_in_memory_stream(tmp_path):
    data = _dataset(n=20)
    source = ShardSource(write_shards(data, tmp_path / "out", max_count=7))
    streamed = StreamingBatches(source, ImageTransform(8, 3), batch_size=6, seed=3)
    in_memory = BatchStream(data, batch_size=6, seed=3)
    for _ in range(5):  # 30 examples: across an epoch boundary
        (x, y), (x_ref, y_ref) = streamed.next_batch(), in_memory.next_batch()
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert streamed.state_dict()["fingerprint"] == source.fingerprint()


# ---------------------------------------------------------------- re-sharding and prepare_shards


def test_resharding_copies_the_stored_bytes(tmp_path):
    first = ShardSource(write_shards(_dataset(n=7), tmp_path / "a", max_count=3))
    second = ShardSource(write_shards(first, tmp_path / "b", image_format="jpg"))  # copied, not re-encoded
    assert len(second) == 7 and second.class_names == first.class_names
    assert [second.encoded(i) for i in range(7)] == [first.encoded(i) for i in range(7)]
    assert second.labels.tolist() == first.labels.tolist()
    assert json.loads((tmp_path / "b" / "shards.json").read_text())["image_format"] == "copied"


def test_prepare_shards_writes_train_and_test_from_an_array_spec(tmp_path):
    train, test = _pixels(6, 1, seed=2), _pixels(3, 1, seed=3)
    np.savez(tmp_path / "d.npz", train_images=train.numpy(), train_labels=np.arange(6) % 2,
             test_images=test.numpy(), test_labels=np.array([1, 0, 1]))
    out = prepare_shards(f"array:{tmp_path / 'd.npz'}", tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]
    for split, pixels in [("train", train), ("test", test)]:
        source = ShardSource(out / split)
        assert len(source) == len(pixels) and source.channels == 1
        np.testing.assert_array_equal(_hwc(source[2][0]), pixels[2].permute(1, 2, 0).numpy())
    assert ShardSource(out / "test").labels.tolist() == [1, 0, 1]


def _image_file(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A random RGB image file (PNG or JPEG by ``path``'s extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_prepare_shards_copies_folder_files_and_skips_undecodable_ones(tmp_path):
    root = tmp_path / "images"
    files = {split: [_image_file(root / split / "cat" / "a.png", (12, 9), 1 + k),
                     _image_file(root / split / "dog" / "b.jpg", (10, 10), 3 + k),
                     _image_file(root / split / "dog" / "c.jpeg", (7, 11), 5 + k)]
             for k, split in enumerate(["train", "test"])}
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.warns(UserWarning, match=r"skipped 1 undecodable image.*broken\.png"):
        out = prepare_shards(f"folder-stream:{root}", tmp_path / "out", progress=False)
    for split in ("train", "test"):
        source = ShardSource(out / split)
        assert source.class_names == ["cat", "dog"] and source.labels.tolist() == [0, 1, 1]
        assert [source.encoded(i) for i in range(3)] == [
            (f.read_bytes(), f.suffix[1:]) for f in files[split]]  # the files' bytes, not re-encoded
        assert source[2][0].size == (7, 11)
    manifest = json.loads((out / "train" / "shards.json").read_text())
    assert manifest["image_format"] == "copied" and len(manifest["skipped"]) == 1
    assert manifest["skipped"][0].endswith("broken.png") and manifest["count"] == 3
    with pytest.raises(BadImageError, match="broken.png"):
        prepare_shards(f"folder:{root}", tmp_path / "strict", on_bad_image="fail", progress=False)
    assert not (tmp_path / "strict").exists()


def test_prepare_shards_resizes_folders_as_the_in_memory_loader_does(tmp_path):
    for k, size in enumerate([(12, 9), (10, 10), (6, 13)]):
        _image_file(tmp_path / "flat" / f"{k}.png", size, k)
    out = prepare_shards(f"folder:{tmp_path / 'flat'}", tmp_path / "out", image_size=8, channels=1,
                         progress=False)
    source = ShardSource(out)  # one split: the folder has no train/ and test/
    reference = load_dataset(f"folder:{tmp_path / 'flat'}", image_size=8, channels=1)
    assert len(source) == 3 and source.channels == 1 and source.class_names is None
    for i in range(3):
        assert source[i][1] == -1
        np.testing.assert_array_equal(uint8_to_float(_hwc(source[i][0])).permute(2, 0, 1), reference[i][0])
