"""`+mode=sync`, the reconciler: its state machine (pure), the comparison behind drift, the
refusal of invalid commits on a real git repository, and, on live Serve, a watched branch
whose commits reach production in place under load."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from mlplatform.sync import state as sm
from mlplatform.sync.reconciler import Reconciler, compose_commit, differences, normalise

from .conftest import CONF, SERVE_PORT, compose, run_cli, wait_for

C1, C2, C3 = "a" * 40, "b" * 40, "c" * 40


# ----------------------------------------------------------------------------- the state machine


def test_new_commits_apply_once_each() -> None:
    s = sm.SyncState()
    assert sm.head_seen(s, C1, 1) == C1 and s.state == "applying" and s.target == C1
    sm.applied(s, C1, 2)
    assert (s.state, s.applied, s.applied_ts, s.target) == ("synced", C1, 2, None)
    assert sm.head_seen(s, C1, 3) is None and s.state == "synced"  # nothing new: nothing to do
    assert sm.head_seen(s, C2, 4) == C2 and s.state == "applying" and s.applied == C1
    sm.applied(s, C2, 5)
    assert (s.state, s.applied, s.seen) == ("synced", C2, C2)


def test_an_invalid_commit_is_refused_once_and_the_last_good_one_keeps_serving() -> None:
    s = sm.SyncState()
    sm.head_seen(s, C1, 1)
    sm.applied(s, C1, 2)
    assert sm.head_seen(s, C2, 3) == C2
    sm.invalid(s, C2, "serve.versions[1].weight=-5: must be in [0, 100]", 4)
    assert (s.state, s.applied, s.failed, s.error) == ("failed", C1, C2, "serve.versions[1].weight=-5: must be "
                                                                         "in [0, 100]")
    assert sm.failing(s) and s.changed_ts == 4
    assert sm.head_seen(s, C2, 5) is None and s.state == "failed"  # not retried: it cannot change
    assert sm.head_seen(s, C3, 6) == C3  # the next commit is applied
    sm.applied(s, C3, 7)
    assert (s.state, s.applied, s.failed, s.error) == ("synced", C3, None, None) and not sm.failing(s)


def test_a_branch_reset_to_the_serving_commit_clears_the_refusal() -> None:
    s = sm.SyncState()
    sm.head_seen(s, C1, 1)
    sm.applied(s, C1, 2)
    sm.head_seen(s, C2, 3)
    sm.invalid(s, C2, "bad", 4)
    assert sm.head_seen(s, C1, 5) is None and (s.state, s.failed, s.error) == ("synced", None, None)


def test_a_failed_apply_is_retried_at_the_next_poll() -> None:
    s = sm.SyncState()
    sm.head_seen(s, C1, 1)
    sm.apply_failed(s, C1, "application species did not start", 2)
    assert s.state == "failed" and s.applied is None and s.retry
    assert sm.head_seen(s, C1, 3) == C1 and s.state == "applying"
    sm.applied(s, C1, 4)
    assert s.state == "synced" and not s.retry


def test_an_unreachable_remote_is_failing_until_it_answers() -> None:
    s = sm.SyncState()
    sm.head_seen(s, C1, 1)
    sm.applied(s, C1, 2)
    sm.fetch_failed(s, "gitops.repo=/gone: git fetch: does not appear to be a git repository", 3)
    assert (s.state, s.applied, s.failed) == ("failed", C1, None) and "/gone" in (s.error or "")
    assert sm.head_seen(s, C1, 4) is None and (s.state, s.error) == ("synced", None)


def test_drift_is_reported_or_healed() -> None:
    s = sm.SyncState()
    assert sm.drift_checked(s, ["species (not running)"], True, 1) is None  # nothing applied yet: no verdict
    sm.head_seen(s, C1, 1)
    sm.applied(s, C1, 2)
    assert sm.drift_checked(s, ["species.deployments.Ingress.user_config.routes"], False, 3) is None
    assert s.state == "drifted" and s.drift == ["species.deployments.Ingress.user_config.routes"]
    assert sm.drift_checked(s, [], False, 4) is None and (s.state, s.drift) == ("synced", [])
    assert sm.drift_checked(s, ["x"], True, 5) == C1 and s.state == "applying"  # self-heal: Git again
    sm.applied(s, C1, 6)
    assert (s.state, s.drift) == ("synced", [])


def test_drift_during_a_refusal_keeps_the_refusal_as_the_state() -> None:
    s = sm.SyncState()
    sm.head_seen(s, C1, 1)
    sm.applied(s, C1, 2)
    sm.head_seen(s, C2, 3)
    sm.invalid(s, C2, "bad", 4)
    assert sm.drift_checked(s, ["x"], False, 5) is None and (s.state, s.drift) == ("failed", ["x"])
    sm.head_seen(s, C1, 6)  # reverted: the drift is still there
    assert s.state == "drifted"


# ----------------------------------------------------------------------------- drift's comparison


def _app(weight_v2: int, source: dict | None = None) -> dict:
    routes = [{"version": "v1", "role": "stable", "weight": 100 - weight_v2},
              {"version": "v2", "role": "canary", "weight": weight_v2}]
    return {"name": "species", "route_prefix": "/", "import_path": "mlplatform.deployments.app:build_app",
            "args": {"settings": {"versions": ["v1", "v2"]}},
            "deployments": [{"name": "model-v1", "num_replicas": "auto"},
                            {"name": "Ingress", "user_config": {"routes": routes, "source": source}}]}


def test_differences_name_the_keys_and_ignore_the_source_stamp() -> None:
    desired = {"species": normalise(_app(10))}
    stamped = _app(10, {"repo": "r", "branch": "main", "commit": C1})
    assert differences(desired, {"species": stamped}) == []
    moved = _app(30)
    moved["deployments"].reverse()  # order does not matter: deployments compare by name
    assert differences(desired, {"species": moved}) == ["species.deployments.Ingress.user_config.routes"]
    assert differences(desired, {}) == ["species (not running)"]
    assert differences(desired, {"species": stamped, "other": _app(0)}) == ["other (not in Git)"]


# ----------------------------------------------------------------------------- a real repository


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout.strip()


class Watched:
    """A bare repository (the remote the reconciler watches) and a clone that pushes to it."""

    def __init__(self, tmp: Path) -> None:
        self.remote, self.work = tmp / "remote.git", tmp / "work"
        subprocess.run(["git", "init", "--quiet", "--bare", "-b", "main", str(self.remote)], check=True)
        subprocess.run(["git", "clone", "--quiet", str(self.remote), str(self.work)], check=True,
                       capture_output=True)
        shutil.copytree(CONF, self.work / "conf")

    def commit(self, message: str, edit=None) -> str:
        if edit:
            edit(self.work)
        _git(self.work, "add", "-A")
        _git(self.work, "commit", "--quiet", "--allow-empty", "-m", message)
        _git(self.work, "push", "--quiet", "origin", "HEAD:main")
        return _git(self.work, "rev-parse", "HEAD")


def set_traffic(*weights: int):
    """An edit of conf/serve/default.yaml's versions: v1 stable, then canaries v2..."""
    def edit(work: Path) -> None:
        path = work / "conf" / "serve" / "default.yaml"
        entries = "".join(f"  - {{ref: v{i + 1}, role: {'stable' if i == 0 else 'canary'}, weight: {w}}}\n"
                          for i, w in enumerate(weights))
        text, n = re.subn(r"(?ms)^versions:\n.*?^(?=shadows:)", "versions:\n" + entries, path.read_text())
        assert n == 1
        path.write_text(text)
    return edit


