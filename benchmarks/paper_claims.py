"""The paper's claims, measured on Fashion-MNIST at CPU scale: trains and evaluates one run per setting, then writes
a report (default docs/paper_claims.md) with tables in the paper's layout, plots, and a verdict per claim.

Every run is the `tiny` preset (or a variant of it) at **equal compute**: the same batch (64) and the same number of
optimiser steps (1,700 stage-1 + 600 stage-2; single-stage runs 2,300 joint steps), on full Fashion-MNIST (60k
train / 10k test, Debian's ``dataset-fashion-mnist``; the embedded 5k/1k subset with a warning when it is absent).
Each run is then scored by ``ul-fast eval`` (N held-out reconstructions and N class-balanced samples, DDIM 32 + 32
steps, guidance as the preset, seed 0, Fashion-MNIST classifier features).

Noise scale, per metric: σ is the larger of (a) the standard deviation over the default setting's training seeds
(two or three) and (b) the standard deviation of the default seed-0 run's scores over evaluation seeds 0, 1 and 2
(``EVAL_SEEDS``: other samples, noise and subsets, same weights). A difference between two runs counts when it lies
outside the 95 % prediction interval of a difference of two runs, ``t(0.975, n − 1) · σ · √2`` with n the number of
values σ came from, in the claimed direction ("reproduced"), against it ("not reproduced"), else "inconclusive at
this scale". So few values make σ itself uncertain; the t quantile pays for that.

Resumable: a run with an ``eval.json`` is done; a run folder with a checkpoint is resumed (``ul-fast train
--resume``); ``--jobs 2`` trains two runs at once (one thread each), as fits a 2-core machine.

Usage:
    python benchmarks/paper_claims.py --out runs/paper_claims [--jobs 2] [--samples 1000]
    python benchmarks/paper_claims.py --out runs/paper_claims --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ul_fast.data import DEBIAN_FASHION_MNIST_ROOT

EVAL_SEEDS = (1, 2)  # extra ``ul-fast eval --seed`` draws of the default run, for the evaluation's own noise
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}  # Student t quantiles by degrees of freedom
DEFAULT_CLF = 5.0  # the tiny preset's loss factor (ul_fast/configs/tiny.yaml says why it is above the paper's)


@dataclass(frozen=True)
class Setting:
    """One training run of the study: a preset, its overrides and a seed."""

    name: str
    label: str
    overrides: tuple[str, ...] = ()
    preset: str = "tiny"
    seed: int = 0

    def train_args(self, data: str) -> list[str]:
        sets = [f"data.dataset={data}", f"train.seed={self.seed}", *self.overrides]
        return ["--config", self.preset, *[arg for s in sets for arg in ("--set", s)]]


# In the order they run: every claim's settings and a second seed of the default first; the extra points (a fourth
# c_lf, more seeds) last, so that a study cut short still answers every claim.
SETTINGS = (
    Setting("ul_clf5_s0", "UL, c_lf 5 (default)"),
    Setting("vae_ldm_s0", "two-stage VAE + LDM", preset="vae-ldm"),
    Setting("ul_clf5_s1", "UL, c_lf 5 (default), seed 1", seed=1),
    Setting("ul_clf2", "UL, c_lf 2", ("model.decoder_weighting.factor=2.0",)),
    Setting("ul_clf8", "UL, c_lf 8", ("model.decoder_weighting.factor=8.0",)),
    Setting("normal_prior", "N(0, I) prior", ("model.latent_prior=normal",)),
    Setting("mse_decoder", "MSE decoder", ("model.decoder_loss=mse",)),
    Setting("stop_grad", "stop-gradient prior", ("model.prior_stop_grad=true",)),
    Setting("logsnr0_10", "λ_z(0) = 10", ("model.latent_logsnr_0=10.0",)),
    Setting("single_stage", "single-stage", ("model.mode=single_stage", "train.stage1_steps=2300",
                                             "train.stage2_steps=0")),
    Setting("ul_clf3", "UL, c_lf 3", ("model.decoder_weighting.factor=3.0",)),
    Setting("vae_ldm_s1", "two-stage VAE + LDM, seed 1", preset="vae-ldm", seed=1),
    Setting("ul_clf5_s2", "UL, c_lf 5 (default), seed 2", seed=2),
    # c_lf 5 leaves UL at about a tenth of the baselines' bits/pixel; c_lf 20 moves it towards theirs (the
    # paper's comparisons are at equal bits), so that the headline is also compared at a higher bitrate.
    Setting("ul_clf20", "UL, c_lf 20", ("model.decoder_weighting.factor=20.0",)),
)
DEFAULT_SEEDS = ("ul_clf5_s0", "ul_clf5_s1", "ul_clf5_s2")
EVAL_NOISE_RUN = "ul_clf5_s0"
CLF_SWEEP = {2.0: "ul_clf2", 3.0: "ul_clf3", 5.0: "ul_clf5_s0", 8.0: "ul_clf8", 20.0: "ul_clf20"}
METRICS = ("bits_per_pixel_prior", "bits_per_pixel_base", "psnr", "rfd", "gfd")


# ----------------------------------------------------------------------------------------------- running
def cli(*args: str, log: Path) -> float:
    """Run ``ul-fast ARGS`` in a child process with one thread; returns its wall time in s."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    with log.open("a") as out:
        done = subprocess.run([sys.executable, "-m", "ul_fast.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                              env=env)
    if done.returncode:
        raise RuntimeError(f"ul-fast {' '.join(args)} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def run_setting(setting: Setting, root: Path, data: str, samples: int) -> None:
    """Train (or resume) and evaluate one setting; its timings go to ``RUN/study.json``."""
    run = root / setting.name
    if (run / "eval.json").exists():
        return
    log = root / f"{setting.name}.log"
    timing_path = run / "study.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {"train_s": 0.0}
    if (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()):
        timing["train_s"] += cli("train", "--resume", str(run), "--no-progress", log=log)
    else:
        timing["train_s"] += cli("train", *setting.train_args(data), "--out", str(run), "--overwrite",
                                 "--no-progress", log=log)
    timing_path.write_text(json.dumps(timing))
    timing["eval_s"] = cli("eval", "--run", str(run), "--samples", str(samples), "--seed", "0", "--no-progress",
                           log=log)
    timing_path.write_text(json.dumps(timing))
    print(f"[paper_claims {time.strftime('%H:%M:%S')}] {setting.name}: done", flush=True)


def run_eval_noise(root: Path, samples: int) -> None:
    """Score the default seed-0 run again with evaluation seeds :data:`EVAL_SEEDS`, into ``ROOT/eval_noise``
    (a copy of the run's config and checkpoints, so that its own ``eval.json`` stays the seed-0 one)."""
    source = root / EVAL_NOISE_RUN
    for seed in EVAL_SEEDS:
        copy = root / "eval_noise" / f"seed{seed}"
        if (copy / "eval.json").exists() or not (source / "eval.json").exists():
            continue
        copy.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / "config.yaml", copy / "config.yaml")
        if not (copy / "checkpoints").exists():
            shutil.copytree(source / "checkpoints", copy / "checkpoints")
        cli("eval", "--run", str(copy), "--samples", str(samples), "--seed", str(seed), "--no-progress",
            log=root / "eval_noise.log")


# ----------------------------------------------------------------------------------------------- results
def load_results(root: Path) -> dict[str, dict]:
    """``{setting name: eval.json + study.json}`` of every finished run."""
    results = {}
    for setting in SETTINGS:
        run = root / setting.name
        if (run / "eval.json").exists():
            results[setting.name] = {**json.loads((run / "eval.json").read_text()),
                                     **json.loads((run / "study.json").read_text())}
    return results


def eval_noise(root: Path, results: dict[str, dict]) -> list[dict]:
    """The default seed-0 run's scores under every evaluation seed measured (seed 0 first)."""
    runs = [results[EVAL_NOISE_RUN]] if EVAL_NOISE_RUN in results else []
    for seed in EVAL_SEEDS:
        path = root / "eval_noise" / f"seed{seed}" / "eval.json"
        if path.exists():
            runs.append(json.loads(path.read_text()))
    return runs


def noise(root: Path, results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per metric: ``sigma`` (the larger of the training-seed and the evaluation-seed standard deviations, nan
    with fewer than two values of either), ``threshold`` (the difference two runs need to count: t(0.975, n−1)·σ·√2)
    and the two spreads."""
    seeds = [results[n] for n in DEFAULT_SEEDS if n in results]
    evals = eval_noise(root, results)
    table = {}
    for m in METRICS:
        spreads = {name: (statistics.stdev(r[m] for r in runs), len(runs))
                   for name, runs in (("seeds", seeds), ("eval", evals)) if len(runs) >= 2}
        if not spreads:
            table[m] = {"sigma": float("nan"), "threshold": float("nan")}
            continue
        sigma, n = max(spreads.values())
        table[m] = {"sigma": sigma, "threshold": T_975[min(n - 1, 4)] * sigma * 2 ** 0.5,
                    **{f"sigma_{name}": value for name, (value, _) in spreads.items()}}
    return table


def verdict(difference: float, threshold: float, claimed_sign: int) -> str:
    """A difference (b − a) against the claim that its sign is ``claimed_sign``, at the noise threshold."""
    if threshold != threshold:  # nan: no spread measured yet
        return "inconclusive (no seed spread)"
    if abs(difference) <= threshold:
        return "inconclusive at this scale"
    return "reproduced" if difference * claimed_sign > 0 else "not reproduced"


def fmt(value: float, digits: int = 3) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def row(results: dict[str, dict], name: str) -> str:
    r = results[name]
    label = next(s.label for s in SETTINGS if s.name == name)
    return (f"| {label} | {fmt(r['bits_per_pixel_prior'], 4)} | {fmt(r['bits_per_pixel_base'], 4)} | "
            f"{fmt(r['psnr'], 2)} | {fmt(r['rfd'], 2)} | {fmt(r['gfd'], 2)} | {r['train_s'] / 60:.1f} |")


HEADER = ("| setting | bits/pixel (prior) | bits/pixel (base) | PSNR dB | rFD | gFD | train min |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")


def compare(results: dict[str, dict], spread: dict[str, dict], a: str, b: str, metric: str, sign: int,
            what: str) -> str:
    """One line: metric of b against a, the claimed sign of (b − a), and the verdict."""
    if a not in results or b not in results:
        return f"- {what}: not measured (a run is missing)"
    diff = results[b][metric] - results[a][metric]
    threshold = spread[metric]["threshold"]
    return (f"- {what}: {fmt(results[a][metric])} → {fmt(results[b][metric])} (difference {diff:+.3f}, "
            f"threshold {fmt(threshold)}): **{verdict(diff, threshold, sign)}**")


def monotone_claim(results: dict[str, dict], spread: dict[str, dict], metric: str, sign: int, what: str) -> str:
    """A metric rising (sign +1) or falling (−1) along the c_lf sweep: each neighbour pair and end to end."""
    points = [(c, results[n][metric]) for c, n in sorted(CLF_SWEEP.items()) if n in results]
    if len(points) < 2:
        return f"- {what}: not measured"
    threshold = spread[metric]["threshold"]
    steps = [b - a for (_, a), (_, b) in zip(points, points[1:])]
    end = verdict(points[-1][1] - points[0][1], threshold, sign)
    if any(d * sign < -threshold for d in steps):
        end = "not reproduced (a step of the sweep goes the other way)"
    values = ", ".join(f"{c:g}: {fmt(v)}" for c, v in points)
    return f"- {what} ({values}; threshold {fmt(threshold)}): **{end}**"


def optimum_claim(results: dict[str, dict], spread: dict[str, dict]) -> str:
    """gFD has an interior optimum over c_lf: the best point is not an end and beats both ends beyond noise."""
    points = [(c, results[n]["gfd"]) for c, n in sorted(CLF_SWEEP.items()) if n in results]
    if len(points) < 3:
        return "- gFD has an optimum in c_lf: not measured"
    best = min(range(len(points)), key=lambda i: points[i][1])
    margin = spread["gfd"]["threshold"]
    values = ", ".join(f"{c:g}: {fmt(v, 2)}" for c, v in points)
    if 0 < best < len(points) - 1 and all(points[i][1] - points[best][1] > margin for i in (0, -1)):
        result = "reproduced"
    elif best in (0, len(points) - 1) and abs(points[0][1] - points[-1][1]) > margin:
        result = f"not reproduced (the best gFD is at the end c_lf = {points[best][0]:g})"
    else:
        result = "inconclusive at this scale"
    return f"- gFD has an optimum in c_lf ({values}; threshold {fmt(margin, 2)}): **{result}**"


def plot(results: dict[str, dict], path: Path) -> None:
    """gFD, rFD and PSNR against bits/pixel (under the base model, comparable across every variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for axis, metric, title in zip(axes, ("gfd", "rfd", "psnr"), ("gFD", "rFD", "PSNR (dB)")):
        for setting in SETTINGS:
            if setting.name in results:
                r = results[setting.name]
                sweep = setting.name in CLF_SWEEP.values() or setting.name in DEFAULT_SEEDS
                axis.scatter(r["bits_per_pixel_base"], r[metric], marker="o" if sweep else "s",
                             color="C0" if sweep else "C3")
                axis.annotate(setting.name, (r["bits_per_pixel_base"], r[metric]), fontsize=7)
        sweep = [(results[n]["bits_per_pixel_base"], results[n][metric]) for _, n in sorted(CLF_SWEEP.items())
                 if n in results]
        if sweep:
            axis.plot(*zip(*sweep), color="C0", alpha=0.5)
        axis.set_xlabel("bits/pixel under the base model")
        axis.set_title(title)
    fig.suptitle("Fashion-MNIST 32×32, tiny preset, equal compute (blue: c_lf sweep and seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(root: Path, out: Path, data: str, samples: int, wall_s: float | None) -> None:
    results = load_results(root)
    spread = noise(root, results)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, out.with_suffix(".png"))
    (out.parent / "data").mkdir(exist_ok=True)
    (out.parent / "data" / f"{out.stem}.json").write_text(json.dumps(results, indent=1, default=str))
    any_run = next(iter(results.values()), {})
    lines = [
        "# The paper's claims, measured on Fashion-MNIST",
        "",
        f"Written by `benchmarks/paper_claims.py` from {len(results)} of {len(SETTINGS)} runs in `{root}`. Data "
        f"`{data}`; every run the `tiny` preset (or the variant named) at equal compute: batch 64, 1,700 stage-1 + "
        "600 stage-2 steps (single-stage: 2,300 joint steps). Scores from `ul-fast eval` with "
        f"{samples} held-out reconstructions and {samples} class-balanced samples, DDIM 32 + 32 steps, guidance 2, "
        "seed 0, Fashion-MNIST classifier features (FD in its 256-d feature space, not Inception FID). "
        f"Software: {any_run.get('versions', {})}; CPU: 2 shared cores, two runs at a time, one thread each"
        + (f"; the whole study took {wall_s / 60:.0f} min." if wall_s else "."),
        "",
        "Noise: σ per metric is the larger of the standard deviation over the default setting's "
        f"{sum(n in results for n in DEFAULT_SEEDS)} training seeds and over the default seed-0 run's "
        f"{len(eval_noise(root, results))} evaluation seeds; a difference counts when it exceeds t(0.975, n − 1) · σ "
        "· √2 (the 95 % prediction interval of a difference of two runs, n the number of values behind σ). So "
        "few values make σ itself uncertain; the t quantile pays for that, and borderline verdicts stay borderline.",
        "",
        "| metric | σ over training seeds | σ over evaluation seeds | threshold |",
        "| --- | --- | --- | --- |",
        *[f"| {m} | {fmt(spread[m].get('sigma_seeds'), 4)} | {fmt(spread[m].get('sigma_eval'), 4)} | "
          f"{fmt(spread[m]['threshold'], 4)} |" for m in METRICS],
        "",
        "## Loss factor sweep (paper Tab. 2)",
        "",
        HEADER,
        *[row(results, n) for _, n in sorted(CLF_SWEEP.items()) if n in results],
        "",
        monotone_claim(results, spread, "bits_per_pixel_prior", +1, "bits/pixel rise with c_lf"),
        monotone_claim(results, spread, "psnr", +1, "PSNR rises with c_lf"),
        monotone_claim(results, spread, "rfd", -1, "rFD falls with c_lf"),
        optimum_claim(results, spread),
        "",
        "## Prior and decoder ablations (paper Tab. 5)",
        "",
        HEADER,
        *[row(results, n) for n in ("ul_clf5_s0", "normal_prior", "mse_decoder") if n in results],
        "",
        compare(results, spread, "ul_clf5_s0", "normal_prior", "gfd", +1,
                "a N(0, I) prior generates worse than the diffusion prior (gFD)"),
        compare(results, spread, "ul_clf5_s0", "mse_decoder", "gfd", +1,
                "an MSE decoder generates worse than the diffusion decoder (gFD)"),
        compare(results, spread, "ul_clf5_s0", "mse_decoder", "rfd", +1,
                "an MSE decoder reconstructs worse in FD (rFD)"),
        "",
        "## Stop-gradient prior and λ_z(0) = 10 (paper Tab. 6 A, B)",
        "",
        HEADER,
        *[row(results, n) for n in ("ul_clf5_s0", "stop_grad", "logsnr0_10") if n in results],
        "",
        compare(results, spread, "ul_clf5_s0", "stop_grad", "gfd", +1, "stop-gradient through the prior: worse gFD"),
        compare(results, spread, "ul_clf5_s0", "logsnr0_10", "bits_per_pixel_prior", -1,
                "λ_z(0) = 10 collapses the latent's bitrate (prior bits/pixel)"),
        compare(results, spread, "ul_clf5_s0", "logsnr0_10", "psnr", -1,
                "λ_z(0) = 10 collapses reconstruction (PSNR)"),
        "",
        "## Unified Latents against two-stage VAE + latent diffusion, and single-stage (the headline; App. B)",
        "",
        HEADER,
        *[row(results, n) for n in ("ul_clf5_s0", "ul_clf5_s1", "ul_clf5_s2", "ul_clf20", "vae_ldm_s0",
                                    "vae_ldm_s1", "mse_decoder", "single_stage") if n in results],
        "",
        compare(results, spread, "ul_clf5_s0", "vae_ldm_s0", "gfd", +1,
                "UL generates better than the two-stage VAE + LDM at equal compute (gFD, seed 0)"),
        compare(results, spread, "ul_clf5_s1", "vae_ldm_s1", "gfd", +1,
                "the same, seed 1"),
        compare(results, spread, "ul_clf20", "vae_ldm_s0", "gfd", +1,
                "UL at a higher bitrate (c_lf 20) generates better than the two-stage VAE + LDM (gFD)"),
        compare(results, spread, "ul_clf5_s0", "single_stage", "gfd", +1,
                "single-stage generates worse than two-stage (gFD)"),
        "",
        f"![gFD, rFD and PSNR against bits/pixel]({out.with_suffix('.png').name})",
        "",
    ]
    notes = out.with_suffix(".notes.md")
    if notes.exists():  # the interpretation, written by a person after reading the numbers
        lines += [notes.read_text().rstrip(), ""]
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder of the study's runs")
    parser.add_argument("--data", default=f"fmnist:{DEBIAN_FASHION_MNIST_ROOT}")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated setting names (default all)")
    parser.add_argument("--report", default="docs/paper_claims.md")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    data = args.data
    if data.startswith("fmnist:") and not Path(data.partition(":")[2], "train-images-idx3-ubyte.gz").exists():
        warnings.warn(f"{data} not found: falling back to the embedded 5k/1k subset", stacklevel=1)
        data = "fmnist-embedded"
    wall_s = None
    if not args.report_only:
        chosen = [s for s in SETTINGS if not args.only or s.name in args.only.split(",")]
        start = time.perf_counter()
        with ThreadPoolExecutor(args.jobs) as pool:
            for future in [pool.submit(run_setting, s, root, data, args.samples) for s in chosen]:
                future.result()
        run_eval_noise(root, args.samples)
        wall_s = time.perf_counter() - start
        if not args.only:  # the whole study's time, not a part's
            (root / "study_wall_s.txt").write_text(f"{wall_s:.0f}\n")
    elif (root / "study_wall_s.txt").exists():
        wall_s = float((root / "study_wall_s.txt").read_text())
    write_report(root, Path(args.report), data, args.samples, wall_s)


if __name__ == "__main__":
    main()
