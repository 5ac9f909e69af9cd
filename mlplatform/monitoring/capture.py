"""Data capture: every served prediction, human feedback, and a sample of input images.

Layout under the capture root (a path or a filesystem URI):

    predictions/date=YYYY-MM-DD/version=vN/part-<unix ms>-<id>.parquet
    feedback/date=YYYY-MM-DD/part-<unix ms>-<id>.parquet
    images/date=YYYY-MM-DD/version=vN/<request_id>.<ext>

`CaptureWriter` never blocks the request path: `add_*` appends to an in-memory buffer and
a background thread writes it out every `flush_interval_s` (and at `close()`). Each file is
written atomically (beside the target, then renamed; an object-store PUT is atomic by
itself), so a reader never sees a half-written file, and a killed process loses at most
the records of one flush interval. Images are written before the records that name them.
"""

from __future__ import annotations

import io
import logging
import random
import threading
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlplatform import storage

log = logging.getLogger(__name__)

PREDICTION_SCHEMA = pa.schema([
    ("request_id", pa.string()), ("ts", pa.float64()), ("version", pa.string()), ("role", pa.string()),
    ("route", pa.string()), ("labels", pa.list_(pa.string())), ("scores", pa.list_(pa.float32())),
    ("top1", pa.string()), ("top1_index", pa.int32()), ("input_sha256", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("format", pa.string()), ("num_bytes", pa.int64()),
    ("latency_ms", pa.float32()), ("embedding", pa.list_(pa.float32())), ("image_path", pa.string()),
    ("status", pa.int32()),  # 200, or the 5xx a routed request failed with (no prediction then)
])
FEEDBACK_SCHEMA = pa.schema([
    ("request_id", pa.string()), ("ts", pa.float64()), ("label", pa.string()), ("version", pa.string()),
    ("predicted", pa.string()), ("correct", pa.bool_()), ("prediction_ts", pa.float64()),
    ("image_path", pa.string()),
])
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif", "GIF": "gif"}


def _date(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def image_rel_path(ts: float, version: str, request_id: str, fmt: str) -> str:
    return f"images/date={_date(ts)}/version={version}/{request_id}.{EXTENSIONS.get(fmt, 'img')}"


def _table(records: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    cols: dict[str, Any] = {}
    for f in schema:
        values = [r.get(f.name) for r in records]
        if f.name == "embedding":
            arrays = [np.asarray(v, np.float32).ravel() if v is not None else np.zeros(0, np.float32)
                      for v in values]
            offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int32)
            flat = np.concatenate(arrays) if arrays else np.zeros(0, np.float32)
            cols[f.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32()))
        else:
            cols[f.name] = pa.array(values, f.type)
    return pa.Table.from_pydict(cols, schema=schema)


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


class CaptureWriter:
    """Buffered, asynchronous, atomic. Thread-safe; one per ingress replica."""

    def __init__(self, root: str, flush_interval_s: float = 2.0, sample_images: float = 0.0,
                 max_buffer: int = 200_000, seed: int | None = None) -> None:
        if flush_interval_s <= 0:
            raise ValueError(f"flush_interval_s must be > 0, got {flush_interval_s}")
        self.root = storage.resolve_root(root)
        self.flush_interval_s = float(flush_interval_s)
        self.sample_images = float(sample_images)
        self.max_buffer = int(max_buffer)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._predictions: list[dict[str, Any]] = []
        self._feedback: list[dict[str, Any]] = []
        self._images: dict[str, bytes] = {}
        self._stop = threading.Event()
        self.stats = {"predictions": 0, "feedback": 0, "images": 0, "files": 0, "flush_errors": 0, "dropped": 0}
        self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ request path (cheap)

    def wants_image(self) -> bool:
        return self.sample_images > 0 and self._rng.random() < self.sample_images

    def add_prediction(self, record: dict[str, Any], image: bytes | None = None) -> None:
        """`record` follows PREDICTION_SCHEMA; with `image`, its bytes are stored too."""
        if image is not None:
            record["image_path"] = image_rel_path(record["ts"], record["version"], record["request_id"],
                                                  record.get("format") or "")
        with self._lock:
            if len(self._predictions) >= self.max_buffer:  # storage down for long: bounded memory
                self._predictions.pop(0)
                self.stats["dropped"] += 1
            self._predictions.append(record)
            if image is not None:
                self._images[record["image_path"]] = image

    def add_feedback(self, record: dict[str, Any], image: bytes | None = None, fmt: str = "") -> None:
        if image is not None and not record.get("image_path"):
            record["image_path"] = image_rel_path(record["prediction_ts"], record["version"],
                                                  record["request_id"], fmt)
        with self._lock:
            self._feedback.append(record)
            if image is not None:
                self._images[record["image_path"]] = image

    # ------------------------------------------------------------------ background

    def _run(self) -> None:
        # Not niced: the loss bound depends on this thread keeping its interval under load.
        while not self._stop.wait(self.flush_interval_s):
            self.flush()

    def flush(self) -> int:
        """Write everything buffered; on a storage error keep it for the next try."""
        with self._flush_lock:
            with self._lock:
                preds, feedback, images = self._predictions, self._feedback, self._images
                self._predictions, self._feedback, self._images = [], [], {}
            if not (preds or feedback or images):
                return 0
            try:
                written = self._write(preds, feedback, images)
            except Exception as exc:
                self.stats["flush_errors"] += 1
                log.error("capture flush to %s failed (%s: %s); %d records kept for the next try", self.root,
                          type(exc).__name__, exc, len(preds) + len(feedback))
                with self._lock:
                    self._predictions[:0], self._feedback[:0] = preds, feedback
                    self._images = {**images, **self._images}
                return 0
            self.stats["predictions"] += len(preds)
            self.stats["feedback"] += len(feedback)
            self.stats["images"] += len(images)
            self.stats["files"] += written
            return len(preds) + len(feedback)

    def _write(self, preds: list[dict[str, Any]], feedback: list[dict[str, Any]], images: dict[str, bytes]) -> int:
        written = 0
        for rel, data in images.items():
            storage.write_bytes(storage.join(self.root, rel), data)
            written += 1
        stamp = f"part-{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}.parquet"
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in preds:
            groups.setdefault((_date(r["ts"]), r["version"]), []).append(r)
        for (date, version), rows in groups.items():
            path = storage.join(self.root, "predictions", f"date={date}", f"version={version}", stamp)
            storage.write_bytes(path, _parquet_bytes(_table(rows, PREDICTION_SCHEMA)))
            written += 1
        by_date: dict[str, list[dict[str, Any]]] = {}
        for r in feedback:
            by_date.setdefault(_date(r["ts"]), []).append(r)
        for date, rows in by_date.items():
            path = storage.join(self.root, "feedback", f"date={date}", stamp)
            storage.write_bytes(path, _parquet_bytes(_table(rows, FEEDBACK_SCHEMA)))
            written += 1
        return written

    def close(self) -> None:
        """Stop the thread and write what is left (Serve calls this at replica shutdown)."""
        self._stop.set()
        self._thread.join(timeout=self.flush_interval_s + 30)
        self.flush()


# ----------------------------------------------------------------------------- reading


def _partition(rel: str, key: str) -> str | None:
    for part in rel.split("/"):
        if part.startswith(key + "="):
            return part[len(key) + 1:]
    return None


class CaptureStore:
    """Reads what the writers wrote: only finished `.parquet` files, never temporaries."""

    def __init__(self, root: str) -> None:
        self.root = storage.resolve_root(root)

    def _files(self, kind: str, since: float | None = None, until: float | None = None,
               versions: Iterable[str] | None = None) -> list[storage.FileEntry]:
        base = storage.join(self.root, kind)
        if not storage.exists(base):
            return []
        lo = _date(since) if since is not None else None
        hi = _date(until) if until is not None else None
        wanted = set(versions) if versions is not None else None
        out = []
        # Only the date partitions in range are walked: the monitor polls this every few seconds.
        for day in storage.list_dirs(base):
            date = day[len("date="):] if day.startswith("date=") else ""
            if (lo and date < lo) or (hi and date > hi):
                continue
            for f in storage.list_files(storage.join(base, day)):
                if not f.rel.endswith(".parquet"):
                    continue
                if wanted is not None and _partition(f.rel, "version") not in wanted:
                    continue
                out.append(storage.FileEntry(f.path, f"{day}/{f.rel}", f.size, f.mtime))
        return out

    def prediction_files(self, **kw: Any) -> list[storage.FileEntry]:
        return self._files("predictions", **kw)

    def feedback_files(self, **kw: Any) -> list[storage.FileEntry]:
        return self._files("feedback", **kw)

    @staticmethod
    def read(files: Iterable[storage.FileEntry], schema: pa.Schema, columns: list[str] | None = None,
             since: float | None = None, until: float | None = None) -> pa.Table:
        tables = [pq.read_table(io.BytesIO(storage.read_bytes(f.path)), columns=columns) for f in files]
        if not tables:
            names = columns or schema.names
            return pa.table({n: pa.array([], schema.field(n).type) for n in names})
        table = pa.concat_tables(tables, promote_options="default")
        if since is not None or until is not None:
            ts = table.column("ts").to_numpy()
            mask = np.ones(len(ts), bool)
            if since is not None:
                mask &= ts >= since
            if until is not None:
                mask &= ts <= until
            table = table.filter(pa.array(mask))
        return table.sort_by("ts") if "ts" in table.column_names else table

    def predictions(self, since: float | None = None, until: float | None = None,
                    versions: Iterable[str] | None = None, columns: list[str] | None = None) -> pa.Table:
        files = self.prediction_files(since=since, until=until, versions=versions)
        return self.read(files, PREDICTION_SCHEMA, columns, since, until)

    def feedback(self, since: float | None = None, until: float | None = None) -> pa.Table:
        """Feedback, the latest label per request when a request was labelled twice."""
        table = self.read(self.feedback_files(since=since, until=until), FEEDBACK_SCHEMA, None, since, until)
        if table.num_rows == 0:
            return table
        rows = table.to_pylist()
        latest = {r["request_id"]: r for r in rows}  # sorted by ts: the last one wins
        return pa.Table.from_pylist(sorted(latest.values(), key=lambda r: r["ts"]), schema=FEEDBACK_SCHEMA)

    def find(self, request_id: str, since: float | None = None) -> dict[str, Any] | None:
        """A primary prediction by request id (a feedback lookup for requests no longer in memory)."""
        cols = ["request_id", "ts", "version", "role", "top1", "labels", "image_path", "format"]
        for f in reversed(self.prediction_files(since=since)):
            t = pq.read_table(io.BytesIO(storage.read_bytes(f.path)), columns=cols)
            ids = t.column("request_id").to_pylist()
            for i in range(len(ids) - 1, -1, -1):
                if ids[i] == request_id and t.column("role")[i].as_py() != "shadow" \
                        and t.column("top1")[i].as_py() is not None:
                    return {c: t.column(c)[i].as_py() for c in cols}
        return None

    def labelled(self, since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
        """Feedback joined with its prediction: what production saw, what it answered, the truth."""
        fb = self.feedback(since, until).to_pylist()
        if not fb:
            return []
        preds = self.predictions(columns=["request_id", "role", "ts", "version", "top1", "input_sha256",
                                          "image_path", "format", "width", "height"]).to_pylist()
        by_id = {p["request_id"]: p for p in preds if p["role"] != "shadow" and p["top1"] is not None}
        out = []
        for f in fb:
            p = by_id.get(f["request_id"])
            if p is None:
                continue
            out.append({**p, "label": f["label"], "feedback_ts": f["ts"], "correct": f["label"] == p["top1"],
                        "image_path": p["image_path"] or f["image_path"]})
        return out
