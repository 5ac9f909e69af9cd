"""The statistical tests behind a rollout decision: canary against stable.

Each comparison has two one-sided tests with opposite roles:

- a *rollback* test: "the canary is worse than stable" (no margin). Its null hypothesis is a
  canary as good as stable, so `rollout.false_rollback` bounds how often such a canary is
  rolled back.
- a *non-inferiority* test: "the canary is worse than stable by the margin or more" is
  rejected. Its null hypothesis is a canary that is worse by at least the margin, so
  `rollout.false_promotion` bounds how often such a canary advances.

A canary between equal and the margin is in the indifference zone: either outcome is fine.

The decision is taken again and again on growing data (one look per interval), so each
rate is spent over `rollout.max_looks` looks by Bonferroni: every look tests at rate /
max_looks. That holds for any timing of the looks and needs no state between them (a
Pocock or O'Brien-Fleming boundary needs the information fraction of each look). The
rollback rate is also split over the tests that can roll back, since any one of them
does; the promotion rate is not, since advancing needs every test to pass.

Pure numpy/scipy; `decide` takes the per-version figures and the rollout config.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from scipy import stats
from scipy.special import gammaln

ROLLBACK, PASS, INCONCLUSIVE, NO_DATA = "rollback", "pass", "inconclusive", "not enough data"


def wilson(k: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of k successes in n, with normal quantile z (one side each)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z / den * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe(k1: int, n1: int, k2: int, n2: int, z: float) -> tuple[float, float]:
    """Newcombe's hybrid score interval (method 10) of p1 - p2, from the two Wilson intervals."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, z)
    l2, u2 = wilson(k2, n2, z)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def restricted_mle(x1: int, n1: int, x2: int, n2: int, delta: float) -> tuple[float, float]:
    """Maximum-likelihood (p1, p2) of two binomials under p1 - p2 = delta: Farrington and
    Manning's closed form, the one root of the score equation's cubic in range."""
    p1, p2, t = x1 / n1, x2 / n2, n2 / n1
    a = 1 + t
    b = -(1 + t + p1 + t * p2 + delta * (t + 2))
    c = delta * delta + delta * (2 * p1 + t + 1) + p1 + t * p2
    d = -p1 * delta * (1 + delta)
    v = b ** 3 / (27 * a ** 3) - b * c / (6 * a * a) + d / (2 * a)
    u = math.copysign(math.sqrt(max(b * b / (9 * a * a) - c / (3 * a), 0.0)), v)
    w = (math.pi + math.acos(max(-1.0, min(1.0, v / u ** 3)))) / 3 if u else math.pi / 2
    r1 = min(1.0, max(0.0, 2 * u * math.cos(w) - b / (3 * a), delta))
    return r1, min(1.0, max(0.0, r1 - delta))


def farrington_manning(x1: int, n1: int, x2: int, n2: int, margin: float) -> tuple[float, float]:
    """Non-inferiority of a rate that should be low: H0 p1 - p2 >= margin against p1 - p2 < margin.

    Farrington and Manning's score test: the variance is taken at the restricted MLE under
    p1 - p2 = margin, so zero counts (no errors at all) still give a finite, valid z.
    Returns (z, one-sided p-value).
    """
    r1, r2 = restricted_mle(x1, n1, x2, n2, margin)
    var = r1 * (1 - r1) / n1 + r2 * (1 - r2) / n2
    z = (x1 / n1 - x2 / n2 - margin) / math.sqrt(var) if var > 0 else (-math.inf if x1 / n1 - x2 / n2 < margin else math.inf)
    return z, 1.0 - _norm_sf(z) if z > 0 else _norm_sf(-z)


def fisher_greater(x1: int, n1: int, x2: int, n2: int) -> float:
    """One-sided exact p-value of p1 > p2 (Fisher's test, conditional on the total count):
    the hypergeometric upper tail, summed directly (scipy's `hypergeom.sf` costs ten times
    more a call, and the rollout simulation calls this tens of thousands of times)."""
    n, k = n1 + n2, x1 + x2
    ks = np.arange(x1, min(n1, k) + 1)
    if not len(ks):
        return 0.0
    logp = (_lchoose(k, ks) + _lchoose(n - k, n1 - ks)) - _lchoose(n, n1)
    return float(min(1.0, np.exp(logp).sum()))


def _lchoose(n: Any, k: Any) -> Any:
    return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)


def _norm_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


