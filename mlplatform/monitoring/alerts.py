"""Alerts: the rules that turn window results and live accuracy into alerts, the alerts log,
and the retrain trigger an alert can pull (`monitor.alerts.action=retrain`)."""

from __future__ import annotations

import json
import logging
import os
import uuid
from datetime import UTC, datetime
from typing import Any, Protocol

from mlplatform import storage
from mlplatform.monitoring.detectors import DriftResult
from mlplatform.triggers import start_guarded, write_trigger

log = logging.getLogger("mlplatform.monitor")


class Window(Protocol):
    """What an alert rule reads of a scored window (`windows.WindowResult`)."""

    version: str
    index: int
    start_ts: float
    end_ts: float
    results: list[DriftResult]


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
    """Drift after `min_consecutive` drifting windows, a quality breach, or a flood of labels
    from one key raises an alert; the same (version, kind, detector) does not alert again
    within `cooldown_s`."""

    def __init__(self, path: str, action: str, *, min_consecutive: int, cooldown_s: float,
                 retrain_cooldown_s: float, trigger_dir: str | None = None,
                 retrain_command: list[str] | None = None, on_alert: Any = None) -> None:
        """The values are conf/monitor's alerts keys; trigger_dir and retrain_command are
        needed only by action=retrain."""
        if action not in ("none", "log", "retrain"):
            raise ValueError(f"action must be none, log or retrain, got {action!r}")
        self.path, self.action, self.min_consecutive, self.cooldown_s = path, action, int(min_consecutive), \
            float(cooldown_s)
        self.trigger_dir, self.retrain_command, self.on_alert = trigger_dir, retrain_command, on_alert
        self.retrain_cooldown_s = float(retrain_cooldown_s)
        self.streak: dict[tuple[str, str], int] = {}
        self.last: dict[tuple[str, str, str], float] = {}
        self.raised: list[dict[str, Any]] = []

    def window(self, w: Window, now: float | None = None) -> list[dict[str, Any]]:
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

    def feedback_flood(self, key_id: str, labels: int, limit: int, interval_s: float, version: str,
                       now: float) -> dict | None:
        """One key sent more than `limit` labels within `interval_s`: logged for a human, never
        a retrain (the flood may be the poisoning attempt); `detector` is the key id."""
        return self._raise("feedback_flood", version, key_id, now,
                           {"key_id": key_id, "labels": labels, "limit": limit, "interval_s": interval_s},
                           retrain=False)

    def _raise(self, kind: str, version: str, detector: str, ts: float, details: dict[str, Any],
               retrain: bool = True) -> dict | None:
        key = (version, kind, detector)
        if ts - self.last.get(key, -1e18) < self.cooldown_s:
            return None
        self.last[key] = ts
        action = self.action if retrain or self.action != "retrain" else "log"
        alert = {"ts": ts, "time": datetime.fromtimestamp(ts, UTC).isoformat(), "kind": kind, "version": version,
                 "detector": detector, "action": action, **details}
        try:
            if action == "retrain":
                self._trigger(alert)
        finally:  # the alert is logged even when its trigger fails
            append_alert(self.path, alert)
            log.warning(json.dumps({"event": "alert", **alert}, default=str))
        if self.on_alert:
            self.on_alert(alert)
        self.raised.append(alert)
        return alert

    def _trigger(self, alert: dict[str, Any]) -> None:
        """Hand the alert to the retraining pipeline: a trigger file it consumes, and the
        configured command (e.g. `python run.py +mode=pipeline`) started detached, its output
        in the log file the alert names (`retrain_log`)."""
        try:
            if self.trigger_dir:
                write_trigger(self.trigger_dir, alert)
            if self.retrain_command and self.trigger_dir:
                # One alert storm, one pipeline run: nothing starts while a run holds the lock or
                # within the cooldown of the last start; that run answers every trigger file.
                log_path = start_guarded(self.trigger_dir, list(self.retrain_command), self.retrain_cooldown_s)
                alert["pipeline_started"] = log_path is not None
                alert["retrain_log"] = log_path
        except Exception as exc:
            # The alert still stands: logged with the reason, and counted as a failed retrain
            # (mlp_retrain_total{outcome="failed"}, the MLPRetrainFailed rule).
            alert["retrain_error"] = f"{type(exc).__name__}: {exc}"[:500]
            log.error("retrain trigger failed for %s: %s", alert["version"], alert["retrain_error"])
