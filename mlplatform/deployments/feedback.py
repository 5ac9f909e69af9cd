"""POST /feedback's memory: which version answered a request id, and with what.

Recent primary predictions are held in memory (bounded); older ones, or those another
ingress replica served, are looked up in capture storage. The images of recent requests are
cached too, so that a label can be stored with an image that capture did not sample."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from mlplatform.capture.store import CaptureStore
from mlplatform.capture.writer import CaptureWriter
from mlplatform.deployments.errors import ApiError
from mlplatform.deployments.settings import Capture


class FeedbackIndex:
    """Request id -> {"ts", "version", "top1", "image_path", "format"}; `capture` is
    conf/monitor's capture section, resolved (the sizes of both caches, the lookup window)."""

    def __init__(self, capture: Capture, writer: CaptureWriter, store: CaptureStore,
                 ingress_replicas: Callable[[], int]) -> None:
        # ingress_replicas: how many run now (autoscaled); with one, no other can hold a record.
        self.cap, self.writer, self.store, self.replicas = capture, writer, store, ingress_replicas
        self.index: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.images: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self.image_bytes = 0  # of self.images: bounded too, as one image may be megabytes

    @property
    def lookup_days(self) -> int:
        return self.cap.lookup_days

    def remember(self, request_id: str, record: dict[str, Any], data: bytes | None, sampled: bool) -> None:
        """A primary prediction (a capture record), and its image unless capture keeps it."""
        self.index[request_id] = {"ts": record["ts"], "version": record["version"], "top1": record["top1"],
                                  "image_path": record["image_path"], "format": record["format"]}
        while len(self.index) > self.cap.index_size:
            self.index.popitem(last=False)
        if data is not None and not sampled and self.cap.store_feedback_images:
            old = self.images.pop(request_id, None)
            self.image_bytes += len(data) - (len(old[0]) if old else 0)
            self.images[request_id] = (data, record["format"])
            limit = self.cap.image_cache_mb * 1e6
            while self.images and (len(self.images) > self.cap.image_cache or self.image_bytes > limit):
                _, (evicted, _) = self.images.popitem(last=False)
                self.image_bytes -= len(evicted)

    async def find(self, request_id: str) -> dict[str, Any]:
        """The prediction a label is for, served within `lookup_days`; else the contract's
        404 unknown request, or 422 `feedback_window_closed` when it is older than that."""
        entry = self.index.get(request_id)
        if entry is None:
            entry = await asyncio.to_thread(self._lookup, request_id)
            if entry is None and self.replicas() > 1:
                # Another ingress replica may hold it unflushed: wait one flush, look again.
                await asyncio.sleep(self.cap.flush_interval_s + 0.5)
                entry = await asyncio.to_thread(self._lookup, request_id)
        opened = time.time() - 86400 * self.lookup_days
        if entry is None:
            # Only a miss searches the older partitions (the feedback rate limit bounds how often).
            entry = await asyncio.to_thread(self.store.find, request_id, None, opened)
            if entry is None:
                raise ApiError(404, "unknown_request", f"no served prediction has request_id {request_id!r}")
        if entry["ts"] < opened:
            raise ApiError(422, "feedback_window_closed", f"request {request_id!r} was served "
                           f"{(time.time() - entry['ts']) / 86400:.1f} days ago; labels are taken for "
                           f"{self.lookup_days} days (monitor.capture.lookup_days)")
        return entry

    def _lookup(self, request_id: str) -> dict[str, Any] | None:
        return self.store.find(request_id, since=time.time() - 86400 * self.lookup_days)

    def record(self, request_id: str, label: str, entry: dict[str, Any], key_id: str | None) -> bool:
        """Store the label beside its prediction (with the cached image when capture has none)
        and the key that sent it (None: open access); True when the prediction was right."""
        image = self.images.get(request_id) if not entry.get("image_path") else None
        correct = label == entry["top1"]
        self.writer.add_feedback({"request_id": request_id, "ts": time.time(), "label": label,
                                  "version": entry["version"], "predicted": entry["top1"], "correct": correct,
                                  "prediction_ts": entry["ts"], "image_path": entry.get("image_path"),
                                  "key_id": key_id},
                                 image[0] if image else None, image[1] if image else "")
        return correct
