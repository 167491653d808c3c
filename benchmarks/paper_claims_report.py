"""The report of the paper-claims study (``benchmarks/paper_claims.py``): tables per family, the frontier plot,
the verdicts at equal bits, the c_lf sweep under the preset's and under a weaker base model, and the metric
check; then the interpretation a person wrote after reading the numbers (``<report>.notes.md``), if any.
Every number comes from the runs' ``eval.json`` files; the statistics from ``frontiers.py``."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import frontiers
from frontiers import BITS, FrontierPoint, Noise

REPORTED = ("bits_per_pixel_prior", BITS, "psnr", "rfd", "gfd", "gkid")
NAMES = {"bits_per_pixel_prior": "bits/pixel (prior)", BITS: "bits/pixel (base)", "psnr": "PSNR dB", "rfd": "rFD",
         "gfd": "gFD", "gkid": "gKID ×10³", "rkid": "rKID ×10³"}
SCALE = {"gkid": 1e3, "rkid": 1e3}

# The claims compared at equal bits: (family a, family b, metric, claimed sign of b − a, what is claimed).
EQUAL_BITS_CLAIMS = (
    ("ul", "vae_ldm", "gfd", +1, "UL generates better than the two-stage VAE + LDM (gFD; the headline)"),
    ("ul", "vae_ldm", "gkid", +1, "the same in KID (gKID)"),
    ("ul", "normal_prior", "gfd", +1, "a N(0, I) prior generates worse than the diffusion prior (gFD; Tab. 5)"),
    ("ul", "mse_decoder", "gfd", +1, "an MSE decoder generates worse than the diffusion decoder (gFD; Tab. 5)"),
    ("ul", "mse_decoder", "rfd", +1, "an MSE decoder reconstructs worse in FD (rFD; Tab. 5)"),
    ("ul", "single_stage", "gfd", +1, "single-stage generates worse than two-stage (gFD; App. B)"),
    ("ul", "stop_grad", "gfd", +1, "a stop-gradient prior generates worse (gFD; Tab. 6 A)"),
    ("ul", "logsnr10", "psnr", -1, "λ_z(0) = 10 reconstructs worse (PSNR; Tab. 6 B)"),
    ("ul", "logsnr10", "gfd", +1, "λ_z(0) = 10 generates worse (gFD; Tab. 6 B)"),
)


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def _values(scores: frontiers.Scores, point: str, metric: str, samples: int, base: str | None = None) -> list[float]:
    return [r[metric] * SCALE.get(metric, 1) for r in scores.seeds(point, samples, base) if r.get(metric) is not None]


def _cell(values: list[float], digits: int) -> str:
    """Mean, and ± the standard deviation over training seeds when there are several."""
    if not values:
        return "–"
    if len(values) == 1:
        return fmt(values[0], digits)
    return f"{fmt(statistics.fmean(values), digits)} ± {fmt(statistics.stdev(values), digits)}"


def curve(scores: frontiers.Scores, points: list[str], metric: str, samples: int,
          base: str | None = None) -> list[FrontierPoint]:
    """A family's measured points as (bits under the preset's base model, mean metric, seeds), by bits."""
    found = []
    for name in points:
        values = _values(scores, name, metric, samples, base)
        bits = [r[BITS] for r in scores.seeds(name, samples, None)]
        if values and bits:
            found.append(FrontierPoint(name, statistics.fmean(bits), statistics.fmean(values), len(values)))
    return sorted(found, key=lambda p: p.bits)


def scaled(noise: Noise, metric: str) -> Noise:
    return Noise(noise.sigma * SCALE.get(metric, 1), noise.dof, noise.source)


def _noise_tables(study, scores, samples: int) -> dict[str, dict[str, Noise]]:
    families = frontiers.group_by_family({p.name: p.family for p in study.points.values()})
    return {m: {f: scaled(n, m) for f, n in frontiers.family_noise(
        scores, families, m, samples, study.eval_noise_point).items()}
        for m in (*REPORTED, "rkid")}


def plot(study, scores, metric_check: dict | None, samples: int, path: Path) -> None:
    """gFD, rFD, PSNR and gKID against bits/pixel per family (log x; seeds small, means large, frontier lines);
    gFD of the c_lf sweep under each base model; FD of blurred and noisy test sets against their PSNR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = frontiers.group_by_family({p.name: p.family for p in study.points.values()})
    colours = {f: f"C{k}" for k, f in enumerate(study.families)}
    fig, axes = plt.subplots(2, 3, figsize=(16, 9.5))
    for axis, metric in zip(axes.flat, ("gfd", "rfd", "psnr", "gkid")):
        for family, points in families.items():
            colour = colours[family]
            for name in points:
                for r in scores.seeds(name, samples):
                    axis.scatter(r[BITS], r[metric] * SCALE.get(metric, 1), s=10, color=colour, alpha=0.5)
            line = curve(scores, points, metric, samples)
            if line:
                axis.plot([p.bits for p in line], [p.value for p in line], marker="o", color=colour, alpha=0.8,
                          label=study.families[family])
        axis.set_xscale("log")
        axis.set_xlabel("bits/pixel under the base model")
        axis.set_title(NAMES[metric] + (" (lower is better)" if frontiers.LOWER_IS_BETTER[metric] else ""))
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)  # below every panel
    axis = axes[1, 1]
    ul = [p.name for p in study.points.values() if p.family == "ul"]
    for k, base in enumerate([None, *study.base_models]):
        found = [(scores.mean(p, BITS, samples), scores.mean(p, "gfd", samples, base)) for p in ul]
        found = sorted((b[0], g[0]) for b, g in found if b and g)
        if found:
            label = "preset's base model" if base is None else study.base_models[base].label
            axis.plot(*zip(*found), marker="o", color=f"C{k}", label=label)
    axis.set_xscale("log")
    axis.set_xlabel("bits/pixel under the preset's base model")
    axis.set_title("UL: gFD by base model (the bottleneck)")
    axis.legend(fontsize=7)
    axis = axes[1, 2]
    if metric_check:
        for kind, marker in (("blur", "o"), ("noise", "s")):
            rows = [r for r in metric_check["rows"] if r["kind"] == kind]
            axis.plot([r["psnr"] for r in rows], [r["fd"] for r in rows], marker=marker, label=kind)
            for r in rows:
                axis.annotate(f"{r['strength']:g}", (r["psnr"], r["fd"]), fontsize=7)
        axis.legend(fontsize=7)
    axis.set_xlabel("PSNR of the degraded test set (dB)")
    axis.set_title("FD against the clean test set (blur σ px / noise std)")
    fig.suptitle(f"Fashion-MNIST 32×32, tiny scale, equal compute per run; {samples} samples per score")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def family_table(study, scores, family: str, samples: int) -> list[str]:
    points = [p for p in study.points.values() if p.family == family]
    lines = ["| setting | seeds | " + " | ".join(NAMES[m] for m in REPORTED) + " | train min |",
             "| --- | --- | " + " | ".join("---" for _ in REPORTED) + " | --- |"]
    for point in points:
        runs = scores.seeds(point.name, samples)
        if not runs:
            continue
        digits = {"bits_per_pixel_prior": 4, BITS: 4, "psnr": 2}
        cells = [_cell(_values(scores, point.name, m, samples), digits.get(m, 2)) for m in REPORTED]
        minutes = statistics.fmean(r.get("train_s", float("nan")) for r in runs) / 60
        lines.append(f"| {point.label} | {len(runs)} | " + " | ".join(cells) + f" | {minutes:.0f} |")
    return lines