def _sync_cfg(tmp: Path, watched: Watched, *extra: str, overrides: tuple[str, ...] = ()):
    items = ", ".join(f"'{o}'" for o in (f"paths.root={tmp / 'root'}", *overrides))
    return compose("+mode=sync", f"paths.root={tmp / 'root'}", f"gitops.repo={watched.remote}",
                   f"gitops.overrides=[{items}]", *extra)


def test_an_invalid_commit_is_refused_with_its_one_line_error(tmp_path: Path) -> None:
    watched = Watched(tmp_path)
    bad = watched.commit("canary at -5", set_traffic(105, -5))
    cfg = _sync_cfg(tmp_path, watched)
    rec = Reconciler(cfg)
    status = rec.poll()
    assert status["state"] == "failed" and status["failed_commit"] == bad and status["applied_commit"] is None
    assert status["error"] == f"commit {bad[:12]}: serve.versions[0].weight=105: must be in [0, 100]"
    assert json.loads(Path(status["status_path"]).read_text())["error"] == status["error"]
    alerts = [json.loads(line) for line in (tmp_path / "root" / "alerts" / "alerts.jsonl").read_text().splitlines()]
    assert [(a["kind"], a["commit"], a["detail"]) for a in alerts] == [("gitops_sync_failed", bad, status["error"])]
    rec.poll()  # the same head: neither retried nor alerted again
    assert len((tmp_path / "root" / "alerts" / "alerts.jsonl").read_text().splitlines()) == 1
    # An unknown key and a missing config directory are refused the same way.
    unknown = watched.commit("a typo", lambda w: (w / "conf" / "serve" / "default.yaml").write_text(
        (w / "conf" / "serve" / "default.yaml").read_text() + "weigth: 3\n"))
    assert rec.poll()["error"].startswith(f"commit {unknown[:12]}: serve.weigth")
    gone = watched.commit("conf moved", lambda w: shutil.move(w / "conf", w / "config"))
    assert rec.poll()["error"].startswith(f"commit {gone[:12]}: gitops.conf_dir=conf: not in commit")
    # A restarted reconciler remembers the refusal.
    again = Reconciler(cfg).status()
    assert (again["state"], again["failed_commit"]) == ("failed", gone)


