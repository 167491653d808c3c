"""The paper's claims, measured on Fashion-MNIST at CPU scale: runs the study a YAML describes (default
``docs/data/paper_claims.yaml``: its points, base models and jobs), then writes a report (default
``docs/paper_claims.md``) with rate–quality frontiers, a plot, and a verdict per claim at equal bits.

A **point** is one setting of the model (a preset and ``--set`` overrides) in a **family** (UL, the VAE + LDM
baseline, an ablation); a family's points trace its rate–quality frontier: gFD, rFD, PSNR and KID against
bits/pixel under the base model. The **jobs**, run in the order the study file lists them, two at a time:

* ``train: P`` (``seed: S``, default 0): ``ul-fast train`` the point, then ``ul-fast eval`` it (``samples``
  held-out reconstructions and class-balanced samples, DDIM 32 + 32 steps, guidance 2, evaluation seed 0).
* ``eval: P`` (``seed``, ``eval_seed``, ``samples``): score a trained point again, in a folder of its own (a copy
  of the run's config and checkpoints), e.g. other evaluation seeds (the evaluation's own noise) or 10,000 samples.
* ``base: B, of: P``: stage 2 alone, a base model B of ``base_models`` trained from scratch on P's frozen stage 1
  (encoder, prior, decoder), then scored: the same weaker base for every latent (the bottleneck sweep).
* ``metric_check``: Fréchet distance and KID of the Gaussian-blurred and of the noisy test set against the clean
  one, at several strengths: what the classifier's feature space rewards.

Resumable: a job whose result file exists is done; a run folder with a checkpoint is resumed (``ul-fast train
--resume``); a run folder made from other settings than the study file's now is an error, not a silent mix.
The study file is read again whenever a job ends, so jobs appended to it while the study runs join the queue.
A failed job is reported and the others go on. Every child process runs with one thread (``OMP_NUM_THREADS=1``)
and inherits this process's niceness (start the study under ``nice -n 19`` on a shared machine).

The statistics (noise, interpolation in log-bits, verdicts) are in ``frontiers.py``.

Usage:
    nice -n 19 python benchmarks/paper_claims.py --out /work/study-runs [--study docs/data/paper_claims.yaml]
    python benchmarks/paper_claims.py --out /work/study-runs --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # frontiers.py, beside this script
import frontiers  # noqa: E402

from ul_fast.files import write_json_atomically  # noqa: E402

STUDY_FILE = Path(__file__).resolve().parents[1] / "docs" / "data" / "paper_claims.yaml"
STUDY_RECORD = "study.json"  # per run folder: the job's settings and timings
EVAL_FILE = "eval.json"
METRIC_CHECK_FILE = "metric_check.json"
WALL_FILE = "study_wall_s.json"  # the wall time of every session of the study


class StudyError(ValueError):
    """The study file is wrong (an unknown point, a key misspelt, a job before the run it needs)."""


# ----------------------------------------------------------------------------------------------- the study
@dataclass(frozen=True)
class Point:
    """One setting of the model: ``ul-fast train --config preset --set overrides``."""

    name: str
    family: str
    label: str
    preset: str = "tiny"
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class BaseModel:
    """A base model for stage 2 alone: ``--set`` overrides on the point's own config."""

    name: str
    label: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Job:
    """One unit of the study's queue. ``kind``: train, eval, base or metric_check."""

    kind: str
    point: str = ""
    seed: int = 0
    eval_seed: int = 0
    samples: int = 0  # 0: the study's default
    base: str = ""

    @property
    def run(self) -> str:
        """The training run this job trains or reads: ``POINT_sSEED``."""
        return f"{self.point}_s{self.seed}"

    @property
    def folder(self) -> str:
        """This job's folder under the study's root (its result file inside)."""
        if self.kind == "train":
            return self.run
        if self.kind == "eval":
            return f"{self.run}.eval-n{self.samples}-e{self.eval_seed}"
        if self.kind == "base":
            return f"{self.run}.base-{self.base}"
        return "metric_check"

    @property
    def result(self) -> str:
        return f"{self.folder}/{METRIC_CHECK_FILE if self.kind == 'metric_check' else EVAL_FILE}"

    @property
    def needs(self) -> str | None:
        """The folder of the training run this job needs finished first, or None."""
        return self.run if self.kind in ("eval", "base") else None


