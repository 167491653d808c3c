"""The public API: load a model from Python (``ul_fast.load``), export a run into a portable folder, the shipped
pretrained models, and (with the ``diffusers`` extra) a diffusers autoencoder, ``ul_fast.api.diffusers_vae``."""

from ul_fast.api.export import ExportError, export_run, load_export, read_export
from ul_fast.api.pipeline import UnifiedLatentsPipeline, load
from ul_fast.api.shipped import SHIPPED_MODELS
from ul_fast.api.sources import OpenedModel, open_model

__all__ = ["SHIPPED_MODELS", "ExportError", "OpenedModel", "UnifiedLatentsPipeline", "export_run", "load",
           "load_export", "open_model", "read_export"]
