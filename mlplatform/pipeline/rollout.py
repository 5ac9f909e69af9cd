"""`+mode=rollout`: canary analysis, then the next step as a GitOps change.

The canary of conf/serve is compared with its stable version over `rollout.window` of
live captured data, by the statistical tests of `mlplatform.pipeline.analysis`: error rate,
latency, accuracy against feedback, and agreement with stable when the canary was also
mirrored as a shadow. Error rate and latency need `rollout.min_requests` per version (else
hold); accuracy and agreement are tested once `min_feedback` labels or `min_shadow_pairs`
pairs exist. A test that finds the canary worse proposes a rollback; a canary shown no
worse than stable by the margins moves to the next weight in `rollout.steps`, and at 100 it
becomes the only stable version (the old one is retired) and the registry's `production`
alias moves to it; otherwise it holds. What each step does to the traffic is
`gitops.next_traffic`'s, for the proposal and for `rollout.apply=true` alike.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from omegaconf import DictConfig

from mlplatform import storage
from mlplatform.capture.store import CaptureStore
from mlplatform.config import parse_since
from mlplatform.errors import ConfigError
from mlplatform.pipeline import analysis, gitops

log = logging.getLogger(__name__)


def version_stats(store: CaptureStore, since: float, version: str, role: str,
                  shadow_of: str | None = None) -> dict[str, Any]:
    """One version's live figures while it served in `role` (stable or canary), with the raw
    latencies (ms, of its successful requests) the latency test ranks."""
    cols = ["request_id", "ts", "version", "role", "latency_ms", "status", "top1"]
    rows = store.predictions(since=since, columns=cols).to_pylist()
    mine = [r for r in rows if r["version"] == version and r["role"] == role]
    ok = [r for r in mine if (r["status"] or 200) < 500]
    lat = np.array([r["latency_ms"] for r in ok if r["latency_ms"] is not None], float)
    fb = [f for f in store.labelled(since=since) if f["version"] == version and f["role"] == role]
    correct = sum(bool(f["correct"]) for f in fb)
    stats: dict[str, Any] = {
        "version": version, "requests": len(mine), "errors": len(mine) - len(ok),
        "error_rate": (len(mine) - len(ok)) / len(mine) if mine else None,
        "latency_p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "latency_p95_ms": float(np.percentile(lat, 95)) if len(lat) else None,
        "latencies_ms": lat,
        "feedback": len(fb), "feedback_correct": correct, "feedback_accuracy": correct / len(fb) if fb else None,
    }
    if shadow_of:  # the canary mirrored as a shadow of stable: answer agreement on the same request
        primary = {r["request_id"]: r["top1"] for r in rows if r["version"] == shadow_of and r["role"] != "shadow"}
        pairs = [(primary[r["request_id"]], r["top1"]) for r in rows
                 if r["version"] == version and r["role"] == "shadow" and r["request_id"] in primary]
        stats["shadow_pairs"] = len(pairs)
        stats["agreements"] = sum(a == b for a, b in pairs)
        stats["agreement"] = stats["agreements"] / len(pairs) if pairs else None
    return stats


def analyze(stable: dict[str, Any], canary: dict[str, Any], r: Any) -> dict[str, Any]:
    """The tests of the canary against stable and the decision: advance, hold or rollback.

    `stable` and `canary` are `version_stats` dicts (requests, errors, latencies_ms,
    feedback, feedback_correct; shadow_pairs and agreements for a mirrored canary). Each
    call is one look: it spends 1 / `rollout.max_looks` of each stated rate, so a caller
    that decides again and again on one canary takes at most max_looks decisions.
    """
    return analysis.decide(stable, canary, r)


def evidence_lines(result: dict[str, Any]) -> list[str]:
    """The decision record as markdown: per test, what was tested on how much data, the
    statistic, the p-values or interval, the bound and the outcome."""
    lines = [f"Each look tests promotion at {result['alpha_promote']:.3g} and rollback at "
             f"{result['alpha_rollback']:.3g} per test (the stated rates over {result['max_looks']} looks). "
             "Estimates: canary minus stable (error rate, accuracy), the p95 ratio (latency), the rate "
             "(agreement). Intervals: the lower end at the promotion level, the upper at the rollback level.", "",
             "| check | test | n (canary / stable) | estimate | statistic | p (worse) | p (non-inferior) | "
             "interval | bound | outcome |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["checks"]:
        n = " / ".join(str(x) for x in c["n"])
        if c["outcome"] == analysis.NO_DATA:
            lines.append(f"| {c['check']} | | {n} (need {c['need']}) | | | | | | | {c['outcome']} |")
            continue
        iv = c.get("interval")
        lines.append(
            f"| {c['check']} | {c['test']} | {n} | {_fmt(c.get('estimate'), '.4g')} | "
            f"{c['statistic_name'] + ' = ' + _fmt(c['statistic'], '.4g') if 'statistic' in c else ''} | "
            f"{_fmt(c.get('p_worse'), '.3g')} | {_fmt(c.get('p_noninferior'), '.3g')} | "
            f"{f'[{iv[0]:.4f}, {iv[1]:.4f}]' if iv else ''} | {c['bound']} | {c['outcome']} |")
    return lines


def serve_versions(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """conf/serve's stable version and its (first) canary, with the version ids they resolve to."""
    from mlplatform.registry.store import Registry

    reg = Registry(storage.resolve_root(cfg.registry.root), cfg.registry.model_name)
    stable = canary = None
    for i, v in enumerate(cfg.serve.versions):
        entry = {"ref": v.ref, "version": reg.resolve(v.ref), "role": v.role, "weight": int(v.weight), "index": i}
        if v.role == "stable":
            stable = entry
        elif v.role == "canary" and canary is None:
            canary = entry
    if stable is None:
        raise ConfigError("serve.versions", [v.ref for v in cfg.serve.versions], "no stable version")
    return stable, canary


