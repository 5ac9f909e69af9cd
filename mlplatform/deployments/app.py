"""The Ray Serve application: an ingress that validates and routes, one batched deployment
per served model version, canary weights and shadow mirroring from conf/serve, and the drift
monitor when monitoring is on.

`build_app(args)` is a typed application builder, so `serve run` and `serve deploy` work
with the same config that `python run.py +mode=serve` uses.
"""

from typing import Any

from pydantic import BaseModel
from ray import serve

from mlplatform.deployments.ingress import Ingress
from mlplatform.deployments.model_server import ModelServer
from mlplatform.deployments.settings import (
    Deployment,
    IngressOptions,
    ModelSettings,
    ServeSettings,
    TrafficSettings,
    model_deployment_name,
)

# In flight per ingress replica: each request waits there on a batch, far more than a model replica takes.
INGRESS_MAX_ONGOING = 1000


def per_node(limit: int | None) -> dict[str, Any]:
    """max_replicas_per_node when set: Serve's schema takes no null for "no limit"."""
    return {} if limit is None else {"max_replicas_per_node": limit}


def deployment_options(d: Deployment) -> dict[str, Any]:
    """Serve options for one version: autoscaling, resources, queue limits."""
    return {
        "autoscaling_config": {
            "min_replicas": d.min_replicas, "max_replicas": d.max_replicas,
            "initial_replicas": max(1, d.min_replicas),
            "target_ongoing_requests": d.target_ongoing_requests,
            "upscale_delay_s": d.upscale_delay_s, "downscale_delay_s": d.downscale_delay_s,
            "metrics_interval_s": d.metrics_interval_s, "look_back_period_s": d.look_back_period_s,
        },
        "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
        "max_ongoing_requests": d.max_ongoing_requests,
        "max_queued_requests": d.max_queued_requests,
        **per_node(d.max_replicas_per_node),
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
    }


def ingress_options(i: IngressOptions) -> dict[str, Any]:
    """Serve options for the ingress (serve.ingress). Its access rate limits divide by the
    live count of its replicas (health.ReplicaHealth), so scaling keeps a key's total rate."""
    return {
        "autoscaling_config": {
            "min_replicas": i.min_replicas, "max_replicas": i.max_replicas, "initial_replicas": i.min_replicas,
            "target_ongoing_requests": i.target_ongoing_requests,
            "upscale_delay_s": i.upscale_delay_s, "downscale_delay_s": i.downscale_delay_s,
            "metrics_interval_s": i.metrics_interval_s, "look_back_period_s": i.look_back_period_s,
        },
        "ray_actor_options": {"num_cpus": i.num_cpus},
        **per_node(i.max_replicas_per_node),
        "max_ongoing_requests": INGRESS_MAX_ONGOING,
    }


def model_user_config(traffic: TrafficSettings, version: str) -> dict[str, Any]:
    """A model deployment's user_config: the live forward-pass size and the failure drill
    (the wait belongs to the ingress's batcher)."""
    return {"max_batch_size": traffic.batching.max_batch_size, "chaos_fail": version in traffic.chaos_fail_versions}


class AppArgs(BaseModel):
    """The builder's typed arguments: Serve validates `args` against this model."""

    settings: ServeSettings


class ModelArgs(BaseModel):
    settings: ModelSettings


def build_app(args: AppArgs) -> serve.Application:
    """Typed application builder for `serve run` / `serve deploy` (import path
    `mlplatform.deployments.app:build_app`); `+mode=serve` deploys through it too.

    The ingress (and the drift monitor when monitoring is on). Traffic (weights, shadows,
    batching) is its user_config, which the serve config written by `+mode=deploy` (or
    `+mode=serve`) sets; until the ingress has it, it answers 503 and reports not ready.
    Each version it routes to is an application of its own (`build_model`), found by name:
    a version added or retired changes this application's user_config only."""
    s = args.settings
    monitor = None
    if s.monitor:
        from mlplatform.monitoring.deployment import DriftMonitor

        monitor = DriftMonitor.options(ray_actor_options={"num_cpus": s.monitor.num_cpus}
                                       ).bind(s.monitor.model_dump())
    # Options (autoscaling, resources) come from the serve config's Ingress entry (ingress_options).
    return Ingress.bind(s.model_dump(mode="json"), monitor)


def build_model(args: ModelArgs) -> serve.Application:
    """One version's application (import path `mlplatform.deployments.app:build_model`): its
    batched model deployment, options from the serve config's entry for it."""
    m = args.settings
    return ModelServer.options(name=model_deployment_name(m.version)).bind(
        m.registry_root, m.registry_model, m.version, m.accelerator.model_dump())
