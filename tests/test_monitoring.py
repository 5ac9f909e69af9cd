"""Monitoring against real Serve and real alibi-detect: capture, feedback, drift, quality,
alerts, the kill-safety of capture, and retraining on labelled production data."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
from scipy.stats import binom

from mlplatform.data import synthetic
from mlplatform.monitoring.capture import CaptureStore
from mlplatform.monitoring.monitor import read_alerts

from .conftest import compose, parallel

PORT = 8765  # Serve's HTTP port is fixed per cluster; the serving tests use it too
URL = f"http://127.0.0.1:{PORT}"
WINDOW = 32
MIN_CONSECUTIVE = 2
BUDGET = 0.05

pytestmark = pytest.mark.ray


def _overrides(root: Path, *extra: str) -> list[str]:
    return ["+mode=serve", "+experiment=smoke", f"paths.root={root}", f"serve.port={PORT}",
            "serve.deployment.num_cpus=0.25", "serve.deployment.min_replicas=1", "serve.deployment.max_replicas=1",
            f"monitor.window_size={WINDOW}", f"monitor.alerts.min_consecutive={MIN_CONSECUTIVE}",
            f"monitor.p_val_budget={BUDGET}", "monitor.quality.min_labels=16", "monitor.quality.window=40",
            "monitor.quality.min_accuracy=0.6", "monitor.alerts.cooldown_s=0", *extra]


@pytest.fixture(scope="module")
def monitored(ray_cluster, tmp_path_factory):
    from ray import serve

    from mlplatform.deployments.serve_mode import deploy
    from mlplatform.training.job import run_train

    root = tmp_path_factory.mktemp("monitor")
    trained = run_train(compose("+mode=train", "+experiment=smoke", f"paths.root={root}", "logger=none"))
    cfg = compose(*_overrides(root))
    deploy(cfg)
    labels = synthetic.species_names(8)
    yield {"root": root, "cfg": cfg, "labels": labels, "version": trained["version"],
           "store": CaptureStore(str(root / "capture"))}
    serve.delete(cfg.serve.app_name)


def _image(species: int, index: int, drifted: bool = False) -> bytes:
    kinds = ["brightness", "blur", "noise", "color_cast", "background"] if drifted else []
    img = synthetic.render(species, index, 32, 0, kinds, 0.6 if drifted else 0.0)
    return synthetic.encode_jpeg(img)


def _predict(data: bytes) -> requests.Response:
    return requests.post(URL + "/predict", data=data, headers={"content-type": "image/jpeg"}, timeout=30)


def _send(n: int, start: int, drifted: bool = False, threads: int = 4) -> list[dict]:
    """n predictions over all species evenly (the reference's mix), in parallel."""
    out: list[dict] = [{}] * n

    def work(k: int) -> None:
        for i in range(k, n, threads):
            data = _image(i % 8, 1000 + start + i, drifted)
            r = _predict(data)
            assert r.status_code == 200, r.text
            out[i] = {**r.json(), "species": i % 8, "sha256": hashlib.sha256(data).hexdigest()}

    parallel(work, threads)
    return out


def _status() -> dict:
    r = requests.get(URL + "/monitoring", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _wait_windows(version: str, count: int, timeout: float = 90) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = _status()
        v = st["versions"].get(version)
        if v and v["windows"] >= count:
            return st
        time.sleep(0.5)
    raise AssertionError(f"monitor did not reach {count} windows: {_status()}")


def _align(version: str) -> int:
    """Top the current window up with in-distribution traffic; returns windows scored."""
    st = _status()
    v = st["versions"].get(version) or {"windows": 0, "pending": 0}
    if v["pending"]:
        _send(WINDOW - v["pending"], 50_000)
        return _wait_windows(version, v["windows"] + 1)["versions"][version]["windows"]
    return v["windows"]


# ----------------------------------------------------------------------------- drift


def test_in_distribution_stays_quiet_and_drift_alerts(monitored) -> None:
    version = monitored["version"]
    _send(2, 90_000)  # the monitor builds its detectors on the first records it sees
    time.sleep(2)
    start = _align(version)
    n_windows = 6
    _send(n_windows * WINDOW, 0)
    st = _wait_windows(version, start + n_windows)
    quiet = [w for w in st["windows"] if w["version"] == version][start:start + n_windows]
    batch_alarms = sum(any(r["is_drift"] for r in w["results"] if r["p_value"] is not None) for w in quiet)
    online_alarms = sum(any(r["is_drift"] for r in w["results"] if r["p_value"] is None) for w in quiet)
    # Within the budget: the batch family's false alarms over 6 windows are Binomial(6, <= budget),
    # so 3 or more would happen with probability < 0.3%; the online detector (ert=500) sees 192
    # steps: 3 or more false detections has probability < 1%.
    assert batch_alarms <= binom.ppf(0.997, n_windows, BUDGET), quiet
    assert online_alarms <= 2, quiet
    assert not [a for a in st["alerts"] if a["kind"] == "drift"], st["alerts"]
    assert not read_alerts(str(monitored["root"] / "alerts" / "alerts.jsonl"))

    _send(3 * WINDOW, 10_000, drifted=True)
    st = _wait_windows(version, start + n_windows + 3)
    drifted = [w for w in st["windows"] if w["version"] == version][start + n_windows:]
    assert all(w["drift"] for w in drifted[:MIN_CONSECUTIVE]), drifted
    alerts = [a for a in st["alerts"] if a["kind"] == "drift" and a["version"] == version]
    assert alerts and {a["detector"] for a in alerts} & {"mmd", "ks"}, st["alerts"]
    assert alerts[0]["window"] <= start + n_windows + MIN_CONSECUTIVE  # within min_consecutive windows
    logged = read_alerts(str(monitored["root"] / "alerts" / "alerts.jsonl"))
    # Every alert the status showed is in the log; the monitor may have raised more since
    # the snapshot (another detector on a later window), so the log can hold more.
    key = lambda a: (a["version"], a["kind"], a["detector"], a["window"])  # noqa: E731
    assert {key(a) for a in alerts} <= {key(a) for a in logged}, (alerts, logged)
    assert all(a["action"] == "log" and a["p_value"] is None or a["p_value"] < 1 for a in logged)


def test_drift_gauges_reach_prometheus(monitored) -> None:
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if "mlp_drift_is_drift" in text and "mlp_alerts_total" in text:
            break
        time.sleep(2)
    lines = [ln for ln in text.splitlines() if ln.startswith("ray_mlp_drift_is_drift") and 'detector="mmd"' in ln]
    assert lines, text[-3000:]
    assert any(f'version="{monitored["version"]}"' in ln for ln in lines)
    assert "ray_mlp_drift_p_value" in text and "ray_mlp_alerts_total" in text


# ----------------------------------------------------------------------------- capture


def test_every_prediction_is_captured(monitored) -> None:
    sent = _send(12, 20_000)
    oip = requests.post(f"{URL}/v2/models/species-classifier/infer", timeout=30, json={
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                    "data": [__import__("base64").b64encode(_image(1, 7)).decode()]}]})
    assert oip.status_code == 200, oip.text
    time.sleep(1.5)  # > flush_interval_s (0.5)
    table = monitored["store"].predictions().to_pylist()
    by_id = {r["request_id"]: r for r in table}
    for s in sent:
        r = by_id[s["request_id"]]
        assert r["version"] == s["version"] and r["top1"] == s["predictions"][0]["label"]
        assert r["labels"] == [p["label"] for p in s["predictions"]]
        assert r["input_sha256"] == s["sha256"] and (r["width"], r["height"], r["format"]) == (32, 32, "JPEG")
        assert len(r["embedding"]) > 0 and r["latency_ms"] > 0 and r["role"] == "stable"
        assert r["image_path"] is None  # images are off by default
    assert any(r["route"] == "infer" for r in table)
    files = monitored["store"].prediction_files()
    assert files and all("/date=" in f.path and "/version=" in f.path for f in files)


