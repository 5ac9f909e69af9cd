"""Step caching and lineage: a step's key is the hash of everything it depends on."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

from mlplatform import storage

PACKAGE = Path(__file__).resolve().parents[1]


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def code_fingerprint() -> str:
    """The platform's own code: every .py file of the package, by content."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        h.update(str(path.relative_to(PACKAGE)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


class StepCache:
    """`root/<step>/<key>/output.json` (+ artifacts beside it), written atomically."""

    def __init__(self, root: str, enabled: bool = True) -> None:
        self.root, self.enabled = storage.resolve_root(root), enabled

    def dir(self, step: str, key: str) -> str:
        return storage.join(self.root, step, key[:24])

    def get(self, step: str, key: str) -> dict[str, Any] | None:
        path = storage.join(self.dir(step, key), "output.json")
        if not self.enabled or not storage.exists(path):
            return None
        record = storage.read_json(path)
        return record["outputs"] if record.get("key") == key else None

    def put(self, step: str, key: str, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        storage.write_json(storage.join(self.dir(step, key), "output.json"),
                           {"step": step, "key": key, "inputs": inputs, "outputs": outputs})

    def put_blob(self, step: str, key: str, name: str, obj: Any) -> str:
        path = storage.join(self.dir(step, key), name)
        storage.write_bytes(path, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        return path

    @staticmethod
    def get_blob(path: str) -> Any:
        if not storage.exists(path):
            raise FileNotFoundError(path)
        return pickle.loads(storage.read_bytes(path))


def listing_fingerprint(items: list[dict[str, Any]]) -> str:
    """What files a dataset holds, by relative path, size and modification time."""
    return digest([(it["rel"], it["size"], round(it["mtime"], 3)) for it in items])


def git_state(repo: str | None = None) -> dict[str, Any]:
    import subprocess

    cwd = repo or os.getcwd()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}
