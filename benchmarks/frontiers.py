"""Statistics of the paper-claims study: scores by point and seed, the noise scale, rate–quality frontiers
interpolated in log-bits, and verdicts at equal bits. Pure Python on numbers (no torch), so that its rules are
tested on synthetic scores (``tests/test_benchmark_scripts.py``).

**Noise.** For a metric, σ of one run's score is the larger of (a) the standard deviation over training seeds,
pooled over the points of a family that have several seeds (pooled variance ``Σ Σ (x − x̄)² / Σ (k − 1)``), and
(b) the standard deviation of one run's score over evaluation seeds (other samples and noise, same weights). A
family without seeds of its own takes the largest σ of those with them. The first study's rule is the special case
of one point with seeds: a difference of two single runs counts when it exceeds ``t(0.975, ν) · σ · √2``.

**Frontier.** A family's frontier for a metric is the piecewise-linear curve, in log(bits/pixel), through the mean
scores (over training seeds) of all its points in order of bits: the quality its settings give at each rate,
including settings that give more bits for worse quality (that is where a base model becomes the bottleneck).

**Equal bits.** Two frontiers are compared where both are defined: at every point of either family inside the
overlap of their bit ranges, one frontier's value there against the other's interpolated value. An interpolated
value ``w·y₁ + (1 − w)·y₂`` of means over k₁ and k₂ seeds has variance ``σ²·(w²/k₁ + (1 − w)²/k₂)``, so a
difference counts when it exceeds ``t(0.975, ν) · √(σ_a²·c_a + σ_b²·c_b)``, ν the smaller of the two σ's degrees
of freedom (for single runs at the same bits: the rule above). The uncertainty of the bits themselves (a few per
cent over seeds) is not propagated.

**Sweeps.** Along one family's sweep (the trends of c_lf, an interior optimum), two means over k₁ and k₂ seeds
differ significantly beyond ``t(0.975, ν) · σ · √(1/k₁ + 1/k₂)``.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass

# Student t 0.975 quantiles by degrees of freedom; above 30 the value at 30 (slightly conservative).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
BITS = "bits_per_pixel_base"  # the rate axis: bits/pixel under the base model, comparable across every family
METRICS = ("bits_per_pixel_prior", BITS, "psnr", "rfd", "gfd", "rkid", "gkid")
LOWER_IS_BETTER = {"rfd": True, "gfd": True, "rkid": True, "gkid": True, "psnr": False}

INCONCLUSIVE = "inconclusive at this scale"


def t975(dof: int) -> float:
    """The 0.975 quantile of Student's t with ``dof`` ≥ 1 degrees of freedom."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    return T_975[min(dof, len(T_975)) - 1]


def verdict(difference: float, threshold: float, claimed_sign: int) -> str:
    """A difference (b − a) against the claim that its sign is ``claimed_sign``, at the noise threshold."""
    if threshold != threshold:  # nan: no spread measured yet
        return "inconclusive (no seed spread)"
    if abs(difference) <= threshold:
        return INCONCLUSIVE
    return "reproduced" if difference * claimed_sign > 0 else "not reproduced"


# ----------------------------------------------------------------------------------------------- scores
class Scores:
    """Evaluation records by (point, training seed, samples, evaluation seed, base model)."""

    def __init__(self) -> None:
        self.records: dict[tuple, dict] = {}

    def add(self, point: str, *, seed: int, samples: int, eval_seed: int = 0, base: str | None = None,
            result: dict) -> None:
        self.records[(point, seed, samples, eval_seed, base)] = result

    def seeds(self, point: str, samples: int, base: str | None = None) -> list[dict]:
        """The records of a point's training seeds (evaluation seed 0), seed order."""
        found = [(k[1], r) for k, r in self.records.items()
                 if k[0] == point and k[2] == samples and k[3] == 0 and k[4] == base]
        return [r for _, r in sorted(found, key=lambda item: item[0])]

    def eval_seeds(self, point: str, samples: int) -> list[dict]:
        """Training seed 0 of a point under every evaluation seed scored (the evaluation's own noise)."""
        found = [(k[3], r) for k, r in self.records.items()
                 if k[0] == point and k[1] == 0 and k[2] == samples and k[4] is None]
        return [r for _, r in sorted(found, key=lambda item: item[0])]

    def mean(self, point: str, metric: str, samples: int, base: str | None = None) -> tuple[float, int] | None:
        """``(mean over training seeds, number of seeds)`` or None when not measured."""
        values = [r[metric] for r in self.seeds(point, samples, base) if r.get(metric) is not None]
        return (statistics.fmean(values), len(values)) if values else None


