"""`+mode=train`: snapshot -> Ray Train -> test metrics -> gate -> registry -> model card."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import numpy as np
import ray.data
import ray.train
import torch
from omegaconf import DictConfig, OmegaConf
from ray.train.torch import TorchTrainer

from mlplatform import progress, storage
from mlplatform.data import snapshot as snapshots
from mlplatform.data.job import run_data
from mlplatform.data.preprocess import PreprocessSpec
from mlplatform.errors import JobFailed
from mlplatform.models import check_weights
from mlplatform.registry.mode import git_commit, registry_for
from mlplatform.registry.store import RegistryError
from mlplatform.training import card, datasets
from mlplatform.training import metrics as M
from mlplatform.training.evaluate import evaluate_version
from mlplatform.training.gate import judge
from mlplatform.training.loop import train_loop_per_worker
from mlplatform.training.progress import EpochLines

log = logging.getLogger(__name__)
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
_USER_POLL = os.environ.get(POLL_ENV)  # exported before this process started: it wins


def prepare(cfg: DictConfig, snap: snapshots.Snapshot | None = None
            ) -> tuple[snapshots.Snapshot, PreprocessSpec, dict[str, ray.data.Dataset]]:
    """Run the data job (unless given its snapshot), then decode the splits into Ray Datasets."""
    if snap is None:
        snap = snapshots.load(run_data(cfg)["snapshot_dir"])
    # Bars drawn in every worker and relayed here would drown the epoch lines. Without Ray's
    # tqdm, a process with no terminal logs its progress instead, which the default log level
    # keeps in Ray's files (mlplatform.progress); the driver draws bars only on a terminal.
    # (Turning bars off would make every Ray Data process print a notice that they are off.)
    ray.data.DataContext.get_current().use_ray_tqdm = False
    spec = PreprocessSpec.from_dict(OmegaConf.to_container(cfg.data.preprocess, resolve=True))
    spec = spec.with_labels(snap.labels)
    bs = cfg.train.eval_batch_size
    val_items = datasets.split_items(snap, "val", snap.labels)
    rng = np.random.default_rng(cfg.seed)
    n_ref = min(cfg.train.reference_samples, len(val_items))
    ref_items = [val_items[i] for i in sorted(rng.choice(len(val_items), n_ref, replace=False))] if n_ref else []
    # Manifests are sorted by species: shuffle once here, or every block (and so every
    # batch drawn from the local shuffle buffer) would hold only a handful of species.
    train_items = datasets.split_items(snap, "train", snap.labels)
    train_items = [train_items[i] for i in rng.permutation(len(train_items))]
    dsets = {
        "train": datasets.build(train_items, spec, bs),
        "val": datasets.build(val_items, spec, bs),
        "test": datasets.build(datasets.split_items(snap, "test", snap.labels), spec, bs),
        "reference": datasets.build(ref_items or val_items[:1], spec, bs),
    }
    check_weights(cfg.model, len(spec.labels))
    return snap, spec, dsets


def make_trainer(cfg: DictConfig, resolved: dict[str, Any], spec: PreprocessSpec,
                 dsets: dict[str, ray.data.Dataset], run_name: str, storage_path: str,
                 overrides: dict[str, Any] | None = None,
                 callbacks: list | None = None) -> TorchTrainer:
    t = cfg.train
    # Ray Train reads the controller's poll interval from this variable only, in the driver
    # when fit() starts the controller; a value the user exported wins.
    if _USER_POLL is None:
        os.environ[POLL_ENV] = str(float(t.report_poll_s))
    resources = {"CPU": float(t.scaling.cpus_per_worker)}
    if t.scaling.use_gpu:
        resources["GPU"] = float(t.scaling.gpus_per_worker or 1)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": resolved, "labels": list(spec.labels), "spec": spec.to_dict(),
                           "run_id": run_name, "run_name": run_name, "overrides": overrides or {},
                           "chaos_dir": storage.join(storage_path, run_name, "chaos"),
                           "verbose": progress.verbose()},
        scaling_config=ray.train.ScalingConfig(num_workers=t.scaling.num_workers, use_gpu=t.scaling.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=t.scaling.placement_strategy),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path, callbacks=callbacks or None,
            # Ray Train's own INFO lines (worker group start, each checkpoint) stay in its log files.
            logging_config=ray.train.LoggingConfig(log_level="INFO" if progress.verbose() else "WARNING"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.checkpoint.num_to_keep,
                                                         checkpoint_score_attribute=t.checkpoint.metric,
                                                         checkpoint_score_order=t.checkpoint.mode),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
        ),
        datasets=dsets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train", "val"]),
    )


def fit(trainer: TorchTrainer, name: str) -> ray.train.Result:
    """Run the trainer; a run that exhausts its retries is a failed job, not a traceback.

    Ray Train installs a SIGINT handler whose closure holds the TrainController's handle, so
    the controller (and its dataset split coordinators) would outlive fit() and keep using
    CPU in a process that goes on to serve (`make run`). Restoring the previous handler
    drops the last reference and Ray reclaims those actors."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise JobFailed(f"training failed after retries: {str(exc).splitlines()[0][:500]}",
                        {"mode": "train", "run": name}) from exc
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGINT, previous)
    if result.error is not None:
        raise JobFailed(f"training failed: {result.error}", {"mode": "train", "run": name})
    return result


