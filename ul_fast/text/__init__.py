"""Text conditioning for text-to-image: all-MiniLM-L6-v2 caption embeddings (extra ``ul-fast[text]``).

``TextEncoder().encode(["a photo of a sneaker"])`` -> :class:`TextEmbedding` with token states
``[B, T, 384]``, mask ``[B, T]`` and the pooled sentence embedding ``[B, 384]``.
Importing this package needs only torch and safetensors; the extra's packages are imported when a
:class:`TextEncoder` is built.
"""

from ul_fast.text.bank import ClassCaptionBank
from ul_fast.text.minilm import MiniLM, MiniLMConfig, load_minilm, mean_pool
from ul_fast.text.text_encoder import (
    EMBED_DIM,
    MINILM_TOKENIZER_SHA256,
    MINILM_WEIGHTS_SHA256,
    TextEmbedding,
    TextEncoder,
    bundled_model_dir,
    encode_caption_bank,
    verify_sha256,
)

__all__ = [
    "EMBED_DIM",
    "MINILM_TOKENIZER_SHA256",
    "MINILM_WEIGHTS_SHA256",
    "ClassCaptionBank",
    "MiniLM",
    "MiniLMConfig",
    "TextEmbedding",
    "TextEncoder",
    "bundled_model_dir",
    "encode_caption_bank",
    "load_minilm",
    "mean_pool",
    "verify_sha256",
]
