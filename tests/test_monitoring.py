"""Monitoring against real Serve and real alibi-detect: capture, feedback, drift, quality,
alerts, the kill-safety of capture, and retraining on labelled production data."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import signal
import subprocess
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
from scipy.stats import binom

from mlplatform.capture.store import CaptureStore
from mlplatform.data import synthetic
from mlplatform.monitoring.alerts import read_alerts

from .conftest import SERVE_PORT, compose, parallel, wait_for

PORT = SERVE_PORT
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
    from mlplatform.deployments.serve_mode import deploy, undeploy
    from mlplatform.training.job import run_train

    root = tmp_path_factory.mktemp("monitor")
    trained = run_train(compose("+mode=train", "+experiment=smoke", f"paths.root={root}", "logger=none"))
    cfg = compose(*_overrides(root))
    deploy(cfg)
    labels = synthetic.species_names(8)
    yield {"root": root, "cfg": cfg, "labels": labels, "version": trained["version"],
           "store": CaptureStore(str(root / "capture"))}
    undeploy(cfg.serve.app_name)


def _image(species: int, index: int, drifted: bool = False) -> bytes:
    kinds = ["brightness", "blur", "noise", "color_cast", "background"] if drifted else []
    img = synthetic.render(species, index, 32, 0, kinds, 0.6 if drifted else 0.0)
    return synthetic.encode_jpeg(img)


def _predict(data: bytes) -> requests.Response:
    return requests.post(URL + "/predict", data=data, headers={"content-type": "image/jpeg"}, timeout=30)


_SENT: set[str] = set()  # every prediction _send got: capture must hold them all (_settle)


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
    _SENT.update(o["request_id"] for o in out)
    return out


def _status() -> dict:
    r = requests.get(URL + "/monitoring", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _ids(sent: list[dict]) -> set[str]:
    return {s["request_id"] for s in sent}


def _captured(store: CaptureStore, ids: set[str], timeout: float = 30) -> dict[str, dict]:
    """Wait until the capture files hold these predictions; returns every captured row by id."""
    by_id: dict[str, dict] = {}

    def all_there() -> bool:
        by_id.clear()
        by_id.update((r["request_id"], r) for r in store.predictions().to_pylist())
        return ids <= by_id.keys()

    wait_for(all_there, timeout, 0.3, lambda: f"{len(ids - by_id.keys())} of {len(ids)} predictions not captured")
    return by_id


def _settle(m: dict) -> dict:
    """Wait until capture holds every prediction _send got and the monitor has read every
    captured prediction of the version (scored in windows, pending or skipped); returns the
    version's status. Windows then start where this test's traffic starts."""
    store, version = m["store"], m["version"]
    _captured(store, _SENT)

    def caught_up() -> dict | None:
        rows = store.predictions(columns=["version", "top1_index", "embedding"]).to_pylist()
        # What the monitor scores: answered predictions (a failed one has no top-1 or embedding).
        n = sum(1 for r in rows if r["version"] == version and r["top1_index"] is not None
                and r["top1_index"] >= 0 and r["embedding"])
        v = _status()["versions"].get(version) or {"windows": 0, "pending": 0, "skipped": 0}
        return v if v["windows"] * WINDOW + v["pending"] + v["skipped"] == n else None

    return wait_for(caught_up, 90, 0.5, "the monitor did not read every captured prediction")


def _align(m: dict) -> int:
    """Fill the version's current window with in-distribution traffic; returns the windows scored."""
    v = _settle(m)
    if v["pending"]:
        _send(WINDOW - v["pending"], 50_000 + v["windows"] * WINDOW)
        v = _settle(m)
    assert v["pending"] == 0, v
    return v["windows"]


def _windows(st: dict, version: str, lo: int, hi: int) -> list[dict]:
    """The status's windows of `version` with index lo..hi-1, in order."""
    return sorted((w for w in st["windows"] if w["version"] == version and lo <= w["index"] < hi),
                  key=lambda w: w["index"])


def _drift_alerts(alerts: list[dict], version: str, lo: int, hi: int = 1 << 30) -> list[dict]:
    return [a for a in alerts if a["kind"] == "drift" and a["version"] == version and lo <= a["window"] < hi]


def _feedback(request_id: str, label: str) -> requests.Response:
    return requests.post(URL + "/feedback", json={"request_id": request_id, "label": label}, timeout=30)


def _ingress_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ServeReplica:species:Ingress"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _ingress_pid() -> int:
    pids = _ingress_pids()
    assert len(pids) == 1, f"expected one ingress replica process, found {pids}"
    return pids[0]


