"""Feedback that cannot poison training: labels carry the key that sent them, only trusted
keys' labels become `data=captured` training data, a label past its window is refused, and a
flood of labels from one key raises an alert. Real capture files throughout."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from mlplatform.capture.schema import ANONYMOUS, FEEDBACK_SCHEMA, date_partition
from mlplatform.capture.store import CaptureStore
from mlplatform.capture.writer import CaptureWriter
from mlplatform.data import synthetic
from mlplatform.errors import ConfigError, JobFailed
from mlplatform.monitoring.alerts import read_alerts
from mlplatform.monitoring.windows import Monitor

from .conftest import compose

SPECIES = synthetic.species_names(8)


def _prediction(rid: str, top1: str, ts: float) -> dict:
    return {"request_id": rid, "ts": ts, "version": "v1", "role": "stable", "route": "predict",
            "labels": [top1], "scores": [0.9], "top1": top1, "top1_index": SPECIES.index(top1),
            "input_sha256": "0" * 64, "width": 32, "height": 32, "format": "JPEG", "num_bytes": 100,
            "latency_ms": 3.0, "embedding": np.zeros(4, np.float32), "image_path": None}


def _label(rid: str, label: str, key_id: str | None, ts: float, top1: str) -> dict:
    return {"request_id": rid, "ts": ts, "label": label, "version": "v1", "predicted": top1,
            "correct": label == top1, "prediction_ts": ts - 1, "image_path": None, "key_id": key_id}


def _capture(root: Path, labels: list[tuple[str, str, str | None]]) -> None:
    """A served prediction with its stored image for each request id, then the labels
    (request id, label, key id) in order, one second apart, as serving writes them."""
    w = CaptureWriter(str(root), flush_interval_s=3600, sample_images=0.0)
    t0 = time.time() - 600
    for i, rid in enumerate(dict.fromkeys(rid for rid, _, _ in labels)):
        img = synthetic.encode_jpeg(synthetic.render(i % 8, 5000 + i, 32))
        w.add_prediction(_prediction(rid, SPECIES[0], t0 + i), image=img)
    for i, (rid, label, key) in enumerate(labels):
        w.add_feedback(_label(rid, label, key, t0 + 100 + i, SPECIES[0]))
    w.close()


# Alice is a trusted labeller; mallory is a valid key that is not; r4 came without a key.
# mallory relabels alice's r5: the trusted label must stay the one trained on.
LABELS = [("r0", SPECIES[1], "alice"), ("r1", SPECIES[2], "alice"), ("r2", SPECIES[3], "mallory"),
          ("r3", SPECIES[3], "mallory"), ("r4", SPECIES[4], None), ("r5", SPECIES[5], "alice"),
          ("r5", SPECIES[6], "mallory")]


def _placed(data_root: str) -> dict[str, str]:
    """captured-<rid> file -> the species folder it was placed in."""
    return {p.stem.removeprefix("captured-"): p.parent.name for p in Path(data_root).rglob("captured-*")}


def test_untrusted_feedback_never_reaches_a_captured_snapshot(tmp_path: Path) -> None:
    """The pipeline's snapshot step (no Ray: it lists the tree the trainer reads) on real
    capture files; then trust changes and the tree follows it."""
    from mlplatform.pipeline.run import run_pipeline

    _capture(tmp_path / "capture", LABELS)
    base = ["+mode=pipeline", f"paths.root={tmp_path}", "logger=none", "pipeline.steps=[snapshot]",
            "data.captured.base=none"]
    out = run_pipeline(compose(*base, "data.captured.trusted_keys=[alice]", "data.captured.trust_anonymous=false"))
    root = compose(*base).data.root
    assert _placed(root) == {"r0": SPECIES[1], "r1": SPECIES[2], "r5": SPECIES[5]}
    (snap,) = [s["outputs"] for s in json.loads(Path(out["lineage"]).read_text())["steps"] if s["step"] == "snapshot"]
    assert snap["captured_files"] == 3
    assert snap["captured"]["by_key"] == {"alice": {"labels": 3, "used": 3, "trusted": True},
                                          "mallory": {"labels": 3, "used": 0, "trusted": False},
                                          ANONYMOUS: {"labels": 1, "used": 0, "trusted": False}}
    assert (snap["captured"]["labels"], snap["captured"]["used"], snap["captured"]["untrusted"]) == (7, 3, 4)

    # alice's trust revoked, anonymous labels trusted: her images leave the tree, r4 enters;
    # mallory's labels never do, even as the latest label of r5.
    run_pipeline(compose(*base, "data.captured.trust_anonymous=true"))
    assert _placed(root) == {"r4": SPECIES[4]}
    with pytest.raises(JobFailed, match="no labelled production image from a trusted labeller"):
        run_pipeline(compose(*base, "data.captured.trust_anonymous=false"))
    assert _placed(root) == {}


@pytest.mark.ray
def test_a_captured_data_job_trains_only_on_trusted_labels(ray_cluster, tmp_path: Path) -> None:
    """The real data job (Ray Data ingest, splits, gates, snapshot manifest) over the
    synthetic base plus captured labels: the manifest holds alice's images and no one else's,
    and its summary says how many labels it used from which keys."""
    from mlplatform.data.job import run_data

    _capture(tmp_path / "capture", LABELS)
    cfg = compose("+mode=data", "+experiment=smoke", "data=captured", f"paths.root={tmp_path}",
                  "data.captured.trusted_keys=[alice]", "data.captured.trust_anonymous=false")
    summary = run_data(cfg)
    manifest = [json.loads(line) for line in Path(summary["manifest"]).read_text().splitlines()]
    captured = {Path(e["file"]).stem.removeprefix("captured-"): e for e in manifest
                if Path(e["file"]).name.startswith("captured-")}
    assert set(captured) == {"r0", "r1", "r5"}
    assert summary["captured"]["by_key"]["alice"] == {"labels": 3, "used": 3, "trusted": True}
    assert summary["captured"]["by_key"]["mallory"]["used"] == 0
    meta = json.loads((Path(summary["snapshot_dir"]) / "snapshot.json").read_text())
    assert meta["captured"]["untrusted"] == 4 and meta["captured"]["trusted_keys"] == ["alice"]


def test_feedback_files_written_before_key_ids_stay_readable(tmp_path: Path) -> None:
    old_schema = pa.schema([f for f in FEEDBACK_SCHEMA if f.name != "key_id"])
    ts = time.time()
    day = tmp_path / "feedback" / f"date={date_partition(ts)}"
    day.mkdir(parents=True)
    row = {k: v for k, v in _label("r0", SPECIES[1], None, ts, SPECIES[0]).items() if k != "key_id"}
    pq.write_table(pa.Table.from_pylist([row], schema=old_schema), day / "part-0000000000001-old.parquet")
    w = CaptureWriter(str(tmp_path), flush_interval_s=3600, sample_images=0.0)
    w.add_prediction(_prediction("r0", SPECIES[0], ts - 5))
    w.add_prediction(_prediction("r1", SPECIES[0], ts - 4))
    w.add_feedback(_label("r1", SPECIES[0], "alice", ts + 1, SPECIES[0]))
    w.close()
    store = CaptureStore(str(tmp_path))
    assert {r["request_id"]: r["key_id"] for r in store.feedback().to_pylist()} == {"r0": None, "r1": "alice"}
    assert {r["request_id"]: r["key_id"] for r in store.labelled()} == {"r0": None, "r1": "alice"}
    old_only = store.read([f for f in store.feedback_files() if "old" in f.rel], FEEDBACK_SCHEMA)
    assert old_only.column("key_id").to_pylist() == [None]


def _index(root: Path, *overrides: str):
    from mlplatform.deployments.feedback import FeedbackIndex
    from mlplatform.deployments.settings import Capture

    cap = OmegaConf.to_container(compose(*overrides).monitor.capture, resolve=True)
    capture = Capture.model_validate({**cap, "root": str(root)})
    writer = CaptureWriter(str(root), flush_interval_s=3600, sample_images=0.0)
    return FeedbackIndex(capture, writer, CaptureStore(str(root)), ingress_replicas=lambda: 1), writer


def test_a_label_past_its_window_is_refused_and_a_label_keeps_its_key(tmp_path: Path) -> None:
    from mlplatform.deployments.errors import ApiError

    days = compose().monitor.capture.lookup_days
    w = CaptureWriter(str(tmp_path), flush_interval_s=3600, sample_images=0.0)
    w.add_prediction(_prediction("old", SPECIES[0], time.time() - (days + 1) * 86400))
    w.add_prediction(_prediction("recent", SPECIES[0], time.time() - 3600))
    w.close()
    index, writer = _index(tmp_path)
    with pytest.raises(ApiError) as info:
        asyncio.run(index.find("old"))
    assert (info.value.status, info.value.code) == (422, "feedback_window_closed")
    assert f"{days} days (monitor.capture.lookup_days)" in info.value.message
    with pytest.raises(ApiError) as info:
        asyncio.run(index.find("never-served"))
    assert (info.value.status, info.value.code) == (404, "unknown_request")
    entry = asyncio.run(index.find("recent"))
    assert index.record("recent", SPECIES[0], entry, "alice") is True
    writer.close()
    (label,) = CaptureStore(str(tmp_path)).feedback().to_pylist()
    assert (label["key_id"], label["label"]) == ("alice", SPECIES[0]) and label["ts"] > entry["ts"]


def test_the_feedback_image_cache_is_bounded_in_bytes(tmp_path: Path) -> None:
    """Phone photos are megabytes: the cache evicts the oldest images past
    monitor.capture.image_cache_mb as well as past image_cache, and a label for an evicted
    request is stored without its image."""
    index, writer = _index(tmp_path, "monitor.capture.image_cache=100", "monitor.capture.image_cache_mb=0.0025")
    now = time.time()
    for i in range(5):  # 1,000 bytes each: the last two fit in 2,500
        index.remember(f"r{i}", _prediction(f"r{i}", SPECIES[0], now), bytes([i]) * 1000, sampled=False)
    assert list(index.images) == ["r3", "r4"] and index.image_bytes == 2000
    index.remember("r4", _prediction("r4", SPECIES[0], now), b"x" * 1600, sampled=False)  # the same id again
    assert list(index.images) == ["r4"] and index.image_bytes == 1600
    index.remember("big", _prediction("big", SPECIES[0], now), b"y" * 3000, sampled=False)  # alone over the bound
    assert list(index.images) == [] and index.image_bytes == 0
    for rid in ("r0", "r4"):
        index.record(rid, SPECIES[0], asyncio.run(index.find(rid)), "alice")
    writer.close()
    assert all(r["image_path"] is None for r in CaptureStore(str(tmp_path)).feedback().to_pylist())
    index, writer = _index(tmp_path / "count", "monitor.capture.image_cache=2")
    for i in range(4):
        index.remember(f"r{i}", _prediction(f"r{i}", SPECIES[0], now), b"z" * 10, sampled=False)
    assert list(index.images) == ["r2", "r3"] and index.image_bytes == 20
    index.record("r3", SPECIES[0], asyncio.run(index.find("r3")), None)
    writer.close()
    (label,) = CaptureStore(str(tmp_path / "count")).feedback().to_pylist()
    assert label["image_path"]  # a cached image is stored with its label


def _monitor(tmp_path: Path, action: str = "retrain") -> Monitor:
    return Monitor({"quality": {"window": 100, "min_labels": 1000, "min_accuracy": 0.5},
                    "alerts": {"path": str(tmp_path / "alerts.jsonl"), "action": action, "min_consecutive": 2,
                               "cooldown_s": 60, "retrain_cooldown_s": 3600, "trigger_dir": str(tmp_path / "trig"),
                               "feedback_flood_labels": 5, "feedback_flood_interval_s": 10}})


def test_a_flood_of_labels_from_one_key_raises_an_alert_never_a_retrain(tmp_path: Path) -> None:
    mon = _monitor(tmp_path)
    t0 = 1_000_000.0
    steady = [_label(f"a{i}", SPECIES[1], "alice", t0 + 3 * i, SPECIES[1]) for i in range(8)]  # 4 per 10 s
    flood = [_label(f"m{i}", SPECIES[2], "mallory", t0 + 0.1 * i, SPECIES[1]) for i in range(8)]
    mon.add_feedback(steady + flood + [_label("x", SPECIES[1], None, t0, SPECIES[1])])
    alerts = read_alerts(str(tmp_path / "alerts.jsonl"))
    assert [(a["kind"], a["detector"], a["key_id"], a["labels"]) for a in alerts] == \
        [("feedback_flood", "mallory", "mallory", 6)]  # the 6th within 10 s; then the cooldown
    assert alerts[0]["action"] == "log" and not (tmp_path / "trig").exists()  # a flood is no reason to retrain
    assert mon.alerts.raised == alerts
    # The live accuracy says whose labels it counts.
    assert mon.quality.by_key("v1") == {"alice": 8, "mallory": 8, ANONYMOUS: 1}
    assert mon.quality.accuracy("v1") == (9 / 17, 17)
    assert dict(mon.floods.totals) == {"alice": 8, "mallory": 8, ANONYMOUS: 1}


def test_trusted_keys_come_from_the_keys_marked_trusted_labeller() -> None:
    cfg = OmegaConf.create({"keys": [{"id": "alice", "trusted_labeller": True}, {"id": "bot"},
                                     {"id": "bob", "trusted_labeller": False}],
                            "trusted": "${mlp.trusted_labellers:${keys}}", "none": "${mlp.trusted_labellers:[]}"})
    assert cfg.trusted == ["alice"] and cfg.none == []
    assert compose("data=captured").data.captured.trusted_keys == []  # no keys declared


@pytest.mark.parametrize("override,key", [
    ("monitor.alerts.feedback_flood_labels=0", "monitor.alerts.feedback_flood_labels"),
    ("monitor.alerts.feedback_flood_interval_s=0", "monitor.alerts.feedback_flood_interval_s"),
    ("monitor.capture.lookup_days=0", "monitor.capture.lookup_days"),
    ("data=captured data.captured.trusted_keys=['']", "data.captured.trusted_keys"),
])
def test_feedback_trust_config_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose(*override.split())
    assert info.value.key == key


def test_trusted_keys_follow_serve_auth_keys_and_a_typo_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLP_TEST_LABELLER_SECRET", "a-labeller-secret-of-some-length")
    keys = ("serve.auth.keys=[{id: alice, roles: [feedback], rate: 1, burst: 1, "
            "secret_env: MLP_TEST_LABELLER_SECRET, trusted_labeller: true}, {id: bob, roles: [feedback], "
            "rate: 1, burst: 1, secret_env: MLP_TEST_LABELLER_SECRET}]")
    assert list(compose("data=captured", keys).data.captured.trusted_keys) == ["alice"]
    with pytest.raises(ConfigError) as info:
        compose("data=captured", keys, "data.captured.trusted_keys=[alcie]")
    assert info.value.key == "data.captured.trusted_keys"