@dataclass
class Study:
    data: str
    samples: int
    eval_noise_point: str
    families: dict[str, str]
    points: dict[str, Point]
    base_models: dict[str, BaseModel]
    jobs: list[Job] = field(default_factory=list)
    clf_sweep: dict[str, float] = field(default_factory=dict)  # UL points of the loss-factor sweep: {point: c_lf}
    source: str = ""  # the study file


def _keys(entry: dict, allowed: set[str], where: str) -> None:
    unknown = set(entry) - allowed
    if unknown:
        raise StudyError(f"{where}: unknown key(s) {sorted(unknown)}; expected some of {sorted(allowed)}")


def load_study(path: str | Path) -> Study:
    """Read and check a study file (see ``docs/data/paper_claims.yaml``)."""
    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: expected a mapping with keys data, samples, families, points, jobs")
    _keys(raw, {"data", "samples", "eval_noise_point", "families", "points", "base_models", "clf_sweep", "jobs"},
          str(path))
    families = dict(raw.get("families") or {})
    points = {}
    for name, entry in (raw.get("points") or {}).items():
        _keys(entry, {"family", "label", "preset", "set"}, f"{path}: point {name}")
        if entry.get("family") not in families:
            raise StudyError(f"{path}: point {name} has family {entry.get('family')!r}, not one of {list(families)}")
        points[name] = Point(name, entry["family"], entry.get("label", name), entry.get("preset", "tiny"),
                             tuple(entry.get("set") or ()))
    bases = {}
    for name, entry in (raw.get("base_models") or {}).items():
        _keys(entry, {"label", "set"}, f"{path}: base model {name}")
        bases[name] = BaseModel(name, entry.get("label", name), tuple(entry.get("set") or ()))
    samples = int(raw.get("samples", 1000))
    jobs, trained = [], set()
    for k, entry in enumerate(raw.get("jobs") or []):
        where = f"{path}: job {k + 1} {entry}"
        kinds = [kind for kind in ("train", "eval", "base", "metric_check") if kind in entry]
        if len(kinds) != 1:
            raise StudyError(f"{where}: give exactly one of train, eval, base, metric_check")
        kind = kinds[0]
        _keys(entry, {kind, "seed", "eval_seed", "samples", "of"}, where)
        point = entry.get("of") if kind == "base" else entry.get(kind)
        if kind != "metric_check" and point not in points:
            raise StudyError(f"{where}: unknown point {point!r}")
        if kind == "base" and entry["base"] not in bases:
            raise StudyError(f"{where}: unknown base model {entry['base']!r}; expected one of {list(bases)}")
        job = Job(kind, point or "", int(entry.get("seed", 0)), int(entry.get("eval_seed", 0)),
                  int(entry.get("samples", samples)), entry["base"] if kind == "base" else "")
        if job.needs and job.needs not in trained:
            raise StudyError(f"{where}: needs `train: {job.point}` (seed {job.seed}) earlier in the jobs")
        if kind == "train":
            trained.add(job.run)
        jobs.append(job)
    eval_noise_point = raw.get("eval_noise_point", "")
    if eval_noise_point and eval_noise_point not in points:
        raise StudyError(f"{path}: eval_noise_point {eval_noise_point!r} is not a point")
    clf_sweep = {name: float(c) for name, c in (raw.get("clf_sweep") or {}).items()}
    unknown = [name for name in clf_sweep if name not in points]
    if unknown:
        raise StudyError(f"{path}: clf_sweep names unknown points {unknown}")
    return Study(str(raw["data"]), samples, eval_noise_point, families, points, bases, jobs, clf_sweep, str(path))


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


def train_settings(study: Study, job: Job) -> list[str]:
    """The ``--set`` assignments of a train or base job (data, seed, the point's and the base model's)."""
    point = study.points[job.point]
    sets = [f"data.dataset={study.data}", f"train.seed={job.seed}", *point.overrides]
    if job.kind == "base":
        sets += [*study.base_models[job.base].overrides, "train.stage1_steps=0"]
    return sets


