"""Drift and live-quality monitoring, fed from captured data, never from the request path.

`VersionMonitor` turns one version's captured predictions into fixed-size windows and runs
the configured detectors on each; `QualityTracker` keeps each version's rolling accuracy
against human feedback; `AlertManager` turns results into alerts (alerts log, structured
log, a configured action). The same classes run live in the `DriftMonitor` deployment and
offline in `+mode=monitor`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from mlplatform import storage
from mlplatform.monitoring import detectors as D

log = logging.getLogger("mlplatform.monitor")


def load_reference(registry_root: str, model_name: str, version: str) -> dict[str, Any]:
    """The served version's own reference (validation embeddings and predictions at training)."""
    from mlplatform.registry import Registry

    reg = Registry(registry_root, model_name)
    npz = np.load(io.BytesIO(reg.read_file(version, "reference.npz")))
    labels = json.loads(reg.read_file(version, "label_map.json"))
    labels = labels if isinstance(labels, list) else [k for k, _ in sorted(labels.items(), key=lambda kv: kv[1])]
    return {"embedding": npz["embeddings"], "prediction": npz["predictions"],
            "frequencies": npz["predicted_class_frequencies"], "labels": labels}


@dataclass
class WindowResult:
    version: str
    index: int
    start_ts: float
    end_ts: float
    n: int
    results: list[D.DriftResult]
    species: dict[str, int] = field(default_factory=dict)

    @property
    def drift(self) -> bool:
        return any(r.is_drift for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "index": self.index, "start_ts": self.start_ts, "end_ts": self.end_ts,
                "n": self.n, "drift": self.drift, "results": [r.to_dict() for r in self.results],
                "species": self.species}


class VersionMonitor:
    """Non-overlapping windows of `window_size` captured predictions of one version."""

    def __init__(self, version: str, reference: dict[str, Any], detectors: list[D.DriftDetector],
                 window_size: int) -> None:
        self.version, self.window_size = version, int(window_size)
        self.labels = list(reference["labels"])
        self.reference_frequencies = np.asarray(reference["frequencies"], np.float64)
        self.detectors = detectors
        for d in detectors:
            d.fit(reference[d.feature], len(self.labels))
        self._emb: list[np.ndarray] = []
        self._pred: list[int] = []
        self._ts: list[float] = []
        self.windows = 0

    def add(self, records: list[dict[str, Any]]) -> list[WindowResult]:
        out = []
        for r in records:
            self._emb.append(np.asarray(r["embedding"], np.float32))
            self._pred.append(int(r["top1_index"]))
            self._ts.append(float(r["ts"]))
            if len(self._ts) >= self.window_size:
                out.append(self._score())
        return out

    def _score(self) -> WindowResult:
        emb, pred, ts = np.stack(self._emb), np.asarray(self._pred), self._ts
        self._emb, self._pred, self._ts = [], [], []
        features = {"embedding": emb, "prediction": pred}
        results = [d.score(features[d.feature]) for d in self.detectors]
        counts = np.bincount(pred, minlength=len(self.labels))
        species = {self.labels[i]: int(c) for i, c in enumerate(counts) if c}
        self.windows += 1
        return WindowResult(self.version, self.windows - 1, ts[0], ts[-1], len(ts), results, species)


class QualityTracker:
    """Rolling accuracy of each version against feedback labels (concept drift)."""

    def __init__(self, window: int = 100, min_labels: int = 20, min_accuracy: float = 0.7) -> None:
        self.window, self.min_labels, self.min_accuracy = int(window), int(min_labels), float(min_accuracy)
        self.recent: dict[str, deque[bool]] = {}

    def add(self, version: str, correct: bool) -> None:
        self.recent.setdefault(version, deque(maxlen=self.window)).append(bool(correct))

    def accuracy(self, version: str) -> tuple[float | None, int]:
        d = self.recent.get(version)
        if not d:
            return None, 0
        return sum(d) / len(d), len(d)

    def breached(self, version: str) -> bool:
        acc, n = self.accuracy(version)
        return acc is not None and n >= self.min_labels and acc < self.min_accuracy


