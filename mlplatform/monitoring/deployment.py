"""The live drift monitor: a Serve deployment that polls capture storage, runs `Monitor`
on what is new, and exports its results as Prometheus metrics."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from ray import serve
from ray.serve.metrics import Counter, Gauge

from mlplatform.capture.schema import ANONYMOUS, FEEDBACK_SCHEMA, PREDICTION_SCHEMA
from mlplatform.capture.store import CaptureStore
from mlplatform.monitoring.windows import Monitor, WindowResult
from mlplatform.triggers import exit_status

log = logging.getLogger("mlplatform.monitor")


@serve.deployment(name="DriftMonitor", num_replicas=1, max_ongoing_requests=16)
class DriftMonitor:
    """Polls capture storage every `interval_s`; detectors and gauges live here, so the
    request path never waits for them. One replica: it owns the windows."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.s = settings
        # Background work: on a busy node the request path gets the CPU first.
        os.nice(int(settings["nice"]))
        self.store = CaptureStore(settings["capture_root"])
        tags = ("version", "detector")
        self.g_p = Gauge("mlp_drift_p_value", description="Drift p-value of the last window", tag_keys=tags)
        self.g_dist = Gauge("mlp_drift_distance", description="Drift statistic of the last window",
                            tag_keys=tags)
        self.g_thr = Gauge("mlp_drift_threshold", description="Drift threshold on the statistic or p-value",
                           tag_keys=tags)
        self.g_drift = Gauge("mlp_drift_is_drift", description="1 if the last window drifted", tag_keys=tags)
        self.g_acc = Gauge("mlp_live_accuracy", description="Rolling accuracy against feedback",
                           tag_keys=("version",))
        self.g_labels = Gauge("mlp_live_feedback_labels", description="Labels in the rolling window",
                              tag_keys=("version",))
        self.c_alerts = Counter("mlp_alerts_total", description="Alerts raised",
                                tag_keys=("version", "kind", "detector"))
        self.c_labels = Counter("mlp_feedback_labels_total", tag_keys=("version", "key_id"),
                                description="Feedback labels read by the monitor, per version and sending key")
        self.c_windows = Counter("mlp_monitor_windows_total", description="Windows scored", tag_keys=("version",))
        self.c_skipped = Counter("mlp_monitor_skipped_total", tag_keys=("version",),
                                 description="Captured predictions not scored (monitor.max_windows_per_poll)")
        self.c_retrain = Counter("mlp_retrain_total", tag_keys=("version", "outcome"),
                                 description="Retrains alerts triggered: started, succeeded, failed")
        self.retrains: dict[str, str] = {}  # log file of a started retrain -> version
        self.skipped: dict[str, int] = {}
        self.monitor = Monitor(settings, on_window=self._gauges, on_alert=self._count)
        self.seen: set[str] = set()
        self.started = time.time()
        self.last_poll: float | None = None
        self.error: str | None = None
        self._stop = threading.Event()
        self.versions: list[str] = []
        self.warmed: set[str] = set()
        self._warm = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="drift-monitor", daemon=True)
        self._thread.start()

    def _gauges(self, w: WindowResult) -> None:
        self.c_windows.inc(tags={"version": w.version})
        for r in w.results:
            tags = {"version": w.version, "detector": r.detector}
            if r.p_value is not None:
                self.g_p.set(r.p_value, tags=tags)
            self.g_dist.set(r.distance, tags=tags)
            self.g_thr.set(r.threshold, tags=tags)
            self.g_drift.set(1.0 if r.is_drift else 0.0, tags=tags)

    def _count(self, alert: dict[str, Any]) -> None:
        self.c_alerts.inc(tags={"version": alert["version"], "kind": alert["kind"],
                                "detector": alert["detector"]})
        if alert.get("retrain_error"):
            self.c_retrain.inc(tags={"version": alert["version"], "outcome": "failed"})
        elif alert.get("retrain_log"):
            self.c_retrain.inc(tags={"version": alert["version"], "outcome": "started"})
            self.retrains[alert["retrain_log"]] = alert["version"]

    def _check_retrains(self) -> None:
        """Count each started retrain's end; a non-zero exit is a failed retrain."""
        for path, version in list(self.retrains.items()):
            code = exit_status(path)
            if code is None:
                continue
            del self.retrains[path]
            self.c_retrain.inc(tags={"version": version, "outcome": "succeeded" if code == 0 else "failed"})
            if code != 0:
                log.error("retrain for %s exited %d: see %s", version, code, path)

    def poll(self) -> int:
        """Read capture files not seen yet (in time order) and feed the monitor."""
        plisted = self.store.prediction_files(since=self.started - 86400)
        flisted = self.store.feedback_files(since=self.started - 86400)
        pfiles = [f for f in plisted if f.path not in self.seen]
        ffiles = [f for f in flisted if f.path not in self.seen]
        n = 0
        if pfiles:
            cols = ["request_id", "ts", "version", "role", "top1_index", "embedding"]
            table = self.store.read(pfiles, PREDICTION_SCHEMA, cols, since=self.started)
            cap = int(self.s.get("max_windows_per_poll") or 0)
            if cap > 0 and table.num_rows:
                keep, skipped = self.monitor.sample_latest(table.column("version").to_pylist(),
                                                           table.column("ts").to_pylist(), cap)
                table = table.take(keep)
                for v, k in skipped.items():
                    self.skipped[v] = self.skipped.get(v, 0) + k
                    self.c_skipped.inc(k, tags={"version": v})
            rows = table.to_pylist()
            self.monitor.add_predictions(rows)
            n += len(rows)
        if ffiles:
            rows = self.store.read(ffiles, FEEDBACK_SCHEMA, since=self.started).to_pylist()
            self.monitor.add_feedback(rows)
            for r in rows:
                self.c_labels.inc(tags={"version": r["version"], "key_id": r["key_id"] or ANONYMOUS})
            for v in {r["version"] for r in rows}:
                acc, k = self.monitor.quality.accuracy(v)
                if acc is not None:
                    self.g_acc.set(acc, tags={"version": v})
                    self.g_labels.set(k, tags={"version": v})
            n += len(rows)
        # Everything listed is read now; what left the window is forgotten (bounded memory).
        self.seen = {f.path for f in [*plisted, *flisted]}
        self.last_poll = time.time()
        return n

    def reconfigure(self, config: dict[str, Any]) -> None:
        """The versions served (user_config): their detectors are loaded ahead of traffic."""
        self.versions = list(config.get("versions") or [])
        self._warm.set()

    def _warm_up(self) -> None:
        # Load the detectors (alibi-detect's import, each version's reference fit) while the
        # deployment starts or a version is added, not under the first traffic.
        for version in list(self.versions):
            if version not in self.warmed:
                self.warmed.add(version)
                self.monitor._monitor(version)  # a failure is logged and reported by status()

    def _loop(self) -> None:
        self._warm.wait(5.0)  # reconfigure runs right after __init__
        self._warm_up()
        while not self._stop.wait(float(self.s["interval_s"])):
            self._warm_up()
            try:
                self.poll()
                self._check_retrains()
                self.error = None
            except Exception as exc:  # keep watching; report the failure in status and logs
                self.error = f"{type(exc).__name__}: {exc}"[:500]
                log.exception("monitor poll failed")

    def status(self) -> dict[str, Any]:
        versions = {}
        completed = self.monitor.completed
        for v, m in self.monitor.monitors.items():
            acc, n = self.monitor.quality.accuracy(v)
            last = self.monitor.last_window.get(v)
            versions[v] = {"available": m is not None, "windows": completed.get(v, 0),
                           "pending": len(m._ts) if m else 0, "skipped": self.skipped.get(v, 0),
                           "accuracy": acc, "labels": n, "labels_by_key": self.monitor.quality.by_key(v),
                           "last": last.to_dict() if last else None}
        # Every label read since the monitor started, per sending key (the flood alert's counts).
        feedback = {"labels_by_key": dict(self.monitor.floods.totals)}
        return {"versions": versions, "feedback": feedback, "alerts": self.monitor.alerts.raised,
                "last_poll": self.last_poll,
                "error": self.error, "windows": [w.to_dict() for w in list(self.monitor.results)[-200:]]}

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the monitor thread died")

    def __del__(self) -> None:
        self._stop.set()
