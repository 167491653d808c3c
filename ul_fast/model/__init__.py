"""The Unified Latents model."""

from ul_fast.model.unified_latents import UnifiedLatents

__all__ = ["UnifiedLatents"]
