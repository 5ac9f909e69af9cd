"""`data=captured`: labelled production data as a dataset.

Images labelled (POST /feedback) by a trusted labeller, a key in `data.captured.trusted_keys`
or anyone without a key when `trust_anonymous`, are written to
`data.root/<label>/captured-<request_id>.<ext>`; everyone else's labels stay in capture, for
monitoring and review only. With `captured.base` the base dataset is put in the same tree, so the mix goes through the same ingest, splits (an image keeps its
split across snapshots) and quality gates as any other source.
"""

from __future__ import annotations

import logging
import posixpath
from typing import Any

from omegaconf import DictConfig

from mlplatform import storage
from mlplatform.capture.schema import ANONYMOUS, FEEDBACK_SCHEMA
from mlplatform.capture.store import CaptureStore
from mlplatform.config import parse_since
from mlplatform.data.generate import materialize_synthetic
from mlplatform.errors import JobFailed

log = logging.getLogger(__name__)
MARKER = "_CAPTURED.json"
SUMMARY = "_CAPTURED_SUMMARY.json"


def _copy_tree(src: str, dst: str) -> int:
    n = 0
    for f in storage.list_files(src):
        if f.rel.split("/")[-1].startswith(("_", ".")):
            continue
        target = storage.join(dst, *f.rel.split("/"))
        if not storage.exists(target):
            storage.write_bytes(target, storage.read_bytes(f.path))
            n += 1
    return n


def materialize_captured(data: DictConfig) -> str:
    root = storage.resolve_root(data.root)
    cap = data.captured
    if cap.base == "synthetic":
        materialize_synthetic(data)
    elif cap.base == "folder":
        copied = _copy_tree(storage.resolve_root(cap.base_root), root)
        log.info("base folder %s: %d new files copied into %s", cap.base_root, copied, root)

    store = CaptureStore(cap.capture_root)
    since = parse_since(cap.since).timestamp() if cap.since else None
    trusted = set(map(str, cap.trusted_keys))

    def is_trusted(label: dict[str, Any]) -> bool:
        return label["key_id"] in trusted if label["key_id"] is not None else bool(cap.trust_anonymous)

    # Who labelled what: every label in range, and the ones that may become training data.
    by_key: dict[str, dict[str, int]] = {}
    every = store.read(store.feedback_files(since=since), FEEDBACK_SCHEMA, ["ts", "key_id"], since=since)
    for f in every.to_pylist():
        counts = by_key.setdefault(f["key_id"] or ANONYMOUS, {"labels": 0, "used": 0, "trusted": is_trusted(f)})
        counts["labels"] += 1
    rows = store.labelled(since=since, accept=is_trusted)
    marker_path = storage.join(root, MARKER)
    placed: dict[str, str] = storage.read_json(marker_path) if storage.exists(marker_path) else {}
    written = missing = 0
    # The tree holds exactly the current trusted labels: an image placed by an earlier run
    # whose label is no longer trusted (a key's trust revoked, or out of `since`) leaves it.
    current = {r["request_id"] for r in rows if r.get("image_path")}
    for rid in [rid for rid in placed if rid not in current]:
        storage.delete(storage.join(root, *placed.pop(rid).split("/")))
    for r in rows:
        if not r.get("image_path"):
            missing += 1
            continue
        by_key[r["key_id"] or ANONYMOUS]["used"] += 1
        ext = posixpath.splitext(r["image_path"])[1] or ".img"
        rel = f"{r['label']}/captured-{r['request_id']}{ext}"
        if placed.get(r["request_id"]) == rel and storage.exists(storage.join(root, *rel.split("/"))):
            continue
        if r["request_id"] in placed:  # relabelled: the latest feedback wins
            storage.delete(storage.join(root, *placed[r["request_id"]].split("/")))
        storage.write_bytes(storage.join(root, *rel.split("/")),
                            storage.read_bytes(storage.join(store.root, *r["image_path"].split("/"))))
        placed[r["request_id"]] = rel
        written += 1
    storage.write_json(marker_path, placed)
    summary = {"labels": sum(c["labels"] for c in by_key.values()), "used": len(placed),
               "untrusted": sum(c["labels"] for c in by_key.values() if not c["trusted"]),
               "without_image": missing, "trusted_keys": sorted(trusted),
               "trust_anonymous": bool(cap.trust_anonymous), "by_key": by_key}
    storage.write_json(storage.join(root, SUMMARY), summary)
    log.info("captured: %d labels from %d keys, %d trusted with a stored image placed (%d new), %d kept for "
             "review only (untrusted), %d without a stored image", summary["labels"], len(by_key), len(placed),
             written, summary["untrusted"], missing)
    if not placed and cap.base == "none":
        raise JobFailed(f"data=captured: no labelled production image from a trusted labeller under "
                        f"{store.root} (POST /feedback stores the image when "
                        "monitor.capture.store_feedback_images=true; only labels from data.captured.trusted_keys, "
                        "or anonymous ones with data.captured.trust_anonymous=true, are trained on)",
                        {"mode": "data", **summary})
    return root


def captured_summary(root: str) -> dict[str, Any] | None:
    """What the last materialization of `root` used: labels per key, trusted or kept for review."""
    path = storage.join(storage.resolve_root(root), SUMMARY)
    return storage.read_json(path) if storage.exists(path) else None
