"""Step caching and lineage: a step's key is the hash of everything it depends on."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from mlplatform import blobs, storage

log = logging.getLogger(__name__)

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
    """`root/<step>/<key>/output.json` (+ blobs beside it), written atomically.

    Nothing here is pickled (see `mlplatform.blobs`). An entry that cannot be read, or whose
    blobs are missing or changed since it was written, is a miss: the step runs again and
    overwrites it. Reusing it would feed later steps whatever the damaged file now holds.
    """

    def __init__(self, root: str, enabled: bool = True) -> None:
        self.root, self.enabled = storage.resolve_root(root), enabled
        self._blobs: dict[tuple[str, str], dict[str, str]] = {}  # blobs put() will vouch for

    def dir(self, step: str, key: str) -> str:
        return storage.join(self.root, step, key[:24])

    def get(self, step: str, key: str) -> dict[str, Any] | None:
        path = storage.join(self.dir(step, key), "output.json")
        if not self.enabled or not storage.exists(path):
            return None
        try:
            record = storage.read_json(path)
            if not isinstance(record, dict) or not isinstance(record.get("outputs"), dict):
                raise ValueError("not a cache record")
            if record.get("key") != key:
                return None  # another key with the same prefix: not this step's output
            for blob, sha in (record.get("blobs") or {}).items():
                if hashlib.sha256(storage.read_bytes(blob)).hexdigest() != sha:
                    raise ValueError(f"{blob} changed since it was cached")
        except (OSError, ValueError) as exc:
            log.warning("pipeline cache: %s is unreadable (%s): running step %s again", path, exc, step)
            return None
        return record["outputs"]

    def put(self, step: str, key: str, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        storage.write_json(storage.join(self.dir(step, key), "output.json"),
                           {"step": step, "key": key, "inputs": inputs, "outputs": outputs,
                            "blobs": self._blobs.pop((step, key), {})})

    def put_blob(self, step: str, key: str, name: str, obj: Any) -> str:
        """Arrays, bytes and JSON values in `<name>.npz`; its path goes into the step's outputs."""
        path = storage.join(self.dir(step, key), f"{name}.npz")
        data = blobs.write(path, obj)
        self._blobs.setdefault((step, key), {})[path] = hashlib.sha256(data).hexdigest()
        return path

    @staticmethod
    def get_blob(path: str) -> Any:
        if not storage.exists(path):
            raise FileNotFoundError(path)
        return blobs.read(path)


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
