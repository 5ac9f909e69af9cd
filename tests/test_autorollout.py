"""rollout.auto on real Serve under load: a good canary stepped to 100% and promoted, a
canary with injected errors rolled back, each decision written with its statistical evidence;
decisions deployed directly (apply_via=direct), and committed to a watched branch that a
running reconciler (+mode=sync) applies (apply_via=git)."""

from __future__ import annotations

import io
import json
import subprocess
import threading
from collections import Counter
from pathlib import Path

import pytest
import requests

from mlplatform.data import synthetic
from mlplatform.pipeline.autorollout import run_auto
from mlplatform.registry.store import Registry

from .conftest import SERVE_PORT, ClosedLoop, compose, trained_with_copies, wait_for
from .test_sync import Watched, set_traffic

URL = f"http://127.0.0.1:{SERVE_PORT}"
MODEL = "species-classifier"

pytestmark = pytest.mark.ray


def _serve(root: Path, versions: str, *extra: str) -> list[str]:
    return ["+experiment=smoke", f"paths.root={root}", f"serve.port={SERVE_PORT}", "serve.app_name=auto-rollout",
            "serve.deployment.num_cpus=0.25", "serve.deployment.min_replicas=1", "serve.deployment.max_replicas=1",
            "monitor.enabled=false", "monitor.capture.flush_interval_s=0.5", f"serve.versions={versions}", *extra]


# Small samples and wide margins: the test is about the loop, not the tests' power
# (tests/test_rollout_stats.py simulates their rates).
AUTO = ("rollout.auto=true", "rollout.apply_via=direct", "rollout.interval_s=2", "rollout.steps=[50,100]",
        "rollout.min_requests=30", "rollout.error_margin=0.1", "rollout.latency_margin=3", "rollout.max_looks=30")


class Load(ClosedLoop):
    """Closed-loop clients posting one JPEG; each answer's (status, version)."""

    def __init__(self, clients: int = 4) -> None:
        super().__init__(clients, join_s=30)
        buf = io.BytesIO()
        synthetic.render(0, 0, 48).save(buf, format="JPEG")
        self.img = buf.getvalue()

    def request(self, session, t0: float) -> tuple[int, str | None]:
        r = session.post(URL + "/predict", data=self.img, headers={"content-type": "image/jpeg"}, timeout=30)
        return r.status_code, r.json().get("version") if r.status_code == 200 else None


@pytest.fixture(scope="module")
def site(ray_cluster, tmp_path_factory):
    from mlplatform.deployments.serve_mode import undeploy

    root = tmp_path_factory.mktemp("auto")
    trained_with_copies(root, 2)  # v2: a good candidate, v3: one that fails (serve.chaos_fail_versions)
    yield root
    undeploy("auto-rollout")


def _evidence(summary: dict, kind: str) -> str:
    step = next(s for s in summary["steps"] if s["evidence"].endswith(f"-{kind}.md"))
    return Path(step["evidence"]).read_text()


def test_auto_rollout_promotes_a_good_canary_and_rolls_back_a_failing_one(site: Path) -> None:
    from mlplatform.deployments.serve_mode import deploy

    canary = "[{ref: v1, role: stable, weight: 90}, {ref: v2, role: canary, weight: 10}]"
    deploy(compose("+mode=serve", *_serve(site, canary)))
    with Load() as load:
        wait_for(lambda: len(load.results) >= 20, timeout=60)
        good = run_auto(compose("+mode=rollout", *_serve(site, canary), *AUTO))
    assert good["decision"] == "promote", json.dumps(good)[:3000]
    assert [s["decision"] for s in good["steps"]] == ["advance", "promote"]
    assert Registry(str(site / "registry"), MODEL).aliases()["production"] == "v2"
    models = requests.get(URL + "/models", timeout=30).json()["versions"]
    assert [(m["version"], m["weight"]) for m in models] == [("v2", 100)]
    assert not [a for a in load.results if a[0] != 200]  # the steps failed no request
    text = _evidence(good, "promote")
    assert "error_rate" in text and "latency" in text and "p (worse)" in text
    # Every look, holds included, is in the decision log with its sample sizes.
    looks = [json.loads(line) for line in (Path(good["record"]) / "decisions.jsonl").read_text().splitlines()]
    assert len(looks) == good["looks"] and all(rec["canary"]["requests"] >= 0 for rec in looks)

    bad = "[{ref: v2, role: stable, weight: 80}, {ref: v3, role: canary, weight: 20}]"
    deploy(compose("+mode=serve", *_serve(site, bad, "serve.chaos_fail_versions=[v3]")))
    with Load() as load:
        wait_for(lambda: len(load.results) >= 20, timeout=60)
        rolled = run_auto(compose("+mode=rollout", *_serve(site, bad, "serve.chaos_fail_versions=[v3]"), *AUTO))
        mark = len(load.results)
        wait_for(lambda: len(load.results) >= mark + 10, timeout=60)
    assert rolled["decision"] == "rollback", json.dumps(rolled)[:3000]
    models = requests.get(URL + "/models", timeout=30).json()["versions"]
    assert [(m["version"], m["weight"]) for m in models] == [("v2", 100)]
    assert set(Counter(load.results[mark:])) == {(200, "v2")}  # the canary is gone
    error_row = next(line for line in _evidence(rolled, "rollback").splitlines() if line.startswith("| error_rate"))
    assert error_row.rstrip(" |").endswith("rollback"), error_row


def test_decisions_go_through_git_and_the_reconciler_serves_them(site: Path, tmp_path: Path) -> None:
    """The whole loop: rollout.auto commits each decision to the watched branch, +mode=sync
    (running meanwhile) applies it in place, and the rollout waits until it is served."""
    from mlplatform.sync.reconciler import Reconciler

    watched = Watched(tmp_path)
    start = watched.commit("v1 stable, v2 canary at 10", set_traffic(90, 10))
    served = _serve(site, "[]")  # the versions come from the commit
    pinned = ", ".join(f"'{o}'" for o in served if not o.startswith("serve.versions="))
    git = (f"gitops.repo={watched.remote}", "gitops.branch=main", "gitops.interval_s=1")
    rec = Reconciler(compose("+mode=sync", f"paths.root={site}", *git, f"gitops.overrides=[{pinned}]"))
    loop = threading.Thread(target=rec.run, daemon=True)
    loop.start()
    try:
        wait_for(lambda: rec.status().get("applied_commit") == start, 60, message=lambda: str(rec.status()))
        with Load() as load:
            wait_for(lambda: len(load.results) >= 20, timeout=60)
            auto = [o.replace("apply_via=direct", "apply_via=git") for o in AUTO]
            result = run_auto(compose("+mode=rollout", *served, *auto, *git))
    finally:
        rec.stop()
        loop.join(timeout=30)
    assert result["decision"] == "promote", json.dumps(result)[:3000]
    commits = [s["commit"] for s in result["steps"]]
    assert len(commits) == 2 and all(commits)
    history = subprocess.run(["git", "-C", str(watched.remote), "log", "--format=%H", "main"], check=True,
                             capture_output=True, text=True).stdout.split()
    assert history[:2] == commits[::-1] and history[2] == start  # each decision one commit on the branch
    assert rec.status()["applied_commit"] == commits[-1]
    models = requests.get(URL + "/models", timeout=30).json()["versions"]
    assert [(m["version"], m["weight"]) for m in models] == [("v2", 100)]
    assert not [a for a in load.results if a[0] != 200]  # neither commit failed a request
