"""Reading capture: only finished `.parquet` files, never a writer's temporaries."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlplatform import storage
from mlplatform.capture.schema import (
    FEEDBACK_SCHEMA,
    PREDICTION_SCHEMA,
    conform,
    date_partition,
    partition_value,
)


def _read_file(path: str, schema: pa.Schema, columns: list[str] | None) -> pa.Table:
    """One capture file; a column it predates (feedback's key_id) is read as nulls, so files
    written before a column was added stay readable."""
    pf = pq.ParquetFile(io.BytesIO(storage.read_bytes(path)))
    present = pf.schema_arrow.names
    return conform(pf.read(columns=[c for c in columns if c in present] if columns else None), schema, columns)


class CaptureStore:
    """Reads what the writers wrote: only finished `.parquet` files, never temporaries."""

    def __init__(self, root: str) -> None:
        self.root = storage.resolve_root(root)

    def _files(self, kind: str, since: float | None = None, until: float | None = None,
               versions: Iterable[str] | None = None) -> list[storage.FileEntry]:
        base = storage.join(self.root, kind)
        if not storage.exists(base):
            return []
        lo = date_partition(since) if since is not None else None
        hi = date_partition(until) if until is not None else None
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
                if wanted is not None and partition_value(f.rel, "version") not in wanted:
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
        tables = [_read_file(f.path, schema, columns) for f in files]
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

    def feedback(self, since: float | None = None, until: float | None = None,
                 accept: Callable[[dict[str, Any]], bool] | None = None) -> pa.Table:
        """Feedback, the latest label per request when a request was labelled twice; with
        `accept`, the latest of the labels it accepts (an untrusted relabel then neither
        replaces nor hides a trusted label)."""
        table = self.read(self.feedback_files(since=since, until=until), FEEDBACK_SCHEMA, None, since, until)
        if table.num_rows == 0:
            return table
        rows = [r for r in table.to_pylist() if accept is None or accept(r)]
        latest = {r["request_id"]: r for r in rows}  # sorted by ts: the last one wins
        return pa.Table.from_pylist(sorted(latest.values(), key=lambda r: r["ts"]), schema=FEEDBACK_SCHEMA)

    def find(self, request_id: str, since: float | None = None, until: float | None = None) -> dict[str, Any] | None:
        """A primary prediction by request id (a feedback lookup for requests no longer in memory);
        `since`/`until` bound the date partitions searched."""
        cols = ["request_id", "ts", "version", "role", "top1", "labels", "image_path", "format"]
        for f in reversed(self.prediction_files(since=since, until=until)):
            t = pq.read_table(io.BytesIO(storage.read_bytes(f.path)), columns=cols)
            ids = t.column("request_id").to_pylist()
            for i in range(len(ids) - 1, -1, -1):
                if ids[i] == request_id and t.column("role")[i].as_py() != "shadow" \
                        and t.column("top1")[i].as_py() is not None:
                    return {c: t.column(c)[i].as_py() for c in cols}
        return None

    def labelled(self, since: float | None = None, until: float | None = None,
                 accept: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
        """Feedback (that `accept` accepts) joined with its prediction: what production saw,
        what it answered, the truth, and who said so (`key_id`)."""
        fb = self.feedback(since, until, accept).to_pylist()
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
                        "key_id": f["key_id"], "image_path": p["image_path"] or f["image_path"]})
        return out