def _record(run: Path) -> dict:
    path = run / STUDY_RECORD
    return json.loads(path.read_text()) if path.exists() else {}


def _check_settings(run: Path, settings: dict) -> None:
    """A run folder made from other settings than the study's now is refused: its scores would be mislabelled."""
    recorded = _record(run).get("settings")
    if recorded is not None and recorded != settings:
        raise StudyError(f"{run} was made with {recorded}, the study file now says {settings}: move the folder "
                         "away (or restore the study file) and run again")


def _train(run: Path, preset: str, sets: list[str], log: Path, record: dict) -> None:
    """Train (or resume) a run folder; its training time accumulates in ``record['train_s']``."""
    if record.get("trained"):
        return
    start = time.perf_counter()
    try:
        if (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("step_*")):
            cli("train", "--resume", str(run), "--no-progress", log=log)
        else:
            cli("train", "--config", preset, *[a for s in sets for a in ("--set", s)], "--out", str(run),
                "--overwrite", "--no-progress", log=log)
        record["trained"] = True
    finally:  # an interrupted attempt's time counts too
        record["train_s"] = record.get("train_s", 0.0) + time.perf_counter() - start
        write_json_atomically(run / STUDY_RECORD, record)


def _evaluate(run: Path, samples: int, seed: int, log: Path, record: dict) -> None:
    record["eval_s"] = cli("eval", "--run", str(run), "--samples", str(samples), "--seed", str(seed),
                           "--no-progress", log=log)
    write_json_atomically(run / STUDY_RECORD, record)


def prepare_base_init(source: Path, target: Path, preset: str, sets: list[str], seed: int) -> None:
    """A checkpoint folder ``target`` for ``train.init_from``: the source run's EMA encoder, prior and decoder,
    and a freshly initialised base model of the config ``preset`` + ``sets`` (its shape may differ)."""
    import torch
    from safetensors.torch import load_file

    from ul_fast.config import load_config
    from ul_fast.model import UnifiedLatents
    from ul_fast.train.checkpoint import newest_readable_checkpoint, save_checkpoint

    config = load_config(preset, sets)
    torch.manual_seed(seed)
    weights = UnifiedLatents(config.model).state_dict()
    _, trained = newest_readable_checkpoint(source, lambda folder: load_file(folder / "ema.safetensors"))
    stage1 = {k for k in trained if not k.startswith("base.")}
    if stage1 != {k for k in weights if not k.startswith("base.")}:
        raise StudyError(f"{source}'s stage 1 does not match the base job's config (only the base may differ)")
    for key in stage1:
        if trained[key].shape != weights[key].shape:
            raise StudyError(f"{source}: {key} has shape {tuple(trained[key].shape)}, the base job's config "
                             f"{tuple(weights[key].shape)}")
        weights[key] = trained[key]
    save_checkpoint(target, 0, weights, weights, {"stage": 1, "stage_step": 0, "init_for_base_job": str(source)})


def run_job(study: Study, job: Job, root: Path) -> None:
    """Do one job (resuming what an earlier, interrupted attempt left)."""
    folder = root / job.folder
    log = root / f"{job.folder}.log"
    if job.kind == "metric_check":
        from fd_degradations import degradation_scores

        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomically(root / job.result, degradation_scores(study.data))
        return
    if job.kind == "eval":
        settings = {"kind": "eval", "run": job.run, "samples": job.samples, "eval_seed": job.eval_seed}
        folder.mkdir(parents=True, exist_ok=True)
        _check_settings(folder, settings)
        source = root / job.run
        shutil.copy2(source / "config.yaml", folder / "config.yaml")
        if not (folder / "checkpoints").exists():
            shutil.copytree(source / "checkpoints", folder / "checkpoints")
        record = {**_record(folder), "settings": settings}
        _evaluate(folder, job.samples, job.eval_seed, log, record)
        return
    point = study.points[job.point]
    sets = train_settings(study, job)
    settings = {"kind": job.kind, "preset": point.preset, "set": sets}
    folder.mkdir(parents=True, exist_ok=True)
    _check_settings(folder, settings)
    record = {**_record(folder), "settings": settings}
    write_json_atomically(folder / STUDY_RECORD, record)
    if job.kind == "base":
        init = root / f"{job.folder}.init"
        sets = [*sets, f"train.init_from={init}"]
        if not (init / "checkpoints" / "latest").exists():
            prepare_base_init(root / job.run, init, point.preset, sets, job.seed)
    _train(folder, point.preset, sets, log, record)
    _evaluate(folder, job.samples, 0, log, record)


