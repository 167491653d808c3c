"""Training: the loop, EMA, checkpoints and metrics; progressive distillation of the decoder."""

from ul_fast.train.checkpoint import (
    CheckpointError,
    NonFiniteWeightsError,
    latest_checkpoint,
    load_trained_model,
    save_checkpoint,
)
from ul_fast.train.distill import Distiller, DistillSettings
from ul_fast.train.run_folder import RunFolderError
from ul_fast.train.trainer import Trainer, TrainingAborted, TrainingDiverged, TrainingInterrupted

__all__ = ["CheckpointError", "DistillSettings", "Distiller", "NonFiniteWeightsError", "RunFolderError", "Trainer",
           "TrainingAborted", "TrainingDiverged", "TrainingInterrupted", "latest_checkpoint", "load_trained_model",
           "save_checkpoint"]
