"""The capture format: record schemas, partition names and how records become Parquet."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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
    # The API key id that sent the label (null: open access, or a file written before keys);
    # data=captured trains only on the labels of trusted keys (data.captured.trusted_keys).
    ("key_id", pa.string()),
])
# Labels without a key id are counted under this name (a key id never has parentheses).
ANONYMOUS = "(anonymous)"
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif", "GIF": "gif"}


def prediction_record(request_id: str, ts: float, version: str, role: str, route: str, latency_ms: float,
                      status: int = 200, **fields: Any) -> dict[str, Any]:
    """A PREDICTION_SCHEMA record with every field: `fields` fills the prediction's; without
    them it is a routed request that failed (`status`), with no prediction to watch."""
    record: dict[str, Any] = {f.name: None for f in PREDICTION_SCHEMA}
    record.update(request_id=request_id, ts=ts, version=version, role=role, route=route, latency_ms=latency_ms,
                  status=status, labels=[], scores=[], top1_index=-1)
    unknown = set(fields) - set(record)
    if unknown:
        raise KeyError(f"not in PREDICTION_SCHEMA: {sorted(unknown)}")
    record.update(fields)
    return record


def date_partition(ts: float) -> str:
    """The `date=` partition of a record at `ts` (UTC)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def partition_value(rel: str, key: str) -> str | None:
    """`key`'s value in a Hive-style relative path (`.../key=value/...`), else None."""
    for part in rel.split("/"):
        if part.startswith(key + "="):
            return part[len(key) + 1:]
    return None


def image_rel_path(ts: float, version: str, request_id: str, fmt: str) -> str:
    return f"images/date={date_partition(ts)}/version={version}/{request_id}.{EXTENSIONS.get(fmt, 'img')}"


def conform(table: pa.Table, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """`table` with every column of `schema` (or `columns`) a file written before that column
    existed lacks, as nulls: old capture files stay readable."""
    for name in columns or schema.names:
        if name not in table.column_names:
            table = table.append_column(schema.field(name), pa.nulls(table.num_rows, schema.field(name).type))
    return table


def to_table(records: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
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


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()