def next_change(decision: str, canary: dict[str, Any], steps: list[int]) -> gitops.Change | None:
    """The traffic change a decision proposes: the next weight in `steps`, a promotion past
    the last one, or a rollback; None holds."""
    if decision == "rollback":
        return gitops.Change("rollback", canary["version"])
    if decision != "advance":
        return None
    nxt = next((w for w in steps if w > canary["weight"]), 100)
    return gitops.Change("promote" if nxt >= 100 else "advance", canary["version"], min(nxt, 100))


def collect(cfg: DictConfig, since: float) -> tuple[dict[str, Any], dict[str, Any] | None,
                                                   dict[str, Any], dict[str, Any]]:
    """conf/serve's stable and canary (serve_versions), and their live figures from `since`
    (from the canary's first request after it, when later: stable's earlier traffic saw
    other load). A canary also mirrored as a shadow of stable gets its agreement."""
    stable, canary = serve_versions(cfg)
    if canary is None:
        return stable, None, {}, {}
    store = CaptureStore(cfg.monitor.capture.root)
    mirrored = any(gitops.mirrors(sh.ref, canary["ref"], canary["version"]) for sh in cfg.serve.shadows)
    first = [r["ts"] for r in store.predictions(since=since, versions=[canary["version"]],
                                                 columns=["ts", "role"]).to_pylist() if r["role"] == "canary"]
    since = max(since, min(first)) if first else since
    s_stats = version_stats(store, since, stable["version"], "stable")
    c_stats = version_stats(store, since, canary["version"], "canary",
                            shadow_of=stable["version"] if mirrored else None)
    s_stats["since"] = c_stats["since"] = since
    return stable, canary, s_stats, c_stats