def append_alert(path: str, alert: dict[str, Any]) -> None:
    """The alerts log: JSON lines on a local path (one write per line, appended and fsynced);
    on an object store, one object per alert beside it (appends are not atomic there)."""
    line = json.dumps(alert, sort_keys=True, default=str) + "\n"
    if storage.is_uri(path):
        storage.write_text(f"{path}.d/{alert['ts']:.3f}-{uuid.uuid4().hex[:8]}.json", line)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_alerts(path: str, since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
    lines: list[str] = []
    if storage.is_uri(path):
        if storage.exists(f"{path}.d"):
            lines = [storage.read_text(f.path) for f in storage.list_files(f"{path}.d") if f.rel.endswith(".json")]
    elif os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    out = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            a = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash mid-write is skipped, never fatal
        if (since is None or a["ts"] >= since) and (until is None or a["ts"] <= until):
            out.append(a)
    return sorted(out, key=lambda a: a["ts"])


class AlertManager:
    """Drift after `min_consecutive` drifting windows, or a quality breach, raises an alert;
    the same (version, kind, detector) does not alert again within `cooldown_s`."""

    def __init__(self, path: str, action: str = "log", min_consecutive: int = 1, cooldown_s: float = 300,
                 trigger_dir: str | None = None, retrain_command: list[str] | None = None,
                 on_alert: Any = None, retrain_cooldown_s: float = 3600) -> None:
        if action not in ("none", "log", "retrain"):
            raise ValueError(f"action must be none, log or retrain, got {action!r}")
        self.path, self.action, self.min_consecutive, self.cooldown_s = path, action, int(min_consecutive), \
            float(cooldown_s)
        self.trigger_dir, self.retrain_command, self.on_alert = trigger_dir, retrain_command, on_alert
        self.retrain_cooldown_s = float(retrain_cooldown_s)
        self.streak: dict[tuple[str, str], int] = {}
        self.last: dict[tuple[str, str, str], float] = {}
        self.raised: list[dict[str, Any]] = []

    def window(self, w: WindowResult, now: float | None = None) -> list[dict[str, Any]]:
        out = []
        for r in w.results:
            key = (w.version, r.detector)
            self.streak[key] = self.streak.get(key, 0) + 1 if r.is_drift else 0
            if self.streak[key] >= self.min_consecutive:
                alert = self._raise("drift", w.version, r.detector, now or w.end_ts, {
                    **r.to_dict(), "window": w.index, "window_start": w.start_ts, "window_end": w.end_ts,
                    "consecutive": self.streak[key]})
                if alert:
                    out.append(alert)
        return out

    def quality(self, version: str, accuracy: float, n: int, threshold: float, now: float) -> dict | None:
        return self._raise("quality", version, "live_accuracy", now,
                           {"accuracy": accuracy, "labels": n, "threshold": threshold})

    def _raise(self, kind: str, version: str, detector: str, ts: float, details: dict[str, Any]) -> dict | None:
        key = (version, kind, detector)
        if ts - self.last.get(key, -1e18) < self.cooldown_s:
            return None
        self.last[key] = ts
        alert = {"ts": ts, "time": datetime.fromtimestamp(ts, UTC).isoformat(), "kind": kind, "version": version,
                 "detector": detector, "action": self.action, **details}
        append_alert(self.path, alert)
        log.warning(json.dumps({"event": "alert", **alert}, default=str))
        if self.action == "retrain":
            self._trigger(alert)
        if self.on_alert:
            self.on_alert(alert)
        self.raised.append(alert)
        return alert

    def _trigger(self, alert: dict[str, Any]) -> None:
        """Hand the alert to the retraining pipeline: a trigger file it consumes, and the
        configured command (e.g. `python run.py +mode=pipeline`) started detached."""
        if self.trigger_dir:
            storage.write_json(storage.join(self.trigger_dir, f"{int(alert['ts'] * 1000)}-{alert['version']}-"
                                                              f"{alert['kind']}-{alert['detector']}.json"), alert)
        if self.retrain_command and self.trigger_dir:
            from mlplatform.pipeline.triggers import start_guarded

            # One alert storm, one pipeline run: nothing starts while a run holds the lock or
            # within the cooldown of the last start; that run consumes every trigger file.
            started = start_guarded(self.trigger_dir, list(self.retrain_command), self.retrain_cooldown_s)
            alert["pipeline_started"] = started


class Monitor:
    """Everything the live deployment and the offline report share: per-version monitors,
    quality tracking and alerting, fed with batches of captured records."""

    def __init__(self, settings: dict[str, Any], on_window: Any = None, on_alert: Any = None,
                 keep_windows: int = 1000) -> None:
        self.s = settings
        self.monitors: dict[str, VersionMonitor | None] = {}
        q = settings["quality"]
        self.quality = QualityTracker(q["window"], q["min_labels"], q["min_accuracy"])
        a = settings["alerts"]
        self.alerts = AlertManager(a["path"], a["action"], a["min_consecutive"], a["cooldown_s"],
                                   a.get("trigger_dir"), a.get("retrain_command"), on_alert,
                                   a.get("retrain_cooldown_s", 3600))
        self.on_window = on_window
        # The newest scored windows (status shows the last 200): bounded, so a long-running
        # monitor's memory does not grow with its traffic. `completed` counts them all.
        self.results: deque[WindowResult] = deque(maxlen=keep_windows)
        self.last_window: dict[str, WindowResult] = {}

    @property
    def completed(self) -> dict[str, int]:
        """Windows scored per version, each counted once its alerts are raised."""
        return {v: w.index + 1 for v, w in self.last_window.items()}

    def _monitor(self, version: str) -> VersionMonitor | None:
        if version not in self.monitors:
            try:
                ref = load_reference(self.s["registry_root"], self.s["registry_model"], version)
                dets = D.build(self.s["detectors"], self.s.get("p_val_budget"))
                self.monitors[version] = VersionMonitor(version, ref, dets, self.s["window_size"])
            except Exception as exc:  # a version without a usable reference is reported, not fatal
                log.error(json.dumps({"event": "monitor_unavailable", "version": version,
                                      "error": f"{type(exc).__name__}: {exc}"[:500]}))
                self.monitors[version] = None
        return self.monitors[version]

    def sample_latest(self, versions: list[str], ts: list[float], max_windows: int) -> tuple[list[int], dict[str, int]]:
        """Indices of the newest records that fill at most `max_windows` windows per version
        (counting what is already pending), in time order, and how many were skipped per
        version: under heavy traffic the monitor scores a sample of windows, the latest."""
        by_version: dict[str, list[int]] = {}
        for i in sorted(range(len(ts)), key=ts.__getitem__):
            by_version.setdefault(versions[i], []).append(i)
        keep, skipped = [], {}
        for version, idx in by_version.items():
            m = self.monitors.get(version)
            room = max(0, max_windows * int(self.s["window_size"]) - (len(m._ts) if m else 0))
            if len(idx) > room:
                skipped[version] = len(idx) - room
                idx = idx[len(idx) - room:]
            keep += idx
        return sorted(keep, key=ts.__getitem__), skipped

    def add_predictions(self, records: list[dict[str, Any]]) -> list[WindowResult]:
        by_version: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            if r.get("top1_index", -1) < 0 or not r.get("embedding"):
                continue  # a failed request has no prediction to watch
            by_version.setdefault(r["version"], []).append(r)
        out = []
        for version, rows in by_version.items():
            m = self._monitor(version)
            if m is None:
                continue
            for w in m.add(rows):
                self.alerts.window(w)
                self.results.append(w)
                # Counted once its alerts are raised: status never shows a scored window
                # whose alerts are still to come.
                self.last_window[version] = w
                if self.on_window:
                    self.on_window(w)
                out.append(w)
        return out

    def add_feedback(self, records: list[dict[str, Any]], now: float | None = None) -> None:
        touched = set()
        for r in records:
            self.quality.add(r["version"], r["correct"])
            touched.add(r["version"])
        for version in touched:
            if self.quality.breached(version):
                acc, n = self.quality.accuracy(version)
                self.alerts.quality(version, acc, n, self.quality.min_accuracy, now or time.time())


# ----------------------------------------------------------------------------- the live deployment


def _deployment():
    from ray import serve
    from ray.serve.metrics import Counter, Gauge

    from mlplatform.monitoring.capture import CaptureStore

    @serve.deployment(name="DriftMonitor", num_replicas=1, max_ongoing_requests=16)
    class DriftMonitor:
        """Polls capture storage every `interval_s`; detectors and gauges live here, so the
        request path never waits for them. One replica: it owns the windows."""

        def __init__(self, settings: dict[str, Any]) -> None:
            self.s = settings
            # Background work: on a busy node the request path gets the CPU first.
            os.nice(int(settings.get("nice", 10)))
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
            self.c_windows = Counter("mlp_monitor_windows_total", description="Windows scored", tag_keys=("version",))
            self.c_skipped = Counter("mlp_monitor_skipped_total", tag_keys=("version",),
                                     description="Captured predictions not scored (monitor.max_windows_per_poll)")
            self.skipped: dict[str, int] = {}
            self.monitor = Monitor(settings, on_window=self._gauges, on_alert=self._count)
            self.seen: set[str] = set()
            self.started = time.time()
            self.last_poll: float | None = None
            self.error: str | None = None
            self._stop = threading.Event()
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

        def poll(self) -> int:
            """Read capture files not seen yet (in time order) and feed the monitor."""
            plisted = self.store.prediction_files(since=self.started - 86400)
            flisted = self.store.feedback_files(since=self.started - 86400)
            pfiles = [f for f in plisted if f.path not in self.seen]
            ffiles = [f for f in flisted if f.path not in self.seen]
            from mlplatform.monitoring.capture import FEEDBACK_SCHEMA, PREDICTION_SCHEMA

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

        def _loop(self) -> None:
            # Load the detectors (alibi-detect's import, each version's reference fit) now,
            # while the deployment starts, not under the first traffic.
            for version in self.s.get("versions") or []:
                self.monitor._monitor(version)  # a failure is logged and reported by status()
            while not self._stop.wait(float(self.s["interval_s"])):
                try:
                    self.poll()
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
                               "accuracy": acc, "labels": n,
                               "last": last.to_dict() if last else None}
            return {"versions": versions, "alerts": self.monitor.alerts.raised, "last_poll": self.last_poll,
                    "error": self.error, "windows": [w.to_dict() for w in list(self.monitor.results)[-200:]]}

        def check_health(self) -> None:
            if not self._thread.is_alive():
                raise RuntimeError("the monitor thread died")

        def __del__(self) -> None:
            self._stop.set()

    return DriftMonitor


DriftMonitor = _deployment()
