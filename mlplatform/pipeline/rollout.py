"""`+mode=rollout`: canary analysis, then the next step as a GitOps change.

The canary of conf/serve is compared with its stable version over `rollout.window` of
live captured data: error rate, p95 latency, accuracy against feedback and agreement with
stable when the canary was also mirrored as a shadow. Every check needs
`rollout.min_requests` (or `min_feedback`, `min_shadow_pairs`) to count. A failed check
proposes a rollback; too little data holds; otherwise the canary moves to the next weight
in `rollout.steps`, and at 100 it becomes the only stable version (the old one is
retired) and the registry's `production` alias moves to it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mlplatform import storage
from mlplatform.config import parse_since
from mlplatform.errors import ConfigError
from mlplatform.monitoring.capture import CaptureStore

log = logging.getLogger(__name__)


def version_stats(store: CaptureStore, since: float, version: str, role: str,
                  shadow_of: str | None = None) -> dict[str, Any]:
    """One version's live figures while it served in `role` (stable or canary)."""
    cols = ["request_id", "ts", "version", "role", "latency_ms", "status", "top1"]
    rows = store.predictions(since=since, columns=cols).to_pylist()
    mine = [r for r in rows if r["version"] == version and r["role"] == role]
    ok = [r for r in mine if (r["status"] or 200) < 500]
    lat = np.array([r["latency_ms"] for r in ok], float)
    fb = [f for f in store.labelled(since=since) if f["version"] == version and f["role"] == role]
    stats: dict[str, Any] = {
        "version": version, "requests": len(mine), "errors": len(mine) - len(ok),
        "error_rate": (len(mine) - len(ok)) / len(mine) if mine else None,
        "latency_p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "latency_p95_ms": float(np.percentile(lat, 95)) if len(lat) else None,
        "feedback": len(fb), "feedback_accuracy": float(np.mean([f["correct"] for f in fb])) if fb else None,
    }
    if shadow_of:  # the canary mirrored as a shadow of stable: answer agreement on the same request
        primary = {r["request_id"]: r["top1"] for r in rows if r["version"] == shadow_of and r["role"] != "shadow"}
        pairs = [(primary[r["request_id"]], r["top1"]) for r in rows
                 if r["version"] == version and r["role"] == "shadow" and r["request_id"] in primary]
        stats["shadow_pairs"] = len(pairs)
        stats["agreement"] = float(np.mean([a == b for a, b in pairs])) if pairs else None
    return stats


def analyze(stable: dict[str, Any], canary: dict[str, Any], r: Any) -> dict[str, Any]:
    """Checks of the canary against stable; decision: advance, hold or rollback."""
    checks: list[dict[str, Any]] = []

    def check(name: str, enough: bool, passed: bool, reason: str) -> None:
        checks.append({"check": name, "enough_data": enough, "passed": passed if enough else None, "reason": reason})

    enough = canary["requests"] >= r.min_requests and stable["requests"] >= r.min_requests
    c_err, s_err = canary["error_rate"] or 0.0, stable["error_rate"] or 0.0
    check("error_rate", enough, c_err <= r.max_error_rate and c_err <= s_err + r.max_error_rate_increase,
          f"canary {c_err:.3%} vs stable {s_err:.3%} (max {r.max_error_rate:.1%}, +{r.max_error_rate_increase:.1%} "
          f"over stable); {canary['requests']}/{stable['requests']} requests, need {r.min_requests}")
    c95, s95 = canary["latency_p95_ms"], stable["latency_p95_ms"]
    lat_ok = c95 is None or s95 is None or c95 <= s95 * r.max_latency_p95_ratio
    check("latency_p95", enough and c95 is not None and s95 is not None, lat_ok,
          f"canary p95 {c95 or 0:.1f} ms vs stable {s95 or 0:.1f} ms (max ratio {r.max_latency_p95_ratio})")
    fb_enough = canary["feedback"] >= r.min_feedback and stable["feedback"] >= r.min_feedback
    ca, sa = canary["feedback_accuracy"], stable["feedback_accuracy"]
    check("feedback_accuracy", fb_enough, fb_enough and ca >= sa - r.max_accuracy_drop,
          f"canary {ca if ca is not None else float('nan'):.3f} vs stable {sa if sa is not None else float('nan'):.3f} "
          f"on {canary['feedback']}/{stable['feedback']} labels (need {r.min_feedback}; max drop "
          f"{r.max_accuracy_drop})")
    if "agreement" in canary:
        ag = canary["agreement"]
        sh_enough = canary["shadow_pairs"] >= r.min_shadow_pairs
        check("shadow_agreement", sh_enough, sh_enough and ag >= r.min_agreement,
              f"agreement {ag if ag is not None else float('nan'):.3f} on {canary['shadow_pairs']} mirrored requests "
              f"(min {r.min_agreement}, need {r.min_shadow_pairs})")
    failed = [c for c in checks if c["passed"] is False]
    if failed:
        decision = "rollback"
    elif not enough:
        decision = "hold"
    else:
        decision = "advance"
    return {"decision": decision, "checks": checks}


