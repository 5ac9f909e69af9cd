"""`+mode=pipeline`: production data back to a safer model, step by step, with lineage.

snapshot -> validate -> split -> train (or tune) -> evaluate -> gate -> register -> propose

Each step computes a key from everything it depends on (config, upstream outputs, the
platform's code); a step whose key is in the cache is skipped and its output reused, so a
re-run with no new data trains nothing. Every run writes its lineage (each step's inputs,
outputs, key and status), and every registered version carries it.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mlplatform import progress, storage
from mlplatform.errors import JobFailed
from mlplatform.pipeline.cache import (
    StepCache,
    code_fingerprint,
    digest,
    git_state,
    listing_fingerprint,
)
from mlplatform.pipeline.triggers import consume_triggers, pipeline_lock
from mlplatform.triggers import pending

log = logging.getLogger(__name__)


class Context:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.root = storage.resolve_root(cfg.paths.root)
        self.run_id = f"pipeline-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.cache = StepCache(storage.join(self.root, "pipeline", "cache"), bool(cfg.pipeline.cache))
        self.code = code_fingerprint()
        self.outputs: dict[str, dict[str, Any]] = {}
        self.keys: dict[str, str] = {}
        self.records: list[dict[str, Any]] = []
        self.memo: dict[str, Any] = {}  # in-process objects (snapshot, trained output)

    def section(self, key: str) -> Any:
        return OmegaConf.to_container(OmegaConf.select(self.cfg, key), resolve=True)


# ----------------------------------------------------------------------------- steps
# Each returns (inputs, compute): inputs identify the work; compute does it.


def _snapshot(ctx: Context):
    from mlplatform.data import ingest
    from mlplatform.data.captured import captured_summary
    from mlplatform.data.job import materialize

    data = ctx.cfg.data
    data_root = materialize(data)  # idempotent: places new captured images, generates the base once
    items, _ = ingest.list_images(data_root, list(data.extensions), None)
    inputs = {"data": {k: v for k, v in ctx.section("data").items() if k != "root"},
              "files": listing_fingerprint(items), "num_files": len(items)}
    return inputs, lambda: {"data_root": data_root, "num_files": len(items),
                            "captured_files": sum(it["rel"].rsplit("/", 1)[-1].startswith("captured-") for it in items),
                            "listing": inputs["files"],
                            # labels used per key, trusted or kept for review (data=captured)
                            "captured": captured_summary(data_root) if data.source == "captured" else None}


def _validate(ctx: Context):
    from mlplatform.data.job import run_data

    inputs = {"snapshot": ctx.keys["snapshot"], "quality": ctx.section("data.quality"),
              "splits": ctx.section("data.splits")}

    def compute() -> dict[str, Any]:
        s = run_data(ctx.cfg)  # Ray Data ingest, stable splits, quality gates (raises when they fail)
        return {k: s[k] for k in ("snapshot_id", "snapshot_hash", "snapshot_dir", "num_images", "num_species",
                                  "gates_passed", "report_md", "unreadable", "duplicates") if k in s}
    return inputs, compute


def _split(ctx: Context):
    from mlplatform.data import snapshot as snapshots

    v = ctx.outputs["validate"]
    inputs = {"snapshot_hash": v["snapshot_hash"]}

    def compute() -> dict[str, Any]:
        snap = snapshots.load(v["snapshot_dir"])
        counts = {name: len(snap.split(name)) for name in ("train", "val", "test")}
        per_split = {name: digest(sorted(e["sha256"] for e in snap.split(name))) for name in counts}
        return {"snapshot_dir": v["snapshot_dir"], "counts": counts, "split_hashes": per_split,
                "captured_in_test": sum(e["file"].rsplit("/", 1)[-1].startswith("captured-")
                                        for e in snap.split("test"))}
    return inputs, compute


def _snap(ctx: Context):
    from mlplatform.data import snapshot as snapshots

    if "snap" not in ctx.memo:
        ctx.memo["snap"] = snapshots.load(ctx.outputs["split"]["snapshot_dir"])
    return ctx.memo["snap"]


def _train(ctx: Context, tune: bool = False):
    cfg = ctx.cfg
    inputs = {"snapshot_hash": ctx.outputs["validate"]["snapshot_hash"], "model": ctx.section("model"),
              "train": {k: v for k, v in ctx.section("train").items() if k not in ("chaos",)},
              "preprocess": ctx.section("data.preprocess"), "seed": cfg.seed, "code": ctx.code, "tune": tune}
    step = "tune" if tune else "train"

    def compute() -> dict[str, Any]:
        from mlplatform.training.job import fit_with_progress, prepare, run_name

        snap, spec, dsets = prepare(cfg, _snap(ctx))
        resolved = OmegaConf.to_container(cfg, resolve=True)
        storage_path = storage.join(ctx.root, "ray_results")
        extra: dict[str, Any] = {}
        if tune:
            from mlplatform.training.tune import tune_fit

            payload, trials, name = tune_fit(cfg, spec, dsets)
            out = payload["out"]
            extra = {"tune_run": name, "tune_best_config": payload["overrides"], "num_trials": len(trials)}
        else:
            name = run_name("train")
            result = fit_with_progress(cfg, resolved, spec, dsets, name, storage_path)
            out = result.return_value
            extra = {"ray_train_run": result.path}
        key = digest(inputs)
        blob = ctx.cache.put_blob(step, key, "trained", {"out": out, "labels": list(spec.labels),
                                                         "spec": spec.to_dict()})
        ctx.memo["trained"] = {"out": out, "labels": list(spec.labels), "spec": spec.to_dict()}
        from mlplatform.training import metrics as M

        return {"run": name, "blob": blob, "metrics": M.scalar_metrics(out["test"]), **extra}
    return inputs, compute


def _trained(ctx: Context) -> dict[str, Any]:
    if "trained" not in ctx.memo:
        ctx.memo["trained"] = StepCache.get_blob(ctx.outputs["train"]["blob"])
    return ctx.memo["trained"]


def _evaluate_model(model, spec, labels: list[str], items: list[dict[str, Any]], bs: int) -> dict[str, Any] | None:
    import torch

    from mlplatform.training import datasets
    from mlplatform.training import metrics as M
    from mlplatform.training.evaluation import forward_batches

    index = {n: i for i, n in enumerate(labels)}
    known = [{**it, "label": index[it["species"]]} for it in items if it["species"] in index]
    if not known:
        return None
    ds = datasets.build(known, spec, bs, materialize=False)
    logits, y, _ = forward_batches(model, ds.iter_batches(batch_size=bs, batch_format="numpy"), spec,
                                   torch.device("cpu"))
    s = M.summarize(M.softmax(logits), y, labels, prefix="test")
    return {"acc": s["test/acc"], "n": len(known)}


def _slices(ctx: Context) -> dict[str, list[dict[str, Any]]]:
    """The extra evaluation slices: the test split's production images, the drifted variant."""
    from mlplatform.data.job import materialize
    from mlplatform.training import datasets

    cfg, out = ctx.cfg, {}
    snap = _snap(ctx)
    for name in cfg.pipeline.evaluate.slices:
        if name == "captured":
            out[name] = [it for it in datasets.split_items(snap, "test", snap.labels)
                         if os.path.basename(it["path"]).startswith("captured-")]
        elif name == "drifted":
            d = OmegaConf.merge(cfg.data, {"source": "synthetic"})
            n = int(cfg.pipeline.evaluate.drifted_images_per_class)
            d.synthetic.images_per_class = n
            d.synthetic.drift = cfg.pipeline.evaluate.drift
            d.root = storage.join(ctx.root, "datasets", f"pipeline-drifted-c{d.synthetic.num_classes}-n{n}-"
                                                        f"s{d.synthetic.image_size}-seed{d.synthetic.seed}")
            root = materialize(d)
            out[name] = [{"path": f.path, "species": f.rel.split("/")[0]} for f in storage.list_files(root)
                         if "/" in f.rel and not f.rel.split("/")[-1].startswith(("_", "."))]
    return out


