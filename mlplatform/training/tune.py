"""`+mode=tune`: Ray Tune drives a function that runs a TorchTrainer (the Train V2 pattern).

The search space lives in YAML (conf/train/tune/*.yaml) as Tune sampling functions built
through `_target_`; ASHA stops weak trials early; the best trial is registered like a
training run.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray.tune
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from ray.tune.integration.ray_train import TuneReportCallback

from mlplatform import blobs, progress, storage
from mlplatform.data.preprocess import PreprocessSpec
from mlplatform.errors import ConfigError, JobFailed
from mlplatform.training.job import make_trainer, prepare, register_result, run_name
from mlplatform.training.progress import TrialLines

log = logging.getLogger(__name__)


def _trial(config: dict[str, Any], cfg_container: dict[str, Any], spec: PreprocessSpec, dsets: dict,
           tune_name: str, storage_path: str) -> dict[str, Any]:
    """One trial: a full distributed training run whose epochs are reported to Tune."""
    cfg = OmegaConf.create(cfg_container)
    ctx = ray.tune.get_context()
    name = f"{tune_name}-{ctx.get_trial_id()}"
    trainer = make_trainer(cfg, cfg_container, spec, dsets, name, storage_path, overrides=config,
                           callbacks=[TuneReportCallback()])
    result = trainer.fit()
    out = result.return_value
    out_path = storage.join(storage_path, tune_name, "trial-outputs", f"{ctx.get_trial_id()}.npz")
    blobs.write(out_path, {"out": out, "overrides": config, "ray_train_run": result.path})
    # The final result repeats the last epoch's metrics: Tune checks it holds its metric.
    return {**out["history"][-1], "output": out_path}


def search_space(tune_cfg: DictConfig) -> dict[str, Any]:
    space = {}
    for item in tune_cfg.search_space:
        log.info("search space %s: %s", item.key, item.sampler.get("_target_", item.sampler))
        space[item.key] = instantiate(item.sampler) if "_target_" in item.sampler else item.sampler
    return space


def _fit_concurrency(cfg: DictConfig, wanted: int) -> int:
    """Cap concurrent trials so one CPU stays free for Ray Data: trials whose workers hold
    every CPU wait forever for the data tasks that feed them."""
    cpus = ray.cluster_resources().get("CPU", 1.0)
    per_trial = cfg.train.scaling.num_workers * cfg.train.scaling.cpus_per_worker
    fits = max(1, int((cpus - 1) // per_trial)) if per_trial > 0 else wanted
    if wanted > fits:
        log.warning("train.tune.max_concurrent_trials=%d does not fit %g CPUs with %g CPUs per trial: "
                    "running %d at a time", wanted, cpus, per_trial, fits)
    return min(wanted, fits)


def run_tune(cfg: DictConfig) -> dict[str, Any]:
    tcfg = cfg.train.tune
    if tcfg is None:
        raise ConfigError("train.tune", None, "choose a search space, e.g. train/tune=asha")
    started = time.time()
    snap, spec, dsets = prepare(cfg)
    payload, trials, name = tune_fit(cfg, spec, dsets)
    reg_summary = register_result(cfg, payload["out"], snap, spec, source="tune",
                                  extra={"tune_run": name, "tune_best_config": payload["overrides"],
                                         "ray_train_run": payload["ray_train_run"]})
    return {"mode": "tune", "run": name, "trials": trials, "num_trials": len(trials),
            "best_config": payload["overrides"], **reg_summary, "seconds": round(time.time() - started, 1)}


def tune_fit(cfg: DictConfig, spec: PreprocessSpec, dsets: dict) -> tuple[dict[str, Any], list[dict], str]:
    """Run the search; returns the best trial's payload (out, overrides), all trials, the run name."""
    tcfg = cfg.train.tune
    if tcfg is None:
        raise ConfigError("train.tune", None, "choose a search space, e.g. train/tune=asha")
    name = run_name("tune")
    storage_path = storage.join(storage.resolve_root(cfg.paths.root), "ray_results")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    log.info("scheduler: %s", tcfg.scheduler._target_)
    # ASHA stops a trial when it reaches max_t reports; at max_t == epochs it would stop every
    # trial on its last epoch, before the trial returns its test metrics and weights.
    sched_kwargs = {"max_t": cfg.train.epochs + 1} if "max_t" not in tcfg.scheduler else {}
    scheduler = instantiate(tcfg.scheduler, **sched_kwargs)
    trainable = ray.tune.with_parameters(_trial, cfg_container=resolved, spec=spec, dsets=dsets,
                                         tune_name=name, storage_path=storage_path)
    # The trial function only drives a TorchTrainer; its workers hold the real resources.
    trainable = ray.tune.with_resources(trainable, {"cpu": float(tcfg.driver_cpus)})
    concurrent = _fit_concurrency(cfg, tcfg.max_concurrent_trials)
    tuner = ray.tune.Tuner(
        trainable,
        param_space=search_space(tcfg),
        tune_config=ray.tune.TuneConfig(metric=tcfg.metric, mode=tcfg.mode, scheduler=scheduler,
                                        num_samples=tcfg.num_samples,
                                        max_concurrent_trials=concurrent),
        # Tune's status tables stay off the terminal unless asked for: TrialLines prints a line
        # per trial report instead.
        run_config=ray.tune.RunConfig(
            name=name, storage_path=storage_path, verbose=None if progress.verbose() else 0,
            callbacks=[TrialLines(int(cfg.train.epochs), int(tcfg.num_samples), str(tcfg.metric))]),
    )
    grid = tuner.fit()
    finished = [r for r in grid if r.error is None and r.metrics and "output" in r.metrics]
    if not finished:
        errors = [str(r.error) for r in grid if r.error is not None]
        raise JobFailed(f"no tune trial finished: {errors[:3]}", {"mode": "tune", "run": name})
    # ASHA-stopped trials never return; rank by the metric their training reached.
    best = max(finished, key=lambda r: r.metrics.get(tcfg.metric, float("-inf")) * (1 if tcfg.mode == "max" else -1))
    payload = blobs.read(best.metrics["output"])
    trials = [{"trial": r.metrics.get("trial_id"), "config": r.config, "finished": r in finished,
               tcfg.metric: r.metrics.get(tcfg.metric), "error": str(r.error) if r.error else None}
              for r in grid]
    return payload, trials, name