def test_a_ref_the_registry_cannot_resolve_is_refused(tmp_path: Path) -> None:
    watched = Watched(tmp_path)
    head = watched.commit("v1 and v2", set_traffic(90, 10))
    status = Reconciler(_sync_cfg(tmp_path, watched)).poll()
    assert status["failed_commit"] == head and status["error"].startswith(f"commit {head[:12]}: serve.versions[0].ref=v1")


def test_an_unreachable_repository_is_failing(tmp_path: Path) -> None:
    watched = Watched(tmp_path)
    cfg = _sync_cfg(tmp_path, watched, f"gitops.repo={tmp_path / 'nowhere'}")
    status = Reconciler(cfg).poll()
    assert status["state"] == "failed" and status["error"].startswith(f"gitops.repo={tmp_path / 'nowhere'}: git fetch")


def test_compose_sets_hydras_global_state_back(tmp_path: Path) -> None:
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    watched = Watched(tmp_path)
    watched.commit("one", set_traffic(90, 10))
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):  # as under @hydra.main
        hydra = GlobalHydra.instance().hydra
        cfg = compose_commit(str(watched.work / "conf"), ["serve.port=9999"])
        assert GlobalHydra.instance().hydra is hydra
    assert not GlobalHydra.instance().is_initialized()
    assert cfg.serve.port == 9999 and [v.weight for v in cfg.serve.versions] == [90, 10]
    compose_commit(str(watched.work / "conf"), [])  # and with none held
    assert not GlobalHydra.instance().is_initialized()


def test_sync_needs_a_repository_and_the_actor_a_cluster() -> None:
    proc = run_cli("+mode=sync")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: gitops.repo=None: ")
    proc = run_cli("+mode=sync", "gitops.repo=/tmp", "gitops.actor=true")
    assert proc.returncode == 2 and "error: gitops.actor=True: " in proc.stderr


# ----------------------------------------------------------------------------- on live Serve


URL = f"http://127.0.0.1:{SERVE_PORT}"
INTERVAL_S = 2.0