def _evaluate(ctx: Context):
    from mlplatform.registry.mode import registry_for

    reg = registry_for(ctx.cfg)
    train_key = ctx.keys.get("train") or ctx.keys.get("tune")
    production = reg.resolve("production") if "production" in reg.aliases() else None
    if production and (reg.get(production).get("pipeline") or {}).get("train_key") == train_key:
        production = None  # this very model became production (the first one): nothing to compare with
    inputs = {"train": train_key, "production": production,
              "slices": list(ctx.cfg.pipeline.evaluate.slices), "code": ctx.code}

    def compute() -> dict[str, Any]:
        from mlplatform.data.preprocess import PreprocessSpec
        from mlplatform.models.load import load_model
        from mlplatform.training.evaluate import evaluate_version

        trained = _trained(ctx)
        snap = _snap(ctx)
        baseline, baseline_version = None, production
        if production:
            baseline = evaluate_version(reg, production, snap, "test", int(ctx.cfg.train.eval_batch_size))["summary"]
        spec = PreprocessSpec.from_dict(trained["spec"])
        model = instantiate({**ctx.section("model"), "weights_path": None}, num_classes=len(trained["labels"]))
        import torch

        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in trained["out"]["state"].items()})
        model.eval()
        bs = int(ctx.cfg.train.eval_batch_size)
        slices = {}
        prod_model = load_model(reg, baseline_version) if baseline_version else None
        for name, items in _slices(ctx).items():
            slices[name] = {"candidate": _evaluate_model(model, spec, trained["labels"], items, bs)}
            if prod_model is not None:
                pm, pspec, pmeta = prod_model
                slices[name]["production"] = _evaluate_model(pm, pspec, pmeta["labels"], items, bs)
        return {"candidate_test": trained["out"]["test"], "baseline_test": baseline,
                "baseline_version": baseline_version, "slices": slices}
    return inputs, compute


