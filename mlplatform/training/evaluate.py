"""Evaluate any registered version on any dataset and split; `+mode=evaluate|promote`."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import torch
from omegaconf import DictConfig

from mlplatform import storage
from mlplatform.data import snapshot as snapshots
from mlplatform.errors import ConfigError, JobFailed
from mlplatform.models.load import load_model
from mlplatform.registry.mode import registry_for
from mlplatform.registry.store import Registry, RegistryError
from mlplatform.training import datasets
from mlplatform.training import metrics as M
from mlplatform.training.evaluation import forward_batches
from mlplatform.training.gate import judge

log = logging.getLogger(__name__)


def evaluate_version(reg: Registry, ref: str, snap: snapshots.Snapshot, split: str,
                     batch_size: int = 256) -> dict[str, Any]:
    model, spec, meta = load_model(reg, ref)
    items = datasets.split_items(snap, split, meta["labels"])
    known = [it for it in items if it["label"] >= 0]
    unknown = sorted({it["species"] for it in items if it["label"] < 0})
    if not known:
        raise JobFailed(f"{meta['version']} knows none of the species in {snap.id}/{split}",
                        {"version": meta["version"], "unknown_species": unknown})
    ds = datasets.build(known, spec, batch_size, materialize=False)
    logits, y, _ = forward_batches(model, ds.iter_batches(batch_size=batch_size, batch_format="numpy"),
                                   spec, torch.device("cpu"))
    summary = M.summarize(M.softmax(logits), y, meta["labels"], prefix="test")
    return {"version": meta["version"], "summary": summary, "unknown_species": unknown,
            "num_skipped_unknown": len(items) - len(known), "labels": meta["labels"]}


def run_evaluate(cfg: DictConfig) -> dict[str, Any]:
    from mlplatform.data.job import run_data

    reg = registry_for(cfg)
    try:
        version = reg.resolve(cfg.evaluate.version)
    except RegistryError as exc:
        raise ConfigError("evaluate.version", cfg.evaluate.version, str(exc)) from None
    data_summary = run_data(cfg)
    snap = snapshots.load(data_summary["snapshot_dir"])
    res = evaluate_version(reg, version, snap, cfg.evaluate.split, cfg.train.eval_batch_size)
    s = res["summary"]
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out_dir = storage.join(storage.resolve_root(cfg.paths.root), "evaluations",
                           f"{version}-{cfg.data.name}-{cfg.evaluate.split}-{stamp}")
    scalars = M.scalar_metrics(s)
    storage.write_json(storage.join(out_dir, "report.json"), {**res, "dataset": cfg.data.name,
                                                               "snapshot": snap.hash})
    storage.write_bytes(storage.join(out_dir, "confusion_matrix.png"),
                        M.confusion_matrix_png(s["confusion_matrix"], res["labels"],
                                               title=f"{version} on {cfg.data.name}/{cfg.evaluate.split}"))
    registered = reg.get(version)["metrics"]
    lines = [f"# Evaluation of {version} on {cfg.data.name} ({cfg.evaluate.split} split)", "",
             f"Snapshot `{snap.id}`; {s['test/num_samples']} images; species unknown to the model: "
             f"{res['unknown_species'] or 'none'}.", "",
             "| metric | this evaluation | at registration |", "| --- | --- | --- |"]
    lines += [f"| {k.split('/', 1)[1]} | {v:.4f} | {registered.get(k, float('nan')):.4f} |" for k, v in scalars.items()]
    lines += ["", f"Worst species: {', '.join(s['worst_classes'])}", "", "![confusion](confusion_matrix.png)", ""]
    storage.write_text(storage.join(out_dir, "report.md"), "\n".join(lines))
    return {"mode": "evaluate", "version": version, "dataset": cfg.data.name, "split": cfg.evaluate.split,
            "snapshot_id": snap.id, "metrics": scalars, "report_dir": out_dir,
            "report_md": storage.join(out_dir, "report.md"), "report_json": storage.join(out_dir, "report.json")}


def run_promote(cfg: DictConfig) -> dict[str, Any]:
    """Judge a candidate against production on the candidate's own test split; record the verdict."""
    reg = registry_for(cfg)
    versions = reg.versions()
    if not versions:
        raise ConfigError("promote.candidate", cfg.promote.candidate, "the registry has no versions yet")
    ref = versions[-1] if cfg.promote.candidate == "latest" else cfg.promote.candidate
    try:
        candidate = reg.resolve(ref)
    except RegistryError as exc:
        raise ConfigError("promote.candidate", ref, str(exc)) from None
    aliases = reg.aliases()
    baseline = aliases.get(cfg.promote.baseline)
    if baseline == candidate:
        baseline = None
    meta = reg.get(candidate)
    snap = snapshots.load(meta["data_snapshot"]["dir"])
    cand_eval = evaluate_version(reg, candidate, snap, "test", cfg.train.eval_batch_size)["summary"]
    base_eval = evaluate_version(reg, baseline, snap, "test", cfg.train.eval_batch_size)["summary"] if baseline else None
    verdict = judge(cand_eval, base_eval, cfg.train.gate, candidate_version=candidate, baseline_version=baseline)
    path = reg.record_verdict(candidate, verdict)
    if verdict["blessed"]:
        reg.set_alias(cfg.train.gate.alias_on_bless, candidate)
        if "production" not in aliases:
            reg.set_alias("production", candidate)
    return {"mode": "promote", "candidate": candidate, "baseline": baseline, "verdict": verdict["verdict"],
            "reasons": verdict["reasons"], "verdict_path": path, "aliases": reg.aliases(),
            "metrics": M.scalar_metrics(cand_eval),
            "baseline_metrics": M.scalar_metrics(base_eval) if base_eval else None}

