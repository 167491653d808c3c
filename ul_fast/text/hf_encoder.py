"""A local Hugging Face text encoder (a BERT-like model, a T5 encoder, a CLIP text tower), loaded offline.

``model.text_encoder: /path/to/folder`` names a folder as ``save_pretrained`` writes it: ``config.json``, the
weights (``model.safetensors`` or ``pytorch_model.bin``, possibly sharded) and the tokenizer's files. It is loaded
with ``transformers`` (the ``ul-fast[text]`` extra) with ``local_files_only=True``: nothing is downloaded, a
missing file is an error. The caption's token states are the model's last hidden states (T5: its encoder's;
CLIP: its text tower's, read from a whole CLIP folder too); the pooled vector is their masked mean, L2-normalised,
the same rule as for all-MiniLM-L6-v2.

:func:`inspect_text_encoder` reads ``config.json`` alone (no ``transformers`` import), so a run checks the folder
before any work starts: that it is a text encoder of a supported kind, and its width (``model.context_dim``) and
positions (``model.text_max_tokens``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ul_fast.files import sha256_of_file

__all__ = ["ENCODER_CLASSES", "HuggingFaceTextEncoder", "TextEncoderFolder", "check_text_encoder",
           "inspect_text_encoder"]

ENCODER_CLASSES = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "mpnet", "electra", "albert",
                     "deberta", "deberta-v2"), "AutoModel"),
    "t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
    "clip": "CLIPTextModel", "clip_text_model": "CLIPTextModel",
}
"""``model_type`` of ``config.json`` → the ``transformers`` class that gives its text states (``AutoModel``: the
bare encoder of that type)."""
_POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2}
"""Positions these models reserve (RoBERTa numbers positions from ``padding_idx + 1``)."""
_INSTALL_HINT = "install it with: pip install 'ul-fast[text]'"


@dataclass(frozen=True)
class TextEncoderFolder:
    """What ``config.json`` says of a text encoder folder: ``model_type``, ``hidden_size`` (the width of its
    token states) and ``max_tokens`` (its positions; None when unbounded, as T5's relative positions are)."""

    path: Path
    model_type: str
    hidden_size: int
    max_tokens: int | None


def inspect_text_encoder(path: str | Path) -> TextEncoderFolder:
    """Read ``path/config.json``; ValueError (one line, naming ``model.text_encoder``) unless it describes a text
    encoder of :data:`ENCODER_CLASSES`."""
    folder = Path(path).expanduser()
    where = f"model.text_encoder {str(path)!r}"
    if not folder.is_dir():
        raise ValueError(f"{where}: not a folder (expected minilm, or a Hugging Face text encoder folder with "
                         f"config.json, weights and tokenizer files)")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{where}: no config.json (expected a folder written by save_pretrained)") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"{where}: config.json is unreadable ({error})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in ENCODER_CLASSES:
        raise ValueError(f"{where} holds a {model_type or 'model of unknown type'} model, not a text encoder ul-fast "
                         f"can use (model types: {', '.join(sorted(ENCODER_CLASSES))})")
    text = (config.get("text_config") or {}) if model_type == "clip" else config
    hidden = text.get("hidden_size", text.get("d_model", text.get("dim")))
    if not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"{where}: config.json gives no hidden size (hidden_size, d_model or dim)")
    positions = text.get("max_position_embeddings")
    max_tokens = None if not isinstance(positions, int) else positions - _POSITION_OFFSET.get(model_type, 0)
    return TextEncoderFolder(folder, model_type, hidden, max_tokens)


def check_text_encoder(path: str | Path, context_dim: int, max_tokens: int) -> TextEncoderFolder:
    """:func:`inspect_text_encoder`, then that the run's ``model.context_dim`` is the encoder's width and its
    ``model.text_max_tokens`` fits the encoder's positions (ValueError naming the key otherwise)."""
    info = inspect_text_encoder(path)
    if context_dim != info.hidden_size:
        raise ValueError(f"model.context_dim is {context_dim} but the text encoder {str(path)!r} ({info.model_type}) "
                         f"gives {info.hidden_size}-dimensional token states: set model.context_dim: "
                         f"{info.hidden_size}")
    if info.max_tokens is not None and max_tokens > info.max_tokens:
        raise ValueError(f"model.text_max_tokens is {max_tokens} but the text encoder {str(path)!r} has "
                         f"{info.max_tokens} positions: set model.text_max_tokens to at most {info.max_tokens}")
    return info


