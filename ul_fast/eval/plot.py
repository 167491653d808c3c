"""Training curves: ``RUN/metrics.jsonl`` -> one PNG with loss (per stage), bits/pixel and PSNR panels.

Needs matplotlib (the ``ul-fast[plot]`` extra). It draws with the Agg canvas directly, not pyplot, so it
changes no global matplotlib state (backend, open figures) of the calling process.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ul_fast.eval.metrics_file import read_metrics

__all__ = ["read_metrics_file", "plot_run"]

# Per-stage loss panel: the total loss and, where logged, its parts (nats per image).
LOSS_KEYS = ("loss", "prior_nats", "prior_kl", "decoder_loss", "base_loss")
BPP_KEYS = {"bits_per_pixel": "train", "heldout_bits_per_pixel": "held-out"}
PANEL_WIDTH_IN, PANEL_HEIGHT_IN = 6.0, 4.0


def read_metrics_file(path: str | Path) -> list[dict[str, Any]]:
    """The metric records of a metrics JSONL file (events left out), sorted by step; errors as
    :func:`~ul_fast.eval.metrics_file.read_metrics` (a torn last line is dropped), and ValueError when the
    file holds no records yet."""
    records = read_metrics(path)
    if not records:
        raise ValueError(f"{path} holds no metrics records yet")
    return sorted(records, key=lambda r: r["step"])


def _number(value: Any) -> float | None:
    """A finite float, or None for missing / null / non-numeric / non-finite values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records where ``key`` holds a finite number."""
    pairs = [(r["step"], _number(r.get(key))) for r in records]
    pairs = [(s, v) for s, v in pairs if v is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _panels(records: list[dict[str, Any]]) -> list[tuple[str, str, list[tuple[str, list[int], list[float]]]]]:
    """(title, y label, [(legend, steps, values)]) for every panel that has data."""
    panels = []
    stages = sorted({r["stage"] for r in records if isinstance(r.get("stage"), int)}) or [None]
    for stage in stages:
        rows = [r for r in records if stage is None or r.get("stage") == stage]
        lines, seen = [], []
        for key in LOSS_KEYS:
            steps, values = _series(rows, key)
            if values and (steps, values) not in seen:  # stage 2 logs base_loss == loss: draw it once
                seen.append((steps, values))
                lines.append((key, steps, values))
        if lines:
            title = "loss" if stage is None else f"stage {stage} loss"
            panels.append((title, "nats per image", lines))
    bpp = [(label, *_series(records, key)) for key, label in BPP_KEYS.items()]
    if any(values for _, _, values in bpp):
        panels.append(("bits per pixel", "bits/pixel", [line for line in bpp if line[2]]))
    steps, values = _series(records, "psnr")
    if values:
        panels.append(("reconstruction PSNR", "dB", [("psnr", steps, values)]))
    return panels


def plot_run(run_dir: str | Path, out_path: str | Path | None = None, *, dpi: int = 100) -> Path:
    """Draw ``run_dir/metrics.jsonl`` into a PNG (default ``run_dir/curves.png``); returns its path.

    Panels (those with data): loss per training stage with its logged parts, bits/pixel (train and
    held-out), PSNR of EMA reconstructions; x is the global step, a dashed line marks where each stage
    starts. Two panels per row, each 6 x 4 inches at ``dpi``: a 2 x 2 grid at dpi 100 is 1200 x 800 px.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install 'ul-fast[plot]'") from error
    run_dir = Path(run_dir)
    records = read_metrics_file(run_dir / "metrics.jsonl")
    panels = _panels(records)
    if not panels:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no loss, bits/pixel or PSNR values to plot")
    stage_starts = {}
    for r in records:
        stage_starts.setdefault(r.get("stage"), r["step"])
    boundaries = [step for stage, step in stage_starts.items() if stage is not None and step > records[0]["step"]]

    columns = min(2, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(PANEL_WIDTH_IN * columns, PANEL_HEIGHT_IN * rows), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, (title, ylabel, lines) in zip(axes, panels):
        for label, steps, values in lines:
            ax.plot(steps, values, label=label, marker="o" if len(values) <= 20 else None, markersize=3)
        all_values = [v for _, _, values in lines for v in values]
        # Diffusion losses fall over orders of magnitude early on: log scale when that is the case.
        if title.endswith("loss") and min(all_values) > 0 and max(all_values) / min(all_values) > 20:
            ax.set_yscale("log")
        for step in boundaries:
            ax.axvline(step, color="gray", linestyle="--", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    last_speed = _series(records, "images_per_s")[1]
    speed = f" — {last_speed[-1]:.1f} images/s (last log)" if last_speed else ""
    figure.suptitle(f"{run_dir.resolve().name}: {len(records)} records up to step {records[-1]['step']}{speed}")

    out_path = Path(out_path) if out_path is not None else run_dir / "curves.png"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, format="png")
    return out_path
