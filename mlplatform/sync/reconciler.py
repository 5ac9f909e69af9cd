"""`+mode=sync`: keep the running Serve app at what the watched Git branch says.

Each poll: fetch `gitops.branch` of `gitops.repo` into a bare mirror under
dirname(gitops.status_path)/cache; at a new head, compose that commit's `gitops.conf_dir` as
`+mode=serve` plus `gitops.overrides`, validate it (mlplatform.config, then the registry's refs
as +mode=serve resolves them) and apply it in place (serve_mode.deploy, with the commit as
the app's `source`). Then compare the running applications with what the applied commit
composes to: a difference is drift, reported, and re-applied with `gitops.self_heal`.

The state machine is mlplatform/sync/state.py; what it decides is written to the status
file, exported as Ray metrics (mlp_gitops_*), and a refusal or drift is appended to the
platform's alerts log (monitor.alerts.path).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import UTC, datetime
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mlplatform import storage
from mlplatform.errors import ConfigError, JobFailed
from mlplatform.sync import state as sm
from mlplatform.sync.repo import GitError, Mirror

log = logging.getLogger("mlplatform.sync")

ACTOR_NAME = "mlp-gitops-sync"
ACTOR_NAMESPACE = "mlplatform"


# ----------------------------------------------------------------------------- compose


def compose_commit(config_dir: str, overrides: list[str]) -> DictConfig:
    """The commit's config, composed and validated as `python run.py +mode=serve <overrides>`
    would see it there. ConfigError (one line) on any user error.

    In this process, not a subprocess: a compose costs well under a second here, against
    seconds for a fresh interpreter on a busy head node. Hydra's GlobalHydra is a process
    singleton that @hydra.main holds while the mode runs, so it is set aside for the compose
    and put back after; nothing else of Hydra's global state is touched by compose."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.singleton import Singleton

    from mlplatform.cli_check import compose_checked
    from mlplatform.config import register_configs

    register_configs()  # the schemas the running platform validates with (a no-op when registered)
    held = Singleton._instances.pop(GlobalHydra, None)
    try:
        return compose_checked(config_dir, ["+mode=serve", *overrides])
    finally:
        Singleton._instances.pop(GlobalHydra, None)
        if held is not None:
            Singleton._instances[GlobalHydra] = held


def desired_apps(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """What the config deploys: each application's ServeApplicationSchema, normalised.
    Resolves the registry's refs and verifies checksums, as +mode=serve does."""
    from mlplatform.deployments.serve_mode import deploy_schema, resolve_settings

    schema = deploy_schema(cfg, resolve_settings(cfg))
    return {app.name: normalise(app.model_dump(mode="json", exclude_unset=True)) for app in schema.applications}


def normalise(app: dict[str, Any]) -> dict[str, Any]:
    """An application config in one form (Ray's schema, only the keys set), deployments keyed
    by name, the `source` stamp left out: the same config from Git and from the controller
    compare equal."""
    from ray.serve.schema import ServeApplicationSchema

    data = ServeApplicationSchema.model_validate(app).model_dump(mode="json", exclude_unset=True)
    deployments = {}
    for d in data.pop("deployments", None) or []:
        d = dict(d)
        if isinstance(d.get("user_config"), dict):
            d["user_config"] = {k: v for k, v in d["user_config"].items() if k != "source"}
        deployments[d.pop("name")] = d
    return {**data, "deployments": deployments}


def _diff(a: Any, b: Any, path: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            _diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k), out)
    elif a != b:
        out.append(path)


def differences(desired: dict[str, dict[str, Any]], running: dict[str, dict[str, Any]]) -> list[str]:
    """The keys where the running applications differ from Git's, e.g.
    `species.deployments.Ingress.user_config.routes`; an application only one side has is
    `<app> (not running)` or `<app> (not in Git)`."""
    out: list[str] = []
    for name in sorted(set(desired) | set(running)):
        if name not in running:
            out.append(f"{name} (not running)")
        elif name not in desired:
            out.append(f"{name} (not in Git)")
        else:
            _diff(desired[name], normalise(running[name]), name, out)
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:1000]


# ----------------------------------------------------------------------------- metrics


class _Metrics:
    """The mlp_gitops_* gauges, exported by Ray's metrics agent of the node this runs on;
    nothing when Ray is not connected (a unit test of the loop)."""

    def __init__(self) -> None:
        import ray
        from ray.util.metrics import Gauge

        self.on = ray.is_initialized()
        if not self.on:
            return
        self.info = Gauge("mlp_gitops_applied_info", description="1 for the commit the reconciler applied last",
                          tag_keys=("commit",))
        self.failing = Gauge("mlp_gitops_sync_failing",
                             description="1 while the watched branch's head is refused or cannot be applied")
        self.drift = Gauge("mlp_gitops_drift", description="1 while the running app differs from Git")
        self.applied_ts = Gauge("mlp_gitops_last_apply_timestamp_seconds",
                                description="When the reconciler last applied a commit (Unix time)")
        self.commit: str | None = None

    def export(self, s: sm.SyncState) -> None:
        if not self.on:
            return
        if s.applied and s.applied != self.commit:
            if self.commit:
                self.info.set(0, tags={"commit": self.commit})
            self.info.set(1, tags={"commit": s.applied})
            self.commit = s.applied
        self.failing.set(1 if sm.failing(s) else 0)
        self.drift.set(1 if s.drift else 0)
        if s.applied_ts:
            self.applied_ts.set(s.applied_ts)


