"""Ray Datasets of a snapshot's splits: decoded once to uint8 with the shared preprocessing."""

from __future__ import annotations

from typing import Any

import numpy as np
import ray

from mlplatform import storage
from mlplatform.data.preprocess import PreprocessSpec, decode, to_uint8
from mlplatform.data.snapshot import Snapshot


def split_items(snap: Snapshot, split: str, labels: list[str]) -> list[dict[str, Any]]:
    """Rows (path, label index) of one split ("all" for every image); labels map by name."""
    index = {name: i for i, name in enumerate(labels)}
    rows = []
    for e in snap.entries:
        if split != "all" and e["split"] != split:
            continue
        rows.append({"path": storage.join(snap.data_root, e["file"]),
                     "label": index.get(e["species"], -1), "species": e["species"]})
    return rows


def decode_batch(batch: dict[str, np.ndarray], spec: dict[str, Any]) -> dict[str, np.ndarray]:
    """Ray Data batch function: file bytes to uint8 (N, H, W, 3) with the version's spec."""
    pspec = PreprocessSpec.from_dict(spec)
    images = [to_uint8(decode(storage.read_bytes(str(p))), pspec) for p in batch["path"]]
    return {"image": np.stack(images), "label": batch["label"].astype(np.int64)}


def build(items: list[dict[str, Any]], spec: PreprocessSpec, batch_size: int = 256,
          materialize: bool = True) -> ray.data.Dataset:
    """A dataset of {"image": uint8 HWC, "label": int64}; materialised so epochs skip decoding."""
    if not items:
        raise ValueError("empty split")
    blocks = max(1, min(len(items) // batch_size, 32))
    ds = ray.data.from_items([{"path": it["path"], "label": it["label"]} for it in items],
                             override_num_blocks=blocks)
    ds = ds.map_batches(decode_batch, fn_kwargs={"spec": spec.to_dict()}, batch_size=batch_size,
                        batch_format="numpy")
    return ds.materialize() if materialize else ds