def describe(change: gitops.Change | None, result: dict[str, Any], stable: dict[str, Any], canary: dict[str, Any],
             s_stats: dict[str, Any], c_stats: dict[str, Any]) -> tuple[str, str]:
    """A decision's title and its evidence (markdown): the figures and every test."""
    if change is None:
        title = f"Hold canary {canary['version']} at {canary['weight']}%: not enough evidence yet"
    elif change.kind == "rollback":
        title = f"Roll back canary {canary['version']}: {', '.join(c['check'] for c in result['checks'] if c['passed'] is False)} failed"
    elif change.kind == "promote":
        title = f"Promote {canary['version']} to 100% and retire {stable['version']}"
    else:
        title = f"Canary {canary['version']}: {canary['weight']}% -> {change.weight}%"
    evidence = "\n".join(
        [f"Window: since {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(s_stats['since']))} UTC.", "",
         "| | requests | error rate | p50 ms | p95 ms | feedback | accuracy |", "|---|---|---|---|---|---|---|"]
        + [f"| {n} {s['version']} | {s['requests']} | {_fmt(s['error_rate'], '.2%')} | {_fmt(s['latency_p50_ms'])} | "
           f"{_fmt(s['latency_p95_ms'])} | {s['feedback']} | {_fmt(s['feedback_accuracy'], '.3f')} |"
           for n, s in (("stable", s_stats), ("canary", c_stats))]
        + ["", f"Decision: {result['decision']}.", ""] + evidence_lines(result))
    return title, evidence


def run_rollout(cfg: DictConfig) -> dict[str, Any]:
    from mlplatform.registry.store import Registry

    r = cfg.rollout
    started = time.time()
    stable, canary, s_stats, c_stats = collect(cfg, parse_since(r.window).timestamp())
    if canary is None:
        return {"mode": "rollout", "decision": "none", "reason": "conf/serve has no canary version",
                "stable": stable["version"]}
    result = analyze(s_stats, c_stats, r)
    decision = result["decision"]
    change = next_change(decision, canary, list(r.steps))
    promote = change is not None and change.kind == "promote"
    title, evidence = describe(change, result, stable, canary, s_stats, c_stats)
    summary: dict[str, Any] = {"mode": "rollout", "decision": "promote" if promote else decision, "title": title,
                               "stable": public(s_stats), "canary": public(c_stats), "checks": result["checks"],
                               "alpha_promote": result["alpha_promote"], "alpha_rollback": result["alpha_rollback"],
                               "versions": None, "applied": False}
    if change is None:
        summary["seconds"] = round(time.time() - started, 1)
        return summary
    tag = f"{canary['version']}-{change.kind}-{change.weight if change.kind == 'advance' else 100}"
    summary["proposal"] = gitops.propose(cfg, change, title, evidence, tag)
    summary["versions"] = summary["proposal"]["versions"]
    if r.apply:
        new_cfg = gitops.applied(cfg, change)  # what the proposal's serve file composes to
        from mlplatform.config import validate_serve
        from mlplatform.deployments.serve_mode import deploy

        validate_serve(new_cfg.serve)
        summary["deployed"] = deploy(new_cfg)["versions"]
        summary["applied"] = True
        if promote:
            reg = Registry(storage.resolve_root(cfg.registry.root), cfg.registry.model_name)
            reg.set_alias("previous", stable["version"])
            reg.set_alias("production", canary["version"])
            summary["aliases"] = reg.aliases()
    elif promote:
        summary["note"] = ("the production alias moves when the promotion is applied (rollout.apply=true) "
                           "or with +mode=registry registry.set_alias=production:" + canary["version"])
    summary["seconds"] = round(time.time() - started, 1)
    if decision == "rollback" and not r.apply:
        log.warning("canary %s should be rolled back: %s", canary["version"], title)
    return summary


def public(stats: dict[str, Any]) -> dict[str, Any]:
    """A version's figures without the raw samples (the summary is printed as JSON)."""
    return {k: v for k, v in stats.items() if k not in ("latencies_ms", "since")}


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)

