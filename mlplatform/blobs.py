"""Nested records of JSON values, numpy arrays and bytes in one `.npz` file, never pickled.

A trained run's output (weights as arrays, metrics, plots as PNG bytes) must outlive the
process that made it: the pipeline cache and Tune's trial outputs keep it on disk. Pickle
would run code from whatever file sits there; this format holds data only. The record is
JSON (stored in the archive as the bytes of `doc`); each array or bytes value becomes an
archive member that the JSON names. Reading never unpickles (`allow_pickle=False`).

Tuples come back as lists, numpy scalars as Python numbers, as with JSON; anything else
that JSON cannot hold (an object array, a set, a non-string key) is refused when writing.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import numpy as np

from mlplatform import storage

_DOC, _ARRAY, _BYTES = "doc", "$array", "$bytes"


class BlobError(ValueError):
    """A file that is not a readable blob: truncated, corrupted, or not written by `dumps`."""


def dumps(obj: Any) -> bytes:
    arrays: dict[str, np.ndarray] = {}
    doc = json.dumps(_pack(obj, arrays, "record"), sort_keys=True).encode()
    buf = io.BytesIO()
    np.savez(buf, **{_DOC: np.frombuffer(doc, np.uint8)}, **arrays)
    return buf.getvalue()


def loads(data: bytes) -> Any:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            doc = json.loads(archive[_DOC].tobytes())
            return _unpack(doc, archive)
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise BlobError(f"not a readable blob: {type(exc).__name__}: {exc}") from exc


def write(path: str, obj: Any) -> bytes:
    """Atomically, through `storage`; returns the bytes written (for a checksum)."""
    data = dumps(obj)
    storage.write_bytes(path, data)
    return data


def read(path: str) -> Any:
    return loads(storage.read_bytes(path))


def _pack(obj: Any, arrays: dict[str, np.ndarray], where: str) -> Any:
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a string")
        if _ARRAY in obj or _BYTES in obj:
            raise ValueError(f"{where}: the keys {_ARRAY!r} and {_BYTES!r} are reserved")
        return {k: _pack(v, arrays, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_pack(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    name = f"a{len(arrays)}"
    if isinstance(obj, bytes | bytearray | memoryview):
        arrays[name] = np.frombuffer(bytes(obj), np.uint8)
        return {_BYTES: name}
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(f"{where}: an array of Python objects can only be pickled")
        arrays[name] = obj
        return {_ARRAY: name}
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be stored without pickle")


def _unpack(doc: Any, archive: Any) -> Any:
    if isinstance(doc, list):
        return [_unpack(v, archive) for v in doc]
    if not isinstance(doc, dict):
        return doc
    if len(doc) == 1 and _ARRAY in doc:
        return archive[doc[_ARRAY]]
    if len(doc) == 1 and _BYTES in doc:
        return archive[doc[_BYTES]].tobytes()
    return {k: _unpack(v, archive) for k, v in doc.items()}
