"""The rollout's decision rule: each statistical test against a reference, and a simulation
of the repeated decisions on synthetic streams with a known difference.

The simulation is the claim of `rollout.false_promotion` and `rollout.false_rollback`:
decided again and again on a growing sample, as `rollout.auto` does, a canary as good as
stable is rolled back, and one worse by the margin is promoted, in at most that share of
runs. No Ray, no Serve.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import optimize, stats
from scipy.special import xlogy

from mlplatform.errors import ConfigError
from mlplatform.pipeline import analysis
from mlplatform.pipeline.rollout import analyze, evidence_lines
from tests.conftest import compose

# ----------------------------------------------------------------------------- the tests' statistics


@pytest.mark.parametrize("k,n,lo,hi", [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611)])
def test_wilson_matches_newcombes_published_intervals(k: int, n: int, lo: float, hi: float) -> None:
    """Newcombe (1998), Statistics in Medicine 17:857, table I, 95% Wilson score intervals."""
    got = analysis.wilson(k, n, stats.norm.isf(0.025))
    assert got == pytest.approx((lo, hi), abs=5e-5)


@pytest.mark.parametrize("k1,n1,k2,n2,lo,hi", [(56, 70, 48, 80, 0.0524, 0.3339), (9, 10, 3, 10, 0.1705, 0.8090),
                                               (5, 56, 0, 29, -0.0381, 0.1926)])
def test_newcombe_matches_the_published_hybrid_score_intervals(k1, n1, k2, n2, lo, hi) -> None:
    """Newcombe (1998), Statistics in Medicine 17:873, table II, method 10."""
    got = analysis.newcombe(k1, n1, k2, n2, stats.norm.isf(0.025))
    assert got == pytest.approx((lo, hi), abs=5e-5)


@pytest.mark.parametrize("x1,n1,x2,n2,delta", [(3, 100, 1, 300, 0.02), (0, 100, 0, 100, 0.01), (5, 50, 2, 400, 0.05),
                                               (0, 60, 12, 240, 0.02), (7, 60, 3, 240, -0.02), (40, 50, 5, 10, 0.3)])
def test_farrington_manning_against_a_numerical_restricted_mle(x1, n1, x2, n2, delta) -> None:
    def nll(p2: float) -> float:
        p1 = p2 + delta
        return -float(xlogy(x1, p1) + xlogy(n1 - x1, 1 - p1) + xlogy(x2, p2) + xlogy(n2 - x2, 1 - p2))

    lo, hi = max(0.0, -delta), min(1.0, 1.0 - delta)
    ref = optimize.minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12}).x
    r1, r2 = analysis.restricted_mle(x1, n1, x2, n2, delta)
    assert r2 == pytest.approx(ref, abs=1e-6) and r1 == pytest.approx(r2 + delta, abs=1e-12)
    z, p = analysis.farrington_manning(x1, n1, x2, n2, delta)
    want = (x1 / n1 - x2 / n2 - delta) / math.sqrt(r1 * (1 - r1) / n1 + r2 * (1 - r2) / n2)
    assert z == pytest.approx(want) and p == pytest.approx(stats.norm.cdf(want))


def test_farrington_manning_with_no_errors_at_all() -> None:
    # 0/100 against 0/100 with margin 0.05: the restricted MLE is (0.05, 0), z = -0.05 / sqrt(0.05 * 0.95 / 100)
    z, p = analysis.farrington_manning(0, 100, 0, 100, 0.05)
    assert z == pytest.approx(-0.05 / math.sqrt(0.05 * 0.95 / 100)) and p == pytest.approx(0.010891, abs=1e-5)


@pytest.mark.parametrize("x1,n1,x2,n2", [(6, 600, 24, 2400), (14, 100, 0, 100), (0, 50, 3, 200), (5, 10, 1, 10)])
def test_fisher_greater_is_scipys_one_sided_fisher(x1, n1, x2, n2) -> None:
    ref = stats.fisher_exact([[x1, n1 - x1], [x2, n2 - x2]], alternative="greater").pvalue
    assert analysis.fisher_greater(x1, n1, x2, n2) == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("alternative", ["greater", "less"])
@pytest.mark.parametrize("rounded", [False, True])  # rounded: many ties
def test_mann_whitney_is_scipys_asymptotic_test(alternative: str, rounded: bool) -> None:
    rng = np.random.default_rng(1)
    x, y = rng.lognormal(3.05, 0.5, 300), rng.lognormal(3.0, 0.5, 900)
    if rounded:
        x, y = np.round(x / 5), np.round(y / 5)
    auc, p = analysis.mann_whitney(x, y, alternative)
    ref = stats.mannwhitneyu(x, y, alternative=alternative, method="asymptotic")
    assert p == pytest.approx(ref.pvalue, rel=1e-9)
    pairs = (x[:, None] > y[None, :]).sum() + 0.5 * (x[:, None] == y[None, :]).sum()
    assert auc == pytest.approx(pairs / (len(x) * len(y)))


def test_mann_whitney_on_all_tied_values_carries_no_evidence() -> None:
    assert analysis.mann_whitney(np.full(60, 5.0), np.full(80, 5.0), "greater") == (0.5, 1.0)


# ----------------------------------------------------------------------------- the decision


@functools.lru_cache(maxsize=1)
def _defaults() -> dict:
    r = compose("+mode=rollout").rollout
    return {k: r[k] for k in r}


def _rollout(**over: object) -> SimpleNamespace:
    """conf's rollout block, as plain attributes."""
    return SimpleNamespace(**{**_defaults(), **over})


