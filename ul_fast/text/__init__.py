"""Text conditioning for text-to-image: all-MiniLM-L6-v2 caption embeddings (extra ``ul-fast[text]``).

``TextEncoder().encode(["a photo of a sneaker"])`` -> :class:`TextEmbedding` with token states
``[B, T, 384]``, mask ``[B, T]`` and the pooled sentence embedding ``[B, 384]``;
``TextEncoder(encoder="/path/to/t5-folder")`` uses a local Hugging Face text encoder instead
(:mod:`ul_fast.text.hf_encoder`). Importing this package needs only torch and safetensors; the extra's
packages are imported when a :class:`TextEncoder` is built.
"""

from ul_fast.text.bank import ClassCaptionBank
from ul_fast.text.hf_encoder import ENCODER_CLASSES, HuggingFaceTextEncoder, check_text_encoder, inspect_text_encoder
from ul_fast.text.minilm import MiniLM, MiniLMConfig, load_minilm, mean_pool
from ul_fast.text.text_encoder import (
    EMBED_DIM,
    MINILM,
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
    "ENCODER_CLASSES",
    "MINILM",
    "MINILM_TOKENIZER_SHA256",
    "MINILM_WEIGHTS_SHA256",
    "ClassCaptionBank",
    "HuggingFaceTextEncoder",
    "MiniLM",
    "MiniLMConfig",
    "TextEmbedding",
    "TextEncoder",
    "bundled_model_dir",
    "check_text_encoder",
    "encode_caption_bank",
    "inspect_text_encoder",
    "load_minilm",
    "mean_pool",
    "verify_sha256",
]
