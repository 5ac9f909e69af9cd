"""`data=captured`: labelled production data as a dataset.

Images that got human feedback (stored by capture, see `monitor.capture`) are written to
`data.root/<label>/captured-<request_id>.<ext>`; with `captured.base` the base dataset is
put in the same tree, so the mix goes through the same ingest, splits (an image keeps its
split across snapshots) and quality gates as any other source.
"""

from __future__ import annotations

import logging
import posixpath

from omegaconf import DictConfig, OmegaConf

from mlplatform import storage
from mlplatform.config import parse_since
from mlplatform.errors import JobFailed
from mlplatform.monitoring.capture import CaptureStore

log = logging.getLogger(__name__)
MARKER = "_CAPTURED.json"


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
    from mlplatform.data.job import materialize

    root = storage.resolve_root(data.root)
    cap = data.captured
    if cap.base == "synthetic":
        base = OmegaConf.merge(data, {"source": "synthetic"})
        materialize(base)
    elif cap.base == "folder":
        copied = _copy_tree(storage.resolve_root(cap.base_root), root)
        log.info("base folder %s: %d new files copied into %s", cap.base_root, copied, root)

    store = CaptureStore(cap.capture_root)
    since = parse_since(cap.since).timestamp() if cap.since else None
    rows = store.labelled(since=since)
    marker_path = storage.join(root, MARKER)
    placed: dict[str, str] = storage.read_json(marker_path) if storage.exists(marker_path) else {}
    written = missing = 0
    for r in rows:
        if not r.get("image_path"):
            missing += 1
            continue
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
    log.info("captured: %d labelled predictions, %d images placed (%d new), %d without a stored image",
             len(rows), len(placed), written, missing)
    if not placed and cap.base == "none":
        raise JobFailed(f"data=captured: no labelled production image under {store.root} (POST /feedback stores "
                        "the image when monitor.capture.store_feedback_images=true)",
                        {"mode": "data", "labelled": len(rows), "without_image": missing})
    return root
