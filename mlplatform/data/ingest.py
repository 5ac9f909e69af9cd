"""Ingest with Ray Data: list an ImageFolder tree, then hash, decode and describe every file.

An unreadable file becomes a record with `ok=False` and the error; it never crashes the job.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from datetime import datetime
from typing import Any

import numpy as np
import ray
from PIL import Image

from mlplatform import storage

INSPECT_COLUMNS = ("sha256", "ok", "error", "width", "height", "mode", "format", "dhash")


def list_images(root: str, extensions: list[str], since: datetime | None = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Candidate images `root/<species>/<file>`; also counts what was skipped and why."""
    exts = {e.lower() for e in extensions}
    items: list[dict[str, Any]] = []
    skipped = {"not_in_species_folder": 0, "other_extension": 0, "older_than_since": 0}
    cutoff = since.timestamp() if since is not None else None
    for entry in storage.list_files(root):
        parts = entry.rel.split("/")
        name = parts[-1]
        if name.startswith(".") or name.startswith("_"):
            continue  # hidden files and our own markers
        if len(parts) < 2:
            skipped["not_in_species_folder"] += 1
            continue
        if "." + name.rsplit(".", 1)[-1].lower() not in exts or "." not in name:
            skipped["other_extension"] += 1
            continue
        if cutoff is not None and entry.mtime < cutoff:
            skipped["older_than_since"] += 1
            continue
        items.append({"path": entry.path, "rel": entry.rel, "species": parts[0],
                      "size": entry.size, "mtime": entry.mtime})
    return items, skipped


def dhash(img: Image.Image, size: int = 16) -> str:
    """Near-duplicate key: a 256-bit difference hash plus a coarse 4x4 colour signature.

    Equal for the same picture re-encoded or resized; a plain 64-bit dHash collides
    between different small, smooth images, so it is not enough on its own.
    """
    g = np.asarray(img.convert("L").resize((size + 1, size), Image.BILINEAR), dtype=np.int16)
    bits = (g[:, 1:] > g[:, :-1]).flatten()
    gradient = np.packbits(bits).tobytes().hex()
    colour = (np.asarray(img.convert("RGB").resize((4, 4), Image.BILINEAR), dtype=np.uint8) // 32)
    return gradient + "-" + colour.tobytes().hex()


def inspect_one(data: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {"sha256": hashlib.sha256(data).hexdigest(), "ok": True, "error": "",
                           "width": 0, "height": 0, "mode": "", "format": "", "dhash": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            out.update(width=img.width, height=img.height, mode=img.mode, format=img.format or "")
            img.load()
        out["dhash"] = dhash(img)
    except Exception as exc:  # any decoder failure is data, not a crash
        out.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
    return out


def _inspect_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rows = []
    for path in batch["path"]:
        try:
            rows.append(inspect_one(storage.read_bytes(str(path))))
        except OSError as exc:
            rows.append({"sha256": "", "ok": False, "error": f"read failed: {exc}"[:300], "width": 0,
                         "height": 0, "mode": "", "format": "", "dhash": ""})
    out = dict(batch)
    for col in INSPECT_COLUMNS:
        out[col] = np.array([r[col] for r in rows])
    return out


def inspect(items: list[dict[str, Any]], batch_size: int) -> list[dict[str, Any]]:
    """Hash and decode every candidate in parallel with Ray Data; keeps the input order."""
    if not items:
        return []
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // batch_size, 64)))
    ds = ds.map_batches(_inspect_batch, batch_format="numpy", batch_size=batch_size)
    rows = ds.take_all()
    order = {it["rel"]: i for i, it in enumerate(items)}
    rows.sort(key=lambda r: order[str(r["rel"])])
    return [_plain(r) for r in rows]


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        out[k] = v.item() if isinstance(v, np.generic) else v
    return out