def _version(n: int, errors: int, lat: np.ndarray, fb: int = 0, correct: int = 0, **extra: int) -> dict:
    return {"version": "v", "requests": n, "errors": errors, "latencies_ms": lat, "feedback": fb,
            "feedback_correct": correct, **extra}


RNG = np.random.default_rng(7)
LAT_S, LAT_C = RNG.lognormal(3, 0.3, 3000), RNG.lognormal(3, 0.3, 1000)


def test_the_record_shows_each_test_with_its_numbers() -> None:
    r = _rollout()
    out = analyze(_version(6000, 60, LAT_S, 200, 180), _version(2000, 18, LAT_C, 10, 9, shadow_pairs=400,
                                                                agreements=380), r)
    by = {c["check"]: c for c in out["checks"]}
    assert list(by) == ["error_rate", "latency", "feedback_accuracy", "shadow_agreement"]
    assert out["alpha_promote"] == pytest.approx(r.false_promotion / r.max_looks)
    assert out["alpha_rollback"] == pytest.approx(r.false_rollback / (r.max_looks * 4))
    err = by["error_rate"]
    assert err["n"] == [2000, 6000] and err["estimate"] == pytest.approx(0.009 - 0.01)
    assert err["p_worse"] == pytest.approx(analysis.fisher_greater(18, 2000, 60, 6000))
    assert err["p_noninferior"] == pytest.approx(analysis.farrington_manning(18, 2000, 60, 6000, r.error_margin)[1])
    assert err["outcome"] == "pass" and err["passed"] is True
    assert by["latency"]["estimate"] == pytest.approx(np.percentile(LAT_C, 95) / np.percentile(LAT_S, 95))
    assert by["latency"]["outcome"] == "pass"
    # 10 labels < min_feedback: not tested, and it does not block the advance
    assert by["feedback_accuracy"]["outcome"] == "not enough data" and by["feedback_accuracy"]["passed"] is None
    ag = by["shadow_agreement"]
    assert ag["interval"][0] < 0.95 < ag["interval"][1] and ag["outcome"] == "pass"
    assert out["decision"] == "advance"
    text = "\n".join(evidence_lines(out))
    for c in out["checks"]:
        assert f"| {c['check']} |" in text
    assert "| error_rate | Fisher exact" in text and "2000 / 6000" in text and "10 / 200 (need 20)" in text


