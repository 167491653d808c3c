"""Streaming image data: the lazily read folder and its index cache, augmentation, the worker-based loader
(order, exact resume, ranks, bad images) and a training run on a streamed folder that resumes exactly."""

import multiprocessing
import os
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ul_fast.config import ConfigError
from ul_fast.data import (
    BadImageError,
    BadImageWarning,
    BatchStream,
    ImageTransform,
    LazyImageFolder,
    StreamingBatches,
    item_rng,
    load_dataset,
    load_examples,
    load_image_folder,
)
from ul_fast.data import lazy_folder as lazy_folder_module
from ul_fast.data import loader as loader_module
from ul_fast.train import Trainer
from ul_fast.train.metrics_log import read_metrics

from folder_times import age_folders
from interrupt import killed_and_resumed
from micro import micro_config


def write_folder(root: Path, classes: int = 2, per_class: int = 5, size: tuple[int, int] = (12, 9), seed: int = 0,
                 mode: str = "RGB") -> Path:
    """``root/c<k>/<i>.png``: random images of ``size`` (W, H), each different, so batches compare by content."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / f"c{k}" / f"{i}.png")
    return root


def add_bad_images(root: Path) -> tuple[Path, Path]:
    """A truncated JPEG and a zero-byte PNG inside the class folders."""
    truncated, empty = root / "c0" / "2_truncated.jpg", root / "c1" / "1_empty.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:600])
    empty.write_bytes(b"")
    return truncated, empty


def take(stream, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [stream.next_batch() for _ in range(k)]


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for (images, labels), (ref_images, ref_labels) in zip(got, expected):
        assert torch.equal(labels, ref_labels) and torch.equal(images, ref_images)


def no_worker_left():
    return not multiprocessing.active_children()


# ---------------------------------------------------------------- the folder and its index
def test_lazy_folder_reads_what_the_in_memory_folder_reads(tmp_path):
    root = write_folder(tmp_path / "data", size=(12, 9))
    (root / ".DS_Store").write_text("hidden files are skipped")
    source = LazyImageFolder(root, channels=3)
    memory = load_image_folder(root, image_size=8, channels=3)
    assert len(source) == 10 and source.class_names == memory.class_names == ["c0", "c1"]
    center = ImageTransform(8, 3)
    images = torch.stack([center(source[i][0]) for i in range(len(source))])
    assert torch.equal(images.float() / 127.5 - 1, memory.images)
    assert [source[i][1] for i in range(len(source))] == memory.labels.tolist()
    assert source[0][0].size == (12, 9) and source[0][0].mode == "RGB"  # stored size: crop happens later
    flat = LazyImageFolder(root / "c1", channels=1)
    assert flat.class_names is None and flat[0][1] == -1 and flat[0][0].mode == "L"
    with pytest.raises(FileNotFoundError, match="not a folder"):
        LazyImageFolder(tmp_path / "nope", 3)
    (root / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"mixes class sub-folders"):
        LazyImageFolder(root, 3)


def test_the_index_is_cached_reused_and_rebuilt_when_files_change(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "data")
    (root / ".ul_fast").mkdir()  # as the first start leaves it (making it changes the folder: see the next test)
    age_folders(root)
    listings = []
    real_list = lazy_folder_module.scan_image_folder
    monkeypatch.setattr(lazy_folder_module, "scan_image_folder", lambda r: listings.append(r) or real_list(r))
    first = LazyImageFolder(root, 3)
    assert first.index_path == root.resolve() / ".ul_fast" / "index.json" and first.index_path.is_file()
    second = LazyImageFolder(root, 3)
    assert len(listings) == 1 and second.index_reused and not first.index_reused
    assert second.fingerprint() == first.fingerprint() and second.path(3) == first.path(3)

    write_folder(root, classes=1, per_class=6, seed=5)  # adds c0/5.png
    age_folders(root)  # added long before the next start, as in real use (see the next test)
    grown = LazyImageFolder(root, 3)
    assert len(listings) == 2 and not grown.index_reused and len(grown) == 11
    assert grown.fingerprint() != first.fingerprint()

    # A read-only folder: the index goes to the cache folder the caller passes, and is reused from there.
    monkeypatch.setattr(lazy_folder_module, "_beside_the_data", lambda r: None)
    cache = tmp_path / "run" / "data-cache"
    cached = LazyImageFolder(root, 3, cache_dir=cache)
    assert cached.index_path.parent == cache and cached.index_path.is_file() and not cached.index_reused
    assert LazyImageFolder(root, 3, cache_dir=cache).index_reused and len(listings) == 3
    assert not LazyImageFolder(root, 3).index_reused  # no cache at all: listed every time


def test_a_file_added_in_the_clock_tick_of_the_listing_is_not_missed(tmp_path, monkeypatch):
    """A folder's modification time moves by ticks of the file system's clock (2 s on FAT): a file added in the tick
    in which the index was listed leaves the times the index recorded unchanged. Such an index is not trusted: the
    next start lists the folder again, and once the folder has settled the index is reused."""
    root = write_folder(tmp_path / "data")
    first = LazyImageFolder(root, 3)
    recorded = [(folder, folder.stat().st_mtime_ns) for folder in (root, root / "c0")]
    write_folder(root, classes=1, per_class=6, seed=5)  # adds c0/5.png ...
    for folder, mtime in recorded:  # ... in the same tick: the folders' times do not move
        os.utime(folder, ns=(mtime, mtime))
    second = LazyImageFolder(root, 3)
    assert len(first) == 10 and len(second) == 11 and not second.index_reused
    age_folders(root)
    assert not LazyImageFolder(root, 3).index_reused and LazyImageFolder(root, 3).index_reused

    fresh = write_folder(tmp_path / "fresh")  # a new folder: its first start makes fresh/.ul_fast, a change
    age_folders(fresh)
    assert not LazyImageFolder(fresh, 3).index_reused
    later = time.time_ns() + 3 * 10**9  # the next starts, 3 s later: listed once more, then reused
    monkeypatch.setattr(lazy_folder_module.time, "time_ns", lambda: later)
    assert [LazyImageFolder(fresh, 3).index_reused for _ in range(2)] == [False, True]


def test_streaming_specs_and_their_split_folders(tmp_path):
    write_folder(tmp_path / "train", per_class=3)
    write_folder(tmp_path / "test", per_class=1)
    train = load_dataset(f"folder-stream:{tmp_path}", "train", channels=1)
    test = load_dataset(f"folder-stream:{tmp_path}", "test", channels=1)
    assert isinstance(train, LazyImageFolder) and (len(train), len(test), train.channels) == (6, 2, 1)
    assert train.source == f"folder-stream:{(tmp_path / 'train').resolve()}"


# ---------------------------------------------------------------- augmentation
def test_transform_crops_flips_and_draws_from_the_item_generator():
    pixels = np.arange(6 * 10, dtype=np.uint8).reshape(6, 10)  # H 6, W 10: a 6x6 square at offset 0..4
    image = Image.fromarray(pixels, "L")
    assert torch.equal(ImageTransform(6, 1)(image)[0], torch.from_numpy(pixels[:, 2:8]))  # center: offset 2
    random_crop = ImageTransform(6, 1, crop="random")
    lefts = set()
    for index in range(40):
        out = random_crop(image, item_rng(0, 0, index))[0]
        left = int(out[0, 0])
        assert torch.equal(out, torch.from_numpy(pixels[:, left:left + 6]))
        lefts.add(left)
    assert lefts == {0, 1, 2, 3, 4}
    flip = ImageTransform(6, 1, flip=True)
    outs = [flip(image, item_rng(3, 1, index))[0] for index in range(20)]
    flipped = [bool(torch.equal(o, torch.from_numpy(pixels[:, 2:8][:, ::-1].copy()))) for o in outs]
    assert any(flipped) and not all(flipped)
    assert all(torch.equal(flip(image, item_rng(3, 1, i))[0], outs[i]) for i in range(20))  # same (seed, epoch, i)
    assert ImageTransform(4, 3)(image.convert("RGB")).shape == (3, 4, 4)
    with pytest.raises(ValueError, match="needs rng"):
        flip(image)
    with pytest.raises(ValueError, match="mode 'RGB'"):
        ImageTransform(4, 3)(image)
    with pytest.raises(ValueError, match="crop must be one of"):
        ImageTransform(4, 3, crop="resized")


# ---------------------------------------------------------------- the loader
def test_streaming_batches_follow_the_in_memory_order(tmp_path):
    root = write_folder(tmp_path / "data", per_class=7)
    memory = BatchStream(load_image_folder(root, 8, 3), 4, seed=3)
    streamed = StreamingBatches(LazyImageFolder(root, 3), ImageTransform(8, 3), 4, seed=3)
    assert_same_batches(take(streamed, 6), take(memory, 6))  # 24 examples: the 14 cross an epoch boundary
    assert streamed.state_dict() == {**memory.state_dict(), "fingerprint": streamed.source.fingerprint()}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_stream_yields_exactly_the_uninterrupted_batches(tmp_path, num_workers):
    root = write_folder(tmp_path / "data", per_class=6)
    source, transform = LazyImageFolder(root, 3), ImageTransform(8, 3, crop="random", flip=True)
    expected = take(StreamingBatches(source, transform, 5, seed=7), 9)  # in this process, no prefetch

    def streaming():
        return StreamingBatches(LazyImageFolder(root, 3), transform, 5, seed=7, num_workers=num_workers,
                                prefetch_factor=2)

    killed = streaming()
    got = take(killed, 4)  # the workers have decoded batches beyond these
    state = killed.state_dict()
    killed.close()
    assert (state["epoch"], state["offset"]) == (1, 8)
    resumed = streaming()
    resumed.load_state_dict(state)
    assert_same_batches(got + take(resumed, 5), expected)
    resumed.close()
    assert no_worker_left()


def test_ranks_decode_disjoint_shares_of_each_global_batch(tmp_path):
    root = write_folder(tmp_path / "data", per_class=7)
    transform = ImageTransform(8, 3, crop="random", flip=True)
    whole = take(StreamingBatches(LazyImageFolder(root, 3), transform, 6, seed=1), 5)
    ranks = [StreamingBatches(LazyImageFolder(root, 3), transform, 6, seed=1, rank=r, world_size=2,
                              num_workers=1 if r else 0) for r in (0, 1)]
    shares = [take(stream, 5) for stream in ranks]
    for step, (images, labels) in enumerate(whole):
        (images0, labels0), (images1, labels1) = shares[0][step], shares[1][step]
        assert images0.shape[0] == images1.shape[0] == 3
        assert torch.equal(torch.cat([images0, images1]), images) and torch.equal(torch.cat([labels0, labels1]), labels)
        assert not any(torch.equal(a, b) for a in images0 for b in images1)  # disjoint examples
    ranks[1].close()


def test_resuming_on_changed_files_is_an_error(tmp_path):
    root = write_folder(tmp_path / "data")
    age_folders(root)
    stream = StreamingBatches(LazyImageFolder(root, 3), ImageTransform(8, 3), 4, seed=0)
    take(stream, 2)
    state = stream.state_dict()
    (root / "c1" / "4.png").rename(root / "c1" / "4b.png")  # same count, another file
    with pytest.raises(ValueError, match="data changed since the state was saved.*folder-stream:"):
        StreamingBatches(LazyImageFolder(root, 3), ImageTransform(8, 3), 4, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="data changed"):  # a state of in-memory data has no fingerprint
        StreamingBatches(LazyImageFolder(root, 3), ImageTransform(8, 3), 4, seed=0).load_state_dict(
            BatchStream(load_image_folder(root, 8, 3), 4, seed=0).state_dict())


def test_a_stop_signal_before_a_workers_init_cannot_kill_it(tmp_path, monkeypatch):
    """The workers are forked with SIGINT and SIGTERM blocked: a signal that reaches a worker before its init has
    made it ignore them waits, then is dropped (before, it killed the worker and the run with it)."""
    ignore = loader_module._ignore_stop_signals

    def slow_init(worker_id: int) -> None:
        time.sleep(1.0)  # the signals below arrive before the worker ignores them
        ignore(worker_id)

    monkeypatch.setattr(loader_module, "_ignore_stop_signals", slow_init)
    stream = StreamingBatches(LazyImageFolder(write_folder(tmp_path / "data"), 3), ImageTransform(8, 3), 4, seed=0,
                              num_workers=1)
    stream._batches = stream._start()  # forks the worker
    workers = multiprocessing.active_children()
    for worker in workers:
        os.kill(worker.pid, signal.SIGINT)
        os.kill(worker.pid, signal.SIGTERM)
    take(stream, 3)
    assert workers and all(worker.is_alive() for worker in workers)
    stream.close()


def test_workers_leave_stop_signals_to_the_main_process(tmp_path):
    """Ctrl-C and a scheduler's SIGTERM reach the whole process group; the trainer stops cleanly after its step
    only if its workers are still there to finish it."""
    stream = StreamingBatches(LazyImageFolder(write_folder(tmp_path / "data"), 3), ImageTransform(8, 3), 4, seed=0,
                              num_workers=2)
    first = stream.next_batch()
    workers = multiprocessing.active_children()
    assert len(workers) == 2
    for worker in workers:
        os.kill(worker.pid, signal.SIGINT)
        os.kill(worker.pid, signal.SIGTERM)
    take(stream, 6)  # two epochs and a half: every worker decoded after the signals
    assert all(worker.is_alive() for worker in workers)
    stream.load_state_dict(BatchStream(stream.source, 4, seed=0).state_dict())  # back to the start
    assert_same_batches(take(stream, 1), [first])
    stream.close()
    assert no_worker_left()


# ---------------------------------------------------------------- bad images
@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_images_are_skipped_counted_and_replaced_by_the_next_image(tmp_path, num_workers):
    root = write_folder(tmp_path / "data", per_class=4)
    truncated, empty = add_bad_images(root)
    source = LazyImageFolder(root, 3)
    assert len(source) == 10
    transform = ImageTransform(8, 3, flip=True)
    stream = StreamingBatches(source, transform, 5, seed=2, num_workers=num_workers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = take(stream, 4)  # two epochs: each bad file is met twice
    stream.close()
    assert stream.bad_images == 4
    messages = [str(w.message) for w in caught if issubclass(w.category, BadImageWarning)]
    assert len(messages) == 2 and {truncated.name, empty.name} == {m.split(": ")[1].split(" ")[0].rsplit("/")[-1]
                                                                   for m in messages}
    # The replacement is the next index that decodes, under the bad index's own augmentation draws.
    position = BatchStream(source, 5, seed=2)
    for images, labels in batches:
        epochs, indices = position.next_items()
        for image, label, epoch, index in zip(images, labels, epochs.tolist(), indices.tolist()):
            good = index
            while source.path(good) in (truncated.resolve(), empty.resolve()):
                good = (good + 1) % len(source)
            expected = transform(source[good][0], item_rng(2, epoch, index)).float() / 127.5 - 1
            assert torch.equal(image, expected) and int(label) == source[good][1]
    assert no_worker_left()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_bad_image_stops_the_run_with_a_clear_error_when_asked(tmp_path, num_workers):
    root = write_folder(tmp_path / "data", per_class=4)
    add_bad_images(root)
    stream = StreamingBatches(LazyImageFolder(root, 3), ImageTransform(8, 3), 10, seed=0, num_workers=num_workers,
                              on_bad_image="fail")
    with pytest.raises(BadImageError, match=r"(2_truncated\.jpg|1_empty\.png): cannot decode.*on_bad_image") as error:
        stream.next_batch()
    assert "Traceback" not in str(error.value)
    assert no_worker_left()


def test_a_missing_file_is_never_skipped(tmp_path):
    root = write_folder(tmp_path / "data", per_class=3)
    source = LazyImageFolder(root, 3)
    (root / "c0" / "1.png").unlink()
    stream = StreamingBatches(source, ImageTransform(8, 3), 6, seed=0, num_workers=2)
    with pytest.raises(FileNotFoundError, match=r"c0/1\.png") as error:
        stream.next_batch()
    assert "Traceback" not in str(error.value)


def test_heldout_examples_in_memory_skip_bad_images(tmp_path):
    root = write_folder(tmp_path / "data", per_class=4)
    truncated, _ = add_bad_images(root)
    source = LazyImageFolder(root, 1)
    with pytest.warns(BadImageWarning, match=truncated.name):
        heldout = load_examples(source, ImageTransform(8, 1), 6)
    assert heldout.images.shape == (6, 1, 8, 8) and heldout.class_names == ["c0", "c1"]
    assert heldout.labels.tolist() == [0, 0, 0, 0, 1, 1]  # c0's four good images, then c1's first two
    with pytest.raises(BadImageError, match=truncated.name):
        load_examples(source, ImageTransform(8, 1), 6, on_bad_image="fail")


# ---------------------------------------------------------------- training
def test_a_run_on_a_streamed_folder_resumes_exactly(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "data", classes=10, per_class=2, size=(20, 16), mode="L")
    config = micro_config(data={"dataset": f"folder-stream:{root}", "num_workers": 2, "crop": "random",
                                "flip": True},
                          train={"stage1_steps": 3, "stage2_steps": 0, "checkpoint_every": 1, "eval_every": 1000,
                                 "batch_size": 8, "keep_last": 5})
    Trainer(config, tmp_path / "reference").fit()

    killed_and_resumed(config, tmp_path / "victim", monkeypatch, step=3)
    expected, got = read_metrics(tmp_path / "reference"), read_metrics(tmp_path / "victim")
    assert [(m["step"], m["loss"], m["bad_images"]) for m in got] == [(m["step"], m["loss"], 0) for m in expected]
    assert no_worker_left()

    with pytest.raises(ConfigError, match="data.flip"):
        Trainer(micro_config(data={"flip": True}), tmp_path / "in-memory")