def run_study(study_file: Path, root: Path, workers: int) -> list[str]:
    """Run every job not done, ``workers`` at a time, in the study file's order (re-read after each job); a job
    waits for the training run it needs. Each session's wall time so far goes to ``ROOT/study_wall_s.json``.
    Returns the failures, one line each."""
    running: dict[str, Future] = {}
    failed: dict[str, str] = {}
    wall = root / WALL_FILE
    sessions = json.loads(wall.read_text()) if wall.exists() else []
    session = {"start": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_s": 0.0}
    sessions.append(session)
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        while True:
            study = load_study(study_file)
            pending = [j for j in study.jobs if not (root / j.result).exists() and j.folder not in running
                       and j.folder not in failed]
            for job in pending:
                if len(running) >= workers:
                    break
                if job.needs and not (root / job.needs / EVAL_FILE).exists():
                    continue  # its training run is still queued or running
                if job.needs in failed:
                    failed[job.folder] = f"{job.folder}: its run {job.needs} failed"
                    continue
                print(f"[paper_claims {time.strftime('%H:%M:%S')}] start {job.folder}", flush=True)
                running[job.folder] = pool.submit(run_job, study, job, root)
            if not running:
                return list(failed.values())
            done, _ = wait(running.values(), return_when=FIRST_COMPLETED)
            session["wall_s"] = time.perf_counter() - start
            write_json_atomically(wall, sessions)
            for name in [n for n, f in running.items() if f in done]:
                error = running.pop(name).exception()
                if error is not None:
                    failed[name] = f"{name}: {error}"
                outcome = f"failed: {error}" if error else "done"
                print(f"[paper_claims {time.strftime('%H:%M:%S')}] {name}: {outcome}", flush=True)


# ----------------------------------------------------------------------------------------------- results
def load_scores(study: Study, root: Path) -> frontiers.Scores:
    """Every finished job's scores, keyed as :class:`frontiers.Scores` expects."""
    scores = frontiers.Scores()
    for job in study.jobs:
        path = root / job.result
        if not path.exists() or job.kind == "metric_check":
            continue
        result = {**json.loads(path.read_text()), **_record(root / job.folder)}
        scores.add(job.point, seed=job.seed, samples=job.samples, eval_seed=job.eval_seed,
                   base=job.base or None, result=result)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder of the study's runs (outside git)")
    parser.add_argument("--study", default=str(STUDY_FILE), help="the study file (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="jobs at once (default 2)")
    parser.add_argument("--report", default="docs/paper_claims.md")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    try:
        study = load_study(args.study)
    except (StudyError, OSError, yaml.YAMLError) as error:
        parser.exit(2, f"paper_claims: error: {error}\n")
    data_dir = Path(study.data.partition(":")[2])
    if study.data.startswith("fmnist:") and not (data_dir / "train-images-idx3-ubyte.gz").exists():
        parser.exit(2, f"paper_claims: error: data {study.data}: {data_dir} holds no Fashion-MNIST\n")
    failures = run_study(Path(args.study), root, args.jobs) if not args.report_only else []
    study = load_study(args.study)
    from paper_claims_report import write_report

    wall = root / WALL_FILE
    check = root / "metric_check" / METRIC_CHECK_FILE
    if check.exists():  # what the degradations look like, beside the report (cheap: no features)
        from fd_degradations import save_degradation_grid

        save_degradation_grid(study.data, Path(args.report).with_name(f"{Path(args.report).stem}_degradations.png"))
    write_report(study, load_scores(study, root), root, Path(args.report),
                 metric_check=json.loads(check.read_text()) if check.exists() else None,
                 wall_s=sum(s["wall_s"] for s in json.loads(wall.read_text())) if wall.exists() else None,
                 missing=[j.folder for j in study.jobs if not (root / j.result).exists()])
    for line in failures:
        print(f"paper_claims: failed: {line}", file=sys.stderr)
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
