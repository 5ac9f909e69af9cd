"""Deterministic splits, de-duplication, "how much data", and the snapshot manifest.

Splits are assigned by a hash of each image's *content*: the same image lands in the same
split on every run and wherever it is stored. An image that an earlier snapshot already
placed keeps that split even if the fractions or the salt change, so a test image never
leaks into a later training set. Each species is split independently (stratified).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from mlplatform import storage

SPLITS = ("train", "val", "test")


def unit_hash(sha: str, salt: str) -> float:
    """A uniform number in [0, 1) from the image's content hash and the salt."""
    h = hashlib.sha256(f"{salt}|{sha}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_for(sha: str, fractions: dict[str, float], salt: str) -> str:
    u = unit_hash(sha, salt)
    if u < fractions["train"]:
        return "train"
    if u < fractions["train"] + fractions["val"]:
        return "val"
    return "test"


@dataclass
class Selection:
    """What the snapshot keeps, and everything it set aside with the reason."""

    kept: list[dict[str, Any]] = field(default_factory=list)
    unreadable: list[dict[str, Any]] = field(default_factory=list)
    duplicates: list[dict[str, Any]] = field(default_factory=list)  # exact copies, same species
    label_conflicts: list[dict[str, Any]] = field(default_factory=list)  # same bytes, other species
    capped: int = 0  # dropped by max_per_class
    sticky: int = 0  # kept the split of an earlier snapshot


def select(records: list[dict[str, Any]], fractions: dict[str, float], salt: str,
           max_per_class: int | None = None, previous: dict[str, str] | None = None) -> Selection:
    """Drop unreadable files and duplicates, apply max_per_class, then assign splits."""
    previous = previous or {}
    sel = Selection()
    by_sha: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if not r["ok"]:
            sel.unreadable.append(r)
        else:
            by_sha[r["sha256"]].append(r)
    candidates = []
    for group in by_sha.values():
        group = sorted(group, key=lambda r: r["rel"])
        species = {r["species"] for r in group}
        if len(species) > 1:
            sel.label_conflicts.extend({**r, "species_seen": sorted(species)} for r in group)
            continue
        candidates.append(group[0])
        sel.duplicates.extend({**r, "duplicate_of": group[0]["rel"]} for r in group[1:])

    if max_per_class is not None:
        per_species: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in candidates:
            per_species[r["species"]].append(r)
        candidates = []
        for group in per_species.values():
            # A salt of its own: ordering by the split hash would keep only train images.
            group.sort(key=lambda r: unit_hash(r["sha256"], salt + "|select"))
            candidates.extend(group[:max_per_class])
            sel.capped += max(0, len(group) - max_per_class)

    for r in sorted(candidates, key=lambda r: r["rel"]):
        if r["sha256"] in previous:
            split = previous[r["sha256"]]
            sel.sticky += 1
        else:
            split = split_for(r["sha256"], fractions, salt)
        sel.kept.append({**r, "split": split})
    return sel


def manifest_lines(kept: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"file": r["rel"], "species": r["species"], "split": r["split"], "sha256": r["sha256"]}
            for r in sorted(kept, key=lambda r: r["rel"])]


def manifest_hash(lines: list[dict[str, Any]]) -> str:
    """One hash for the whole snapshot: every file, species, split and content hash."""
    h = hashlib.sha256()
    for line in lines:
        h.update(f"{line['file']}\t{line['species']}\t{line['split']}\t{line['sha256']}\n".encode())
    return h.hexdigest()


def label_map(kept: list[dict[str, Any]]) -> dict[str, int]:
    return {name: i for i, name in enumerate(sorted({r["species"] for r in kept}))}


@dataclass
class Snapshot:
    """A written snapshot, as later jobs (training, evaluation) read it back."""

    dir: str
    data_root: str
    hash: str
    labels: list[str]
    entries: list[dict[str, Any]]

    @property
    def id(self) -> str:
        return self.hash[:12]

    def split(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["split"] == name]

    def counts(self) -> dict[str, Counter]:
        out: dict[str, Counter] = {s: Counter() for s in SPLITS}
        for e in self.entries:
            out[e["split"]][e["species"]] += 1
        return out


def write_manifest(snapshot_dir: str, data_root: str, lines: list[dict[str, Any]],
                   labels: dict[str, int], extra: dict[str, Any]) -> str:
    digest = manifest_hash(lines)
    storage.write_text(storage.join(snapshot_dir, "manifest.jsonl"),
                       "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))
    storage.write_json(storage.join(snapshot_dir, "label_map.json"), labels)
    storage.write_json(storage.join(snapshot_dir, "snapshot.json"),
                       {"hash": digest, "data_root": data_root, "num_images": len(lines),
                        "num_species": len(labels), **extra})
    return digest


def load(snapshot_dir: str) -> Snapshot:
    meta = storage.read_json(storage.join(snapshot_dir, "snapshot.json"))
    text = storage.read_text(storage.join(snapshot_dir, "manifest.jsonl"))
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    if manifest_hash(entries) != meta["hash"]:
        raise ValueError(f"snapshot {snapshot_dir}: manifest does not match its hash {meta['hash']}")
    labels = storage.read_json(storage.join(snapshot_dir, "label_map.json"))
    return Snapshot(dir=snapshot_dir, data_root=meta["data_root"], hash=meta["hash"],
                    labels=sorted(labels, key=labels.get), entries=entries)


def latest_pointer(snapshots_root: str) -> str:
    return storage.join(snapshots_root, "latest.json")


def load_latest(snapshots_root: str) -> Snapshot | None:
    pointer = latest_pointer(snapshots_root)
    if not storage.exists(pointer):
        return None
    return load(storage.read_json(pointer)["dir"])
