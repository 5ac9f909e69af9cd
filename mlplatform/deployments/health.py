"""Which served versions have a live replica right now: the ingress's readiness answers, its
fast 503s, and the `mlp_version_healthy_replicas` gauge all read this, never a cached success.

A replica counts when the Serve controller has it RUNNING (constructed: model loaded and
warmed up) and its actor is alive in the GCS. The controller alone lags a kill -9 by up to
`health_check_period_s` (10 s); the GCS drops a dead actor's name within a second."""

from __future__ import annotations

import asyncio
import threading
import time

import ray
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Gauge

from mlplatform import ray_compat
from mlplatform.deployments.logs import log

# A refresh is two RPCs (controller, GCS): at 1 s, a dead replica is seen within ~1 s.
REFRESH_S = 1.0
# Counts older than this (the controller or GCS not answering) are unknown: not ready.
STALE_S = 5.0
# A "not ready" answer is looked at again unless this fresh: a replica that just came up,
# or an ingress that just started, is ready at once, and a flood of polls is one call.
RECHECK_S = 0.2
SERVE_NAMESPACE = "serve"


def tally(details: dict[str, dict], alive: set[str],
          kept_up: set[str]) -> tuple[dict[str, int], set[str], set[str]]:
    """From each version's controller details and the live actor names: live replica counts,
    the versions that must keep a replica (seen live, min_replicas >= 1), and those Serve is
    updating on purpose."""
    counts, kept_up, updating = {}, set(kept_up), set()
    for version, d in details.items():
        counts[version] = sum(1 for r in d.get("replicas", [])
                              if r.get("state") == "RUNNING" and r.get("actor_name") in alive)
        if ray_compat.config_updating(d):
            updating.add(version)
        if d and ray_compat.min_replicas(d) == 0:
            kept_up.discard(version)
        elif counts[version]:
            kept_up.add(version)
    return counts, kept_up, updating


class ReplicaHealth:
    """Live replica counts per version, refreshed on a thread (the calls block) every
    REFRESH_S, or at once after `refresh_soon()` (a batch that lost its replica)."""

    def __init__(self, models: dict[str, DeploymentHandle], ingress: tuple[str, str] | None = None) -> None:
        self.deployments = {v: (h.app_name, h.deployment_name) for v, h in models.items()}
        self.counts: dict[str, int] = {}
        # (app, deployment) of the ingress this runs in: its live replica count divides the
        # access rate limits. This replica counts itself, RUNNING in the controller or not yet.
        self.ingress = ingress
        self.me = ray.get_runtime_context().get_actor_name() if ingress else None
        self.ingress_count = 1
        # Versions whose replicas were seen live and must stay up (min_replicas >= 1). Only
        # these are "down" at zero: one still starting, or scaled to zero on purpose, waits
        # in Serve's queue for its replica instead of getting a 503.
        self.kept_up: set[str] = set()
        # Versions Serve is replacing on purpose (a redeploy that restarts replicas): a
        # one-replica version has none RUNNING for a moment, and its requests wait for the
        # new one in Serve's queue rather than getting a 503.
        self.updating: set[str] = set()
        self.at = float("-inf")  # time.monotonic() of the last successful refresh
        self.gauge = Gauge("mlp_version_healthy_replicas", tag_keys=("version",),
                           description="Replicas of a version that are RUNNING and alive")
        self._wake = threading.Event()
        self._lock = threading.Lock()  # one refresh at a time: the loop's or a readiness poll's
        self._failed = False
        threading.Thread(target=self._loop, name="replica-health", daemon=True).start()

    def track(self, models: dict[str, DeploymentHandle]) -> None:
        """The versions to count from now on (the ingress's traffic changed)."""
        self.deployments = {v: (h.app_name, h.deployment_name) for v, h in models.items()}
        self.refresh_soon()

    def refresh_soon(self) -> None:
        self._wake.set()

    def healthy(self, version: str) -> int | None:
        """Live replicas of `version`; None while unknown (no fresh answer)."""
        if time.monotonic() - self.at > STALE_S:
            return None
        return self.counts.get(version)

    def down(self, version: str) -> bool:
        """Lost every live replica it must keep. Unknown is not down: a slow controller must
        not turn every request into a 503."""
        return version in self.kept_up and version not in self.updating and self.healthy(version) == 0

    def ingress_replicas(self) -> int:
        """Ingress replicas running, this one included, as of the last refresh."""
        return self.ingress_count

    def ready(self, versions: list[str]) -> bool:
        return all(self.healthy(v) for v in versions)

    async def ready_now(self, versions: list[str]) -> bool:
        """`ready`, after a fresh look when the last one said no."""
        if not self.ready(versions):
            try:
                await asyncio.to_thread(self._refresh, RECHECK_S)
            except Exception:
                return False
        return self.ready(versions)

    def _loop(self) -> None:
        while True:
            try:
                self._refresh()
                self._failed = False
            except Exception as exc:
                if not self._failed:  # once per outage, not every second
                    log.warning("replica health unknown: %s: %s", type(exc).__name__, exc)
                self._failed = True
            self._wake.wait(REFRESH_S)
            self._wake.clear()

    def _refresh(self, unless_newer_than_s: float = 0.0) -> None:
        with self._lock:
            if time.monotonic() - self.at >= unless_newer_than_s:
                self._count()

    def _count(self) -> None:
        alive = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == SERVE_NAMESPACE}
        apps = {a for a, _ in self.deployments.values()} | ({self.ingress[0]} if self.ingress else set())
        every = ray_compat.all_serve_deployments()
        by_app = {app: every.get(app, {}) for app in apps}
        details = {v: by_app[app].get(name, {}) for v, (app, name) in self.deployments.items()}
        counts, kept_up, updating = tally(details, alive, self.kept_up)
        if self.ingress:
            app, name = self.ingress
            running = {r.get("actor_name") for r in by_app[app].get(name, {}).get("replicas", [])
                       if r.get("state") == "RUNNING"} & alive
            self.ingress_count = len(running | {self.me})
        self.counts, self.kept_up, self.updating, self.at = counts, kept_up, updating, time.monotonic()
        for version, n in counts.items():
            self.gauge.set(n, tags={"version": version})
