"""Monitoring pieces without Serve: the capture writer, alerts, detectors, config errors."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mlplatform.capture.store import CaptureStore
from mlplatform.capture.writer import CaptureWriter
from mlplatform.errors import ConfigError
from mlplatform.monitoring import detectors as D
from mlplatform.monitoring.alerts import AlertManager, read_alerts
from mlplatform.monitoring.windows import Monitor, QualityTracker, VersionMonitor, WindowResult

from .conftest import compose, wait_for


def _record(i: int, version: str = "v1", ts: float | None = None) -> dict:
    return {"request_id": f"r{i}", "ts": ts or time.time(), "version": version, "role": "stable", "route": "predict",
            "labels": ["a", "b"], "scores": [0.7, 0.2], "top1": "a", "top1_index": 0, "input_sha256": "x" * 64,
            "width": 32, "height": 32, "format": "JPEG", "num_bytes": 100, "latency_ms": 3.0,
            "embedding": np.full(4, i, np.float32), "image_path": None}


def test_writer_flushes_on_interval_and_partitions(tmp_path: Path) -> None:
    w = CaptureWriter(str(tmp_path), flush_interval_s=0.2, sample_images=0.0)
    day_ago = time.time() - 86400
    w.add_prediction(_record(1))
    w.add_prediction(_record(2, "v2"))
    w.add_prediction(_record(3, ts=day_ago), image=b"\xff\xd8jpeg")
    store = CaptureStore(str(tmp_path))
    # No explicit flush: the background thread writes within a few intervals.
    wait_for(lambda: store.predictions().num_rows == 3, timeout=5, message="the writer's thread did not flush")
    rows = {r["request_id"]: r for r in store.predictions().to_pylist()}
    assert set(rows) == {"r1", "r2", "r3"}
    assert rows["r1"]["embedding"] == [1.0] * 4
    parts = sorted(f.rel.rsplit("/", 1)[0] for f in store.prediction_files())
    assert len(parts) == 3 and all(p.startswith("date=") and "/version=" in p for p in parts)
    assert (tmp_path / rows["r3"]["image_path"]).read_bytes() == b"\xff\xd8jpeg"
    assert [r["request_id"] for r in store.predictions(since=time.time() - 3600).to_pylist()] == ["r1", "r2"]
    w.close()


def test_close_writes_what_is_buffered_and_files_are_whole(tmp_path: Path) -> None:
    w = CaptureWriter(str(tmp_path), flush_interval_s=3600, sample_images=0.0)
    for i in range(500):
        w.add_prediction(_record(i))
    assert not CaptureStore(str(tmp_path)).prediction_files()
    w.close()
    files = CaptureStore(str(tmp_path)).prediction_files()
    assert sum(pq.read_table(io.BytesIO(Path(f.path).read_bytes())).num_rows for f in files) == 500
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_a_failed_flush_keeps_the_records(tmp_path: Path) -> None:
    blocker = tmp_path / "root"
    blocker.write_text("a file where the capture directory should be")
    w = CaptureWriter(str(blocker), flush_interval_s=3600, sample_images=0.0)
    w.add_prediction(_record(1))
    assert w.flush() == 0 and w.stats["flush_errors"] == 1
    blocker.unlink()
    assert w.flush() == 1
    assert CaptureStore(str(blocker)).predictions().column("request_id").to_pylist() == ["r1"]
    w.close()


def test_feedback_join_latest_label_wins(tmp_path: Path) -> None:
    w = CaptureWriter(str(tmp_path), flush_interval_s=3600, sample_images=0.0)
    for i in range(3):
        w.add_prediction(_record(i))
    t = time.time()
    for rid, label, dt in (("r0", "b", 0), ("r1", "a", 1), ("r0", "a", 2)):
        w.add_feedback({"request_id": rid, "ts": t + dt, "label": label, "version": "v1", "predicted": "a",
                        "correct": label == "a", "prediction_ts": t, "image_path": None})
    w.close()
    joined = {j["request_id"]: j for j in CaptureStore(str(tmp_path)).labelled()}
    assert set(joined) == {"r0", "r1"} and joined["r0"]["label"] == "a" and joined["r0"]["correct"]


def test_alerts_need_consecutive_windows_and_respect_cooldown(tmp_path: Path) -> None:
    path = str(tmp_path / "alerts.jsonl")
    am = AlertManager(path, "retrain", min_consecutive=2, cooldown_s=100, retrain_cooldown_s=3600,
                      trigger_dir=str(tmp_path / "triggers"))

    def window(i: int, drift: bool) -> WindowResult:
        r = D.DriftResult("mmd", "embedding", drift, 0.001 if drift else 0.5, 1.0, 0.05, 32)
        return WindowResult("v1", i, 1000.0 + i, 1000.0 + i, 32, [r])

    assert am.window(window(0, True)) == [] and am.window(window(1, False)) == []
    assert am.window(window(2, True)) == []
    raised = am.window(window(3, True))
    assert len(raised) == 1 and raised[0]["consecutive"] == 2
    assert am.window(window(4, True)) == []  # cooling down
    assert [a["window"] for a in read_alerts(path)] == [3]
    triggers = list((tmp_path / "triggers").glob("*.json"))
    assert len(triggers) == 1 and json.loads(triggers[0].read_text())["kind"] == "drift"
    with open(path, "a") as f:
        f.write('{"cut by a crash')  # a torn last line is skipped, never fatal
    assert len(read_alerts(path)) == 1


def test_quality_tracker_needs_enough_labels() -> None:
    q = QualityTracker(window=10, min_labels=5, min_accuracy=0.7)
    for _ in range(4):
        q.add("v1", False)
    assert not q.breached("v1")
    q.add("v1", False)
    assert q.breached("v1") and q.accuracy("v1") == (0.0, 5)
    for _ in range(10):
        q.add("v1", True)
    assert not q.breached("v1")


def test_budget_is_shared_by_batch_detectors() -> None:
    dets = D.build({"mmd": {"_target_": "mlplatform.monitoring.detectors.AlibiMMD", "n_permutations": 100},
                    "ks": {"_target_": "mlplatform.monitoring.detectors.ScipyKS", "n_components": 8,
                           "p_val": 0.01},
                    "chi2": {"_target_": "mlplatform.monitoring.detectors.ScipyChiSquare"}}, budget=0.06)
    assert {d.name: d.p_val for d in dets} == {"mmd": 0.02, "ks": 0.01, "chi2": 0.02}


def test_backends_agree_and_detect_a_shift() -> None:
    """alibi-detect and the scipy backend compute the same tests behind one interface."""
    import torch

    torch.manual_seed(0)  # MMD's permutation test: a 5% false alarm is its design, not a bug
    np.random.seed(0)
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 16))
    same, shifted = rng.normal(size=(64, 16)), rng.normal(size=(64, 16)) + 0.7
    results = {}
    for cls, kw in ((D.AlibiKS, {"n_components": 8}), (D.ScipyKS, {"n_components": 8}),
                    (D.AlibiMMD, {"n_permutations": 100})):
        d = cls(**kw)
        d.fit(ref, 10)
        results[cls.__name__] = (d.score(same), d.score(shifted))
    for name, (a, b) in results.items():
        assert not a.is_drift and b.is_drift, name
    # alibi uses the asymptotic KS distribution, scipy the exact one at these sizes
    assert results["AlibiKS"][0].p_value == pytest.approx(results["ScipyKS"][0].p_value, rel=0.1)
    pref = rng.integers(0, 10, 300)
    for cls in (D.AlibiChiSquare, D.ScipyChiSquare):
        d = cls()
        d.fit(pref, 10)
        assert not d.score(rng.integers(0, 10, 100)).is_drift and d.score(rng.integers(0, 3, 100)).is_drift


def test_version_monitor_windows() -> None:
    rng = np.random.default_rng(1)
    ref = {"embedding": rng.normal(size=(100, 8)), "prediction": rng.integers(0, 4, 100),
           "frequencies": np.full(4, 0.25), "labels": ["a", "b", "c", "d"]}
    vm = VersionMonitor("v1", ref, [D.ScipyKS(n_components=8), D.ScipyChiSquare()], window_size=20)
    recs = [{"embedding": rng.normal(size=8), "top1_index": int(rng.integers(0, 4)), "ts": float(i)}
            for i in range(50)]
    windows = vm.add(recs)
    assert [(w.index, w.n, w.start_ts, w.end_ts) for w in windows] == [(0, 20, 0, 19), (1, 20, 20, 39)]
    assert len(vm._ts) == 10 and sum(windows[0].species.values()) == 20


def test_heavy_traffic_scores_the_newest_windows_only(tmp_path: Path) -> None:
    """monitor.max_windows_per_poll: per version, the newest records that fill the allowed
    windows (pending records count), in time order; the rest are reported as skipped."""
    rng = np.random.default_rng(2)
    ref = {"embedding": rng.normal(size=(50, 4)), "prediction": rng.integers(0, 3, 50),
           "frequencies": np.full(3, 1 / 3), "labels": ["a", "b", "c"]}
    mon = Monitor({"window_size": 10, "quality": {"window": 10, "min_labels": 5, "min_accuracy": 0.5},
                   "alerts": {"path": str(tmp_path / "alerts.jsonl"), "action": "log", "min_consecutive": 2,
                              "cooldown_s": 60, "retrain_cooldown_s": 3600,
                              "feedback_flood_labels": 100, "feedback_flood_interval_s": 60}})
    mon.monitors["v1"] = VersionMonitor("v1", ref, [D.ScipyKS(n_components=8)], window_size=10)
    mon.monitors["v1"].add([{"embedding": rng.normal(size=4), "top1_index": 0, "ts": -1.0}] * 4)  # 4 pending
    versions = ["v1", "v2"] * 30
    ts = [float(60 - i) for i in range(60)]  # newest first: the sample must reorder
    keep, skipped = mon.sample_latest(versions, ts, max_windows=2)
    assert skipped == {"v1": 30 - 16, "v2": 30 - 20}
    assert [ts[i] for i in keep] == sorted(ts[i] for i in keep)  # time order
    kept_v1 = sorted(ts[i] for i in keep if versions[i] == "v1")
    assert kept_v1 == sorted(t for t, v in zip(ts, versions, strict=True) if v == "v1")[-16:]  # the newest
    assert mon.sample_latest(versions, ts, max_windows=100)[1] == {}


@pytest.mark.parametrize("override,key", [
    ("monitor.window_size=0", "monitor.window_size"),
    ("monitor.alerts.action=page", "monitor.alerts.action"),
    ("monitor.capture.sample_images=1.5", "monitor.capture.sample_images"),
    ("monitor.capture.image_cache_mb=-1", "monitor.capture.image_cache_mb"),
    ("monitor.capture.image_cache=-5", "monitor.capture.image_cache"),
    ("monitor.nice=-5", "monitor.nice"),
    ("monitor.nice=25", "monitor.nice"),
    ("monitor.p_val_budget=0", "monitor.p_val_budget"),
    ("monitor.detectors.online.n_bootstraps=10", "monitor.detectors.online.n_bootstraps"),
    ("+monitor.detectors.bad={p_val:0.1}", "monitor.detectors.bad"),
    ("monitor.report.since=yesterday", "monitor.report.since"),
    ("data=captured data.captured.base=cloud", "data.captured.base"),
])
def test_monitor_config_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose("+mode=monitor", *override.split())
    assert info.value.key == key


def test_monitor_keeps_the_newest_windows_and_counts_them_all(tmp_path: Path) -> None:
    """A long-running monitor's memory does not grow with traffic: it keeps the newest
    `keep_windows` scored windows, while the count and the last window stay exact."""
    rng = np.random.default_rng(3)
    ref = {"embedding": rng.normal(size=(50, 4)), "prediction": rng.integers(0, 3, 50),
           "frequencies": np.full(3, 1 / 3), "labels": ["a", "b", "c"]}
    mon = Monitor({"window_size": 5, "quality": {"window": 10, "min_labels": 5, "min_accuracy": 0.5},
                   "alerts": {"path": str(tmp_path / "alerts.jsonl"), "action": "log", "min_consecutive": 2,
                              "cooldown_s": 60, "retrain_cooldown_s": 3600,
                              "feedback_flood_labels": 100, "feedback_flood_interval_s": 60}}, keep_windows=3)
    for v in ("v1", "v2"):
        mon.monitors[v] = VersionMonitor(v, ref, [D.ScipyKS(n_components=8)], window_size=5)
    rec = lambda v, t: {"version": v, "embedding": rng.normal(size=4).tolist(), "top1_index": 1, "ts": t}  # noqa: E731
    scored = mon.add_predictions([rec("v1", float(t)) for t in range(40)] + [rec("v2", 100.0 + t) for t in range(10)])
    assert len(scored) == 8 + 2
    assert mon.completed == {"v1": 8, "v2": 2}
    assert len(mon.results) == 3 and [w.version for w in mon.results] == ["v1", "v2", "v2"]
    assert mon.last_window["v1"].index == 7 and mon.last_window["v2"].index == 1