def _gate(ctx: Context):
    from mlplatform.training.gate import judge

    ev = ctx.outputs["evaluate"]
    inputs = {"evaluate": ctx.keys["evaluate"], "gate": ctx.section("train.gate")}

    def compute() -> dict[str, Any]:
        verdict = judge(ev["candidate_test"], ev["baseline_test"], ctx.cfg.train.gate,
                        baseline_version=ev["baseline_version"])
        verdict["slices"] = ev["slices"]
        return verdict
    return inputs, compute


def _register(ctx: Context):
    from mlplatform.registry.mode import registry_for
    from mlplatform.training.job import register_version

    train_key = ctx.keys.get("train") or ctx.keys.get("tune")
    inputs = {"train": train_key, "gate": ctx.keys["gate"]}

    def compute() -> dict[str, Any]:
        reg = registry_for(ctx.cfg)
        for v in reg.versions():  # the cache may be gone while the registry holds the version
            if (reg.get(v).get("pipeline") or {}).get("train_key") == train_key:
                return {"version": v, "blessed": reg.get(v)["gate"]["blessed"], "reused": True}
        trained = _trained(ctx)
        from mlplatform.data.preprocess import PreprocessSpec

        spec = PreprocessSpec.from_dict(trained["spec"])
        verdict = dict(ctx.outputs["gate"])
        lineage = {"run_id": ctx.run_id, "train_key": train_key, "steps": dict(ctx.keys),
                   "data_snapshot": ctx.outputs["validate"]["snapshot_hash"], "code": ctx.code,
                   "config_hash": digest(OmegaConf.to_container(ctx.cfg, resolve=True)), "git": git_state()}
        out = register_version(ctx.cfg, trained["out"], _snap(ctx), spec, "pipeline", verdict,
                               ctx.outputs["evaluate"]["baseline_version"], extra={"pipeline": lineage})
        return {"version": out["version"], "blessed": verdict["blessed"], "aliases": out["aliases"],
                "model_card": out["model_card"], "reused": False}
    return inputs, compute


def _propose(ctx: Context):
    from mlplatform.pipeline import gitops
    from mlplatform.registry.store import Registry

    r = ctx.outputs["register"]
    reg = Registry(storage.resolve_root(ctx.cfg.registry.root), ctx.cfg.registry.model_name)
    production = reg.resolve("production") if "production" in reg.aliases() else None
    base_text = gitops.read_serve_file(ctx.cfg)
    inputs = {"version": r["version"], "blessed": r["blessed"], "production": production,
              "serve_file": digest(base_text), "canary_weight": ctx.cfg.pipeline.canary_weight,
              "gitops": ctx.section("gitops"), "traffic": list(gitops.serve_traffic(ctx.cfg))}

    def compute() -> dict[str, Any]:
        if not r["blessed"]:
            return {"proposed": False, "reason": f"{r['version']} was rejected by the gate"}
        if production == r["version"]:
            return {"proposed": False, "reason": f"{r['version']} is the first model: it is production already"}
        w = int(ctx.cfg.pipeline.canary_weight)
        change = gitops.Change("canary", r["version"], w, stable=production)
        gate, ev = ctx.outputs["gate"], ctx.outputs["evaluate"]

        def acc(m: dict[str, Any] | None, key: str) -> str:
            return "n/a" if not m or m.get(key) is None else f"{m[key]:.4f}"

        evidence = "\n".join([f"Pipeline run `{ctx.run_id}`: {r['version']} {gate['verdict']} against "
                              f"{production}.", "", f"| accuracy | candidate {r['version']} | production {production} |",
                              "|---|---|---|",
                              f"| test split | {acc(ev['candidate_test'], 'test/acc')} | {acc(ev['baseline_test'], 'test/acc')} |"]
                             + [f"| slice {name} | {acc(s.get('candidate'), 'acc')} | {acc(s.get('production'), 'acc')} |"
                                for name, s in gate["slices"].items()]
                             + ["", "Gate checks:", "", "| check | result | value | threshold | reason |",
                                "|---|---|---|---|---|"]
                             + [f"| {c['check']} | {'pass' if c['passed'] else 'FAIL'} | {c['value']} | {c['threshold']} "
                                f"| {c['reason']} |" for c in gate["checks"]]
                             + ["", f"Data snapshot {ctx.outputs['validate']['snapshot_id']} "
                                    f"({ctx.outputs['snapshot']['captured_files']} captured images)."])
        links = {"data report": ctx.outputs["validate"].get("report_md"),
                 "pipeline run": storage.join(ctx.root, "pipeline", "runs", f"{ctx.run_id}.json")}
        p = gitops.propose(ctx.cfg, change, f"Canary {r['version']} at {w}% beside {production}", evidence,
                           f"{r['version']}-canary-{w}", links={k: v for k, v in links.items() if v})
        return {"proposed": True, **p}
    return inputs, compute