_FOLDER_DIGESTS: dict[tuple, str] = {}


def folder_digest(folder: Path) -> str:
    """Hex SHA-256 over the names and contents of the folder's files (not hidden ones, not sub-folders): the
    identity of an encoder's cached embeddings. Memoised per process by the files' sizes and times."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    key = (str(folder.resolve()), *((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if key not in _FOLDER_DIGESTS:
        digest = hashlib.sha256()
        for path in files:
            digest.update(f"{path.name}\0{sha256_of_file(path)}\0".encode())
        _FOLDER_DIGESTS[key] = digest.hexdigest()
    return _FOLDER_DIGESTS[key]


class HuggingFaceTextEncoder:
    """The network and tokenizer of a text encoder folder (frozen, fp32, eval mode) on ``device``.

    ``name``: the key of its cached embeddings (``hf-<digest of the folder's files>``); ``dim``: the width of its
    token states; :meth:`tokenize` and :meth:`__call__` give what :class:`~ul_fast.text.TextEncoder` needs.
    """

    def __init__(self, path: str | Path, device: torch.device, max_tokens: int):
        info = inspect_text_encoder(path)
        if info.max_tokens is not None and max_tokens > info.max_tokens:
            raise ValueError(f"max_tokens {max_tokens} is more than the {info.max_tokens} positions of the text "
                             f"encoder {str(path)!r}")
        try:
            import transformers
        except ImportError as error:
            raise ImportError(f"a Hugging Face text encoder needs the package transformers; {_INSTALL_HINT}") from error
        transformers.logging.set_verbosity_error()  # load reports and config notes: errors are raised below
        transformers.utils.logging.disable_progress_bar()
        where = f"model.text_encoder {str(path)!r}"
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(info.path, local_files_only=True)
            model_class = getattr(transformers, ENCODER_CLASSES[info.model_type])
            model, loading = model_class.from_pretrained(info.path, local_files_only=True, dtype=torch.float32,
                                                         output_loading_info=True)
        except (OSError, ValueError, KeyError, TypeError) as error:
            message = " ".join(str(error).split())[:300]
            raise ValueError(f"{where}: cannot be loaded as a {info.model_type} text encoder ({message})") from None
        if loading.get("missing_keys"):
            missing = sorted(loading["missing_keys"])
            raise ValueError(f"{where}: its weights lack {len(missing)} tensor(s) of a {info.model_type} text "
                             f"encoder, e.g. {', '.join(missing[:3])}")
        if self.tokenizer.pad_token is None:
            raise ValueError(f"{where}: its tokenizer has no padding token")
        if not self.tokenizer("")["input_ids"]:
            raise ValueError(f"{where}: its tokenizer gives the empty caption no token (no special tokens such as "
                             f"[CLS] or </s>): the null caption of guidance would be empty")
        self.model = model.to(device).eval().requires_grad_(False)
        self.device, self.max_tokens = device, max_tokens
        self.dim = info.hidden_size
        self.name = f"hf-{folder_digest(info.path)[:16]}"

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """``(ids int64 [B, T], mask bool [B, T], truncated [B])``, padded or truncated to ``max_tokens``."""
        encoded = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_tokens,
                                 return_tensors="pt")
        lengths = [len(ids) for ids in self.tokenizer(captions, truncation=False, verbose=False)["input_ids"]]
        return (encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device, torch.bool),
                [n > self.max_tokens for n in lengths])

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states ``[B, T, dim]`` of token ids ``[B, T]`` under ``mask`` ``[B, T]``."""
        return self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