def equal_bits_section(study, scores, noise, samples: int) -> tuple[list[str], list[dict]]:
    families = frontiers.group_by_family({p.name: p.family for p in study.points.values()})
    lines, verdicts = [], []
    for a, b, metric, sign, what in EQUAL_BITS_CLAIMS:
        if a not in families or b not in families:
            continue
        curve_a = curve(scores, families[a], metric, samples)
        curve_b = curve(scores, families[b], metric, samples)
        if not curve_a or not curve_b:
            lines += [f"**{what}**: not measured (runs missing).", ""]
            verdicts.append({"claim": what, "verdict": "not measured"})
            continue
        rows = frontiers.compare_at_equal_bits(curve_a, curve_b, noise[metric][a], noise[metric][b], sign)
        overall = frontiers.overall_verdict(rows)
        factor = frontiers.overlap_factor(curve_a, curve_b)
        verdicts.append({"claim": what, "verdict": overall, "overlap_factor": factor,
                         "rows": [r.__dict__ for r in rows]})
        ranges = (f"{study.families[a].split(' (')[0]} {fmt(curve_a[0].bits, 4)}–{fmt(curve_a[-1].bits, 4)}, "
                  f"{study.families[b].split(' (')[0]} {fmt(curve_b[0].bits, 4)}–{fmt(curve_b[-1].bits, 4)} "
                  "bits/pixel")
        lines += [f"**{what}**: **{overall}** (frontiers {ranges}; overlap ×{factor:.2f})", ""]
        if rows:
            lines += [f"| bits/pixel | {a} | {b} | {b} − {a} | threshold | verdict |",
                      "| --- | --- | --- | --- | --- | --- |",
                      *[f"| {fmt(r.bits, 4)} | {fmt(r.a, 2)} | {fmt(r.b, 2)} | {r.b - r.a:+.2f} | "
                        f"{fmt(r.threshold, 2)} | {r.verdict} |" for r in rows], ""]
    return lines, verdicts


