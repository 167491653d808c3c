"""Training: the loop, EMA, checkpoints and metrics."""

from ul_fast.train.checkpoint import CheckpointError, latest_checkpoint, load_trained_model, save_checkpoint
from ul_fast.train.trainer import Trainer, TrainingDiverged

__all__ = ["CheckpointError", "Trainer", "TrainingDiverged", "latest_checkpoint", "load_trained_model",
           "save_checkpoint"]
