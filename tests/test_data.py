"""Tests for ul_fast.data: embedded Fashion-MNIST, idx / folder / array loaders, BatchStream, captions."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ul_fast.data import (
    CAPTION_TEMPLATES,
    DEBIAN_FASHION_MNIST_ROOT,
    FASHION_MNIST_CLASSES,
    BadImageError,
    BatchStream,
    Conditioning,
    ImageArrayDataset,
    all_fashion_mnist_captions,
    captions_for_class,
    detect_layout,
    fashion_mnist_captions,
    load_array,
    load_dataset,
    load_embedded_fashion_mnist,
    load_fashion_mnist_idx,
    load_image_folder,
    read_idx,
    splits_apart,
)
from ul_fast.data import folder as folder_module
from ul_fast.data.fashion_mnist import read_fashion_mnist_idx_uint8

HAVE_DEBIAN = (Path(DEBIAN_FASHION_MNIST_ROOT) / "t10k-images-idx3-ubyte.gz").is_file()
needs_debian = pytest.mark.skipif(not HAVE_DEBIAN,
                                  reason="Debian package dataset-fashion-mnist not installed")


@pytest.fixture(scope="module")
def embedded_raw() -> dict[str, np.ndarray]:
    from importlib import resources

    ref = resources.files("ul_fast.data") / "embedded" / "fashion_mnist_subset.npz"
    with resources.as_file(ref) as p, np.load(p) as z:
        return {k: z[k] for k in z.files}


# ---------------------------------------------------------------- embedded Fashion-MNIST


@pytest.mark.parametrize("split,n", [("train", 5000), ("test", 1000)])
def test_embedded_shapes_range_labels_balance(split, n):
    ds = load_embedded_fashion_mnist(split)
    assert ds.images.shape == (n, 1, 32, 32) and ds.images.dtype == torch.float32
    assert ds.image_size == 32 and ds.channels == 1 and len(ds) == n
    assert float(ds.images.min()) == -1.0 and float(ds.images.max()) == 1.0
    assert ds.labels.dtype == torch.int64 and ds.labels.shape == (n,)
    assert torch.equal(torch.bincount(ds.labels, minlength=10), torch.full((10,), n // 10))
    assert ds.class_names == list(FASHION_MNIST_CLASSES) and ds.class_names[9] == "Ankle boot"
    img, label = ds[3]
    assert img.shape == (1, 32, 32) and label == int(ds.labels[3])


def test_embedded_padding_is_background_and_matches_raw_pixels(embedded_raw):
    ds = load_embedded_fashion_mnist("test", image_size=32)
    x = ds.images[:, 0]
    border = torch.cat([x[:, :2].flatten(), x[:, -2:].flatten(), x[:, :, :2].flatten(),
                        x[:, :, -2:].flatten()])
    assert torch.all(border == -1.0)
    raw = torch.from_numpy(embedded_raw["test_images"]).float()
    torch.testing.assert_close(x[:, 2:30, 2:30], raw / 127.5 - 1.0, rtol=0, atol=1e-6)
    assert torch.equal(ds.labels, torch.from_numpy(embedded_raw["test_labels"]).long())


def test_embedded_other_sizes():
    ds28 = load_embedded_fashion_mnist("test", image_size=28)
    assert ds28.images.shape == (1000, 1, 28, 28)
    ds16 = load_embedded_fashion_mnist("test", image_size=16)
    assert ds16.images.shape == (1000, 1, 16, 16)
    assert float(ds16.images.min()) >= -1.0 and float(ds16.images.max()) <= 1.0
    # Downsampling the padded 32x32 by 2 with antialiasing is close to 2x2 average pooling.
    pooled = torch.nn.functional.avg_pool2d(load_embedded_fashion_mnist("test").images, 2)
    assert (ds16.images - pooled).abs().mean() < 0.05
    with pytest.raises(ValueError, match="split"):
        load_embedded_fashion_mnist("val")


def test_embedded_file_is_small_and_disjoint_subset(embedded_raw):
    from importlib import resources

    ref = resources.files("ul_fast.data") / "embedded" / "fashion_mnist_subset.npz"
    with resources.as_file(ref) as p:
        assert p.stat().st_size < 4_000_000  # "a few MB at most"
    for split in ("train", "test"):
        idx = embedded_raw[f"{split}_source_index"]
        assert len(np.unique(idx)) == len(idx)
    licence = (resources.files("ul_fast.data") / "embedded" / "LICENSE-fashion-mnist").read_text()
    assert "Zalando SE" in licence and "Permission is hereby granted" in licence


@needs_debian
def test_embedded_subset_matches_debian_rows(embedded_raw):
    images, labels = read_fashion_mnist_idx_uint8(DEBIAN_FASHION_MNIST_ROOT, "test")
    rows = embedded_raw["test_source_index"]
    assert np.array_equal(images[rows], embedded_raw["test_images"])
    assert np.array_equal(labels[rows], embedded_raw["test_labels"])


# ---------------------------------------------------------------- idx files


def _write_idx(path: Path, arr: np.ndarray, magic_type: int = 0x08, compress: bool = False) -> Path:
    header = bytes([0, 0, magic_type, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def _tiny_fmnist(root: Path, n: int = 7, compress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    sfx = ".gz" if compress else ""
    _write_idx(root / f"t10k-images-idx3-ubyte{sfx}", images, compress=compress)
    _write_idx(root / f"t10k-labels-idx1-ubyte{sfx}", labels, compress=compress)
    return images, labels


@pytest.mark.parametrize("compress", [True, False])
def test_idx_parser_on_tiny_files(tmp_path, compress):
    images, labels = _tiny_fmnist(tmp_path, compress=compress)
    ds = load_fashion_mnist_idx(tmp_path, "test", image_size=28)
    assert ds.images.shape == (7, 1, 28, 28)
    assert torch.equal(((ds.images[:, 0] + 1) * 127.5).round().to(torch.uint8), torch.from_numpy(images))
    assert torch.equal(ds.labels, torch.from_numpy(labels).long())
    ds32 = load_dataset(f"fmnist:{tmp_path}", "test")
    assert ds32.images.shape == (7, 1, 32, 32)


def test_idx_errors(tmp_path):
    good = _write_idx(tmp_path / "ok", np.zeros((2, 3), np.uint8))
    assert read_idx(good, expected_ndim=2).shape == (2, 3)
    bad_magic = _write_idx(tmp_path / "bad", np.zeros((2, 3), np.uint8), magic_type=0x0D)
    with pytest.raises(ValueError, match=r"bad.*magic"):
        read_idx(bad_magic, expected_ndim=2)
    with pytest.raises(ValueError, match="3 dims"):
        read_idx(good, expected_ndim=3)
    truncated = tmp_path / "trunc"
    truncated.write_bytes(good.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"trunc.*6 bytes of data, file has 5"):
        read_idx(truncated, expected_ndim=2)
    # Corrupted magic in a Fashion-MNIST image file, and a count mismatch between images and labels.
    _tiny_fmnist(tmp_path, compress=False)
    p = tmp_path / "t10k-images-idx3-ubyte"
    p.write_bytes(b"\x08\x03\x00\x00" + p.read_bytes()[4:])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.*magic bytes 08030000"):
        load_fashion_mnist_idx(tmp_path, "test")
    _write_idx(p, np.zeros((5, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="5 images but .* 7 labels"):
        load_fashion_mnist_idx(tmp_path, "test")


def test_idx_missing_names_path_and_package(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.*dataset-fashion-mnist"):
        load_fashion_mnist_idx(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_dataset(f"fmnist:{tmp_path}")


@needs_debian
def test_idx_full_debian_test_split():
    ds = load_fashion_mnist_idx(split="test")
    assert ds.images.shape == (10000, 1, 32, 32)
    assert torch.equal(torch.bincount(ds.labels), torch.full((10,), 1000))
    assert float(ds.images[:, :, :2].abs().min()) == 1.0  # padded rows are -1


# ---------------------------------------------------------------- image folders


def _png(path: Path, size: tuple[int, int], mode: str = "RGB", value: int | tuple = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def test_image_folder_classes_and_resize(tmp_path):
    _png(tmp_path / "cats" / "a.png", (40, 20), value=(255, 0, 0))
    _png(tmp_path / "cats" / "b.jpg", (16, 16), value=(0, 255, 0))
    _png(tmp_path / "dogs" / "c.PNG", (8, 8), mode="L", value=255)
    (tmp_path / ".DS_Store").write_text("hidden files are skipped")
    ds = load_image_folder(tmp_path, image_size=16, channels=3)
    assert ds.images.shape == (3, 3, 16, 16) and ds.class_names == ["cats", "dogs"]
    assert ds.labels.tolist() == [0, 0, 1]
    torch.testing.assert_close(ds.images[0, :, 5, 5], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.allclose(ds.images[2], torch.ones(3, 16, 16))  # L -> RGB replicates
    gray = load_dataset(f"folder:{tmp_path}", image_size=16, channels=1)
    assert gray.images.shape == (3, 1, 16, 16)
    # Pillow's L conversion of pure red is 0.299 * 255 = 76.
    assert abs(float(gray.images[0, 0, 5, 5]) - (76 / 127.5 - 1)) < 1e-6


def test_image_folder_center_crop(tmp_path):
    im = Image.new("L", (30, 10), 0)
    im.paste(255, (10, 0, 20, 10))  # white middle square, black left / right thirds
    im.save(tmp_path / "x.png")
    ds = load_image_folder(tmp_path, image_size=10, channels=1)
    assert ds.labels is None and ds[0][1] == -1
    assert torch.all(ds.images == 1.0)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        load_image_folder(tmp_path, 8, 1)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_image_folder(tmp_path / "nope", 8, 1)
    _png(tmp_path / "good.png", (8, 8))
    with pytest.raises(ValueError, match="channels"):
        load_image_folder(tmp_path, 8, channels=2)
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"broken\.png"):
        load_image_folder(tmp_path, 8, 3)
    (tmp_path / "broken.png").unlink()
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"notes\.txt.*not an image"):
        load_image_folder(tmp_path, 8, 3)
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match="mixes class sub-folders"):
        load_image_folder(tmp_path, 8, 3)


def test_an_undecodable_image_is_named_by_its_file_not_by_pillows_buffer(tmp_path):
    """The message named `<_io.BytesIO object at 0x…>`, the in-memory buffer Pillow was given."""
    (tmp_path / "c0").mkdir()
    (tmp_path / "c0" / "garbage.png").write_bytes(b"not an image at all")
    with pytest.raises(BadImageError) as error:
        load_dataset(f"folder:{tmp_path}", "train", 8)
    assert str(error.value) == (f"{tmp_path / 'c0' / 'garbage.png'}: cannot decode image (not an image format Pillow "
                                f"reads (19 bytes starting b'not an i'))")
    (tmp_path / "c0" / "garbage.png").write_bytes(b"")
    with pytest.raises(BadImageError, match=r"garbage\.png: cannot decode image \(the file is empty\)$"):
        load_dataset(f"folder:{tmp_path}", "train", 8)


def test_a_folder_too_large_for_memory_is_refused_before_any_image_is_read(tmp_path, monkeypatch):
    """folder: reads every image into memory: past half the available memory it stops at once, pointing to
    folder-stream: (an ImageNet folder would otherwise fill the machine's memory)."""
    for i in range(10):
        _png(tmp_path / f"{i}.png", (8, 8))
    (tmp_path / "9.png").write_bytes(b"undecodable: reading it would fail differently")
    need = 10 * 3 * 64**2 * 6  # 10 images at 64x64x3, 6 bytes per value while loading
    monkeypatch.setattr(folder_module, "available_memory", lambda: 2 * need - 1)
    with pytest.raises(ValueError, match=rf"folder:{tmp_path} holds 10 images, 0.0 GiB while loading them into memory "
                                         rf"at 64x64x3: more than 50% of the 0.0 GiB available; use data.dataset "
                                         rf"folder-stream:{tmp_path} "):
        load_dataset(f"folder:{tmp_path}", "train", 64)
    monkeypatch.setattr(folder_module, "available_memory", lambda: 2 * need)
    with pytest.raises(BadImageError, match="9.png"):  # fits: the images are read
        load_dataset(f"folder:{tmp_path}", "train", 64)


def test_folder_spec_uses_split_subfolders(tmp_path):
    _png(tmp_path / "train" / "a.png", (8, 8))
    _png(tmp_path / "train" / "b.png", (8, 8))
    _png(tmp_path / "test" / "c.png", (8, 8))
    assert len(load_dataset(f"folder:{tmp_path}", "train", 8)) == 2
    assert len(load_dataset(f"folder:{tmp_path}", "test", 8)) == 1


def test_which_specs_hold_their_splits_apart(tmp_path):
    """Held-out numbers need a test split that is not the training set: each spec says whether it has one."""
    np.save(tmp_path / "x.npy", _u8((4, 8, 8)))
    np.savez(tmp_path / "one.npz", images=_u8((4, 8, 8)))
    np.savez(tmp_path / "half.npz", train_images=_u8((4, 8, 8)), images=_u8((4, 8, 8)))
    np.savez(tmp_path / "two.npz", train_images=_u8((4, 8, 8)), test_images=_u8((2, 8, 8)))
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    for name in ("flat", "split/train", "split/test"):
        _png(tmp_path / name / "a.png", (8, 8))
    (tmp_path / "shards/train").mkdir(parents=True)
    (tmp_path / "shards/test").mkdir()
    (tmp_path / "flat-shards").mkdir()
    expected = {
        "fmnist-embedded": True, "fmnist": True, f"array:{tmp_path / 'x.npy'}": False,
        f"array:{tmp_path / 'one.npz'}": False, f"array:{tmp_path / 'half.npz'}": False,
        f"array:{tmp_path / 'two.npz'}": True, f"folder:{tmp_path / 'flat'}": False,
        f"folder:{tmp_path / 'split'}": True, f"folder-stream:{tmp_path / 'flat'}": False,
        f"folder-stream:{tmp_path / 'split'}": True, f"shards:{tmp_path / 'shards'}": True,
        f"shards:{tmp_path / 'flat-shards'}": False, "mnist": False,
    }
    assert {spec: splits_apart(spec) for spec in expected} == expected
    with pytest.raises(ValueError, match="broken.npz cannot be read as a NumPy .npz file"):
        splits_apart(f"array:{tmp_path / 'broken.npz'}")


# ---------------------------------------------------------------- arrays


def _u8(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


@pytest.mark.parametrize("layout,shape", [("NHW", (5, 8, 8)), ("NHWC", (5, 8, 8, 3)), ("NCHW", (5, 3, 8, 8)),
                                          ("NHWC", (5, 8, 8, 1)), ("NCHW", (5, 1, 8, 8))])
def test_array_layouts(tmp_path, layout, shape):
    arr = _u8(shape)
    assert detect_layout(shape) == layout
    np.save(tmp_path / "x.npy", arr)
    ds = load_array(tmp_path / "x.npy", image_size=8)
    to_nchw = {"NHW": lambda a: a[:, None], "NHWC": lambda a: a.transpose(0, 3, 1, 2), "NCHW": lambda a: a}
    nchw = to_nchw[layout](arr)
    assert ds.images.shape == nchw.shape and ds.labels is None
    torch.testing.assert_close(ds.images, torch.from_numpy(nchw).float() / 127.5 - 1, rtol=0, atol=0)


def test_array_npz_float_labels_and_splits(tmp_path):
    x = np.random.default_rng(0).uniform(-1, 1, size=(6, 4, 4, 3)).astype(np.float32)
    y = np.arange(6) % 2
    np.savez(tmp_path / "d.npz", images=x, labels=y, class_names=np.array(["even", "odd"]))
    ds = load_dataset(f"array:{tmp_path / 'd.npz'}", image_size=4, channels=3)
    torch.testing.assert_close(ds.images, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert ds.labels.tolist() == y.tolist() and ds.class_names == ["even", "odd"]
    np.savez(tmp_path / "s.npz", train_images=_u8((4, 2, 2)), test_images=_u8((3, 2, 2)),
             test_labels=np.zeros(3, np.int64))
    assert len(load_array(tmp_path / "s.npz", split="train")) == 4
    assert load_array(tmp_path / "s.npz", split="test").labels.tolist() == [0, 0, 0]


def test_array_errors(tmp_path):
    def save(name, arr):
        np.save(tmp_path / name, arr)
        return tmp_path / name

    nan = np.zeros((2, 4, 4), np.float32)
    nan[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match=r"nan\.npy.*non-finite"):
        load_array(save("nan.npy", nan))
    with pytest.raises(ValueError, match=r"big\.npy.*\[-1, 1\]"):
        load_array(save("big.npy", np.full((2, 4, 4), 2.5, np.float32)))
    with pytest.raises(ValueError, match=r"ndim\.npy.*3 dims"):
        load_array(save("ndim.npy", _u8((4, 4))))
    with pytest.raises(ValueError, match=r"five\.npy.*3 dims"):
        load_array(save("five.npy", _u8((1, 2, 4, 4, 3))))
    with pytest.raises(ValueError, match="ambiguous"):
        load_array(save("amb.npy", _u8((2, 3, 3, 3))))
    assert load_array(tmp_path / "amb.npy", layout="NHWC").images.shape == (2, 3, 3, 3)
    with pytest.raises(ValueError, match=r"nochan\.npy.*no channel dim"):
        load_array(save("nochan.npy", _u8((2, 4, 4, 4))))
    with pytest.raises(TypeError, match=r"int\.npy.*dtype int64"):
        load_array(save("int.npy", np.zeros((2, 4, 4), np.int64)))
    with pytest.raises(ValueError, match=r"rect\.npy.*square"):
        load_array(save("rect.npy", _u8((2, 4, 6))))
    with pytest.raises(ValueError, match=r"ok\.npy.*image_size=32"):
        load_array(save("ok.npy", _u8((2, 4, 4))), image_size=32)
    with pytest.raises(ValueError, match=r"ok\.npy.*channels=3"):
        load_array(tmp_path / "ok.npy", channels=3)
    np.savez(tmp_path / "lab.npz", images=_u8((2, 4, 4)), labels=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"lab\.npz.*labels must have shape"):
        load_array(tmp_path / "lab.npz")
    np.savez(tmp_path / "nokey.npz", x=_u8((2, 4, 4)))
    with pytest.raises(ValueError, match=r"nokey\.npz.*no 'images'"):
        load_array(tmp_path / "nokey.npz")
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk\.npy.*cannot be read"):
        load_array(tmp_path / "junk.npy")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_array(tmp_path / "missing.npy")
    with pytest.warns(UserWarning, match=r"\[0, 1\]"):
        load_array(save("unit.npy", np.full((2, 4, 4), 0.5, np.float32)))


# ---------------------------------------------------------------- load_dataset / ImageArrayDataset


def test_load_dataset_spec_errors():
    with pytest.raises(ValueError, match=r"unknown data spec 'mnist'.*fmnist-embedded.*folder:.*array:"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="unknown data spec"):
        load_dataset("folder:")
    with pytest.raises(ValueError, match="grayscale"):
        load_dataset("fmnist-embedded", channels=3)
    with pytest.raises(ValueError, match="split"):
        load_dataset(split="validation")
    assert load_dataset(split="test").images.shape == (1000, 1, 32, 32)


def test_dataset_validation():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        ImageArrayDataset(torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        ImageArrayDataset(torch.zeros(2, 2, 4, 4))
    with pytest.raises(TypeError, match="floating point"):
        ImageArrayDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="labels must be a tensor"):
        ImageArrayDataset(torch.zeros(2, 1, 4, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="no class name"):
        ImageArrayDataset(torch.zeros(2, 1, 4, 4), torch.tensor([0, 2]), class_names=["a", "b"])


# ---------------------------------------------------------------- BatchStream


def _counting_dataset(n: int) -> ImageArrayDataset:
    """Image i is filled with a value encoding i, so batches can be checked by content."""
    vals = torch.arange(n, dtype=torch.float32) / n
    return ImageArrayDataset(vals.view(n, 1, 1, 1).expand(n, 1, 2, 2).clone(), torch.arange(n))


def test_batchstream_covers_each_epoch_and_is_deterministic():
    ds = _counting_dataset(10)
    s1, s2 = BatchStream(ds, 4, seed=3), BatchStream(ds, 4, seed=3)
    seq1 = torch.cat([s1.next_batch()[1] for _ in range(5)])  # 20 = exactly two epochs
    seq2 = torch.cat([s2.next_batch()[1] for _ in range(5)])
    assert torch.equal(seq1, seq2)
    assert sorted(seq1[:10].tolist()) == list(range(10)) and sorted(seq1[10:].tolist()) == list(range(10))
    assert not torch.equal(seq1[:10], seq1[10:])  # each epoch has its own permutation
    assert (s1.epoch, s1.offset) == (2, 0)
    other = torch.cat([BatchStream(ds, 4, seed=4).next_batch()[1] for _ in range(3)])
    assert not torch.equal(other, seq1[:4])
    images, labels = BatchStream(ds, 4, seed=3).next_batch()
    torch.testing.assert_close(images[:, 0, 0, 0], labels.float() / 10)


def test_batchstream_state_restore_gives_identical_batches():
    ds = _counting_dataset(13)
    s = BatchStream(ds, 5, seed=11)
    for _ in range(4):
        s.next_batch()
    state = s.state_dict()
    assert state["epoch"] == 1 and state["offset"] == 7
    expected = [s.next_batch()[1] for _ in range(6)]
    restored = BatchStream(ds, 5, seed=11)
    restored.load_state_dict(dict(state))
    assert all(torch.equal(restored.next_batch()[1], e) for e in expected)
    with pytest.raises(ValueError, match="seed"):
        BatchStream(ds, 5, seed=12).load_state_dict(state)
    with pytest.raises(ValueError, match="dataset of 13"):
        BatchStream(_counting_dataset(12), 5, seed=11).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        BatchStream(ds, 5, seed=11).load_state_dict({"epoch": 0})


def test_batchstream_rank_sharding_partitions_global_batch():
    ds = _counting_dataset(23)
    ref = BatchStream(ds, 6, seed=5)
    ranks = [BatchStream(ds, 6, seed=5, rank=r, world_size=3) for r in range(3)]
    for _ in range(9):
        global_labels = ref.next_batch()[1]
        shards = [s.next_batch()[1] for s in ranks]
        assert all(len(sh) == 2 for sh in shards)
        assert torch.equal(torch.cat(shards), global_labels)
    assert all(s.state_dict() == ref.state_dict() for s in ranks)
    with pytest.raises(ValueError, match="divisible"):
        BatchStream(ds, 7, seed=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        BatchStream(ds, 4, seed=0, rank=2, world_size=2)


def test_batchstream_small_dataset_and_unlabeled():
    ds = ImageArrayDataset(torch.zeros(3, 1, 2, 2))
    images, labels = BatchStream(ds, 8, seed=0).next_batch()
    assert images.shape == (8, 1, 2, 2) and labels.tolist() == [-1] * 8


# ---------------------------------------------------------------- captions


def test_captions():
    boots = captions_for_class(9)
    assert "a photo of an ankle boot" in boots and "a black and white picture of a boot" in boots
    assert "a black and white picture of a sneaker" in captions_for_class(7)
    every = [c for caps in all_fashion_mnist_captions() for c in caps]
    assert len(every) == len(set(every))  # no caption is shared by two classes
    assert all(" a a" not in c and " a e" not in c and " a i" not in c and " a o" not in c for c in every)
    assert all(len(captions_for_class(k)) >= len(CAPTION_TEMPLATES) for k in range(10))
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 9, 9, 3, 7, 1])
    a, b = fashion_mnist_captions(labels, g1), fashion_mnist_captions(labels, g2)
    assert a == b and all(c in captions_for_class(int(k)) for c, k in zip(a, labels))
    g = torch.Generator().manual_seed(1)
    drawn = {fashion_mnist_captions(9, g) for _ in range(200)}
    assert drawn == set(boots)  # uniform draw reaches every caption
    with pytest.raises(ValueError, match="0..9"):
        captions_for_class(10)


# ---------------------------------------------------------------- the embedding script


@needs_debian
def test_make_embedded_script_reproduces_committed_files(tmp_path, capsys):
    import importlib.util
    from importlib import resources

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_embedded_fmnist.py"
    if not script.is_file():
        pytest.skip("scripts/ not present (installed package without the repository)")
    spec = importlib.util.spec_from_file_location("make_embedded_fmnist", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--out", str(tmp_path)])
    shipped = resources.files("ul_fast.data") / "embedded"
    for name in ("fashion_mnist_subset.npz", "LICENSE-fashion-mnist", "README.md"):
        assert (tmp_path / name).read_bytes() == (shipped / name).read_bytes(), name


def test_class_conditioning_of_batches_grids_and_requests():
    """Labels pass through to a class-conditional model; a grid shows class i % K in column i; a request is
    one class for every image or all classes in turn. An unconditional model gets no labels."""
    from ul_fast.config import ModelConfig

    cpu = torch.device("cpu")
    conditioning = Conditioning(ModelConfig(num_classes=10), cpu)
    labels = torch.tensor([3, 1, 4])
    assert conditioning.for_batch(labels)["labels"] is labels
    grid, columns = conditioning.for_grid(12)
    assert columns == 10 and torch.equal(grid["labels"], torch.arange(12) % 10)
    one, columns = conditioning.for_request(4, label=7)
    assert columns is None and torch.equal(one["labels"], torch.full((4,), 7))
    every, columns = conditioning.for_request(12)
    assert columns == 10 and torch.equal(every["labels"], torch.arange(12) % 10)

    unconditional = Conditioning(ModelConfig(), cpu)
    assert unconditional.for_batch(labels) == {"labels": None}
    assert unconditional.for_grid(5) == ({"labels": None}, None)
    assert unconditional.for_request(5) == ({"labels": None}, None)
    # A text model draws captions per Fashion-MNIST class: without labelled training data it says so
    # (before loading the text encoder).
    with pytest.raises(ValueError, match="labelled Fashion-MNIST data"):
        Conditioning(ModelConfig(context_dim=384), cpu).for_batch(labels)