def mann_whitney(x: np.ndarray, y: np.ndarray, alternative: str) -> tuple[float, float]:
    """One-sided Mann-Whitney U of x against y: "greater" (x stochastically larger) or "less".

    Normal approximation with tie and continuity corrections, as scipy's `mannwhitneyu(...,
    method="asymptotic")`, by sorting each sample and counting with binary search (scipy's
    costs milliseconds a call on a few thousand values, and the rollout simulation calls it
    tens of thousands of times). Returns (U / (n_x n_y), an estimate of P(x > y) + P(x = y) / 2;
    p-value). All values tied carries no evidence: p = 1.
    """
    n1, n2 = len(x), len(y)
    n = n1 + n2
    xs, ys = np.sort(x), np.sort(y)
    below, upto = np.searchsorted(ys, xs, "left"), np.searchsorted(ys, xs, "right")
    u1 = float(below.sum()) + 0.5 * float((upto - below).sum())  # pairs x > y, ties half
    tie = 0.0
    if (upto > below).any() or (xs[1:] == xs[:-1]).any() or (ys[1:] == ys[:-1]).any():
        s = np.sort(np.concatenate([xs, ys]))  # tie groups over both samples
        cut = np.flatnonzero(s[1:] != s[:-1]) + 1
        t = np.diff(np.concatenate(([0], cut, [n]))).astype(float)
        tie = float((t ** 3 - t).sum())
    var = n1 * n2 / 12 * ((n + 1) - tie / (n * (n - 1)))
    if var <= 0:
        return u1 / (n1 * n2), 1.0
    mu = n1 * n2 / 2
    if alternative == "greater":
        p = _norm_sf((u1 - mu - 0.5) / math.sqrt(var))
    else:
        p = _norm_sf((mu - u1 - 0.5) / math.sqrt(var))
    return u1 / (n1 * n2), min(1.0, p)


@functools.lru_cache(maxsize=64)  # a handful of levels, asked at every look
def _z(alpha: float) -> float:
    return float(stats.norm.isf(alpha))


def error_rate_test(c_err: int, c_n: int, s_err: int, s_n: int, margin: float,
                    a_rollback: float, a_promote: float) -> dict[str, Any]:
    """Rollback: Fisher's one-sided exact test of canary > stable. Pass: Farrington-Manning
    non-inferiority of the canary's error rate within `margin` (absolute) of stable's."""
    p_worse = fisher_greater(c_err, c_n, s_err, s_n)
    z_ni, p_ni = farrington_manning(c_err, c_n, s_err, s_n, margin)
    outcome = ROLLBACK if p_worse < a_rollback else PASS if p_ni < a_promote else INCONCLUSIVE
    return {"test": "Fisher exact (canary > stable); Farrington-Manning non-inferiority",
            "n": [c_n, s_n], "estimate": c_err / c_n - s_err / s_n, "statistic_name": "Farrington-Manning z",
            "statistic": z_ni,
            "p_worse": p_worse, "p_noninferior": p_ni, "alpha_rollback": a_rollback, "alpha_promote": a_promote,
            "bound": f"difference < {margin}", "outcome": outcome}


def p95(a: np.ndarray) -> float:
    """np.percentile(a, 95) (linear interpolation) by partition instead of a full sort."""
    h = (len(a) - 1) * 0.95
    lo = int(h)
    hi = min(lo + 1, len(a) - 1)
    part = np.partition(a, [lo, hi])
    return float(part[lo] + (h - lo) * (part[hi] - part[lo]))


def latency_test(c_lat: np.ndarray, s_lat: np.ndarray, ratio: float,
                 a_rollback: float, a_promote: float) -> dict[str, Any]:
    """Rollback: one-sided Mann-Whitney U, canary latencies stochastically larger than stable's.
    Pass: the canary's latencies divided by `ratio` are stochastically smaller than stable's,
    which rejects "the canary is `ratio` times slower or more" under a scale shift."""
    auc, p_worse = mann_whitney(c_lat, s_lat, "greater")
    auc_ni, p_ni = mann_whitney(c_lat / ratio, s_lat, "less")
    c95, s95 = p95(c_lat), p95(s_lat)
    outcome = ROLLBACK if p_worse < a_rollback else PASS if p_ni < a_promote else INCONCLUSIVE
    return {"test": "Mann-Whitney U (canary slower); Mann-Whitney U of canary/margin (non-inferiority)",
            "n": [len(c_lat), len(s_lat)], "estimate": c95 / s95 if s95 > 0 else None,
            "statistic_name": "U / (n1 n2), P(canary slower)", "statistic": auc,
            "statistic_noninferior": auc_ni, "p_worse": p_worse, "p_noninferior": p_ni,
            "alpha_rollback": a_rollback, "alpha_promote": a_promote,
            "bound": f"latency ratio < {ratio}", "outcome": outcome}


