"""Drift and live-quality monitoring, fed from captured data, never from the request path.

`VersionMonitor` turns one version's captured predictions into fixed-size windows and runs
the configured detectors on each; `QualityTracker` keeps each version's rolling accuracy
against human feedback (every key's labels: trust decides only what is trained on);
`FloodWatch` counts labels per key; `Monitor` feeds them and hands their results to the
alert rules (`alerts.AlertManager`). The same classes run live in the `DriftMonitor` deployment
(`deployment.py`) and offline in `+mode=monitor` (`report.py`).
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlplatform.capture.schema import ANONYMOUS
from mlplatform.monitoring import detectors as D
from mlplatform.monitoring.alerts import AlertManager

log = logging.getLogger("mlplatform.monitor")


def load_reference(registry_root: str, model_name: str, version: str) -> dict[str, Any]:
    """The served version's own reference (validation embeddings and predictions at training)."""
    from mlplatform.registry.store import Registry

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
    """Rolling accuracy of each version against feedback labels (concept drift), and which
    keys the labels in the window came from."""

    def __init__(self, window: int, min_labels: int, min_accuracy: float) -> None:
        self.window, self.min_labels, self.min_accuracy = int(window), int(min_labels), float(min_accuracy)
        self.recent: dict[str, deque[tuple[bool, str]]] = {}

    def add(self, version: str, correct: bool, key_id: str | None = None) -> None:
        self.recent.setdefault(version, deque(maxlen=self.window)).append((bool(correct), key_id or ANONYMOUS))

    def accuracy(self, version: str) -> tuple[float | None, int]:
        d = self.recent.get(version)
        if not d:
            return None, 0
        return sum(c for c, _ in d) / len(d), len(d)

    def by_key(self, version: str) -> dict[str, int]:
        """Labels in the version's window per key id (`ANONYMOUS` for those sent without one)."""
        return dict(Counter(k for _, k in self.recent.get(version, ())))

    def breached(self, version: str) -> bool:
        acc, n = self.accuracy(version)
        return acc is not None and n >= self.min_labels and acc < self.min_accuracy


class FloodWatch:
    """Labels per key within a sliding `interval_s`: a key over `max_labels` is a flood (one
    labeller trying to outvote the others, or a leaked key), whatever its rate limit let in."""

    def __init__(self, max_labels: int, interval_s: float) -> None:
        self.max_labels, self.interval_s = int(max_labels), float(interval_s)
        self.recent: dict[str, deque[float]] = {}
        self.totals: Counter[str] = Counter()

    def add(self, key_id: str | None, ts: float) -> tuple[str, int] | None:
        """(key, labels in the interval) when this label takes the key over the limit."""
        key = key_id or ANONYMOUS
        self.totals[key] += 1
        d = self.recent.setdefault(key, deque())
        d.append(ts)
        while d and d[0] <= ts - self.interval_s:
            d.popleft()
        return (key, len(d)) if len(d) > self.max_labels else None


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
        self.floods = FloodWatch(a["feedback_flood_labels"], a["feedback_flood_interval_s"])
        self.alerts = AlertManager(a["path"], a["action"], min_consecutive=a["min_consecutive"],
                                   cooldown_s=a["cooldown_s"], retrain_cooldown_s=a["retrain_cooldown_s"],
                                   trigger_dir=a.get("trigger_dir"), retrain_command=a.get("retrain_command"),
                                   on_alert=on_alert)
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
        for r in sorted(records, key=lambda r: r["ts"]):
            key_id = r.get("key_id")
            self.quality.add(r["version"], r["correct"], key_id)
            touched.add(r["version"])
            flood = self.floods.add(key_id, r["ts"])
            if flood:
                self.alerts.feedback_flood(flood[0], flood[1], self.floods.max_labels, self.floods.interval_s,
                                           r["version"], r["ts"])
        for version in touched:
            if self.quality.breached(version):
                acc, n = self.quality.accuracy(version)
                self.alerts.quality(version, acc, n, self.quality.min_accuracy, now or time.time())