def sweep_section(study, scores, noise, samples: int) -> list[str]:
    """The UL points by bits under every base model, the c_lf sweep's trends, and the gFD optimum per base."""
    ul = sorted((p for p in study.points.values() if p.family == "ul" and scores.seeds(p.name, samples)),
                key=lambda p: scores.mean(p.name, BITS, samples)[0])
    if not ul:
        return ["Not measured yet.", ""]
    bases = list(study.base_models)
    lines = ["| setting | bits/pixel (base) | PSNR dB | rFD | gFD (preset base) | "
             + " | ".join(f"gFD ({b} base)" for b in bases)
             + "".join(f" | bits/pixel under {b}" for b in bases) + " |",
             "| --- " * (5 + 2 * len(bases)) + "|"]
    for point in ul:
        mean = [scores.mean(point.name, m, samples) for m in (BITS, "psnr", "rfd", "gfd")]
        weak = [scores.mean(point.name, "gfd", samples, b) for b in bases]
        weak_bits = [scores.mean(point.name, BITS, samples, b) for b in bases]
        lines.append(f"| {point.label} | " + " | ".join(fmt(m[0] if m else None, d) for m, d in zip(mean, (4, 2, 2, 2)))
                     + "".join(f" | {fmt(w[0] if w else None, 2)}" for w in weak)
                     + "".join(f" | {fmt(w[0] if w else None, 4)}" for w in weak_bits) + " |")
    lines.append("")
    sweep = [(p, c) for p, c in sorted(study.clf_sweep.items(), key=lambda item: item[1]) if scores.seeds(p, samples)]
    for metric, sign, what in ((BITS, +1, "bits/pixel rise with c_lf"), ("psnr", +1, "PSNR rises with c_lf"),
                               ("rfd", -1, "rFD falls with c_lf")):
        means = [scores.mean(p, metric, samples) for p, _ in sweep]
        values, seeds = [m[0] for m in means], [m[1] for m in means]
        n = noise[metric]["ul"]
        shown = ", ".join(f"{c:g}: {fmt(v, 3)}{_seeds(k)}" for (_, c), v, k in zip(sweep, values, seeds))
        lines.append(f"- {what} ({shown}; σ {fmt(n.sigma)}, ν {n.dof}): "
                     f"**{frontiers.monotone_verdict(values, seeds, n, sign)}**")
    # The optimum along the c_lf sweep alone (one latent shape, the paper's Tab. 2) and along every UL setting
    # by bits (more channels reach rates c_lf alone does not).
    sweeps = (("the c_lf sweep", [study.points[p] for p, _ in sweep]), ("every UL setting by bits", ul))
    for base in [None, *bases]:
        sigma = sweep_noise(study, scores, noise, samples, base)
        name = "the preset's base model" if base is None else f"base model `{base}` ({study.base_models[base].label})"
        for what, points in sweeps:
            found = [(scores.mean(p.name, BITS, samples)[0], scores.mean(p.name, "gfd", samples, base))
                     for p in points]
            found = [(bits, m[0], m[1]) for bits, m in found if m]
            values = ", ".join(f"{bits:.3f}: {fmt(v, 2)}{_seeds(k)}" for bits, v, k in found)
            verdict = frontiers.optimum_verdict([v for _, v, _ in found], [k for _, _, k in found], sigma)
            lines.append(f"- gFD has an interior optimum along {what} under {name} (bits/pixel: gFD {values}; "
                         f"σ {fmt(sigma.sigma, 2)}, ν {sigma.dof}, {sigma.source}): **{verdict}**")
    return lines + [""]


