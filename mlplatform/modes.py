"""The mode table: `+mode=<name>` -> a plain function of the composed config.

Each function returns the summary that run.py prints as the last line of JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig


def _data(cfg: DictConfig) -> dict[str, Any]:
    from mlplatform.data.job import run_data
    from mlplatform.raycluster import ray_session

    with ray_session(cfg.ray):
        return run_data(cfg)


def _with_ray(module: str, func: str) -> Callable[[DictConfig], dict[str, Any]]:
    def run(cfg: DictConfig) -> dict[str, Any]:
        import importlib

        from mlplatform.raycluster import ray_session

        with ray_session(cfg.ray):
            return getattr(importlib.import_module(module), func)(cfg)

    run.__name__ = func
    return run


def _serve(cfg: DictConfig) -> dict[str, Any]:
    from mlplatform.deployments.serve_mode import auth_settings, run_serve
    from mlplatform.raycluster import ray_session

    auth_settings(cfg)  # an unset key variable or unreadable key file: one line, before Ray
    with ray_session(cfg.ray) as session:
        return run_serve(cfg, session)


def _deploy(cfg: DictConfig) -> dict[str, Any]:
    from mlplatform.deployments.manifests import run_deploy

    return run_deploy(cfg)


def _monitor(cfg: DictConfig) -> dict[str, Any]:
    from mlplatform.monitoring.report import run_monitor

    return run_monitor(cfg)


def _rollout(cfg: DictConfig) -> dict[str, Any]:
    from mlplatform.pipeline.rollout import run_rollout

    if not cfg.rollout.apply and not cfg.rollout.auto:
        return run_rollout(cfg)
    if not cfg.ray.address:
        from mlplatform.errors import ConfigError

        key = "rollout.auto=true steps" if cfg.rollout.auto else "rollout.apply=true changes"
        raise ConfigError("ray.address", None, f"{key} the running deployment: "
                          "join its cluster with ray.address=auto")
    from mlplatform.raycluster import ray_session

    with ray_session(cfg.ray):
        if cfg.rollout.auto:
            from mlplatform.pipeline.autorollout import run_auto

            return run_auto(cfg)
        return run_rollout(cfg)


def _sync(cfg: DictConfig) -> dict[str, Any]:
    from mlplatform.sync.reconciler import run_sync

    return run_sync(cfg)


def _registry(cfg: DictConfig) -> dict[str, Any]:
    from mlplatform.registry.mode import run_registry

    return run_registry(cfg)


# Imports stay inside the functions: listing the modes or a config error must not pay for torch.
MODES: dict[str, tuple[Callable[[DictConfig], dict[str, Any]], str]] = {
    "data": (_data, "ingest with Ray Data, split, check quality, write the snapshot manifest"),
    "train": (_with_ray("mlplatform.training.job", "run_train"),
              "train with Ray Train, evaluate, gate against production, register a version"),
    "tune": (_with_ray("mlplatform.training.tune", "run_tune"),
             "search hyperparameters with Ray Tune (ASHA); register the best trial"),
    "evaluate": (_with_ray("mlplatform.training.evaluate", "run_evaluate"),
                 "evaluate a registered version on any dataset and split; write a report"),
    "promote": (_with_ray("mlplatform.training.evaluate", "run_promote"),
                "judge a version against production with the promotion gate"),
    "serve": (_serve, "deploy conf/serve on Ray Serve (REST + Open Inference Protocol); block until SIGINT/SIGTERM"),
    "predict": (_with_ray("mlplatform.deployments.predict", "run_predict"),
                "offline batch inference over a folder or manifest with Ray Data; writes Parquet"),
    "deploy": (_deploy, "write the Serve config, a KubeRay RayService, RayJobs and a volume claim; start nothing"),
    "pipeline": (_with_ray("mlplatform.pipeline.run", "run_pipeline"),
                 "snapshot base + captured data, validate, split, train, evaluate, gate, register, propose a canary"),
    "rollout": (_rollout, "canary analysis against stable; propose (or apply) the next step, promotion or rollback"),
    "monitor": (_monitor, "report drift, species shift, feedback accuracy and alerts over captured data"),
    "sync": (_sync, "apply gitops.branch of gitops.repo to the running Serve app at each new commit; report drift"),
    "registry": (_registry, "list versions, metrics, aliases and lineage; registry.set_alias=alias:vN"),
}


def usage() -> str:
    lines = ["usage: python run.py +mode=<mode> [key=value ...]", "", "modes:"]
    lines += [f"  {name:<10} {doc}" for name, (_, doc) in MODES.items()]
    return "\n".join(lines)
