"""The settings deployments receive, typed by models derived from conf/'s schemas.

`ServeSettings` is what `build_app` takes (the application's `args`): a change to it needs new
replicas. `TrafficSettings` is the ingress's `user_config` (and the source of the model
deployments'): a change to it (weights, shadows, timeouts, batching, drills) is applied to the
running replicas. Both are JSON on the way through
`serve deploy` and validated again where they land; no field has a default, so nothing here
can disagree with the YAML.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from mlplatform.config.schema import (
    CaptureConf,
    MonitorAlertsConf,
    MonitorQualityConf,
    ServeAcceleratorConf,
    ServeBatchingConf,
    ServeDeploymentConf,
    ServeIngressConf,
    ServeInputsConf,
)
from mlplatform.config.typed import Strict, model_of
from mlplatform.deployments.access import AuthSettings

Batching = model_of(ServeBatchingConf)
Deployment = model_of(ServeDeploymentConf)
IngressOptions = model_of(ServeIngressConf)
Accelerator = model_of(ServeAcceleratorConf)
Inputs = model_of(ServeInputsConf)
Capture = model_of(CaptureConf)


class MonitorSettings(Strict):
    """conf/monitor, resolved, for the drift monitor deployment."""

    registry_root: str
    registry_model: str
    capture_root: str
    window_size: int
    interval_s: float
    max_windows_per_poll: int
    p_val_budget: float
    detectors: dict[str, Any]
    quality: model_of(MonitorQualityConf)  # type: ignore[valid-type]
    alerts: model_of(MonitorAlertsConf)  # type: ignore[valid-type]
    num_cpus: float
    nice: int


def model_app_name(app_name: str, version: str) -> str:
    """The application that serves `version` beside the ingress application `app_name`."""
    return f"{app_name}-{version}"


def model_deployment_name(version: str) -> str:
    return f"model-{version}"


class ServeSettings(Strict):
    """The ingress application's args. The versions served are not here: each is an
    application of its own (`ModelSettings`) that the ingress finds from its traffic, so
    adding or retiring a version changes no args and restarts nothing else."""

    registry_root: str
    registry_model: str
    model_name: str  # /v2/models/{model}
    retry_after_s: int
    inputs: Inputs  # type: ignore[valid-type]
    capture: Capture  # type: ignore[valid-type]
    monitor: MonitorSettings | None  # None: monitoring off


class ModelSettings(Strict):
    """One version's application args: its Serve options (serve.deployment with the
    version's overrides) are the serve config's, not args."""

    registry_root: str
    registry_model: str
    version: str
    accelerator: Accelerator  # type: ignore[valid-type]


class Route(Strict):
    version: str
    role: str  # stable or canary
    weight: int


class Mirror(Strict):
    version: str
    mirror: float


class TrafficSettings(Strict):
    routes: list[Route]
    shadows: list[Mirror]
    sticky_header: str | None
    request_timeout_s: float
    top_k: int
    batching: Batching  # type: ignore[valid-type]
    # The failure drill: read by the model deployments' user_config, live like the rest.
    chaos_fail_versions: list[str]
    # serve.auth with secrets as hashes (or where the ingress reads them): keys and rates live.
    auth: AuthSettings
    # Where this config came from (+mode=sync: repo, branch, commit), shown in the serve
    # config that `serve status` and the dashboard print; None when deployed by hand.
    source: dict[str, str] | None


class Resolved(NamedTuple):
    """conf/serve resolved against the registry: what `deploy_schema` turns into a serve config."""

    settings: ServeSettings
    models: dict[str, ModelSettings]  # version -> its application's args (versions, then shadows)
    traffic: TrafficSettings
    deployments: dict[str, Deployment]  # type: ignore[valid-type]  # version -> Serve options
    ingress: IngressOptions  # type: ignore[valid-type]  # the ingress's Serve options
