"""`+mode=predict`: offline batch inference with the same extended model as serving.

Ray Data reads the files, `map_batches` runs an actor pool where each actor holds one
ExtendedModel, and the results land in Parquet: path, top-k labels and scores, version.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import ray
from omegaconf import DictConfig, OmegaConf

from mlplatform import storage
from mlplatform.errors import ConfigError


class _Predictor:
    def __init__(self, registry_root: str, model_name: str, version: str, top_k: int, limits: dict,
                 accelerator: dict) -> None:
        from mlplatform.deployments.decoding import InputLimits
        from mlplatform.deployments.extended import ExtendedModel

        # The serving model's settings (conf/serve accelerator): offline answers equal online ones.
        self.model = ExtendedModel(registry_root, model_name, version, **accelerator)
        self.top_k = top_k
        self.limits = InputLimits.from_dict(limits)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mlplatform.deployments.decoding import InputError, decode_image

        images, ok, errors = [], [], []
        for path in batch["path"]:
            try:
                images.append(decode_image(storage.read_bytes(str(path)), self.limits).image)
                ok.append(True)
                errors.append("")
            except (InputError, OSError) as exc:
                ok.append(False)
                errors.append(str(exc)[:300])
        preds = iter(self.model.predict(images, self.top_k))
        labels, scores = [], []
        for good in ok:
            p = next(preds) if good else None
            labels.append(json.dumps(p.labels if p else []))
            scores.append(json.dumps(p.scores if p else []))
        return {"path": batch["path"], "labels": np.array(labels), "scores": np.array(scores),
                "top1": np.array([json.loads(x)[0] if json.loads(x) else "" for x in labels]),
                "version": np.array([self.model.version] * len(ok)), "error": np.array(errors)}


def _inputs(source: str) -> list[str]:
    if source.endswith(".jsonl"):
        from mlplatform.data.snapshot import load

        snap = load(source.rsplit("/", 1)[0])
        return [storage.join(snap.data_root, e["file"]) for e in snap.entries]
    exts = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
    return [f.path for f in storage.list_files(source) if f.rel.lower().endswith(exts)]


def run_predict(cfg: DictConfig) -> dict[str, Any]:
    from mlplatform.registry.store import Registry, RegistryError

    p = cfg.predict
    if not p.input:
        raise ConfigError("predict.input", None, "name a folder of images or a manifest.jsonl")
    source = storage.resolve_root(p.input)
    if not storage.exists(source):
        raise ConfigError("predict.input", p.input, "does not exist")
    reg = Registry(storage.resolve_root(cfg.registry.root), cfg.registry.model_name)
    try:
        version = reg.resolve(p.version)
    except RegistryError as exc:
        raise ConfigError("predict.version", p.version, str(exc)) from None
    paths = _inputs(source)
    if not paths:
        raise ConfigError("predict.input", p.input, "holds no images")
    started = time.time()
    out = storage.resolve_root(p.output) if p.output else storage.join(
        storage.resolve_root(cfg.paths.root), "predictions", f"{version}-{int(started)}")
    ds = ray.data.from_items([{"path": x} for x in paths])
    ds = ds.map_batches(_Predictor, fn_constructor_args=(reg.root, reg.model_name, version, p.top_k,
                                                         OmegaConf.to_container(cfg.serve.inputs),
                                                         OmegaConf.to_container(cfg.serve.accelerator)),
                        batch_size=p.batch_size, batch_format="numpy", num_cpus=p.num_cpus_per_actor,
                        compute=ray.data.ActorPoolStrategy(size=p.concurrency))
    ds.write_parquet(out)
    errors = ray.data.read_parquet(out, columns=["error"]).to_pandas()["error"]
    n, failed = len(errors), int((errors != "").sum())
    return {"mode": "predict", "version": version, "input": source, "output": out, "images": n,
            "failed": failed, "seconds": round(time.time() - started, 2),
            "images_per_s": round(n / max(time.time() - started, 1e-9), 1)}
