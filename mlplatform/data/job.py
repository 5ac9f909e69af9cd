"""`+mode=data`: materialise the source, ingest with Ray Data, split, check quality, snapshot."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mlplatform import storage
from mlplatform.config import parse_since
from mlplatform.data import ingest, quality, snapshot
from mlplatform.data.captured import captured_summary, materialize_captured
from mlplatform.data.generate import materialize_synthetic
from mlplatform.errors import JobFailed

log = logging.getLogger(__name__)


def materialize(data: DictConfig) -> str:
    """The ImageFolder root to read: for `source=synthetic` generated first (once per
    parameters), for `source=captured` assembled from capture."""
    if data.source == "captured":
        return materialize_captured(data)
    if data.source == "synthetic":
        return materialize_synthetic(data)
    return storage.resolve_root(data.root)


def _load_assignments(path: str) -> dict[str, str]:
    return storage.read_json(path) if storage.exists(path) else {}


def run_data(cfg: DictConfig) -> dict[str, Any]:
    data = cfg.data
    started = time.time()
    paths_root = storage.resolve_root(cfg.paths.root)
    data_root = materialize(data)
    since = parse_since(data.since) if data.since else None
    items, skipped = ingest.list_images(data_root, list(data.extensions), since)
    log.info("inspecting %d files with Ray Data", len(items))
    records = ingest.inspect(items, data.inspect_batch_size)

    snapshots_root = storage.join(paths_root, "snapshots", data.name)
    previous = snapshot.load_latest(snapshots_root)
    ledger_path = storage.join(snapshots_root, "assignments.json")
    assignments = _load_assignments(ledger_path)
    fractions = {"train": data.splits.train, "val": data.splits.val, "test": data.splits.test}
    sel = snapshot.select(records, fractions, data.splits.salt, data.max_per_class, assignments)

    report = quality.build_report(records, sel, skipped, previous.labels if previous else None, fractions)
    gates = quality.check_gates(report, data.quality)
    lines = snapshot.manifest_lines(sel.kept)
    digest = snapshot.manifest_hash(lines)
    snapshot_dir = storage.join(snapshots_root, digest[:12])
    labels = snapshot.label_map(sel.kept)
    passed = all(g["passed"] for g in gates)
    snapshot.write_manifest(snapshot_dir, data_root, lines, labels, {
        "name": data.name,
        "created": datetime.now(UTC).isoformat(),
        "previous": previous.hash if previous else None,
        "gates_passed": passed,
        "preprocess": OmegaConf.to_container(data.preprocess, resolve=True),
        "data_config": OmegaConf.to_container(data, resolve=True),
        "captured": captured_summary(data_root) if data.source == "captured" else None,
    })
    report_paths = quality.write(snapshot_dir, report, gates, digest[:12])

    summary: dict[str, Any] = {
        "mode": "data",
        "dataset": data.name,
        "snapshot_id": digest[:12],
        "snapshot_hash": digest,
        "snapshot_dir": snapshot_dir,
        "manifest": storage.join(snapshot_dir, "manifest.jsonl"),
        "label_map": storage.join(snapshot_dir, "label_map.json"),
        **report_paths,
        "num_images": report["num_images"],
        "num_species": report["num_species"],
        "splits": report["splits"]["counts"],
        "unreadable": report["unreadable"]["count"],
        "duplicates": len(report["duplicates"]["exact_within_species"]),
        "gates_passed": passed,
        "seconds": round(time.time() - started, 2),
    }
    if data.source == "captured":  # how many labels it used, from which keys (trusted or not)
        summary["captured"] = captured_summary(data_root)
    if not passed:
        failed = [f"{g['gate']}: {g['message']}" for g in gates if not g["passed"]]
        raise JobFailed("data quality gates failed: " + "; ".join(failed), summary)
    # Only a snapshot that passed its gates becomes the dataset's latest, and fixes its splits.
    assignments.update({line["sha256"]: line["split"] for line in lines})
    storage.write_json(ledger_path, assignments)
    storage.write_json(snapshot.latest_pointer(snapshots_root), {"dir": snapshot_dir, "hash": digest})
    return summary