def _in_repository(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (the report is committed), else as given."""
    repository = Path(__file__).resolve().parents[1]
    try:
        return str(Path(path).resolve().relative_to(repository))
    except ValueError:
        return path


def _rule(name: str) -> str:
    """The paragraph ``**NAME.** …`` of ``frontiers``' docstring (the statistics' rules, written once), one line."""
    text = frontiers.__doc__.split(f"**{name}.**")[1]
    return text.split("\n\n")[0].strip().replace("\n", " ")


def _seeds(k: int) -> str:
    return f" ({k} seeds)" if k > 1 else ""


def sweep_noise(study, scores, noise, samples: int, base: str | None) -> Noise:
    """σ of one UL run's gFD under ``base`` (None: the preset's): UL's σ, or the base model's own pooled seed
    spread when that is larger (a weaker base model may be noisier; never taken smaller than the preset's)."""
    sigma = noise["gfd"]["ul"]
    if base is None:
        return sigma
    points = [p.name for p in study.points.values() if p.family == "ul"]
    own = frontiers.family_noise(scores, {"ul": points}, "gfd", samples, None, base=base)["ul"]
    if own.measured and (not sigma.measured or own.sigma > sigma.sigma):
        return Noise(own.sigma, own.dof, f"base `{base}`'s {own.source}")
    return sigma


def metric_check_section(check: dict | None, grid: str) -> list[str]:
    """The metric check's table, the floor, and the picture of the degradations (``grid``, beside the report)."""
    if not check:
        return ["Not measured yet.", ""]
    lines = ["| degradation | strength | PSNR dB | FD | KID ×10³ |", "| --- | --- | --- | --- | --- |"]
    for r in check["rows"]:
        unit = "σ px" if r["kind"] == "blur" else "std"
        lines.append(f"| {r['kind']} | {r['strength']:g} {unit} | {r['psnr']:.1f} | {r['fd']:.2f} | "
                     f"{r['kid'] * 1e3:.2f} |")
    floor = ", ".join(f"{k.replace('_', ' ')}: FD {v['fd']:.2f}, KID×10³ {v['kid'] * 1e3:.2f}"
                      for k, v in check["floor"].items())
    strengths = {kind: ", ".join(f"{r['strength']:g}" for r in check["rows"] if r["kind"] == kind)
                 for kind in ("blur", "noise")}
    return lines + ["", f"Floor (clean against clean, other images): {floor}.", "",
                    f"![8 held-out images by row: clean; blurred at σ {strengths['blur']} px; with noise of std "
                    f"{strengths['noise']}]({grid})", ""]


def write_report(study, scores: frontiers.Scores, root: Path, out: Path, *, metric_check: dict | None,
                 wall_s: float | None, missing: list[str]) -> None:
    samples = study.samples
    noise = _noise_tables(study, scores, samples)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(study, scores, metric_check, samples, out.with_suffix(".png"))
    equal_lines, verdicts = equal_bits_section(study, scores, noise, samples)
    versions = next((r.get("versions") for r in scores.records.values()), {})
    reference = next((r.get("reference_images") for r in scores.records.values()), "?")
    compact = {"study": str(study.source), "samples": samples, "noise": {m: {f: n.__dict__ for f, n in t.items()}
                                                                         for m, t in noise.items()},
               "verdicts": verdicts, "metric_check": metric_check,
               "runs": [{"point": k[0], "seed": k[1], "samples": k[2], "eval_seed": k[3], "base": k[4],
                         **{m: r.get(m) for m in (*REPORTED, "rkid", "train_s", "eval_s")}}
                        for k, r in sorted(scores.records.items(), key=lambda item: str(item[0]))]}
    (out.parent / "data").mkdir(exist_ok=True)
    (out.parent / "data" / f"{out.stem}.json").write_text(json.dumps(compact, indent=1, default=str) + "\n")
    lines = [
        "# The paper's claims at equal bits, measured on Fashion-MNIST",
        "",
        f"Written by `benchmarks/paper_claims.py` from the study file `{_in_repository(study.source)}` and the runs "
        f"in `{root}` "
        f"({time.strftime('%Y-%m-%d')}): {len(scores.records)} scored runs. Data `{study.data}` ({reference} "
        "training images behind every gFD). Every point is the `tiny` preset (or the variant named) at equal "
        "compute: batch 64, 1,700 stage-1 + 600 stage-2 steps (single-stage: 2,300 joint steps). Scores from "
        "`ul-fast eval`: "
        f"{samples} held-out reconstructions and {samples} class-balanced samples, DDIM 32 + 32 steps, guidance 2, "
        "Fashion-MNIST classifier features (FD and KID in its 256-d feature space, not Inception FID). The rate is "
        "bits/pixel under the base model (the same unweighted latent ELBO for every family, comparable across "
        f"them). Software: {versions}; CPU: 2 cores shared with other work, two runs at a time, one thread each, "
        "at nice 19" + (f"; the study's wall time so far: {wall_s / 3600:.1f} h." if wall_s else "."),
        "",
        "Missing (queued but not run when this was written): " + (", ".join(missing) if missing else "none") + ".",
        "",
        "## Noise and the rule for a verdict",
        "",
        _rule("Noise"),
        "",
        "| metric | " + " | ".join(study.families) + " |",
        "| --- | " + " | ".join("---" for _ in study.families) + " |",
        *[f"| {NAMES[m]} | " + " | ".join(
            f"{fmt(noise[m][f].sigma, 4)} (ν {noise[m][f].dof})" if f in noise[m] else "–" for f in study.families)
          + " |" for m in REPORTED],
        "",
        "σ per family (ν: degrees of freedom); a family with no seeds of its own takes the widest family's σ.",
        "",
        "## Rate–quality frontiers",
        "",
        _rule("Frontier"),
        "",
        f"![gFD, rFD, PSNR and gKID against bits/pixel; the bottleneck sweep; the metric check]"
        f"({out.with_suffix('.png').name})",
        "",
    ]
    for family, title in study.families.items():
        table = family_table(study, scores, family, samples)
        if len(table) > 2:
            lines += [f"### {title}", "", *table, ""]
    lines += [
        "## Verdicts at equal bits",
        "",
        _rule("Equal bits"),
        "",
        *equal_lines,
        "## The loss-factor sweep and the base-model bottleneck (paper Tab. 2)",
        "",
        "The UL points by bits/pixel (under the preset's base model). The weaker base model is trained from scratch "
        "(stage 2 alone) on each point's frozen stage 1, so only the base model differs from the preset's column; "
        "the weak base's own rate estimate is the last column. The c_lf trends use the 4-channel points. A weak "
        "base model's gFD is judged with the larger of UL's σ and the spread of its own runs over seeds (where a "
        "point's stage 1 was trained with several seeds, the base is trained on each). "
        + _rule("Sweeps"),
        "",
        *sweep_section(study, scores, noise, samples),
        "## A second opinion on the metric: what the classifier's FD rewards",
        "",
        "The held-out set degraded on purpose, against the clean held-out set (`benchmarks/fd_degradations.py`): a "
        "Gaussian blur of known width (what a posterior-mean decoder produces) and added Gaussian noise (texture "
        "that is not in the data), each with its PSNR.",
        "",
        *metric_check_section(metric_check, f"{out.stem}_degradations.png"),
    ]
    notes = out.with_suffix(".notes.md")
    if notes.exists():  # the interpretation, written by a person after reading the numbers
        lines += [notes.read_text().rstrip(), ""]
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
