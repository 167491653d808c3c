"""Metrics: one JSON object per logged step in ``RUN/metrics.jsonl``, mirrored to TensorBoard when the
``tensorboard`` package is installed. Events (a config change on resume, an interruption) are records with
an ``event`` key; :func:`read_metrics` (the one reader, shared with ``ul-fast plot``) leaves them out unless
asked."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ul_fast.eval.metrics_file import METRICS_FILE, read_metrics
from ul_fast.files import write_atomically

__all__ = ["MetricsLog", "read_metrics"]


class MetricsLog:
    """Append-only JSONL metrics file (rank 0 only writes)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self.tensorboard = enabled and tensorboard
        self.writer = None

    def _tensorboard_writer(self):
        """Opened on the first write, so nothing is created in the run folder before training starts."""
        if self.tensorboard and self.writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(self.path.parent / "tensorboard"))
            except Exception:  # tensorboard is optional; JSONL is the record
                self.tensorboard = False
        return self.writer

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (on resume, so the file has no duplicated steps) and a torn last line;
        the file is replaced atomically."""
        if not (self.enabled and self.path.exists()):
            return
        kept = [record for record in read_metrics(self.path, events=True) if record["step"] <= step]
        write_atomically(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        writer = self._tensorboard_writer() if "event" not in record else None
        if writer is not None:
            for key, value in clean.items():
                if isinstance(value, (int, float)) and key != "step":
                    writer.add_scalar(f"{record.get('stage', 'train')}/{key}", value, record["step"])
            writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