def _serve_versions(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
    from mlplatform.registry import Registry

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


def run_rollout(cfg: DictConfig) -> dict[str, Any]:
    from mlplatform.pipeline import gitops
    from mlplatform.registry import Registry

    r = cfg.rollout
    started = time.time()
    stable, canary = _serve_versions(cfg)
    if canary is None:
        return {"mode": "rollout", "decision": "none", "reason": "conf/serve has no canary version",
                "stable": stable["version"]}
    since = parse_since(r.window).timestamp()
    store = CaptureStore(cfg.monitor.capture.root)
    mirrored = any(str(sh.ref) in (canary["ref"], canary["version"]) for sh in cfg.serve.shadows)
    # Compare like with like: both versions over the same period, from the canary's first
    # request in the window (stable's earlier traffic saw other load).
    first = [r["ts"] for r in store.predictions(since=since, versions=[canary["version"]],
                                                 columns=["ts", "role"]).to_pylist() if r["role"] == "canary"]
    since = max(since, min(first)) if first else since
    s_stats = version_stats(store, since, stable["version"], "stable")
    c_stats = version_stats(store, since, canary["version"], "canary",
                            shadow_of=stable["version"] if mirrored else None)
    result = analyze(s_stats, c_stats, r)
    decision = result["decision"]
    steps = list(r.steps)
    promote = False
    if decision == "rollback":
        versions = [{"ref": stable["ref"], "role": "stable", "weight": 100}]
        title = f"Roll back canary {canary['version']}: {', '.join(c['check'] for c in result['checks'] if c['passed'] is False)} failed"
    elif decision == "advance":
        nxt = next((w for w in steps if w > canary["weight"]), 100)
        if nxt >= 100:
            promote = True
            versions = [{"ref": canary["version"], "role": "stable", "weight": 100}]
            title = f"Promote {canary['version']} to 100% and retire {stable['version']}"
        else:
            versions = [{"ref": stable["ref"], "role": "stable", "weight": 100 - nxt},
                        {"ref": canary["version"], "role": "canary", "weight": nxt}]
            title = f"Canary {canary['version']}: {canary['weight']}% -> {nxt}%"
    else:
        versions, title = None, f"Hold canary {canary['version']} at {canary['weight']}%: not enough data yet"
    evidence = "\n".join(
        [f"Window: since {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(since))} UTC.", "",
         "| | requests | error rate | p50 ms | p95 ms | feedback | accuracy |", "|---|---|---|---|---|---|---|"]
        + [f"| {n} {s['version']} | {s['requests']} | {_fmt(s['error_rate'], '.2%')} | {_fmt(s['latency_p50_ms'])} | "
           f"{_fmt(s['latency_p95_ms'])} | {s['feedback']} | {_fmt(s['feedback_accuracy'], '.3f')} |"
           for n, s in (("stable", s_stats), ("canary", c_stats))]
        + ["", "Checks:", ""]
        + [f"- {c['check']}: {'pass' if c['passed'] else 'FAIL' if c['passed'] is False else 'not enough data'}: "
           f"{c['reason']}" for c in result["checks"]])
    summary: dict[str, Any] = {"mode": "rollout", "decision": "promote" if promote else decision, "title": title,
                               "stable": s_stats, "canary": c_stats, "checks": result["checks"],
                               "versions": versions, "applied": False}
    if versions is None:
        summary["seconds"] = round(time.time() - started, 1)
        return summary
    tag = f"{canary['version']}-{'promote' if promote else decision}-{versions[-1]['weight']}"
    summary["proposal"] = gitops.propose(cfg, versions, title, evidence, tag)
    if r.apply:
        shadows = OmegaConf.to_container(cfg.serve.shadows, resolve=True)
        if decision == "rollback" or promote:  # the canary's mirror goes with it
            shadows = [sh for sh in shadows if str(sh["ref"]) not in (canary["ref"], canary["version"])]
        new_cfg = OmegaConf.merge(cfg, {"serve": {"versions": versions, "shadows": shadows}})
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


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)