def accuracy_test(c_ok: int, c_n: int, s_ok: int, s_n: int, margin: float,
                  a_rollback: float, a_promote: float) -> dict[str, Any]:
    """Newcombe interval of canary minus stable accuracy. Rollback: its upper bound (at
    a_rollback) is below 0. Pass: its lower bound (at a_promote) is above -margin."""
    upper = newcombe(c_ok, c_n, s_ok, s_n, _z(a_rollback))[1]
    lower = newcombe(c_ok, c_n, s_ok, s_n, _z(a_promote))[0]
    outcome = ROLLBACK if upper < 0 else PASS if lower > -margin else INCONCLUSIVE
    return {"test": "Newcombe hybrid score interval of the accuracy difference",
            "n": [c_n, s_n], "estimate": c_ok / c_n - s_ok / s_n, "interval": [lower, upper],
            "alpha_rollback": a_rollback, "alpha_promote": a_promote,
            "bound": f"upper < 0 rolls back; lower > -{margin} passes", "outcome": outcome}


def agreement_test(agree: int, n: int, minimum: float, a_rollback: float, a_promote: float) -> dict[str, Any]:
    """Wilson interval of the shadow's top-1 agreement with stable. Rollback: its upper bound
    (at a_rollback) is below `minimum`. Pass: its lower bound (at a_promote) is at or above."""
    upper = wilson(agree, n, _z(a_rollback))[1]
    lower = wilson(agree, n, _z(a_promote))[0]
    outcome = ROLLBACK if upper < minimum else PASS if lower >= minimum else INCONCLUSIVE
    return {"test": "Wilson interval of the agreement rate", "n": [n], "estimate": agree / n,
            "interval": [lower, upper], "alpha_rollback": a_rollback, "alpha_promote": a_promote,
            "bound": f">= {minimum}", "outcome": outcome}


def _count(stats_: dict[str, Any], count: str, rate: str, n: str) -> int:
    if stats_.get(count) is not None:
        return int(stats_[count])
    return int(round((stats_[rate] or 0.0) * stats_[n]))


def decide(stable: dict[str, Any], canary: dict[str, Any], r: Any) -> dict[str, Any]:
    """Every test of the canary against stable, and the decision: rollback when any test
    rolls back; advance when each test with enough data passes (error rate and latency always
    need `min_requests` per version); otherwise hold.

    `stable` and `canary` hold requests, errors, latencies_ms (the successful requests'),
    feedback and feedback_correct, and for a mirrored canary shadow_pairs and agreements.
    """
    names = ["error_rate", "latency", "feedback_accuracy"] + (["shadow_agreement"] if "shadow_pairs" in canary else [])
    a_promote = r.false_promotion / r.max_looks
    a_rollback = r.false_rollback / (r.max_looks * len(names))
    checks: list[dict[str, Any]] = []

    def no_data(name: str, n: list[int], need: int) -> dict[str, Any]:
        return {"check": name, "n": n, "need": need, "outcome": NO_DATA}

    cn, sn = canary["requests"], stable["requests"]
    enough = cn >= r.min_requests and sn >= r.min_requests
    if enough:
        checks.append({"check": "error_rate", **error_rate_test(
            canary["errors"], cn, stable["errors"], sn, r.error_margin, a_rollback, a_promote)})
    else:
        checks.append(no_data("error_rate", [cn, sn], r.min_requests))
    c_lat, s_lat = np.asarray(canary["latencies_ms"], float), np.asarray(stable["latencies_ms"], float)
    if enough and len(c_lat) and len(s_lat):
        checks.append({"check": "latency", **latency_test(c_lat, s_lat, r.latency_margin, a_rollback, a_promote)})
    else:
        checks.append(no_data("latency", [len(c_lat), len(s_lat)], r.min_requests))
    cf, sf = canary["feedback"], stable["feedback"]
    if cf >= r.min_feedback and sf >= r.min_feedback:
        checks.append({"check": "feedback_accuracy", **accuracy_test(
            _count(canary, "feedback_correct", "feedback_accuracy", "feedback"), cf,
            _count(stable, "feedback_correct", "feedback_accuracy", "feedback"), sf,
            r.accuracy_margin, a_rollback, a_promote)})
    else:
        checks.append(no_data("feedback_accuracy", [cf, sf], r.min_feedback))
    if "shadow_agreement" in names:
        pairs = canary["shadow_pairs"]
        if pairs >= r.min_shadow_pairs:
            checks.append({"check": "shadow_agreement", **agreement_test(
                _count(canary, "agreements", "agreement", "shadow_pairs"), pairs, r.min_agreement,
                a_rollback, a_promote)})
        else:
            checks.append(no_data("shadow_agreement", [pairs], r.min_shadow_pairs))
    for c in checks:  # the verdict as a flag: False rolls back, None neither passes nor fails
        c["passed"] = True if c["outcome"] == PASS else False if c["outcome"] == ROLLBACK else None
    outcomes = [c["outcome"] for c in checks]
    if ROLLBACK in outcomes:
        decision = "rollback"
    elif enough and all(o in (PASS, NO_DATA) for o in outcomes):
        decision = "advance"
    else:
        decision = "hold"
    return {"decision": decision, "checks": checks, "alpha_promote": a_promote, "alpha_rollback": a_rollback,
            "max_looks": r.max_looks}