# ----------------------------------------------------------------------------- the reconciler


class Reconciler:
    """One reconciler of one branch. `poll()` is one pass; `run()` polls until stopped."""

    def __init__(self, cfg: DictConfig) -> None:
        g = cfg.gitops
        self.repo, self.branch, self.conf_dir = str(g.repo), str(g.branch), str(g.conf_dir)
        self.overrides = [str(o) for o in g.overrides]
        self.interval_s, self.self_heal = float(g.interval_s), bool(g.self_heal)
        self.status_path = storage.resolve_root(str(g.status_path))
        self.alerts_path = storage.resolve_root(str(cfg.monitor.alerts.path))
        self.mirror = Mirror(self.repo, self.branch, os.path.join(os.path.dirname(self.status_path), "cache"))
        self.state = sm.SyncState()
        self.desired: dict[str, dict[str, Any]] | None = None  # what `state.applied` composes to
        self.cfgs: dict[str, DictConfig] = {}  # composed configs by commit (the applied one and the next)
        self.metrics = _Metrics()
        self._alerted: tuple[str, str] | None = None
        self._stop = threading.Event()
        self._load()

    # ------------------------------------------------------------------ one pass

    def poll(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        try:
            head = self.mirror.fetch()
        except (GitError, OSError) as exc:
            sm.fetch_failed(self.state, f"gitops.repo={self.repo}: {_first_line(exc)}", now)
        else:
            target = sm.head_seen(self.state, head, now)
            if target:
                self._apply(target, now)
        if self.state.applied and self.state.state != "applying":
            self._check_drift(time.time())
        self.mirror.prune({c for c in (self.state.applied, self.state.seen) if c})
        return self._publish()

    def _compose(self, commit: str) -> DictConfig:
        if commit not in self.cfgs:
            try:
                root = self.mirror.checkout(commit, self.conf_dir)
            except GitError as exc:
                raise ConfigError("gitops.conf_dir", self.conf_dir, f"not in commit {commit[:12]}: "
                                  f"{_first_line(exc)}") from None
            config_dir = os.path.join(root, self.conf_dir)
            if not os.path.isfile(os.path.join(config_dir, "config.yaml")):
                raise ConfigError("gitops.conf_dir", self.conf_dir, f"no config.yaml there in commit {commit[:12]}")
            self.cfgs = {c: v for c, v in self.cfgs.items() if c == self.state.applied}
            self.cfgs[commit] = compose_commit(config_dir, self.overrides)
        return self.cfgs[commit]

    def _apply(self, commit: str, now: float) -> None:
        from mlplatform.deployments.serve_mode import deploy

        try:
            cfg = self._compose(commit)
            desired = desired_apps(cfg)  # the registry's refs resolve, checksums hold
        except (ConfigError, JobFailed) as exc:
            sm.invalid(self.state, commit, f"commit {commit[:12]}: {exc}", now)
            log.error("gitops: refused commit %s: %s", commit[:12], exc)
            self._alert("gitops_sync_failed", commit, self.state.error or "")
            return
        try:
            deploy(cfg, None, source={"repo": self.repo, "branch": self.branch, "commit": commit})
        except Exception as exc:  # Serve did not bring it up: retried at the next poll
            sm.apply_failed(self.state, commit, f"commit {commit[:12]}: apply failed: {_first_line(exc)}", now)
            log.error("gitops: %s", self.state.error)
            self._alert("gitops_sync_failed", commit, self.state.error or "")
            return
        sm.applied(self.state, commit, time.time())
        self.desired = desired
        self._alerted = None
        log.info("gitops: applied %s of %s", commit[:12], self.branch)

    def _check_drift(self, now: float) -> None:
        from mlplatform import ray_compat

        if self.desired is None:
            try:  # a restarted reconciler: what its last applied commit composes to
                self.desired = desired_apps(self._compose(self.state.applied or ""))
            except (ConfigError, JobFailed, GitError) as exc:
                log.warning("gitops: cannot compose the applied commit for the drift check: %s", exc)
                return
        running = ray_compat.serve_app_configs()
        diff = differences(self.desired, running)
        target = sm.drift_checked(self.state, diff, self.self_heal, now)
        if diff:
            self._alert("gitops_drift", self.state.applied or "", ", ".join(diff[:20]))
        elif self._alerted and self._alerted[0] == "gitops_drift":
            self._alerted = None  # the next drift alerts again
        if target:
            log.warning("gitops: drift from %s (%s): re-applying Git", target[:12], ", ".join(diff[:5]))
            self._apply(target, now)

    # ------------------------------------------------------------------ reporting

    def status(self) -> dict[str, Any]:
        s = self.state

        def iso(ts: float | None) -> str | None:
            return datetime.fromtimestamp(ts, UTC).isoformat() if ts else None

        return {"state": s.state, "applied_commit": s.applied, "seen_commit": s.seen, "failed_commit": s.failed,
                "error": s.error, "drift": s.drift, "applied_at": iso(s.applied_ts),
                "state_since": iso(s.changed_ts), "updated_at": iso(time.time()),
                "repo": self.repo, "branch": self.branch, "self_heal": self.self_heal,
                "interval_s": self.interval_s, "status_path": self.status_path,
                "_machine": s.to_dict()}

    def _publish(self) -> dict[str, Any]:
        status = self.status()
        os.makedirs(os.path.dirname(self.status_path), exist_ok=True)
        tmp = f"{self.status_path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(status, f, indent=2, default=str)
        os.replace(tmp, self.status_path)  # readers never see half a file
        self.metrics.export(self.state)
        return status

    def _load(self) -> None:
        """A restarted reconciler carries on from its status file: the commit serving, and a
        refusal it already made."""
        try:
            with open(self.status_path, encoding="utf-8") as f:
                saved = json.load(f).get("_machine") or {}
        except (OSError, ValueError):
            return
        if saved.get("state") == "applying":
            saved["state"] = "synced" if saved.get("applied") else "pending"
        fields = {k: saved[k] for k in sm.SyncState.__dataclass_fields__ if k in saved}
        self.state = sm.SyncState(**fields)

    def _alert(self, kind: str, commit: str, detail: str) -> None:
        """One record in the platform's alerts log per refusal or drift (not one per poll)."""
        from mlplatform.monitoring.alerts import append_alert

        if self._alerted == (kind, commit + detail):
            return
        self._alerted = (kind, commit + detail)
        ts = time.time()
        append_alert(self.alerts_path, {
            "ts": ts, "time": datetime.fromtimestamp(ts, UTC).isoformat(), "kind": kind, "version": commit[:12],
            "detector": "gitops", "action": "heal" if kind == "gitops_drift" and self.self_heal else "log",
            "detail": detail[:500], "repo": self.repo, "branch": self.branch, "commit": commit})

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Poll every interval_s until stop()."""
        status = self.poll()
        while not self._stop.wait(self.interval_s):
            try:
                status = self.poll()
            except Exception:  # a bug in one pass must not end the reconciler; the next pass retries
                log.exception("gitops: poll failed")
        return status

    def stop(self) -> None:
        self._stop.set()


# ----------------------------------------------------------------------------- as an actor


class SyncActor:
    """The reconciler as a detached Ray actor: it polls in a thread of its own."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        logging.basicConfig(level=logging.INFO)
        self.reconciler = Reconciler(OmegaConf.create(cfg))
        self.thread = threading.Thread(target=self._run, name="gitops-sync", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.reconciler.run()
        except Exception:
            log.exception("gitops: the reconciler stopped")

    def status(self) -> dict[str, Any]:
        return self.reconciler.status()


def start_actor(cfg: DictConfig) -> dict[str, Any]:
    """Replace any reconciler actor with one running this config; returns where it reports."""
    import ray

    try:
        ray.kill(ray.get_actor(ACTOR_NAME, namespace=ACTOR_NAMESPACE))
    except ValueError:
        pass  # none running
    # The config travels resolved: paths are this driver's (the head's, in a cluster).
    resolved = OmegaConf.to_container(cfg, resolve=True)
    actor = ray.remote(num_cpus=0)(SyncActor).options(
        name=ACTOR_NAME, namespace=ACTOR_NAMESPACE, lifetime="detached", max_restarts=-1).remote(resolved)
    first = ray.get(actor.status.remote(), timeout=120)
    return {"actor": ACTOR_NAME, "namespace": ACTOR_NAMESPACE, "status_path": first["status_path"]}


def run_sync(cfg: DictConfig) -> dict[str, Any]:
    """The mode: one pass (gitops.once), the loop until SIGINT/SIGTERM, or the actor."""
    import signal

    from mlplatform.raycluster import ray_session

    if not cfg.gitops.repo:
        raise ConfigError("gitops.repo", None, "+mode=sync watches a repository: set a path or a URL git can fetch")
    if cfg.gitops.actor and not cfg.ray.address:
        raise ConfigError("gitops.actor", True, "the actor runs in a running cluster: set ray.address (e.g. auto)")
    with ray_session(cfg.ray):
        if cfg.gitops.actor:
            where = start_actor(cfg)
            print(f"reconciler actor {where['namespace']}/{where['actor']}; status: {where['status_path']}", flush=True)
            return {"mode": "sync", **where}
        reconciler = Reconciler(cfg)
        if not cfg.gitops.once:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: reconciler.stop())
            print(f"watching {reconciler.repo} {reconciler.branch} every {reconciler.interval_s:g} s; "
                  f"status: {reconciler.status_path}", flush=True)
        status = reconciler.poll() if cfg.gitops.once else reconciler.run()
        summary = {"mode": "sync", **{k: v for k, v in status.items() if k != "_machine"}}
        if cfg.gitops.once and status["state"] == "failed":
            raise JobFailed(f"gitops: {status['error']}", summary)  # a CI step or cron job sees it
        return summary
