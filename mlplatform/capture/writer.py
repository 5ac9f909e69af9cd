"""Writing capture on the serving path: buffered, asynchronous, atomic.

`add_*` appends to an in-memory buffer and a background thread writes it out every
`flush_interval_s` (and at `close()`). Each file is written atomically (beside the target,
then renamed; an object-store PUT is atomic by itself), so a reader never sees a
half-written file, and a killed process loses at most the records of one flush interval.
Images are written before the records that name them.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from typing import Any

from mlplatform import storage
from mlplatform.capture.schema import (
    FEEDBACK_SCHEMA,
    PREDICTION_SCHEMA,
    date_partition,
    image_rel_path,
    parquet_bytes,
    to_table,
)

log = logging.getLogger(__name__)


class _WriterMetrics:
    def __init__(self, capacity: int) -> None:
        from ray.serve.metrics import Counter, Gauge

        self.buffered = Gauge("mlp_capture_buffered_records", description="Capture records waiting to be written")
        self.capacity = Gauge("mlp_capture_buffer_capacity",
                              description="Predictions the buffer holds before it drops the oldest")
        self.capacity.set(capacity)
        self.dropped = Counter("mlp_capture_dropped_total", description="Captured predictions dropped (buffer full)")
        self.flush_errors = Counter("mlp_capture_flush_errors_total", description="Capture flushes that failed")


class CaptureWriter:
    """Buffered, asynchronous, atomic. Thread-safe; one per ingress replica."""

    def __init__(self, root: str, flush_interval_s: float, sample_images: float,
                 max_buffer: int = 200_000, seed: int | None = None, metrics: bool = False) -> None:
        """flush_interval_s and sample_images are conf/monitor's capture keys. With `metrics`
        (in a Serve replica) the writer exports what the capture alerts read: records
        buffered, the buffer's capacity, records dropped and failed flushes."""
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
        self._metrics = _WriterMetrics(self.max_buffer) if metrics else None
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
                if self._metrics:
                    self._metrics.dropped.inc()
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
            if self._metrics:
                with self._lock:
                    buffered = len(self._predictions) + len(self._feedback)
                self._metrics.buffered.set(buffered)

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
                if self._metrics:
                    self._metrics.flush_errors.inc()
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
            groups.setdefault((date_partition(r["ts"]), r["version"]), []).append(r)
        for (date, version), rows in groups.items():
            path = storage.join(self.root, "predictions", f"date={date}", f"version={version}", stamp)
            storage.write_bytes(path, parquet_bytes(to_table(rows, PREDICTION_SCHEMA)))
            written += 1
        by_date: dict[str, list[dict[str, Any]]] = {}
        for r in feedback:
            by_date.setdefault(date_partition(r["ts"]), []).append(r)
        for date, rows in by_date.items():
            path = storage.join(self.root, "feedback", f"date={date}", stamp)
            storage.write_bytes(path, parquet_bytes(to_table(rows, FEEDBACK_SCHEMA)))
            written += 1
        return written

    def close(self) -> None:
        """Stop the thread and write what is left (Serve calls this at replica shutdown)."""
        self._stop.set()
        self._thread.join(timeout=self.flush_interval_s + 30)
        self.flush()