# ----------------------------------------------------------------------------- feedback


def test_feedback_contract_and_join(monitored) -> None:
    sent = _send(16, 30_000)
    for s in sent:  # the true species: the join must pair each label with its own prediction
        r = requests.post(URL + "/feedback", json={"request_id": s["request_id"],
                                                   "label": monitored["labels"][s["species"]]}, timeout=30)
        assert r.status_code == 202, r.text
        assert r.json()["correct"] == (s["predictions"][0]["label"] == monitored["labels"][s["species"]])
    bad = [
        (requests.post(URL + "/feedback", json={"request_id": "nope", "label": "aardvark"}, timeout=30), 404),
        (requests.post(URL + "/feedback", json={"request_id": sent[0]["request_id"], "label": "unicorn"},
                       timeout=30), 422),
        (requests.post(URL + "/feedback", json={"label": "aardvark"}, timeout=30), 422),
        (requests.post(URL + "/feedback", data=b"{not json", headers={"content-type": "application/json"},
                       timeout=30), 400),
    ]
    for r, status in bad:
        assert r.status_code == status, r.text
        assert set(r.json()) == {"error", "request_id"}
    time.sleep(1.5)
    joined = {j["request_id"]: j for j in monitored["store"].labelled()}
    for s in sent:
        j = joined[s["request_id"]]
        assert j["label"] == monitored["labels"][s["species"]] and j["top1"] == s["predictions"][0]["label"]
        assert j["image_path"]  # the image came from the cache, so it can be trained on
    st = _status()["versions"][monitored["version"]]
    assert st["labels"] >= 16 and st["accuracy"] is not None


