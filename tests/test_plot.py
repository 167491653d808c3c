"""`ul_fast.eval.plot`: metrics.jsonl -> curves PNG."""

from __future__ import annotations

import json
import math
import sys

import pytest
from PIL import Image

from ul_fast.eval.plot import _panels, plot_run, read_metrics_file

pytest.importorskip("matplotlib", reason="plot extra not installed (pip install 'ul-fast[plot]')")


def synthetic_records() -> list[dict]:
    """A two-stage run as the trainer logs it: stage-1 lines with an eval every 4th, then stage 2."""
    records = []
    for step in range(1, 21):
        record = {"step": step, "stage": 1, "stage_step": step, "loss": 900.0 / step, "prior_kl": 5.0 / step,
                  "decoder_loss": 800.0 / step, "bits_per_pixel": 0.5 + 1 / step, "lr": 1e-3,
                  "images_per_s": 120.0 + step, "heldout_bits_per_pixel": None, "psnr": None}
        if step % 4 == 0:
            record.update(heldout_bits_per_pixel=0.6 + 1 / step, psnr=10 + math.log(step))
        records.append(record)
    for stage_step in range(1, 11):
        loss = 0.3 + 1 / stage_step
        records.append({"step": 20 + stage_step, "stage": 2, "stage_step": stage_step, "loss": loss,
                        "base_loss": loss, "bits_per_pixel": 0.62, "lr": 5e-4, "images_per_s": 300.0})
    return records


def write_jsonl(path, records, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_plot_run_writes_png_of_expected_size(tmp_path):
    write_jsonl(tmp_path / "metrics.jsonl", synthetic_records())
    out = plot_run(tmp_path)
    assert out == tmp_path / "curves.png" and out.stat().st_size > 10_000
    with Image.open(out) as image:
        assert image.format == "PNG"
        # 4 panels (stage 1 loss, stage 2 loss, bits/pixel, PSNR) -> 2 x 2 grid of 6 x 4 in at 100 dpi.
        assert image.size == (1200, 800)
        # Not a blank canvas: curves and text put many distinct colours on it.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50

    custom = plot_run(tmp_path, tmp_path / "sub" / "c.png", dpi=50)
    with Image.open(custom) as image:
        assert image.size == (600, 400)


def test_panels_content():
    panels = {title: lines for title, _, lines in _panels(synthetic_records())}
    assert list(panels) == ["stage 1 loss", "stage 2 loss", "bits per pixel", "reconstruction PSNR"]
    assert [label for label, _, _ in panels["stage 1 loss"]] == ["loss", "prior_kl", "decoder_loss"]
    assert [label for label, _, _ in panels["stage 2 loss"]] == ["loss"]  # base_loss == loss drawn once
    bpp = {label: steps for label, steps, _ in panels["bits per pixel"]}
    assert bpp["train"] == list(range(1, 31)) and bpp["held-out"] == [4, 8, 12, 16, 20]
    assert panels["reconstruction PSNR"][0][1] == [4, 8, 12, 16, 20]


def test_single_stage_run_and_partial_last_line(tmp_path):
    records = [r for r in synthetic_records() if r["stage"] == 1][:6]
    write_jsonl(tmp_path / "metrics.jsonl", records, tail='{"step": 7, "loss": 1')  # killed mid-write
    assert len(read_metrics_file(tmp_path / "metrics.jsonl")) == 6
    with Image.open(plot_run(tmp_path)) as image:
        assert image.size == (1200, 800)  # 3 panels -> 2 columns, 2 rows (one hidden)


def test_missing_empty_and_bad_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no metrics records"):
        plot_run(tmp_path)
    write_jsonl(tmp_path / "metrics.jsonl", [{"step": 1, "lr": 1e-3}])
    with pytest.raises(ValueError, match="no loss, bits/pixel or PSNR"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\nnot json\n{"step": 3, "loss": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        plot_run(tmp_path)
    write_jsonl(tmp_path / "metrics.jsonl", [{"loss": 2.0}])
    with pytest.raises(ValueError, match="integer 'step'"):
        plot_run(tmp_path)


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "metrics.jsonl", synthetic_records())
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'ul-fast\[plot\]'"):
        plot_run(tmp_path)
