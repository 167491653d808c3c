"""Networks: ResNet encoder, ViT prior/base model, UViT decoder. Each takes its config dataclass
(:mod:`ul_fast.config`) and, by keyword, the shape facts that come from elsewhere."""

from ul_fast.nets.layers import set_activation_checkpointing
from ul_fast.nets.resnet_encoder import ResNetEncoder
from ul_fast.nets.uvit import UViTDecoder
from ul_fast.nets.vit import ViTDenoiser

__all__ = ["ResNetEncoder", "UViTDecoder", "ViTDenoiser", "set_activation_checkpointing"]
