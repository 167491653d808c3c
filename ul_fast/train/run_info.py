"""What a finished (or stopped) run folder holds, read from its config and newest readable checkpoint."""

from __future__ import annotations

import warnings
from pathlib import Path

from ul_fast.config import SINGLE_STAGE, ConfigError
from ul_fast.train.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    load_run_config,
    load_state,
    newest_readable_checkpoint,
)


def base_model_trained(run_dir: str | Path, seen: tuple[Path, ...] = ()) -> bool:
    """Whether the base model of a run has trained: in single_stage mode stage 1 trains it; in two_stage mode
    once the run's newest readable checkpoint is in stage 2, or the run it was initialised from had one."""
    config = load_run_config(run_dir)
    if config.model.mode == SINGLE_STAGE:
        return True
    with warnings.catch_warnings():  # a skipped checkpoint was already reported when the weights were read
        warnings.simplefilter("ignore", CheckpointWarning)
        _, state = newest_readable_checkpoint(run_dir, load_state)
    if state["stage"] == 2 and state["stage_step"] > 0:
        return True
    if config.train.init_from is None:
        return False
    source = Path(config.train.init_from).resolve()
    try:  # a stage-1 run initialised from another run has that run's base model
        return source not in seen and base_model_trained(source, (*seen, Path(run_dir).resolve()))
    except (CheckpointError, ConfigError):  # that run is gone: trust the weights, as before this check
        return True
