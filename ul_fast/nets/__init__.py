"""Networks: ResNet encoder, ViT prior/base model, UViT decoder."""

from ul_fast.nets.encoder import ResNetEncoder
from ul_fast.nets.uvit import UViTDecoder
from ul_fast.nets.vit import ViTDenoiser

__all__ = ["ResNetEncoder", "UViTDecoder", "ViTDenoiser"]
