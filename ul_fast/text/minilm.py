"""all-MiniLM-L6-v2 as a small pure-PyTorch BERT encoder (no ``transformers`` needed).

MiniLM-L6-H384 is a standard post-LayerNorm BERT: 6 layers, width 384, 12 heads of 64, GELU (erf) MLP of
1536, absolute position embeddings, LayerNorm eps 1e-12. :class:`MiniLM` computes the last hidden states
``[B, T, 384]`` exactly as Hugging Face's ``BertModel`` does (eval mode: no dropout), from the
``model.safetensors`` of the sentence-transformers checkpoint; :func:`load_minilm` maps its tensor names
(``encoder.layer.3.attention.self.query.weight``, ...) onto this module's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

__all__ = ["MiniLMConfig", "MiniLM", "load_minilm", "mean_pool"]


@dataclass(frozen=True)
class MiniLMConfig:
    """The fields of the checkpoint's ``config.json`` that define the network."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: Path) -> MiniLMConfig:
        raw = json.loads(Path(path).read_text())
        # Only what this implementation computes is accepted: a BERT with erf-GELU and absolute positions.
        if raw.get("model_type") != "bert" or raw.get("hidden_act") != "gelu":
            raise ValueError(f"{path}: expected a BERT config with hidden_act 'gelu', got "
                             f"model_type={raw.get('model_type')!r}, hidden_act={raw.get('hidden_act')!r}")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only absolute position embeddings are supported")
        return cls(**{name: raw[name] for name in cls.__dataclass_fields__ if name in raw})


class MiniLMLayer(nn.Module):
    """One post-LN BERT layer: ``x = LN(x + Attn(x)); x = LN(x + MLP(x))`` on ``[B, T, W]``."""

    def __init__(self, c: MiniLMConfig):
        super().__init__()
        width = c.hidden_size
        self.heads = c.num_attention_heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.attn_out = nn.Linear(width, width)
        self.attn_norm = nn.LayerNorm(width, eps=c.layer_norm_eps)
        self.mlp_in = nn.Linear(width, c.intermediate_size)
        self.mlp_out = nn.Linear(c.intermediate_size, width)
        self.mlp_norm = nn.LayerNorm(width, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        """x ``[B, T, W]``; attend ``[B, 1, 1, T]`` bool, True where a key may be attended to."""
        batch, tokens, width = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, T, W] -> [B, H, T, W/H]
            return t.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2)

        attn = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)),
                                              attn_mask=attend)
        x = self.attn_norm(x + self.attn_out(attn.transpose(1, 2).reshape(batch, tokens, width)))
        return self.mlp_norm(x + self.mlp_out(F.gelu(self.mlp_in(x))))


class MiniLM(nn.Module):
    """BERT encoder: token ids ``[B, T]`` int64 + mask ``[B, T]`` bool -> last hidden states ``[B, T, W]``.

    Padded positions (mask False) are never attended to; their own output rows are computed but are
    meaningless (callers zero them). Single-segment input: token type 0 everywhere.
    """

    def __init__(self, c: MiniLMConfig):
        super().__init__()
        self.config = c
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.embed_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(MiniLMLayer(c) for _ in range(c.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = input_ids.shape[1]
        if tokens > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {tokens} tokens, more than the model's "
                             f"{self.config.max_position_embeddings} positions")
        positions = torch.arange(tokens, device=input_ids.device)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
             + self.token_type_embeddings.weight[0])
        x = self.embed_norm(x)
        attend = mask[:, None, None, :]
        for layer in self.layers:
            x = layer(x, attend)
        return x


# Checkpoint name (inside "encoder.layer.{i}.") -> this module's name (inside "layers.{i}.").
_LAYER_NAMES = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "mlp_in",
    "output.dense": "mlp_out",
    "output.LayerNorm": "mlp_norm",
}
_EMBEDDING_NAMES = {
    "embeddings.word_embeddings": "word_embeddings",
    "embeddings.position_embeddings": "position_embeddings",
    "embeddings.token_type_embeddings": "token_type_embeddings",
    "embeddings.LayerNorm": "embed_norm",
}


def _rename(name: str) -> str | None:
    """Checkpoint tensor name -> :class:`MiniLM` parameter name (None: not used, e.g. position_ids)."""
    module, _, leaf = name.rpartition(".")
    if module in _EMBEDDING_NAMES:
        return f"{_EMBEDDING_NAMES[module]}.{leaf}"
    if module.startswith("encoder.layer."):
        index, _, inner = module[len("encoder.layer."):].partition(".")
        if inner in _LAYER_NAMES:
            return f"layers.{index}.{_LAYER_NAMES[inner]}.{leaf}"
    if name == "embeddings.position_ids" or name.startswith("pooler."):
        return None  # a constant buffer and the (unused) NSP pooler head
    raise KeyError(f"unexpected tensor {name!r} in the MiniLM checkpoint")


def load_minilm(model_dir: Path, device: str | torch.device = "cpu") -> MiniLM:
    """Build :class:`MiniLM` from ``model_dir/config.json`` and ``model_dir/model.safetensors`` (fp32, eval).

    Every network parameter must be present in the checkpoint (strict load), so a foreign checkpoint fails
    here rather than giving silently wrong embeddings.
    """
    model_dir = Path(model_dir)
    model = MiniLM(MiniLMConfig.from_json(model_dir / "config.json"))
    state = {}
    for name, tensor in load_file(str(model_dir / "model.safetensors")).items():
        new_name = _rename(name)
        if new_name is not None:
            state[new_name] = tensor.float()
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' pooling: mean of hidden ``[B, T, W]`` over mask ``[B, T]``, then L2-normalise.

    Returns ``[B, W]`` unit vectors (the all-MiniLM-L6-v2 sentence embedding).
    """
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    mean = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
    return F.normalize(mean, p=2, dim=1)
