"""A training run killed in the middle of a step, then resumed: what the exact-resume tests compare with an
uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest

from ul_fast.config import Config
from ul_fast.train import Trainer


class Killed(Exception):
    """Raised in place of a step, as a kill would stop the run."""


def killed_and_resumed(config: Config, run: Path, monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Train ``config`` into ``run`` until its ``step``-th optimiser step (counted from 1) dies, then resume it to
    the end."""
    real_step, calls = Trainer.train_step, []

    def dies(self):
        calls.append(1)
        if len(calls) == step:
            raise Killed
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", dies)
    with pytest.raises(Killed):
        Trainer(config, run).fit()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    Trainer(config, run).fit(resume=True)