def _replaced_ingress(killed: int) -> int:
    """Wait until Serve has replaced the killed ingress replica and the new one answers."""
    def back() -> int | None:
        pids = _ingress_pids()
        if len(pids) != 1 or killed in pids:
            return None
        try:
            ready = requests.get(URL + "/v2/health/ready", timeout=5).status_code == 200
        except requests.RequestException:
            return None
        return pids[0] if ready else None

    return wait_for(back, 120, 1, f"Serve did not replace the killed ingress replica (pid {killed})")


# ----------------------------------------------------------------------------- drift


def test_in_distribution_stays_quiet_and_drift_alerts(monitored) -> None:
    version = monitored["version"]
    alerts_path = str(monitored["root"] / "alerts" / "alerts.jsonl")
    # A whole in-distribution window first, so no streak or online-detector state left by
    # earlier traffic reaches the windows counted below.
    _align(monitored)
    _send(WINDOW, 95_000)
    start = _align(monitored)
    n_windows = 6
    _send(n_windows * WINDOW, 0)
    assert _settle(monitored)["windows"] == start + n_windows
    st = _status()
    quiet = _windows(st, version, start, start + n_windows)
    assert len(quiet) == n_windows, st["windows"]
    batch_alarms = sum(any(r["is_drift"] for r in w["results"] if r["p_value"] is not None) for w in quiet)
    online_alarms = sum(any(r["is_drift"] for r in w["results"] if r["p_value"] is None) for w in quiet)
    # Within the budget: the batch family's false alarms over 6 windows are Binomial(6, <= budget),
    # so 3 or more would happen with probability < 0.3%; the online detector (ert=500) sees 192
    # steps: 3 or more false detections has probability < 1%.
    assert batch_alarms <= binom.ppf(0.997, n_windows, BUDGET), quiet
    assert online_alarms <= 2, quiet
    assert not _drift_alerts(st["alerts"], version, start, start + n_windows), st["alerts"]
    assert not _drift_alerts(read_alerts(alerts_path), version, start, start + n_windows)

    first = start + n_windows
    _send(3 * WINDOW, 10_000, drifted=True)
    assert _settle(monitored)["windows"] == first + 3
    st = _status()
    drifted = _windows(st, version, first, first + 3)
    assert len(drifted) == 3 and all(w["drift"] for w in drifted[:MIN_CONSECUTIVE]), drifted
    alerts = _drift_alerts(st["alerts"], version, first)
    assert alerts and {a["detector"] for a in alerts} & {"mmd", "ks"}, st["alerts"]
    assert alerts[0]["window"] <= first + MIN_CONSECUTIVE  # within min_consecutive windows
    logged = [a for a in read_alerts(alerts_path) if a["kind"] == "drift"]
    key = lambda a: (a["version"], a["kind"], a["detector"], a["window"])  # noqa: E731
    assert {key(a) for a in alerts} <= {key(a) for a in logged}, (alerts, logged)
    # Each logged drift alert carries its evidence: a p-value under the threshold, or for the
    # online detector (no p-value) a statistic over it.
    assert all(a["action"] == "log" and a["is_drift"] and (
        a["p_value"] < a["threshold"] if a["p_value"] is not None else a["distance"] > a["threshold"])
        for a in logged), logged


def test_drift_gauges_reach_prometheus(monitored) -> None:
    from mlplatform import ray_compat

    version = monitored["version"]
    first = _align(monitored)
    _send(3 * WINDOW, 70_000, drifted=True)
    _settle(monitored)
    assert _drift_alerts(_status()["alerts"], version, first), "the drifted traffic raised no alert to count"
    port = ray_compat.metrics_export_port()

    def scrape() -> str | None:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        return text if "mlp_drift_is_drift" in text and "mlp_alerts_total" in text else None

    text = wait_for(scrape, 60, 2, "the monitor's gauges and alert counter never reached Prometheus")
    lines = [ln for ln in text.splitlines() if ln.startswith("ray_mlp_drift_is_drift") and 'detector="mmd"' in ln]
    assert lines, text[-3000:]
    assert any(f'version="{version}"' in ln for ln in lines)
    assert "ray_mlp_drift_p_value" in text and "ray_mlp_alerts_total" in text


# ----------------------------------------------------------------------------- capture


