"""`+mode=rollout rollout.auto=true`: progressive delivery, as Flagger and Argo Rollouts do it.

Every `rollout.interval_s` the canary of the running traffic is tested against its stable
version (`rollout.analyze`: the statistical tests of `analysis`, on the data since the
current step began) until one decision moves it: the next weight of `rollout.steps`, the
promotion at 100, or a rollback. Each decision is applied through Git (`apply_via: git`: a
commit to `gitops.branch`, which `+mode=sync` applies; the loop waits until the running
ingress serves it) or deployed directly (`apply_via: direct`). After `rollout.max_looks`
looks at one canary (all steps together) the loop stops, the traffic as it is: the stated
rates are spent over that many looks, so more would break them.

Every look is written to `paths.root/rollouts/<canary>-<time>/decisions.jsonl`, and each
decision that changes the traffic to its own markdown file with the tests' statistics,
p-values or intervals and sample sizes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import UTC, datetime
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from mlplatform import ray_compat, storage
from mlplatform.errors import JobFailed
from mlplatform.pipeline import gitops, rollout

log = logging.getLogger(__name__)


def _from_branch(cfg: DictConfig) -> DictConfig:
    """cfg with serve.versions and serve.shadows as gitops.serve_file holds them on
    gitops.branch: what +mode=sync serves."""
    doc = yaml.safe_load(gitops.read_serve_file(cfg)) or {}
    return OmegaConf.merge(cfg, {"serve": {"versions": doc.get("versions") or [], "shadows": doc.get("shadows") or []}})


def _wait_served(cfg: DictConfig, after: DictConfig, timeout_s: float) -> None:
    """Until the running ingress routes as `after` says (+mode=sync applied the commit)."""
    from mlplatform.deployments.serve_mode import ingress_traffic, resolve_settings

    want = [r.model_dump() for r in resolve_settings(after, read_secrets=False).traffic.routes]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ingress_traffic(ray_compat.serve_app_configs().get(cfg.serve.app_name) or {}).get("routes") == want:
            return
        time.sleep(1.0)
    raise JobFailed(f"the decision was committed to {cfg.gitops.branch} of {cfg.gitops.repo} but the running "
                    f"application did not serve it within {timeout_s:g} s: is +mode=sync running?",
                    {"mode": "rollout"})


def run_auto(cfg: DictConfig) -> dict[str, Any]:
    from mlplatform.deployments.serve_mode import deploy
    from mlplatform.registry.store import Registry

    r = cfg.rollout
    started = time.time()
    if r.apply_via == "git":  # the canary under way is what the watched branch says
        cfg = _from_branch(cfg)
    stable, canary = rollout.serve_versions(cfg)
    if canary is None:
        return {"mode": "rollout", "auto": True, "decision": "none", "reason": "conf/serve has no canary version",
                "stable": stable["version"]}
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out_dir = storage.join(storage.resolve_root(cfg.paths.root), "rollouts", f"{canary['version']}-{stamp}")
    log_path = storage.join(out_dir, "decisions.jsonl")
    records: list[dict[str, Any]] = []
    step_since, looks = started, 0  # a step's data: from when its traffic was served
    while True:
        time.sleep(float(r.interval_s))
        stable, canary, s_stats, c_stats = rollout.collect(cfg, step_since)
        result = rollout.analyze(s_stats, c_stats, r)
        looks += 1
        change = rollout.next_change(result["decision"], canary, list(r.steps))
        record = {"at": datetime.now(UTC).isoformat(), "look": looks, "weight": canary["weight"],
                  "decision": result["decision"] if change is None or change.kind != "promote" else "promote",
                  "stable": rollout.public(s_stats), "canary": rollout.public(c_stats),
                  "checks": result["checks"], "alpha_promote": result["alpha_promote"],
                  "alpha_rollback": result["alpha_rollback"]}
        records.append(record)
        if change is None:
            _append(log_path, record)
            log.info("canary %s at %d%%: hold (look %d of %d)", canary["version"], canary["weight"], looks, r.max_looks)
            if looks >= r.max_looks:
                return _summary(records, canary, stable, "inconclusive", out_dir, started,
                                note=f"rollout.max_looks={r.max_looks} looks spent, the last at {canary['weight']}%: "
                                     "the traffic stays as it is; a person decides, or a new rollout starts")
            continue
        title, evidence = rollout.describe(change, result, stable, canary, s_stats, c_stats)
        record["title"] = title
        record["evidence"] = storage.join(out_dir, f"{len(records):03d}-{change.kind}.md")
        storage.write_text(record["evidence"], f"# {title}\n\n{evidence}\n")
        after = gitops.applied(cfg, change)
        if r.apply_via == "git":
            record["commit"] = gitops.commit_to_branch(cfg, change, title, evidence)["commit"]
            _wait_served(cfg, after, timeout_s=3 * float(cfg.gitops.interval_s) + 120)
        else:
            deploy(after)
        _append(log_path, record)
        log.info("canary %s: %s", canary["version"], title)
        cfg = after
        if change.kind == "promote":
            reg = Registry(storage.resolve_root(cfg.registry.root), cfg.registry.model_name)
            reg.set_alias("previous", stable["version"])
            reg.set_alias("production", canary["version"])
            return _summary(records, canary, stable, "promote", out_dir, started, aliases=reg.aliases())
        if change.kind == "rollback":
            return _summary(records, canary, stable, "rollback", out_dir, started)
        step_since = time.time()


def _append(path: str, record: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)  # paths.root is a POSIX path in writing modes
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")


def _summary(records: list[dict[str, Any]], canary: dict[str, Any], stable: dict[str, Any], outcome: str,
             out_dir: str, started: float, **extra: Any) -> dict[str, Any]:
    steps = [{k: rec.get(k) for k in ("at", "weight", "decision", "title", "evidence", "commit")}
             for rec in records if rec.get("title")]
    return {"mode": "rollout", "auto": True, "decision": outcome, "canary": canary["version"],
            "stable": stable["version"], "looks": len(records), "steps": steps, "record": out_dir,
            "seconds": round(time.time() - started, 1), **extra}