def fit_with_progress(cfg: DictConfig, resolved: dict[str, Any], spec: PreprocessSpec,
                      dsets: dict[str, ray.data.Dataset], name: str, storage_path: str) -> ray.train.Result:
    """`fit` from the driver, printing one line per epoch there and one when training ends."""
    started = time.time()
    epochs = int(cfg.train.epochs)
    with EpochLines(epochs) as lines:
        result = fit(make_trainer(cfg, resolved, spec, dsets, name, storage_path, callbacks=[lines.callback]),
                     name)
    out, metric = result.return_value, cfg.train.early_stopping.metric
    stop = f"early stop after epoch {out['epochs_run']}/{epochs}, " if out.get("early_stopped") else ""
    best = progress.metrics_text({metric: out.get("best_val")}, (metric,)) or f"{metric} n/a"
    progress.say(f"trained in {progress.duration(time.time() - started)}: {stop}best {best} "
                 f"at epoch {out['best_epoch'] + 1}, {progress.metrics_text(out['test'], ('test/acc',))}")
    return result


def run_name(prefix: str) -> str:
    return f"{prefix}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _reference_npz(ref: dict[str, Any], num_classes: int) -> bytes:
    preds = ref["logits"].argmax(1) if len(ref["logits"]) else np.zeros(0, np.int64)
    freq = np.bincount(preds, minlength=num_classes).astype(np.float64)
    freq = freq / max(freq.sum(), 1)
    buf = io.BytesIO()
    np.savez(buf, embeddings=ref["embeddings"].astype(np.float32), predictions=preds.astype(np.int64),
             predicted_class_frequencies=freq, probs=M.softmax(ref["logits"]).astype(np.float32))
    return buf.getvalue()


def production_baseline(cfg: DictConfig, snap: snapshots.Snapshot) -> tuple[dict[str, Any] | None, str | None]:
    """Production's metrics on the candidate's own test split (None before the first model)."""
    reg = registry_for(cfg)
    if "production" not in reg.aliases():
        return None, None
    version = reg.resolve("production")
    return evaluate_version(reg, version, snap, "test", cfg.train.eval_batch_size)["summary"], version


def register_version(cfg: DictConfig, out: dict[str, Any], snap: snapshots.Snapshot, spec: PreprocessSpec,
                     source: str, verdict: dict[str, Any], baseline_version: str | None,
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Register a judged run as a new version with its model card; bless it by alias."""
    reg = registry_for(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    test = out["test"]
    scalars = M.scalar_metrics(test)
    counts = {s: sum(c.values()) for s, c in snap.counts().items()}
    meta = {
        "model_name": cfg.registry.model_name,
        "source": source,
        "labels": list(spec.labels),
        "preprocess": spec.to_dict(),
        "metrics": scalars,
        "test_summary": test,
        "history": out["history"],
        "training": {k: out.get(k) for k in ("best_epoch", "epochs_run", "best_val", "early_stopped",
                                             "resumed_from_epoch")},
        "data_snapshot": {"name": cfg.data.name, "hash": snap.hash, "dir": snap.dir,
                          "num_images": len(snap.entries), "splits": counts},
        "config": resolved,
        "git_commit": git_commit(),
        "parent": baseline_version,
        "gate": verdict,
        "wandb_dir": out.get("wandb_dir"),
        **(extra or {}),
    }
    files = {
        "label_map.json": json.dumps({n: i for i, n in enumerate(spec.labels)}, indent=2).encode(),
        "preprocess.json": json.dumps(spec.to_dict(), indent=2).encode(),
        "metrics.json": json.dumps(test, indent=2).encode(),
        "confusion_matrix.png": out["confusion_png"],
        "reliability.png": out["reliability_png"],
        "reference.npz": _reference_npz(out["reference"], len(spec.labels)),
    }
    state = {k: torch.from_numpy(np.array(v)) for k, v in out["state"].items()}
    version = reg.register(state, meta, files,
                           late_files=lambda v: {"model_card.md": card.render(meta, v).encode()})
    verdict["candidate"] = version
    aliases = reg.aliases()
    if verdict["blessed"]:
        reg.set_alias(cfg.train.gate.alias_on_bless, version)
        if "production" not in aliases:  # the very first blessed model bootstraps production
            reg.set_alias("production", version)
    return {
        "version": version,
        "registry": reg.model_dir,
        "model_card": reg.path(version, "model_card.md"),
        "metrics": scalars,
        "gate": {"verdict": verdict["verdict"], "reasons": verdict["reasons"], "baseline": baseline_version},
        "aliases": reg.aliases(),
        "data_snapshot": snap.hash[:12],
    }


def register_result(cfg: DictConfig, out: dict[str, Any], snap: snapshots.Snapshot, spec: PreprocessSpec,
                    source: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Judge the run against production, register it as a new version with its model card."""
    baseline, baseline_version = production_baseline(cfg, snap)
    verdict = judge(out["test"], baseline, cfg.train.gate, baseline_version=baseline_version)
    return register_version(cfg, out, snap, spec, source, verdict, baseline_version, extra)


def run_train(cfg: DictConfig) -> dict[str, Any]:
    started = time.time()
    snap, spec, dsets = prepare(cfg)
    name = run_name("train")
    storage_path = storage.join(storage.resolve_root(cfg.paths.root), "ray_results")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    result = fit_with_progress(cfg, resolved, spec, dsets, name, storage_path)
    out = result.return_value
    try:
        reg_summary = register_result(cfg, out, snap, spec, source="train",
                                      extra={"ray_train_run": result.path})
    except RegistryError as exc:
        raise JobFailed(f"registry: {exc}", {"mode": "train", "run": name}) from exc
    return {"mode": "train", "run": name, "ray_train_path": result.path, **reg_summary,
            "epochs_run": out["epochs_run"], "best_epoch": out["best_epoch"],
            "resumed_from_epoch": out.get("resumed_from_epoch"), "worker_nodes": out.get("worker_nodes"),
            "wandb_dir": out.get("wandb_dir"), "seconds": round(time.time() - started, 1)}