@pytest.mark.parametrize("canary,decision,failed", [
    (_version(40, 0, LAT_C[:40]), "hold", []),                          # under min_requests
    (_version(2000, 120, LAT_C), "rollback", ["error_rate"]),           # 6% against 1%
    (_version(2000, 18, LAT_C * 1.5), "rollback", ["latency"]),         # 1.5 times slower
    (_version(2000, 18, LAT_C, 200, 120), "rollback", ["feedback_accuracy"]),  # 0.6 against 0.9
    (_version(2000, 18, LAT_C, 25, 22), "hold", []),                    # 25 labels: accuracy not shown within the margin
    (_version(2000, 18, LAT_C, 1000, 900), "advance", []),              # 1000 labels, as accurate as stable
    (_version(2000, 18, LAT_C, shadow_pairs=400, agreements=200), "rollback", ["shadow_agreement"]),
    (_version(2000, 18, LAT_C, shadow_pairs=30, agreements=0), "advance", []),  # under min_shadow_pairs
    (_version(150, 2, LAT_C[:150]), "hold", []),                        # 150 requests: error rate not shown within 1%
])
def test_decisions(canary: dict, decision: str, failed: list[str]) -> None:
    out = analyze(_version(6000, 60, LAT_S, 1000, 900), canary, _rollout())
    assert out["decision"] == decision, out
    assert [c["check"] for c in out["checks"] if c["passed"] is False] == failed


@pytest.mark.parametrize("override,key", [
    ("rollout.false_promotion=0", "rollout.false_promotion"),
    ("rollout.false_rollback=0.5", "rollout.false_rollback"),
    ("rollout.max_looks=0", "rollout.max_looks"),
    ("rollout.error_margin=0", "rollout.error_margin"),
    ("rollout.latency_margin=1", "rollout.latency_margin"),
    ("rollout.accuracy_margin=1.5", "rollout.accuracy_margin"),
    ("rollout.min_agreement=2", "rollout.min_agreement"),
    ("rollout.min_requests=0", "rollout.min_requests"),
    ("rollout.interval_s=0", "rollout.interval_s"),
    ("rollout.apply_via=ftp", "rollout.apply_via"),
])
def test_rollout_config_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        compose("+mode=rollout", override)
    assert err.value.key == key


# ----------------------------------------------------------------------------- the simulation

RUNS = 1000
LOOKS = 10  # = rollout.max_looks below: one decision per interval, each on the grown sample
PER_LOOK = (100, 300)  # new canary and stable requests per interval (a 25% canary)
BASE_ERROR = 0.01
SIM = ("+mode=rollout", f"rollout.max_looks={LOOKS}", "rollout.error_margin=0.02", "rollout.latency_margin=1.25",
       "rollout.false_promotion=0.05", "rollout.false_rollback=0.05", "rollout.min_requests=50")


def _simulate(r, c_error: float, c_slower: float, seed: int) -> dict[str, int]:
    """RUNS rollouts of one step: every look adds PER_LOOK requests and decides; a run ends at
    the first advance or rollback, or holds after LOOKS looks. Latencies are lognormal (the
    canary's scaled by c_slower); errors Bernoulli."""
    rng = np.random.default_rng(seed)
    mc, ms = PER_LOOK
    counts = {"advance": 0, "rollback": 0, "hold": 0}
    for _ in range(RUNS):
        ce = np.cumsum(rng.binomial(mc, c_error, LOOKS))
        se = np.cumsum(rng.binomial(ms, BASE_ERROR, LOOKS))
        cl = rng.lognormal(3.0, 0.5, mc * LOOKS) * c_slower
        sl = rng.lognormal(3.0, 0.5, ms * LOOKS)
        decision = "hold"
        for k in range(1, LOOKS + 1):
            stable = _version(ms * k, int(se[k - 1]), sl[: ms * k])
            canary = _version(mc * k, int(ce[k - 1]), cl[: mc * k])
            decision = analyze(stable, canary, r)["decision"]
            if decision != "hold":
                break
        counts[decision] += 1
    return counts


def _bound(rate: float) -> int:
    """The most runs out of RUNS a true rate of `rate` exceeds with probability 0.1%."""
    return int(stats.binom.ppf(0.999, RUNS, rate))


@pytest.fixture(scope="module")
def sim_rollout():
    r = compose(*SIM).rollout
    return SimpleNamespace(**{k: r[k] for k in r})  # plain attributes: OmegaConf's cost microseconds a read