def test_feedback_older_than_memory_is_found_in_storage(monitored) -> None:
    """Found after the ingress restarts too: the lookup falls back to captured files."""
    store = monitored["store"]
    old = store.predictions().to_pylist()[0]
    assert store.find(old["request_id"])["version"] == old["version"]
    assert store.find("no-such-request") is None


def test_low_live_accuracy_raises_a_quality_alert(monitored) -> None:
    sent = _send(20, 40_000)
    for s in sent:  # a labeller who disagrees with every answer: concept drift
        wrong = next(lab for lab in monitored["labels"] if lab != s["predictions"][0]["label"])
        assert requests.post(URL + "/feedback", json={"request_id": s["request_id"], "label": wrong},
                             timeout=30).status_code == 202
    deadline = time.time() + 30
    while time.time() < deadline:
        alerts = [a for a in _status()["alerts"] if a["kind"] == "quality"]
        if alerts:
            break
        time.sleep(0.5)
    assert alerts and alerts[-1]["accuracy"] < 0.6 and alerts[-1]["version"] == monitored["version"]


# ----------------------------------------------------------------------------- report and retraining


def test_monitor_report(monitored) -> None:
    from mlplatform.monitoring.report import run_monitor

    cfg = compose("+mode=monitor", *_overrides(monitored["root"])[1:], "monitor.report.since=1h")
    summary = run_monitor(cfg)
    md = Path(summary["report"]).read_text()
    assert "Drift over time" in md and "Feedback accuracy" in md and "Alerts" in md
    v = summary["versions"][monitored["version"]]
    assert v["windows"] >= 9 and v["drift_windows"] >= MIN_CONSECUTIVE and v["labelled"] >= 36
    assert summary["alerts"] >= 1
    for png in summary["plots"]:
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_captured_data_trains(monitored) -> None:
    from mlplatform.training.job import run_train

    root = monitored["root"]
    cfg = compose("+mode=train", "+experiment=smoke", f"paths.root={root}", "logger=none", "data=captured",
                  "data.quality.min_images_per_class=1", "train.epochs=2", "train.gate.min_test_acc=0")
    out = run_train(cfg)
    snap = Path(out["registry"]) / out["version"]
    assert out["version"] != monitored["version"] and snap.is_dir()
    manifest = (Path(root) / "snapshots" / "captured").rglob("manifest.jsonl")
    lines = [line for m in manifest for line in m.read_text().splitlines()]
    assert any("captured-" in line for line in lines)  # production images are in the training data
    assert any("captured-" not in line for line in lines)  # mixed with the base


# ----------------------------------------------------------------------------- kill safety (last)


def _ingress_pid() -> int:
    out = subprocess.run(["pgrep", "-f", "ServeReplica:species:Ingress"], capture_output=True, text=True).stdout
    pids = [int(p) for p in out.split()]
    assert pids, "no ingress replica process"
    return pids[0]


def test_killing_the_server_loses_at_most_one_flush_interval(monitored) -> None:
    flush = float(monitored["cfg"].monitor.capture.flush_interval_s)
    answered: list[tuple[float, str]] = []
    stop = threading.Event()

    def stream() -> None:
        i = 0
        while not stop.is_set():
            try:
                r = _predict(_image(i % 8, 60_000 + i))
                if r.status_code == 200:
                    answered.append((time.time(), r.json()["request_id"]))
            except requests.RequestException:
                pass
            i += 1

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(3)
    killed_at = time.time()
    os.kill(_ingress_pid(), signal.SIGKILL)
    time.sleep(0.5)
    stop.set()
    t.join()
    store = monitored["store"]
    for f in store.prediction_files() + store.feedback_files():  # every finished file reads
        pq.read_table(io.BytesIO(Path(f.path).read_bytes()))
    captured = set(store.predictions(columns=["request_id"]).column("request_id").to_pylist())
    durable = [rid for ts, rid in answered if ts < killed_at - 2 * flush]
    assert len(durable) > 20
    assert not [rid for rid in durable if rid not in captured]
    lost = [rid for ts, rid in answered if rid not in captured]
    assert all(ts >= killed_at - 2 * flush for ts, rid in answered if rid in lost)
    np.testing.assert_array_less(0, len(captured))