STEPS: dict[str, Callable[[Context], tuple[dict[str, Any], Callable[[], dict[str, Any]]]]] = {
    "snapshot": _snapshot, "validate": _validate, "split": _split, "train": _train,
    "tune": lambda ctx: _train(ctx, tune=True), "evaluate": _evaluate, "gate": _gate, "register": _register,
    "propose": _propose,
}


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    started = time.time()
    ctx = Context(cfg)
    trigger_dir = storage.resolve_root(cfg.pipeline.trigger_dir)
    with pipeline_lock(trigger_dir, ctx.run_id):
        # The triggers this run answers: consumed only once it has finished, so that a failed
        # run leaves them for the next one.
        answered = pending(trigger_dir)
        triggers = [record for _, record in answered]
        steps = progress.Steps(list(cfg.pipeline.steps))
        for name in cfg.pipeline.steps:
            t0 = time.time()
            inputs, compute = STEPS[name](ctx)
            key = digest(inputs)
            cached = ctx.cache.get(name, key)
            if name == "train" or name == "tune":
                ctx.keys["train"] = key
            ctx.keys[name] = key
            if cached is not None:
                outputs, status = cached, "cached"
            else:
                steps.started(name)
                try:
                    outputs = compute()
                except JobFailed as exc:
                    steps.finished(name, "failed", time.time() - t0)
                    ctx.records.append({"step": name, "status": "failed", "key": key, "error": str(exc)})
                    _write_lineage(ctx, triggers, started, failed=name)
                    exc.summary = {**(exc.summary or {}), "mode": "pipeline", "failed_step": name,
                                   "steps": _step_summary(ctx)}
                    raise
                ctx.cache.put(name, key, inputs, outputs)
                status = "ran"
            if name == "tune":
                ctx.outputs["train"] = outputs
            ctx.outputs[name] = outputs
            ctx.records.append({"step": name, "status": status, "key": key, "seconds": round(time.time() - t0, 2),
                                "inputs": inputs, "outputs": outputs})
            steps.finished(name, status, time.time() - t0)
        lineage = _write_lineage(ctx, triggers, started)
        consume_triggers(trigger_dir, ctx.run_id, [name for name, _ in answered])
    reg = ctx.outputs.get("register", {})
    prop = ctx.outputs.get("propose", {})
    return {"mode": "pipeline", "run_id": ctx.run_id, "steps": _step_summary(ctx),
            "all_cached": all(r["status"] == "cached" for r in ctx.records),
            "trained": any(r["status"] == "ran" and r["step"] in ("train", "tune") for r in ctx.records),
            "version": reg.get("version"), "blessed": reg.get("blessed"),
            "proposal": prop.get("serve_file"), "branch": prop.get("branch"),
            "pull_request": {k: prop.get(k) for k in ("body", "remote", "pushed", "commit", "pr_url", "pr_error", "note")}
            if prop.get("proposed") else None,
            "proposed": prop.get("proposed"), "triggers": len(triggers), "lineage": lineage,
            "seconds": round(time.time() - started, 1)}


def _step_summary(ctx: Context) -> list[dict[str, Any]]:
    return [{"step": r["step"], "status": r["status"], "key": r["key"][:12], "seconds": r.get("seconds")}
            for r in ctx.records]


def _write_lineage(ctx: Context, triggers: list[dict[str, Any]], started: float, failed: str | None = None) -> str:
    path = storage.join(ctx.root, "pipeline", "runs", f"{ctx.run_id}.json")
    storage.write_json(path, {"run_id": ctx.run_id, "started": started, "finished": time.time(),
                              "failed_step": failed, "code": ctx.code, "git": git_state(),
                              "config": OmegaConf.to_container(ctx.cfg, resolve=True), "triggers": triggers,
                              "steps": ctx.records, "cwd": os.getcwd()})
    return path