# ----------------------------------------------------------------------------------------------- noise
@dataclass(frozen=True)
class Noise:
    """σ of one run's score and its degrees of freedom; ``source`` says where it came from."""

    sigma: float
    dof: int
    source: str

    @property
    def measured(self) -> bool:
        return self.sigma == self.sigma and self.dof >= 1


NO_NOISE = Noise(float("nan"), 0, "no spread measured")


def pooled_sd(groups: list[list[float]]) -> tuple[float, int]:
    """Pooled standard deviation of groups (those with ≥ 2 values) and its degrees of freedom Σ(k − 1);
    ``(nan, 0)`` when no group has two values."""
    squares, dof = 0.0, 0
    for values in groups:
        if len(values) >= 2:
            mean = statistics.fmean(values)
            squares += sum((v - mean) ** 2 for v in values)
            dof += len(values) - 1
    return (math.sqrt(squares / dof), dof) if dof else (float("nan"), 0)


def family_noise(scores: Scores, families: dict[str, list[str]], metric: str, samples: int,
                 eval_point: str | None, base: str | None = None) -> dict[str, Noise]:
    """σ per family for ``metric`` (see the module docstring): the larger of its pooled training-seed spread and
    the evaluation-seed spread of ``eval_point``; families without seeds take the largest σ measured. ``base``:
    the spread of the runs of that base model (evaluation seeds are scored under the preset's base only)."""
    evals = [r[metric] for r in scores.eval_seeds(eval_point, samples)] if eval_point and base is None else []
    evals = [v for v in evals if v is not None]
    eval_noise = Noise(statistics.stdev(evals), len(evals) - 1, f"{len(evals)} evaluation seeds") \
        if len(evals) >= 2 else NO_NOISE
    table = {}
    for family, points in families.items():
        groups = [[r[metric] for r in scores.seeds(p, samples, base) if r.get(metric) is not None] for p in points]
        sd, dof = pooled_sd(groups)
        seeds = Noise(sd, dof, f"training seeds ({dof} degrees of freedom)") if dof else NO_NOISE
        candidates = [n for n in (seeds, eval_noise) if n.measured]
        table[family] = max(candidates, key=lambda n: n.sigma) if candidates else NO_NOISE
    measured = [n for n in table.values() if n.measured and n.source.startswith("training")]
    if measured:
        widest = max(measured, key=lambda n: n.sigma)
        for family, n in table.items():
            has_seeds = any(len(scores.seeds(p, samples, base)) >= 2 for p in families[family])
            if not has_seeds and widest.sigma > (n.sigma if n.measured else -1):
                table[family] = Noise(widest.sigma, widest.dof, "the widest family's training seeds (none of its own)")
    return table


# ----------------------------------------------------------------------------------------------- frontiers
@dataclass(frozen=True)
class FrontierPoint:
    name: str
    bits: float
    value: float
    seeds: int


def interpolate(curve: list[FrontierPoint], bits: float) -> tuple[float, float] | None:
    """The curve's value at ``bits`` (linear in log-bits between neighbours) and its variance factor
    ``Σ wᵢ²/kᵢ`` (variance = σ² times it); None outside the curve's bit range."""
    if not curve or bits < curve[0].bits * (1 - 1e-12) or bits > curve[-1].bits * (1 + 1e-12):
        return None
    for p in curve:
        if math.isclose(p.bits, bits, rel_tol=1e-12):
            return p.value, 1 / p.seeds
    for a, b in zip(curve, curve[1:]):
        if a.bits <= bits <= b.bits:
            w = (math.log(b.bits) - math.log(bits)) / (math.log(b.bits) - math.log(a.bits))
            return w * a.value + (1 - w) * b.value, w * w / a.seeds + (1 - w) ** 2 / b.seeds
    return None


@dataclass(frozen=True)
class Comparison:
    bits: float
    a: float
    b: float
    threshold: float
    verdict: str