def test_every_prediction_is_captured(monitored) -> None:
    sent = _send(12, 20_000)
    oip_id = f"oip-{uuid.uuid4().hex}"
    oip = requests.post(f"{URL}/v2/models/species-classifier/infer", timeout=30, headers={"x-request-id": oip_id},
                        json={"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                          "data": [base64.b64encode(_image(1, 7)).decode()]}]})
    assert oip.status_code == 200, oip.text
    by_id = _captured(monitored["store"], _ids(sent) | {oip_id})  # flushed by the writer's thread
    for s in sent:
        r = by_id[s["request_id"]]
        assert r["version"] == s["version"] and r["top1"] == s["predictions"][0]["label"]
        assert r["labels"] == [p["label"] for p in s["predictions"]]
        assert r["input_sha256"] == s["sha256"] and (r["width"], r["height"], r["format"]) == (32, 32, "JPEG")
        assert len(r["embedding"]) > 0 and r["latency_ms"] > 0 and r["role"] == "stable"
        assert r["route"] == "predict"
        assert r["image_path"] is None  # images are off by default
    assert by_id[oip_id]["route"] == "infer" and by_id[oip_id]["input_sha256"] == hashlib.sha256(
        _image(1, 7)).hexdigest()
    files = monitored["store"].prediction_files()
    assert files and all("/date=" in f.path and "/version=" in f.path for f in files)


# ----------------------------------------------------------------------------- feedback


def test_feedback_contract_and_join(monitored) -> None:
    version, labels = monitored["version"], monitored["labels"]
    sent = _send(16, 30_000)
    for s in sent:  # the true species: the join must pair each label with its own prediction
        r = _feedback(s["request_id"], labels[s["species"]])
        assert r.status_code == 202, r.text
        assert r.json()["correct"] == (s["predictions"][0]["label"] == labels[s["species"]])
    bad = [
        (_feedback("nope", "aardvark"), 404),
        (_feedback(sent[0]["request_id"], "unicorn"), 422),
        (requests.post(URL + "/feedback", json={"label": "aardvark"}, timeout=30), 422),
        (requests.post(URL + "/feedback", data=b"{not json", headers={"content-type": "application/json"},
                       timeout=30), 400),
    ]
    for r, status in bad:
        assert r.status_code == status, r.text
        assert set(r.json()) == {"error", "request_id"}
    ids = _ids(sent)

    def joined_all() -> dict[str, dict] | None:
        joined = {j["request_id"]: j for j in monitored["store"].labelled()}
        return joined if ids <= joined.keys() else None

    joined = wait_for(joined_all, 30, 0.3, "feedback not all joined with its prediction in capture")
    for s in sent:
        j = joined[s["request_id"]]
        assert j["label"] == labels[s["species"]] and j["top1"] == s["predictions"][0]["label"]
        assert j["image_path"]  # the image came from the cache, so it can be trained on

    def live_quality() -> dict | None:
        v = _status()["versions"].get(version)
        return v if v and v["labels"] >= 16 and v["accuracy"] is not None else None

    wait_for(live_quality, 30, 0.5, "the monitor's live accuracy never counted the labels")


def test_feedback_older_than_memory_is_found_in_storage(monitored) -> None:
    """After the ingress restarts, its in-memory index is empty: feedback on an earlier
    prediction is found in the captured files."""
    labels, store = monitored["labels"], monitored["store"]
    sent = _send(4, 35_000)
    _captured(store, _SENT)  # nothing unflushed is lost in the restart
    killed = _ingress_pid()
    os.kill(killed, signal.SIGKILL)
    _replaced_ingress(killed)
    for s in sent:
        r = _feedback(s["request_id"], labels[s["species"]])
        assert r.status_code == 202, r.text
        assert r.json()["version"] == s["version"]
        assert r.json()["correct"] == (s["predictions"][0]["label"] == labels[s["species"]])
    assert _feedback("no-such-request", labels[0]).status_code == 404
    assert store.find(sent[0]["request_id"])["version"] == sent[0]["version"]
    assert store.find("no-such-request") is None


def test_feedback_past_its_window_is_refused_and_labels_are_counted_per_key(monitored) -> None:
    """A prediction served before monitor.capture.lookup_days takes no label (422
    feedback_window_closed, not 404); with open access a label is stored without a key id and
    /monitoring counts it under the anonymous key, in the version's window and in total."""
    from mlplatform.capture.schema import ANONYMOUS, prediction_record
    from mlplatform.capture.writer import CaptureWriter

    labels, store, version = monitored["labels"], monitored["store"], monitored["version"]
    days = monitored["cfg"].monitor.capture.lookup_days
    w = CaptureWriter(str(store.root), flush_interval_s=3600, sample_images=0.0)
    old = f"served-long-ago-{uuid.uuid4().hex[:8]}"
    w.add_prediction(prediction_record(old, time.time() - (days + 1) * 86400, version, "stable", "predict", 3.0,
                                       labels=[labels[0]], scores=[1.0], top1=labels[0], top1_index=0))
    w.close()
    r = _feedback(old, labels[0])
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "feedback_window_closed"
    assert f"{days} days (monitor.capture.lookup_days)" in r.json()["error"]["message"]

    before = _status()["feedback"]["labels_by_key"].get(ANONYMOUS, 0)
    sent = _send(4, 50_000)
    for s in sent:
        assert _feedback(s["request_id"], labels[s["species"]]).status_code == 202
    ids = _ids(sent)

    def stored() -> dict[str, str | None] | None:
        keys = {f["request_id"]: f["key_id"] for f in store.feedback().to_pylist() if f["request_id"] in ids}
        return keys if keys.keys() == ids else None

    assert set(wait_for(stored, 30, 0.3, "the labels never reached capture").values()) == {None}
    st = wait_for(lambda: (s := _status())["feedback"]["labels_by_key"].get(ANONYMOUS, 0) >= before + 4 and s,
                  30, 0.5, "the monitor never counted the labels per key")
    v = st["versions"][version]
    assert sum(v["labels_by_key"].values()) == v["labels"] and v["labels_by_key"][ANONYMOUS] >= 4


def test_low_live_accuracy_raises_a_quality_alert(monitored) -> None:
    version, labels = monitored["version"], monitored["labels"]
    since = time.time()
    sent = _send(20, 40_000)
    for s in sent:  # a labeller who disagrees with every answer: concept drift
        wrong = next(lab for lab in labels if lab != s["predictions"][0]["label"])
        assert _feedback(s["request_id"], wrong).status_code == 202

    def raised() -> list[dict]:
        return [a for a in _status()["alerts"] if a["kind"] == "quality" and a["version"] == version
                and a["ts"] >= since]

    alerts = wait_for(raised, 60, 0.5, "no quality alert after 20 wrong answers")
    assert alerts[-1]["accuracy"] < 0.6


# ----------------------------------------------------------------------------- report and retraining


def test_monitor_report(monitored) -> None:
    """The report over exactly this test's traffic: 2 windows in distribution, 3 drifted,
    32 labels, and the live monitor's drift alert."""
    from mlplatform.monitoring.report import run_monitor

    version, labels, root = monitored["version"], monitored["labels"], monitored["root"]
    _align(monitored)
    since = time.time()
    clean = _send(2 * WINDOW, 80_000)
    drifted = _send(3 * WINDOW, 85_000, drifted=True)
    for s in clean[:16] + drifted[:16]:
        assert _feedback(s["request_id"], labels[s["species"]]).status_code == 202
    _settle(monitored)
    assert [a for a in read_alerts(str(root / "alerts" / "alerts.jsonl"), since) if a["kind"] == "drift"]
    ids = _ids(clean[:16] + drifted[:16])
    wait_for(lambda: ids <= {j["request_id"] for j in monitored["store"].labelled(since)}, 30, 0.3,
             "feedback not all captured")

    iso = datetime.fromtimestamp(since, UTC).isoformat()
    summary = run_monitor(compose("+mode=monitor", *_overrides(root)[1:], f"monitor.report.since='{iso}'"))
    md = Path(summary["report"]).read_text()
    assert "Drift over time" in md and "Feedback accuracy" in md and "Alerts" in md
    v = summary["versions"][version]
    assert v["predictions"] == 5 * WINDOW and v["windows"] == 5, v
    assert v["drift_windows"] >= MIN_CONSECUTIVE and v["labelled"] == 32, v
    assert summary["alerts"] >= 1
    for png in summary["plots"]:
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_captured_data_trains(monitored) -> None:
    from mlplatform.training.job import run_train

    root, labels = monitored["root"], monitored["labels"]
    sent = _send(16, 45_000)
    for s in sent:
        assert _feedback(s["request_id"], labels[s["species"]]).status_code == 202
    ids = _ids(sent)
    wait_for(lambda: ids <= {j["request_id"] for j in monitored["store"].labelled() if j["image_path"]}, 30, 0.3,
             "the labelled images were not all captured")
    cfg = compose("+mode=train", "+experiment=smoke", f"paths.root={root}", "logger=none", "data=captured",
                  "data.quality.min_images_per_class=1", "train.epochs=2", "train.gate.min_test_acc=0")
    out = run_train(cfg)
    snap = Path(out["registry"]) / out["version"]
    assert out["version"] != monitored["version"] and snap.is_dir()
    manifest = (Path(root) / "snapshots" / "captured").rglob("manifest.jsonl")
    lines = [line for m in manifest for line in m.read_text().splitlines()]
    assert all(any(f"captured-{rid}" in line for line in lines) for rid in ids)  # this test's labelled images
    assert any("captured-" not in line for line in lines)  # mixed with the base


# ----------------------------------------------------------------------------- kill safety


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

    _captured(monitored["store"], _SENT)  # what the other tests sent is flushed before the kill
    t = threading.Thread(target=stream)
    t.start()
    try:
        wait_for(lambda: sum(ts < time.time() - 2 * flush for ts, _ in answered) > 30, 60, 0.2,
                 "too few answers before the kill")
        killed = _ingress_pid()
        killed_at = time.time()
        os.kill(killed, signal.SIGKILL)
        time.sleep(0.5)  # the stream keeps sending across the kill
    finally:
        stop.set()
        t.join()
    try:
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
    finally:
        _replaced_ingress(killed)  # the tests after this one find a serving ingress
