"""The one reader of ``RUN/metrics.jsonl``: one JSON object per line, each with an integer ``step``.

Two kinds of record share the file: metrics (``{"step", "stage", "loss", ...}``, one per logged step) and
events (``{"step", "event": "config_change" | "interrupted", ...}``, what happened to the run at that step).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | Path, *, events: bool = False) -> list[dict[str, Any]]:
    """Records of a metrics file (or of ``path/metrics.jsonl`` when ``path`` is a run folder), in file order.

    Metric records only, unless ``events``: then event records too. A torn *last* line (a run killed while
    writing it) is dropped; a malformed earlier line, or a record that is not an object with an integer
    ``step``, raises ValueError naming the file and line. A missing file raises FileNotFoundError naming it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path} (a run folder written by `ul-fast train`?)")
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for position, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if position == len(lines) - 1:
                break  # partial last line of an interrupted write
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{number}: expected a JSON object with an integer 'step', got {line[:80]!r}")
        if events or "event" not in record:
            records.append(record)
    return records
