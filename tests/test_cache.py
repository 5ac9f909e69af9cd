"""The pipeline cache holds no pickle, reads back what it wrote, and treats damage as a miss."""

from __future__ import annotations

import io
import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mlplatform import blobs
from mlplatform.pipeline.cache import StepCache

PICKLE_PROTOCOL_2_TO_5 = tuple(bytes([0x80, p]) for p in range(2, 6))


def _trained_payload() -> dict:
    """What the train step caches: weights, metrics, plots and the monitoring reference."""
    rng = np.random.default_rng(0)
    state = {"body.features.0.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
             "body.features.1.num_batches_tracked": np.array(12, dtype=np.int64),
             "head.bias": np.zeros(5, np.float32)}
    out = {"state": state, "best_epoch": 3, "epochs_run": 5, "best_val": 0.71, "early_stopped": True,
           "resumed_from_epoch": None, "wandb_dir": None,
           "history": [{"epoch": 0, "train/loss": 1.6, "val/acc": 0.4}, {"epoch": 1, "train/loss": float("nan")}],
           "test": {"test/acc": 0.7, "per_class": {"a": {"f1": 0.5, "support": 4}},
                    "confusion_matrix": [[1, 0], [2, 3]], "worst_classes": ["a", "b"]},
           "confusion_png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "reliability_png": b"",
           "reference": {"embeddings": rng.normal(size=(6, 4)).astype(np.float32),
                         "logits": rng.normal(size=(6, 5))}}
    return {"out": out, "labels": ["a", "b", "c", "d", "e"], "spec": {"image_size": 32, "mean": [0.5] * 3}}


def _assert_same(a, b, where: str = "payload") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, where
        assert np.array_equal(a, b), where
    elif isinstance(a, float) and a != a:
        assert isinstance(b, float) and b != b, where
    else:
        assert type(a) is type(b) and a == b, where


def assert_no_pickle(root: Path) -> int:
    """Every file under root is JSON or an npz whose every member loads without pickle."""
    files = [p for p in root.rglob("*") if p.is_file()]
    for path in files:
        data = path.read_bytes()
        assert not data.startswith(PICKLE_PROTOCOL_2_TO_5), path
        if data.startswith(b"PK\x03\x04"):
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                for name in archive.files:
                    archive[name]  # raises ValueError for a member that needs pickle
        else:
            json.loads(data)
    return len(files)


def _cached(tmp_path: Path) -> tuple[StepCache, str, dict, dict]:
    cache = StepCache(str(tmp_path / "cache"))
    key = "k" * 64
    payload = _trained_payload()
    blob = cache.put_blob("train", key, "trained", payload)
    outputs = {"run": "train-1", "blob": blob, "metrics": {"test/acc": 0.7}}
    cache.put("train", key, {"seed": 0}, outputs)
    return cache, key, payload, outputs


def test_a_cached_step_reads_back_what_it_wrote_and_holds_no_pickle(tmp_path: Path) -> None:
    cache, key, payload, outputs = _cached(tmp_path)
    assert cache.get("train", key) == outputs
    _assert_same(payload, StepCache.get_blob(outputs["blob"]))
    assert assert_no_pickle(tmp_path / "cache") == 2  # output.json and trained.npz


def test_a_truncated_record_is_a_miss_with_a_warning(tmp_path: Path, caplog) -> None:
    cache, key, _, _ = _cached(tmp_path)
    record = Path(cache.dir("train", key)) / "output.json"
    record.write_text(record.read_text()[:40])
    with caplog.at_level(logging.WARNING, logger="mlplatform.pipeline.cache"):
        assert cache.get("train", key) is None
    assert any("unreadable" in r.getMessage() and str(record) in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_blob_makes_its_step_a_miss(tmp_path: Path, caplog, damage: str) -> None:
    cache, key, _, outputs = _cached(tmp_path)
    blob = Path(outputs["blob"])
    data = bytearray(blob.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
    elif damage == "truncate":
        blob.write_bytes(bytes(data[: len(data) // 2]))
    else:
        blob.unlink()
    with caplog.at_level(logging.WARNING, logger="mlplatform.pipeline.cache"):
        assert cache.get("train", key) is None
    assert any("running step train again" in r.getMessage() for r in caplog.records)
    # The step runs again and its new entry is a hit.
    new_outputs = {**outputs, "blob": cache.put_blob("train", key, "trained", _trained_payload())}
    cache.put("train", key, {"seed": 0}, new_outputs)
    assert cache.get("train", key) == new_outputs


def test_a_blob_that_needs_pickle_is_refused_not_run(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:  # an npz whose `doc` member is an object array
        member = io.BytesIO()
        np.save(member, np.array([{"x": 1}], dtype=object), allow_pickle=True)
        zf.writestr("doc.npy", member.getvalue())
    with pytest.raises(blobs.BlobError):
        blobs.loads(buf.getvalue())
    with pytest.raises(blobs.BlobError):
        blobs.loads(b"\x80\x05not a blob")


@pytest.mark.parametrize("value", [np.array([object()], dtype=object), {1: "int key"}, {"a": {1, 2}},
                                   {"$array": "a0"}])
def test_values_json_cannot_hold_are_refused_when_writing(value) -> None:
    with pytest.raises((TypeError, ValueError)):
        blobs.dumps({"v": value})