def _jpeg() -> bytes:
    from mlplatform.data import synthetic

    buf = io.BytesIO()
    synthetic.render(0, 0, 48).save(buf, format="JPEG")
    return buf.getvalue()


def _weights() -> dict[str, int]:
    try:
        body = requests.get(URL + "/models", timeout=5).json()
    except (requests.RequestException, ValueError):
        return {}
    return {v["version"]: v.get("weight") for v in body.get("versions", [])}


def _gauge(name: str) -> list[tuple[dict[str, str], float]]:
    """The series of `name` on this node's Ray metrics endpoint."""
    from mlplatform import ray_compat

    text = requests.get(f"http://127.0.0.1:{ray_compat.metrics_export_port()}/metrics", timeout=5).text
    out = []
    for m in re.finditer(rf"^ray_{name}(?:{{(.*?)}})? (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        out.append((labels, float(m.group(2))))
    return out


@pytest.mark.ray
def test_commits_reach_serve_in_place_and_a_broken_one_keeps_the_last_good(ray_cluster, tmp_path: Path) -> None:
    from mlplatform.deployments.serve_mode import undeploy
    from mlplatform.registry.store import Registry
    from mlplatform.training.job import run_train

    root = tmp_path / "root"
    run_train(compose("+mode=train", "+experiment=smoke", f"paths.root={root}", "logger=none"))
    reg = Registry(str(root / "registry"), "species-classifier")
    meta = {k: v for k, v in reg.get("v1").items() if k not in ("version", "created", "files", "weights_sha256")}
    reg.register(reg.load_state_dict("v1"), {**meta, "source": "copy-of-v1"})

    watched = Watched(tmp_path)
    c1 = watched.commit("v1 stable, v2 canary at 10", set_traffic(90, 10))
    cfg = _sync_cfg(tmp_path, watched, f"gitops.interval_s={INTERVAL_S}", overrides=(
        "+experiment=smoke", "monitor.enabled=false", f"serve.port={SERVE_PORT}", "serve.deployment.num_cpus=0.25",
        "serve.deployment.min_replicas=1", "serve.deployment.max_replicas=1"))
    rec = Reconciler(cfg)
    first = rec.poll()
    assert (first["state"], first["applied_commit"], first["drift"]) == ("synced", c1, []), first
    assert _weights() == {"v1": 90, "v2": 10}
    from mlplatform import ray_compat
    ingress = next(d for d in ray_compat.serve_app_configs()["species"]["deployments"] if d["name"] == "Ingress")
    assert ingress["user_config"]["source"] == {"repo": str(watched.remote), "branch": "main", "commit": c1}

    status_file = Path(cfg.gitops.status_path)  # written once per poll, when the pass is done
    loop = threading.Thread(target=rec.run, daemon=True)
    loop.start()
    img, stop, results = _jpeg(), threading.Event(), []

    def load() -> None:
        with requests.Session() as s:
            while not stop.is_set():
                try:
                    r = s.post(URL + "/predict", data=img, headers={"content-type": "image/jpeg"}, timeout=30)
                    results.append((time.time(), r.status_code))
                except requests.RequestException as exc:
                    results.append((time.time(), type(exc).__name__))

    clients = [threading.Thread(target=load) for _ in range(3)]
    for t in clients:
        t.start()
    try:
        # 1. The canary moves 10 -> 30: served within the interval plus a margin.
        pushed = time.time()
        c2 = watched.commit("canary to 30", set_traffic(70, 30))
        wait_for(lambda: _weights() == {"v1": 70, "v2": 30}, INTERVAL_S + 20, message=lambda: str(rec.status()))
        took = time.time() - pushed  # served: what the ingress routes by
        wait_for(lambda: json.loads(status_file.read_text())["applied_commit"] == c2, 30,
                 message=lambda: str(rec.status()))
        # 2. A broken commit: refused, the last good config serves on, and status, metric and alert say so.
        bad = watched.commit("canary at -5", set_traffic(105, -5))
        status = wait_for(lambda: (lambda st: st["failed_commit"] == bad and st)(json.loads(status_file.read_text())),
                          INTERVAL_S + 20, message=lambda: str(rec.status()))
        assert (status["state"], status["applied_commit"]) == ("failed", c2)
        assert status["error"] == f"commit {bad[:12]}: serve.versions[0].weight=105: must be in [0, 100]"
        assert _weights() == {"v1": 70, "v2": 30}
        wait_for(lambda: [v for _, v in _gauge("mlp_gitops_sync_failing")] == [1.0], 20,
                 message=lambda: str(_gauge("mlp_gitops_sync_failing")))
        alerts = [json.loads(x) for x in (root / "alerts" / "alerts.jsonl").read_text().splitlines()]
        assert [(a["kind"], a["commit"]) for a in alerts if a["detector"] == "gitops"] == [("gitops_sync_failed", bad)]
        # 3. The next good commit applies.
        c4 = watched.commit("canary back to 10", set_traffic(90, 10))
        wait_for(lambda: _weights() == {"v1": 90, "v2": 10}, INTERVAL_S + 20, message=lambda: str(rec.status()))
        wait_for(lambda: (lambda st: (st["applied_commit"], st["state"]) == (c4, "synced"))(
            json.loads(status_file.read_text())), 30, message=lambda: str(rec.status()))
        wait_for(lambda: [v for _, v in _gauge("mlp_gitops_sync_failing")] == [0.0], 20)
        info = {labels["commit"]: v for labels, v in _gauge("mlp_gitops_applied_info")}
        assert info[c4] == 1.0 and info[c2] == 0.0
        wait_for(lambda: results and results[-1][0] > time.time() - 1, 10)  # load still answered
    finally:
        stop.set()
        for t in clients:
            t.join()
        rec.stop()
        loop.join(timeout=30)
    try:
        assert results and Counter(s for _, s in results) == Counter({200: len(results)}), \
            Counter(s for _, s in results)
        assert took < INTERVAL_S + 20
        # Drift: a deploy by hand is reported; self-heal puts Git back.
        from mlplatform.deployments.serve_mode import deploy

        deploy(compose(
            "+mode=serve", "+experiment=smoke", "monitor.enabled=false", f"paths.root={root}", f"serve.port={SERVE_PORT}",
            "serve.deployment.num_cpus=0.25", "serve.deployment.min_replicas=1", "serve.deployment.max_replicas=1",
            "serve.versions=[{ref: v1, role: stable, weight: 50}, {ref: v2, role: canary, weight: 50}]"))
        drifted = rec.poll()
        assert drifted["state"] == "drifted" and "species.deployments.Ingress.user_config.routes" in drifted["drift"]
        wait_for(lambda: [v for _, v in _gauge("mlp_gitops_drift")] == [1.0], 20,
                 message=lambda: str(_gauge("mlp_gitops_drift")))
        rec.self_heal = True
        healed = rec.poll()
        assert (healed["state"], healed["drift"], healed["applied_commit"]) == ("synced", [], c4)
        assert _weights() == {"v1": 90, "v2": 10}
        # The same loop as a detached actor in the cluster: it carries on from the status file.
        import ray

        from mlplatform.sync.reconciler import ACTOR_NAME, ACTOR_NAMESPACE, start_actor

        assert start_actor(cfg)["status_path"] == healed["status_path"]
        actor = ray.get_actor(ACTOR_NAME, namespace=ACTOR_NAMESPACE)
        try:
            c5 = watched.commit("canary to 20", set_traffic(80, 20))
            wait_for(lambda: _weights() == {"v1": 80, "v2": 20}, INTERVAL_S + 30,
                     message=lambda: str(ray.get(actor.status.remote())))
            wait_for(lambda: ray.get(actor.status.remote())["applied_commit"] == c5, 30)  # served first, then recorded
        finally:
            ray.kill(actor)
    finally:
        undeploy("species")