@pytest.mark.parametrize("case,c_error,c_slower,seed", [
    ("equal", BASE_ERROR, 1.0, 11),
    ("error rate worse by the margin", BASE_ERROR + 0.02, 1.0, 12),
    ("latency worse by the margin", BASE_ERROR, 1.25, 13),
    ("error rate clearly worse", BASE_ERROR + 0.05, 1.0, 14),
    ("latency clearly worse", BASE_ERROR, 2.0, 15),
])
def test_simulated_false_promotion_and_false_rollback_rates(sim_rollout, case, c_error, c_slower, seed) -> None:
    r = sim_rollout
    got = _simulate(r, c_error, c_slower, seed)
    if case == "equal":
        # As good as stable: rolled back in at most false_rollback of the runs; promoted in most.
        assert got["rollback"] <= _bound(r.false_rollback), got
        assert got["advance"] >= 0.9 * RUNS, got
    elif "by the margin" in case:
        # Exactly at the margin (the hardest bad canary to tell): promoted in at most false_promotion.
        assert got["advance"] <= _bound(r.false_promotion), got
    else:
        assert got["rollback"] >= 0.9 * RUNS and got["advance"] <= _bound(r.false_promotion), got


def test_simulated_noninferiority_tests_alone_keep_false_promotion(sim_rollout) -> None:
    """At the margin the rollback tests usually fire first (the canary is worse), which hides
    the promotion side; here each non-inferiority test is judged alone, over LOOKS looks."""
    r = sim_rollout
    rng = np.random.default_rng(31)
    a_p = r.false_promotion / r.max_looks
    mc, ms = PER_LOOK
    err = lat = 0
    for _ in range(RUNS):
        ce = np.cumsum(rng.binomial(mc, BASE_ERROR + r.error_margin, LOOKS))
        se = np.cumsum(rng.binomial(ms, BASE_ERROR, LOOKS))
        cl = rng.lognormal(3.0, 0.5, mc * LOOKS) * r.latency_margin
        sl = rng.lognormal(3.0, 0.5, ms * LOOKS)
        err += any(analysis.farrington_manning(int(ce[k]), mc * (k + 1), int(se[k]), ms * (k + 1),
                                               r.error_margin)[1] < a_p for k in range(LOOKS))
        lat += any(analysis.mann_whitney(cl[: mc * (k + 1)] / r.latency_margin, sl[: ms * (k + 1)], "less")[1] < a_p
                   for k in range(LOOKS))
    assert err <= _bound(r.false_promotion) and lat <= _bound(r.false_promotion), (err, lat)


def test_simulated_interval_tests_keep_their_rates() -> None:
    """Feedback accuracy and shadow agreement, at their boundaries, over LOOKS looks."""
    rng = np.random.default_rng(21)
    a_p, a_r = 0.05 / LOOKS, 0.05 / (LOOKS * 4)
    acc_promoted = acc_rolled = agr_promoted = agr_rolled = 0
    for _ in range(RUNS):
        c_ok = np.cumsum(rng.binomial(40, 0.85, LOOKS))  # 0.05 below stable: at the accuracy margin
        s_ok = np.cumsum(rng.binomial(120, 0.90, LOOKS))
        e_ok = np.cumsum(rng.binomial(40, 0.90, LOOKS))  # equal to stable
        agree = np.cumsum(rng.binomial(60, 0.80, LOOKS))  # exactly min_agreement
        outs = [analysis.accuracy_test(int(c_ok[k]), 40 * (k + 1), int(s_ok[k]), 120 * (k + 1), 0.05, a_r, a_p)["outcome"]
                for k in range(LOOKS)]
        acc_promoted += "pass" in outs
        eq = [analysis.accuracy_test(int(e_ok[k]), 40 * (k + 1), int(s_ok[k]), 120 * (k + 1), 0.05, a_r, a_p)["outcome"]
              for k in range(LOOKS)]
        acc_rolled += "rollback" in eq
        ag = [analysis.agreement_test(int(agree[k]), 60 * (k + 1), 0.8, a_r, a_p)["outcome"] for k in range(LOOKS)]
        agr_promoted += "pass" in ag
        agr_rolled += "rollback" in ag
    assert acc_promoted <= _bound(0.05) and agr_promoted <= _bound(0.05), (acc_promoted, agr_promoted)
    assert acc_rolled <= _bound(0.05 / 4) and agr_rolled <= _bound(0.05 / 4), (acc_rolled, agr_rolled)
