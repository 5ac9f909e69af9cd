"""The registry store: `Registry` and its errors (the layout and its reasons: the package docstring)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from mlplatform.storage import exists, is_uri, join, read_bytes, read_json, resolve_root, write_json

if TYPE_CHECKING:  # pragma: no cover
    import torch

WEIGHTS = "model.safetensors"
VERSION_JSON = "version.json"
ALIASES_JSON = "aliases.json"
ALIASES_LOCK = ".aliases.lock"
VERDICTS_DIR = "verdicts"
RESERVED_NAMES = frozenset({WEIGHTS, VERSION_JSON, VERDICTS_DIR})

_VERSION_RE = re.compile(r"^v([0-9]+)$")
_ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class RegistryError(Exception):
    """A registry request that cannot be honoured: unknown ref, bad name, unsupported root."""


class ChecksumError(RegistryError):
    """A stored file's bytes no longer match the sha256 recorded when it was registered."""


def _now() -> datetime:
    return datetime.now(UTC)


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_path(path: str) -> None:
    """Flush a file (or directory entry) to disk so the commit marker never outruns the data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _version_number(name: str) -> int | None:
    m = _VERSION_RE.match(name)
    return int(m.group(1)) if m else None


def _list_dir(path: str) -> list[str]:
    """Names directly under `path` (local or URI); [] when it does not exist."""
    if is_uri(path):
        fs, p = pafs.FileSystem.from_uri(path)
    else:
        fs, p = pafs.LocalFileSystem(), path
    selector = pafs.FileSelector(p, allow_not_found=True, recursive=False)
    return sorted(info.base_name for info in fs.get_file_info(selector))


def _is_plain_name(name: object) -> bool:
    """A single path component that cannot escape the version directory."""
    return isinstance(name, str) and bool(_FILE_NAME_RE.match(name)) and ".." not in name


def _check_file_name(name: str) -> None:
    if not _is_plain_name(name) or name in RESERVED_NAMES:
        raise RegistryError(
            f"bad file name {name!r}: use a plain name like 'model_card.md' (no directories, "
            f"not one of {sorted(RESERVED_NAMES)})")


class Registry:
    """One model's versions under `<root>/<model_name>/`; see the module docstring."""

    def __init__(self, root: str, model_name: str) -> None:
        if not isinstance(model_name, str) or not _MODEL_NAME_RE.match(model_name):
            raise RegistryError(f"bad model name {model_name!r}: letters, digits, '.', '_', '-'")
        self.root = resolve_root(root)
        self.model_name = model_name
        self.model_dir = join(self.root, model_name)

    def __repr__(self) -> str:
        return f"Registry(root={self.root!r}, model_name={self.model_name!r})"

    # ------------------------------------------------------------------------------ writing

    def _require_local(self, what: str) -> None:
        if is_uri(self.root):
            raise RegistryError(
                f"{what} needs a local filesystem (atomic os.mkdir / fcntl.flock); "
                f"root {self.root!r} is a URI: register on a local or shared POSIX path")

    def register(self, state_dict: dict[str, torch.Tensor], meta: dict,
                 files: dict[str, bytes] | None = None,
                 late_files: Callable[[str], dict[str, bytes]] | None = None) -> str:
        """Store weights + extra files as the next version `vN` and return its id.

        The version number is claimed with os.mkdir so concurrent registrations never collide;
        version.json is written last, so a crash leaves only an ignored, incomplete directory.
        Keys of `meta` named like the reserved fields (version, created, weights, ...) are
        overridden by the registry's own values.
        """
        import torch
        from safetensors.torch import save_file

        self._require_local("register")
        if not isinstance(meta, dict):
            raise RegistryError(f"meta must be a dict, got {type(meta).__name__}")
        files = dict(files or {})
        for name, data in files.items():
            _check_file_name(name)
            if not isinstance(data, bytes | bytearray | memoryview):
                raise RegistryError(f"file {name!r}: expected bytes, got {type(data).__name__}")
        if not isinstance(state_dict, dict) or not state_dict:
            raise RegistryError("state_dict must be a non-empty dict of name -> torch.Tensor")
        tensors: dict[str, torch.Tensor] = {}
        seen_storage: set[int] = set()
        for key, value in state_dict.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                raise RegistryError(
                    f"state_dict[{key!r}] is {type(value).__name__}: expected str -> torch.Tensor")
            t = value.detach().to("cpu").contiguous()
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen_storage and t.numel() > 0:  # tied weights: safetensors refuses shared
                t = t.clone()
            seen_storage.add(t.untyped_storage().data_ptr())
            tensors[key] = t
        try:  # fail before claiming a version, not after
            json.dumps(meta, default=str)
        except (TypeError, ValueError) as e:
            raise RegistryError(f"meta is not JSON-serialisable: {e}") from e

        os.makedirs(self.model_dir, exist_ok=True)
        version, vdir = self._claim_version()

        weights_path = os.path.join(vdir, WEIGHTS)
        save_file(tensors, weights_path,
                  metadata={"format": "pt", "model_name": self.model_name, "version": version})
        _fsync_path(weights_path)
        weights_sha = _sha256_file(weights_path)
        os.chmod(weights_path, 0o444)

        if late_files is not None:  # files that name their own version (a model card, say)
            for name, data in late_files(version).items():
                _check_file_name(name)
                if name in files:
                    raise RegistryError(f"file {name!r} given twice")
                files[name] = data
        file_shas: dict[str, str] = {}
        for name in sorted(files):
            data = bytes(files[name])
            p = os.path.join(vdir, name)
            with open(p, "xb") as f:  # "x": never overwrite, even within a claimed directory
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(p, 0o444)
            file_shas[name] = _sha256_bytes(data)

        record = {
            **meta,
            "version": version,
            "model_name": self.model_name,
            "created": _now().isoformat(),
            "weights": WEIGHTS,
            "weights_sha256": weights_sha,
            "files": file_shas,
        }
        vjson = os.path.join(vdir, VERSION_JSON)
        write_json(vjson, record)  # atomic rename: the commit point
        os.chmod(vjson, 0o444)
        _fsync_path(vdir)
        return version

    def _claim_version(self) -> tuple[str, str]:
        """mkdir v<N> for N = 1 + highest existing (complete or not); on a race, try N+1."""
        numbers = [n for n in map(_version_number, _list_dir(self.model_dir)) if n is not None]
        n = max(numbers, default=0) + 1
        while True:
            vdir = os.path.join(self.model_dir, f"v{n}")
            try:
                os.mkdir(vdir)
            except FileExistsError:
                n += 1
                continue
            return f"v{n}", vdir

    # ------------------------------------------------------------------------------ reading

    def versions(self) -> list[str]:
        """Complete versions (those with version.json), oldest first: v2 sorts before v10."""
        found = []
        for name in _list_dir(self.model_dir):
            n = _version_number(name)
            if n is not None and exists(join(self.model_dir, name, VERSION_JSON)):
                found.append((n, name))
        return [name for _, name in sorted(found)]

    def _unknown(self, ref: str, why: str = "unknown ref") -> RegistryError:
        vs = self.versions()
        al = self.aliases()
        return RegistryError(
            f"{self.model_name}: {why} {ref!r}; versions: {', '.join(vs) or '(none)'}; "
            f"aliases: {', '.join(f'{a}->{v}' for a, v in sorted(al.items())) or '(none)'}")

    def resolve(self, ref: str) -> str:
        """The version id a ref (version id or alias name) points to; RegistryError if none."""
        if not isinstance(ref, str) or not ref:
            raise RegistryError(f"{self.model_name}: ref must be a non-empty string, got {ref!r}")
        if _version_number(ref) is not None:
            if exists(join(self.model_dir, ref, VERSION_JSON)):
                return ref
            raise self._unknown(ref, "unknown (or incomplete) version")
        target = self.aliases().get(ref)
        if target is None:
            raise self._unknown(ref, "unknown version or alias")
        if not exists(join(self.model_dir, target, VERSION_JSON)):
            raise self._unknown(ref, f"alias points at missing version {target}:")
        return target

    def get(self, ref: str) -> dict:
        """The version.json record of a version id or alias."""
        return read_json(join(self.model_dir, self.resolve(ref), VERSION_JSON))

    def path(self, version: str, name: str) -> str:
        """Where file `name` of a version (id or alias) lives, for tools that want a path."""
        if not _is_plain_name(name):
            raise RegistryError(f"bad file name {name!r}: a plain name, no directories or '..'")
        return join(self.model_dir, self.resolve(version), name)

    def _verified_bytes(self, record: dict, name: str, expected: str) -> bytes:
        data = read_bytes(join(self.model_dir, record["version"], name))
        actual = _sha256_bytes(data)
        if actual != expected:
            raise ChecksumError(
                f"{self.model_name} {record['version']}/{name}: sha256 mismatch, "
                f"recorded {expected}, found {actual}; refusing to use a corrupted file")
        return data

    def verify_weights(self, ref: str) -> str:
        """Check a version's weights against their recorded sha256 without deserialising them
        (no torch in the caller); returns the version. Raises ChecksumError."""
        record = self.get(ref)
        self._verified_bytes(record, record.get("weights", WEIGHTS), record["weights_sha256"])
        return record["version"]

    def load_state_dict(self, ref: str) -> dict[str, torch.Tensor]:
        """The weights of a version, sha256-verified BEFORE deserialising.

        Parses the very bytes that were verified (safetensors.torch.load, the in-memory twin of
        load_file: safe format, no pickle), so nothing can change between check and load, and
        it works on URI roots too.
        """
        from safetensors.torch import load

        record = self.get(ref)
        data = self._verified_bytes(record, record.get("weights", WEIGHTS),
                                    record["weights_sha256"])
        return load(data)

    def read_file(self, ref: str, name: str) -> bytes:
        """An extra file of a version (or its weights), sha256-verified against version.json."""
        record = self.get(ref)
        if name == record.get("weights", WEIGHTS):
            return self._verified_bytes(record, name, record["weights_sha256"])
        shas = record.get("files", {})
        if name not in shas:
            raise RegistryError(
                f"{self.model_name} {record['version']}: no file {name!r}; files: "
                f"{', '.join(sorted([WEIGHTS, *shas]))}")
        return self._verified_bytes(record, name, shas[name])

    # ------------------------------------------------------------------------------ aliases

    def aliases(self) -> dict[str, str]:
        """The alias -> version mapping ({} before any alias is set)."""
        p = join(self.model_dir, ALIASES_JSON)
        if not exists(p):
            return {}
        data = read_json(p)
        return dict(data) if isinstance(data, dict) else {}

    @contextmanager
    def _aliases_locked(self) -> Iterator[dict[str, str]]:
        """Exclusive read-modify-write of aliases.json; the yielded dict is written back."""
        self._require_local("changing aliases")
        os.makedirs(self.model_dir, exist_ok=True)
        with open(os.path.join(self.model_dir, ALIASES_LOCK), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                mapping = self.aliases()
                yield mapping
                # temp file + fsync + os.replace (storage.write_json): never half-written
                write_json(os.path.join(self.model_dir, ALIASES_JSON), mapping)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def set_alias(self, alias: str, version: str) -> dict[str, str]:
        """Point `alias` at a version (an id, or another alias, resolved now); returns the map.

        Alias names are lower-case words (`^[a-z][a-z0-9_-]*$`) and never look like a version id,
        so a ref is never ambiguous.
        """
        if not isinstance(alias, str) or not _ALIAS_RE.match(alias) \
                or _version_number(alias) is not None:
            raise RegistryError(
                f"bad alias name {alias!r}: must match ^[a-z][a-z0-9_-]*$ and not look like v<N>")
        target = self.resolve(version)
        with self._aliases_locked() as mapping:
            mapping[alias] = target
        return dict(mapping)

    def remove_alias(self, alias: str) -> dict[str, str]:
        """Drop an alias (RegistryError if it is not set); returns the new map."""
        with self._aliases_locked() as mapping:
            if alias not in mapping:
                raise RegistryError(
                    f"{self.model_name}: no alias {alias!r}; aliases: "
                    f"{', '.join(sorted(mapping)) or '(none)'}")
            del mapping[alias]
        return dict(mapping)

    # ------------------------------------------------------------------------------ verdicts

    def record_verdict(self, version: str, verdict: dict) -> str:
        """Add a gate verdict to a version after the fact, as a new file; returns its path.

        Versions are immutable, so verdicts go to `<version>/verdicts/<UTC time>-<uuid8>.json`;
        the names sort chronologically and are never reused.
        """
        if not isinstance(verdict, dict):
            raise RegistryError(f"verdict must be a dict, got {type(verdict).__name__}")
        v = self.resolve(version)
        now = _now()
        name = f"{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{uuid.uuid4().hex[:8]}.json"
        p = join(self.model_dir, v, VERDICTS_DIR, name)
        write_json(p, {**verdict, "version": v, "recorded": now.isoformat()})
        if not is_uri(p):
            os.chmod(p, 0o444)
        return p

    def verdicts(self, ref: str) -> list[dict]:
        """All verdicts of a version, oldest first; a "gate" in version.json counts as first."""
        record = self.get(ref)
        out: list[dict] = []
        if isinstance(record.get("gate"), dict):
            out.append(record["gate"])
        vdir = join(self.model_dir, record["version"], VERDICTS_DIR)
        for name in _list_dir(vdir):  # sorted: the timestamp prefix makes this chronological
            if name.endswith(".json") and not name.startswith("."):
                out.append(read_json(join(vdir, name)))
        return out

    def latest_verdict(self, ref: str) -> dict | None:
        """The newest verdict of a version, or None if it has never been judged."""
        vs = self.verdicts(ref)
        return vs[-1] if vs else None

    # ------------------------------------------------------------------------------ lineage

    def lineage(self, ref: str) -> dict[str, Any]:
        """Where a version came from: data snapshot, code commit, parent, model class."""
        record = self.get(ref)
        config = record.get("config")
        model_cfg = config.get("model") if isinstance(config, dict) else None
        target = model_cfg.get("_target_") if isinstance(model_cfg, dict) else None
        return {
            "model_name": record.get("model_name", self.model_name),
            "version": record.get("version"),
            "created": record.get("created"),
            "data_snapshot": record.get("data_snapshot"),
            "git_commit": record.get("git_commit"),
            "parent": record.get("parent"),
            "config_target": target,
        }
