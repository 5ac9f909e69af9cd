"""W&B experiment tracking, offline by default; `logger=none` makes every call a no-op.

Only rank 0 of a training run creates a tracker, so a run is never logged twice.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, wandb_cfg: dict[str, Any] | None, run_id: str, name: str, config: dict[str, Any],
                 job_type: str = "train") -> None:
        self.run = None
        if not wandb_cfg or wandb_cfg.get("mode") == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        os.makedirs(wandb_cfg["dir"], exist_ok=True)
        self.run = wandb.init(
            mode=wandb_cfg["mode"], project=wandb_cfg["project"], entity=wandb_cfg.get("entity"),
            dir=wandb_cfg["dir"], id=run_id, name=name, resume="allow", config=config, job_type=job_type,
            tags=list(wandb_cfg.get("tags") or []), reinit="finish_previous",
        )
        self.log_model_enabled = bool(wandb_cfg["log_model"])

    @property
    def dir(self) -> str | None:
        return self.run.dir if self.run is not None else None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, int | float)}, step=step)

    def log_image(self, key: str, png: bytes, step: int | None = None) -> None:
        if self.run is None:
            return
        import wandb
        from PIL import Image

        self.run.log({key: wandb.Image(Image.open(io.BytesIO(png)))}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in values.items():
                if isinstance(v, int | float | str):
                    self.run.summary[k] = v

    def log_model(self, path: str, name: str, metadata: dict[str, Any]) -> None:
        if self.run is None or not self.log_model_enabled:
            return
        import wandb

        art = wandb.Artifact(name=name, type="model", metadata=metadata)
        art.add_file(path)
        self.run.log_artifact(art)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def read_offline_run(wandb_file: str) -> dict[str, Any]:
    """The records of an offline `.wandb` file (history rows, record counts), without the network.

    The file is a LevelDB-style log (a 7-byte W&B header, then 32 KiB blocks of chunks)
    of protobuf `Record`s; this lets tests and users check what a run recorded before syncing.
    """
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    data = open(wandb_file, "rb").read()
    block, pos, pending = 32768, 7, b""
    history: list[dict[str, Any]] = []
    kinds: dict[str, int] = {}
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        name = record.WhichOneof("record_type")
        kinds[name] = kinds.get(name, 0) + 1
        if name == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                            for i in record.history.item})
    return {"history": history, "record_counts": kinds}
