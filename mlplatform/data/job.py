"""`+mode=data`: materialise the source, ingest with Ray Data, split, check quality, snapshot."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import ray
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from mlplatform import storage
from mlplatform.config import parse_since
from mlplatform.data import ingest, quality, snapshot, synthetic
from mlplatform.errors import ConfigError, JobFailed

log = logging.getLogger(__name__)


@ray.remote(num_cpus=1)
def _write_species_task(root: str, species: int, name: str, images_per_class: int, image_size: int,
                        seed: int, drift_kinds: list[str], drift_strength: float) -> int:
    return synthetic.write_species(root, species, name, images_per_class, image_size, seed,
                                   drift_kinds, drift_strength)


def materialize(data: DictConfig) -> str:
    """The ImageFolder root to read; for `source=synthetic` generate it first (once per parameters)."""
    root = storage.resolve_root(data.root)
    if data.source == "captured":
        from mlplatform.data.captured import materialize_captured

        return materialize_captured(data)
    if data.source != "synthetic":
        return root
    syn = data.synthetic
    kinds = list(syn.drift.kinds)
    fingerprint = synthetic.params_fingerprint(syn.num_classes, syn.images_per_class, syn.image_size,
                                               syn.seed, kinds, syn.drift.strength)
    marker = storage.join(root, "_SYNTHETIC.json")
    if storage.exists(marker):
        if storage.read_json(marker).get("fingerprint") == fingerprint:
            log.info("synthetic dataset already at %s", root)
            return root
        raise ConfigError("data.root", data.root,
                          "holds a synthetic dataset made with other parameters; choose another root")
    names = synthetic.species_names(syn.num_classes)
    log.info("generating %d species x %d images (%dpx) into %s", syn.num_classes, syn.images_per_class,
             syn.image_size, root)
    pending = [_write_species_task.remote(root, i, name, syn.images_per_class, syn.image_size, syn.seed,
                                          kinds, syn.drift.strength) for i, name in enumerate(names)]
    with tqdm(total=syn.num_classes * syn.images_per_class, desc="synthetic species", unit="img") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(sum(ray.get(done)))
    storage.write_json(marker, {"fingerprint": fingerprint, "species": names,
                                "params": OmegaConf.to_container(syn, resolve=True)})
    return root


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
    if not passed:
        failed = [f"{g['gate']}: {g['message']}" for g in gates if not g["passed"]]
        raise JobFailed("data quality gates failed: " + "; ".join(failed), summary)
    # Only a snapshot that passed its gates becomes the dataset's latest, and fixes its splits.
    assignments.update({line["sha256"]: line["split"] for line in lines})
    storage.write_json(ledger_path, assignments)
    storage.write_json(snapshot.latest_pointer(snapshots_root), {"dir": snapshot_dir, "hash": digest})
    return summary
