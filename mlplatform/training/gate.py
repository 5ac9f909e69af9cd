"""The promotion gate: a candidate against production, on the same test split, by config thresholds."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def judge(candidate: dict[str, Any], baseline: dict[str, Any] | None, gate: Any,
          candidate_version: str | None = None, baseline_version: str | None = None) -> dict[str, Any]:
    """Blessed or rejected, with every check and its reason.

    `candidate` and `baseline` are metric summaries (test/acc, per_class recall) computed on
    the same test split. With no production version the absolute threshold alone decides.
    """
    checks = []
    acc = candidate["test/acc"]
    checks.append({"check": "min_test_acc", "value": acc, "threshold": gate.min_test_acc,
                   "passed": acc >= gate.min_test_acc,
                   "reason": f"test/acc {acc:.4f} {'>=' if acc >= gate.min_test_acc else '<'} {gate.min_test_acc}"})
    if baseline is not None:
        gain = acc - baseline["test/acc"]
        checks.append({"check": "min_gain", "value": round(gain, 6), "threshold": gate.min_gain,
                       "passed": gain >= gate.min_gain,
                       "reason": f"gain over {baseline_version or 'production'} {gain:+.4f} "
                                 f"({acc:.4f} vs {baseline['test/acc']:.4f}); need >= {gate.min_gain:+.4f}"})
        drops = {}
        for name, stats in baseline.get("per_class", {}).items():
            cand = candidate.get("per_class", {}).get(name)
            if cand is not None and stats.get("support", 0) > 0:
                drops[name] = stats["recall"] - cand["recall"]
        worst = max(drops.items(), key=lambda kv: kv[1]) if drops else (None, 0.0)
        checks.append({"check": "max_recall_drop", "value": round(worst[1], 6), "threshold": gate.max_recall_drop,
                       "passed": worst[1] <= gate.max_recall_drop,
                       "reason": f"largest per-species recall drop {worst[1]:.4f} ({worst[0]}); "
                                 f"allowed {gate.max_recall_drop}"})
    blessed = all(c["passed"] for c in checks)
    return {
        "verdict": "blessed" if blessed else "rejected",
        "blessed": blessed,
        "candidate": candidate_version,
        "baseline": baseline_version,
        "first_model": baseline is None,
        "checks": checks,
        "reasons": [c["reason"] for c in checks if not c["passed"]] or ["all checks passed"],
        "judged_at": datetime.now(UTC).isoformat(),
        "thresholds": {"min_test_acc": gate.min_test_acc, "min_gain": gate.min_gain,
                       "max_recall_drop": gate.max_recall_drop},
    }