def compare_at_equal_bits(curve_a: list[FrontierPoint], curve_b: list[FrontierPoint], noise_a: Noise,
                          noise_b: Noise, claimed_sign: int) -> list[Comparison]:
    """b − a at every point of either curve inside their overlap in bits, with its verdict (the claim: the
    difference has sign ``claimed_sign``); empty when the bit ranges do not overlap."""
    if not curve_a or not curve_b:
        return []
    low, high = max(curve_a[0].bits, curve_b[0].bits), min(curve_a[-1].bits, curve_b[-1].bits)
    rows = []
    for bits in sorted({p.bits for p in curve_a + curve_b if low <= p.bits <= high}):
        (a, ca), (b, cb) = interpolate(curve_a, bits), interpolate(curve_b, bits)
        if noise_a.measured and noise_b.measured:
            spread = math.sqrt(noise_a.sigma ** 2 * ca + noise_b.sigma ** 2 * cb)
            threshold = t975(min(noise_a.dof, noise_b.dof)) * spread
        else:
            threshold = float("nan")
        rows.append(Comparison(bits, a, b, threshold, verdict(b - a, threshold, claimed_sign)))
    return rows


def overall_verdict(rows: list[Comparison]) -> str:
    """One verdict for a claim checked at several bit rates: reproduced (or not) where some rate decides and
    none decides the other way; both ways: says where each holds; none decides: inconclusive."""
    if not rows:
        return "not comparable (the frontiers do not overlap in bits)"
    yes = [r for r in rows if r.verdict == "reproduced"]
    no = [r for r in rows if r.verdict == "not reproduced"]
    if yes and no:
        return (f"mixed: reproduced at {', '.join(f'{r.bits:.3g}' for r in yes)} bits/pixel, not reproduced at "
                f"{', '.join(f'{r.bits:.3g}' for r in no)}")
    if yes:
        return "reproduced" + ("" if len(yes) == len(rows) else f" (at {len(yes)} of {len(rows)} rates; "
                                                                "inconclusive at the others)")
    if no:
        return "not reproduced" + ("" if len(no) == len(rows) else f" (at {len(no)} of {len(rows)} rates; "
                                                                   "inconclusive at the others)")
    return rows[0].verdict if all(r.verdict == rows[0].verdict for r in rows) else INCONCLUSIVE


def overlap_factor(curve_a: list[FrontierPoint], curve_b: list[FrontierPoint]) -> float:
    """High over low end of the two curves' common bit range (< 1: no overlap; the issue asks for ≥ 3)."""
    if not curve_a or not curve_b:
        return 0.0
    return min(curve_a[-1].bits, curve_b[-1].bits) / max(curve_a[0].bits, curve_b[0].bits)


# ----------------------------------------------------------------------------------------------- sweeps
def pair_threshold(noise: Noise, seeds_a: int, seeds_b: int) -> float:
    """The smallest significant difference of two means over ``seeds_a`` and ``seeds_b`` runs:
    ``t(0.975, ν) · σ · √(1/k_a + 1/k_b)`` (for single runs the first study's ``t · σ · √2``); nan unmeasured."""
    if not noise.measured:
        return float("nan")
    return t975(noise.dof) * noise.sigma * math.sqrt(1 / seeds_a + 1 / seeds_b)


def monotone_verdict(values: list[float], seeds: list[int], noise: Noise, sign: int) -> str:
    """A metric rising (sign +1) or falling (−1) along a sweep of means (over ``seeds`` runs each): end to end,
    and no step significantly against it."""
    if len(values) < 2:
        return "not measured"
    steps = zip(values, values[1:], seeds, seeds[1:])
    if any((b - a) * sign < -pair_threshold(noise, ka, kb) for a, b, ka, kb in steps):
        return "not reproduced (a step of the sweep goes the other way)"
    return verdict(values[-1] - values[0], pair_threshold(noise, seeds[0], seeds[-1]), sign)


def optimum_verdict(values: list[float], seeds: list[int], noise: Noise) -> str:
    """A (lower-is-better) metric has an interior optimum along a sweep of means (over ``seeds`` runs each): the
    best point is not an end and beats both ends significantly; the best at an end, significantly better than the
    other end: not reproduced."""
    if len(values) < 3:
        return "not measured"
    best = min(range(len(values)), key=values.__getitem__)
    last = len(values) - 1
    if 0 < best < last and all(values[i] - values[best] > pair_threshold(noise, seeds[i], seeds[best])
                               for i in (0, last)):
        return "reproduced"
    if best in (0, last) and abs(values[0] - values[last]) > pair_threshold(noise, seeds[0], seeds[last]):
        return f"not reproduced (the best is at the {'first' if best == 0 else 'last'} point)"
    return INCONCLUSIVE


def group_by_family(points: dict[str, str]) -> dict[str, list[str]]:
    """``{point: family}`` → ``{family: [points]}`` (first-seen order)."""
    families: dict[str, list[str]] = defaultdict(list)
    for point, family in points.items():
        families[family].append(point)
    return dict(families)
