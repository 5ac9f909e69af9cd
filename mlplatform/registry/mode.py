"""The registry as the rest of the platform reaches it: from the composed config
(`registry_for`), the commit a version was trained from (`git_commit`), and `+mode=registry`."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from omegaconf import DictConfig

from mlplatform import storage
from mlplatform.errors import ConfigError
from mlplatform.registry.store import Registry, RegistryError


def registry_for(cfg: DictConfig) -> Registry:
    return Registry(storage.resolve_root(cfg.registry.root), cfg.registry.model_name)


def git_commit() -> str | None:
    """HEAD of the repository holding this file, "-dirty" if tracked files changed; else None.

    Recorded in version meta so a model can be traced back to the exact code that trained it.
    """
    here = os.path.dirname(os.path.abspath(__file__))

    def _git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()

    try:
        head = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    if not head:
        return None
    return f"{head}-dirty" if dirty else head


def run_registry(cfg: DictConfig) -> dict[str, Any]:
    """List versions with key metrics, aliases and lineage; optionally move an alias."""
    reg = registry_for(cfg)
    changed = None
    if cfg.registry.set_alias:
        alias, version = cfg.registry.set_alias.split(":")
        try:
            reg.set_alias(alias, reg.resolve(version))
        except RegistryError as exc:
            raise ConfigError("registry.set_alias", cfg.registry.set_alias, str(exc)) from None
        changed = {alias: reg.resolve(version)}
    aliases = reg.aliases()
    by_version: dict[str, list[str]] = {}
    for a, v in aliases.items():
        by_version.setdefault(v, []).append(a)
    rows = []
    for v in reg.versions():
        meta = reg.get(v)
        verdict = reg.latest_verdict(v) or {}
        rows.append({"version": v, "created": meta.get("created"), "aliases": sorted(by_version.get(v, [])),
                     "test/acc": meta.get("metrics", {}).get("test/acc"),
                     "test/macro_f1": meta.get("metrics", {}).get("test/macro_f1"),
                     "gate": verdict.get("verdict"), "lineage": reg.lineage(v)})
    print(f"{'version':<8} {'aliases':<24} {'test/acc':>9} {'macro_f1':>9} {'gate':<9} {'data':<13} {'parent':<7} created")
    for r in rows:
        acc = f"{r['test/acc']:.4f}" if r["test/acc"] is not None else "-"
        f1 = f"{r['test/macro_f1']:.4f}" if r["test/macro_f1"] is not None else "-"
        snap = r["lineage"].get("data_snapshot") or {}
        data = str(snap.get("hash", "-") if isinstance(snap, dict) else snap)[:12]
        print(f"{r['version']:<8} {','.join(r['aliases']) or '-':<24} {acc:>9} {f1:>9} {str(r['gate']):<9} "
              f"{data:<13} {str(r['lineage'].get('parent') or '-'):<7} {r['created']}")
    return {"mode": "registry", "registry": reg.model_dir, "versions": [r["version"] for r in rows],
            "aliases": aliases, "changed": changed, "rows": json.loads(json.dumps(rows, default=str))}
