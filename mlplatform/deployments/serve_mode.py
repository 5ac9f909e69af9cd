"""`+mode=serve`: resolve conf/serve against the registry, deploy on Ray Serve, block.

Run against a running cluster (`ray.address=auto`) it applies the YAML in place and
returns: a changed weight only touches the ingress's user_config, so no replica restarts.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from omegaconf import DictConfig, OmegaConf
from ray import serve
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from mlplatform import ray_compat, storage
from mlplatform.deployments.access import AuthSettings, enforcement, read_secret, sha256_hex
from mlplatform.deployments.settings import (
    Deployment,
    IngressOptions,
    ModelSettings,
    MonitorSettings,
    Resolved,
    ServeSettings,
    TrafficSettings,
    model_app_name,
    model_deployment_name,
)
from mlplatform.errors import ConfigError, JobFailed
from mlplatform.registry.store import ChecksumError, Registry, RegistryError

log = logging.getLogger(__name__)
IMPORT_PATH = "mlplatform.deployments.app:build_app"
MODEL_IMPORT_PATH = "mlplatform.deployments.app:build_model"


def resolve_settings(cfg: DictConfig, read_secrets: bool = True) -> Resolved:
    """conf/serve with aliases resolved to versions, checksums verified, deployments merged:
    what the application is built with, and the traffic its ingress is configured with.
    read_secrets=False (a cluster's config): the ingress reads the keys' secrets itself."""
    s = cfg.serve
    reg = Registry(storage.resolve_root(cfg.registry.root), cfg.registry.model_name)

    def version_of(key: str, item: DictConfig) -> str:
        try:
            version = reg.resolve(item.ref)
            reg.verify_weights(version)  # never serve a version whose checksum fails
        except ChecksumError as exc:
            raise JobFailed(f"refusing to serve {item.ref}: {exc}", {"mode": "serve"}) from None
        except RegistryError as exc:
            raise ConfigError(key, item.ref, str(exc)) from None
        return version

    def options(item: DictConfig) -> Deployment:
        return Deployment.model_validate(OmegaConf.to_container(OmegaConf.merge(s.deployment, item.deployment),
                                                                resolve=True))

    served = [version_of(f"serve.versions[{i}].ref", v) for i, v in enumerate(s.versions)]
    mirrored = [version_of(f"serve.shadows[{i}].ref", v) for i, v in enumerate(s.shadows)]
    if len(set(served)) != len(served):
        raise ConfigError("serve.versions", [v.ref for v in s.versions], f"two refs name one version: {served}")
    for sh, version in zip(s.shadows, mirrored, strict=True):
        if version in served:
            raise ConfigError("serve.shadows", sh.ref, f"{version} is already served")
    settings = ServeSettings(
        registry_root=reg.root, registry_model=cfg.registry.model_name,
        model_name=s.model_name or cfg.registry.model_name, retry_after_s=s.retry_after_s,
        inputs=OmegaConf.to_container(s.inputs, resolve=True),
        **monitor_settings(cfg, reg.root),
    )
    accelerator = OmegaConf.to_container(s.accelerator, resolve=True)
    models = {v: ModelSettings(registry_root=reg.root, registry_model=cfg.registry.model_name, version=v,
                               accelerator=accelerator) for v in [*served, *mirrored]}
    traffic = TrafficSettings(
        routes=[{"version": v, "role": item.role, "weight": item.weight} for v, item in zip(served, s.versions, strict=True)],
        shadows=[{"version": v, "mirror": item.mirror} for v, item in zip(mirrored, s.shadows, strict=True)],
        sticky_header=s.sticky_header, request_timeout_s=s.request_timeout_s, top_k=s.top_k,
        batching=OmegaConf.to_container(s.batching, resolve=True), chaos_fail_versions=list(s.chaos_fail_versions),
        auth=auth_settings(cfg, read_secrets), source=None,
    )
    deployments = {v: options(item) for v, item in zip([*served, *mirrored], [*s.versions, *s.shadows], strict=True)}
    ingress = IngressOptions.model_validate(OmegaConf.to_container(s.ingress, resolve=True))
    return Resolved(settings, models, traffic, deployments, ingress)


def auth_settings(cfg: DictConfig, read_secrets: bool = True) -> AuthSettings:
    """serve.auth for the ingress. read_secrets: this process reads each key's secret and
    passes only its sha256 (the +mode=serve driver, so keys change in place from YAML);
    otherwise the names of the variable or file travel and the ingress reads them."""
    a = OmegaConf.to_container(cfg.serve.auth, resolve=True)
    enforced, _ = enforcement(a["required"], cfg.serve.host, len(a["keys"]))
    keys = []
    for i, k in enumerate(a["keys"]):
        digest = sha256_hex(read_secret(k["id"], k["secret_env"], k["secret_file"], f"serve.auth.keys[{i}]")) \
            if read_secrets and enforced else None
        keys.append({**k, "sha256": digest, **({"secret_env": None, "secret_file": None} if digest else {})})
    return AuthSettings(enforced=enforced, keys=keys if enforced else [], client=a["client"], feedback=a["feedback"])


def monitor_settings(cfg: DictConfig, registry_root: str) -> dict[str, Any]:
    """conf/monitor resolved for the ingress (capture) and the DriftMonitor deployment."""
    m = OmegaConf.to_container(cfg.monitor, resolve=True)
    capture = {**m["capture"], "root": storage.resolve_root(m["capture"]["root"])}
    monitor = None
    if m["enabled"]:
        if not capture["enabled"]:
            raise ConfigError("monitor.capture.enabled", False, "the drift monitor reads captured data; "
                              "enable capture or set monitor.enabled=false")
        alerts = {**m["alerts"], "path": storage.resolve_root(m["alerts"]["path"]),
                  "trigger_dir": storage.resolve_root(m["alerts"]["trigger_dir"])}
        monitor = MonitorSettings(
            registry_root=registry_root, registry_model=cfg.registry.model_name, capture_root=capture["root"],
            window_size=m["window_size"], interval_s=m["interval_s"], max_windows_per_poll=m["max_windows_per_poll"],
            p_val_budget=m["p_val_budget"], detectors=m["detectors"] or {}, quality=m["quality"], alerts=alerts,
            num_cpus=m["num_cpus"], nice=m["nice"])
    return {"capture": capture, "monitor": monitor}


def deploy_schema(cfg: DictConfig, resolved: Resolved) -> ServeDeploySchema:
    """The declarative form: what `serve deploy` takes, and how updates stay in place.

    One application for the ingress (serve.app_name, the HTTP routes) and one per version
    (no route). The import path, runtime env and args fix each application's code version;
    with them unchanged, a change that only touches user_config (weights, shadows' mirrors,
    batch size, which versions the ingress routes to) is applied to the running replicas
    instead of replacing them, and a version added or retired leaves the others running.
    """
    from mlplatform.deployments.app import deployment_options, ingress_options, model_user_config

    settings, models, traffic, options, ingress = resolved
    name = cfg.serve.app_name
    deployments = [{"name": "Ingress", "user_config": traffic.model_dump(mode="json"), **ingress_options(ingress)}]
    if settings.monitor:  # which versions to warm the detectors for: live, like the traffic
        deployments.append({"name": "DriftMonitor", "user_config": {"versions": list(models)}})
    apps = [ServeApplicationSchema(name=name, route_prefix="/", import_path=IMPORT_PATH,
                                   args={"settings": settings.model_dump(mode="json")}, deployments=deployments)]
    for version, model in models.items():
        apps.append(ServeApplicationSchema(
            name=model_app_name(name, version), route_prefix=None, import_path=MODEL_IMPORT_PATH,
            args={"settings": model.model_dump(mode="json")},
            deployments=[{"name": model_deployment_name(version), "user_config": model_user_config(traffic, version),
                          **deployment_options(options[version])}]))
    # Declarative, like `serve deploy`: this config is the cluster's whole Serve state.
    return ServeDeploySchema(http_options={"host": cfg.serve.host, "port": cfg.serve.port}, applications=apps)


def ingress_traffic(app_config: dict[str, Any]) -> dict[str, Any]:
    """The ingress's traffic (its user_config) in an application's running config; {} if none."""
    return next((d.get("user_config") or {} for d in app_config.get("deployments", [])
                 if d.get("name") == "Ingress"), {})


def _routed(traffic: dict[str, Any]) -> set[str]:
    return {r["version"] for r in [*traffic.get("routes", []), *traffic.get("shadows", [])]}


def rollout_phases(app_name: str, desired: ServeDeploySchema,
                   running: dict[str, dict[str, Any]]) -> list[ServeDeploySchema]:
    """The serve configs to apply in turn so that no request is routed to a version without
    replicas: first every new version's application, beside the running traffic; then the
    new traffic, the retired versions still up; then without them. `running`: the
    controller's config of each application (name -> config); a phase that changes nothing
    is left out."""
    apps = {a.name: a for a in desired.applications}
    old = _routed(ingress_traffic(running.get(app_name, {})))
    if not old:  # a first deploy: nothing routes yet
        return [desired]
    retired = [ServeApplicationSchema.model_validate(running[n]) for n in sorted(
        {model_app_name(app_name, v) for v in old} - set(apps)) if n in running]
    added = [a for a in desired.applications if a.name != app_name and a.name not in running]
    phases: list[ServeDeploySchema] = []
    if added:
        previous = ServeApplicationSchema.model_validate(running[app_name])
        phases.append(desired.model_copy(update={"applications": [
            previous, *[a for a in desired.applications if a.name != app_name], *retired]}))
    if retired:
        phases.append(desired.model_copy(update={"applications": [*desired.applications, *retired]}))
    phases.append(desired)
    return phases


def deploy(cfg: DictConfig, session: Any = None, timeout_s: float = 300,
           source: dict[str, str] | None = None) -> dict[str, Any]:
    """Deploy or update the application in place; returns what is served and where.
    source: where this config came from (+mode=sync), recorded in the ingress's config."""
    settings, models, traffic, options, ingress = resolve_settings(cfg)
    traffic = traffic.model_copy(update={"source": source})
    desired = deploy_schema(cfg, Resolved(settings, models, traffic, options, ingress))
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    for phase in rollout_phases(cfg.serve.app_name, desired, ray_compat.serve_app_configs()):
        ray_compat.deploy_apps(phase)
        for app in phase.applications:
            try:
                ray_compat.wait_for_application(app.name, timeout_s)
            except (RuntimeError, TimeoutError) as exc:
                raise JobFailed(f"serve: application {app.name} did not start: {str(exc)[:2000]}",
                                {"mode": "serve"}) from None
    # Applied when what the config leaves out is gone too (retired versions drain first).
    wanted, deadline = {a.name for a in desired.applications}, time.monotonic() + timeout_s
    while set(ray_compat.all_serve_deployments()) - wanted:
        if time.monotonic() > deadline:
            raise JobFailed(f"serve: applications {sorted(set(ray_compat.all_serve_deployments()) - wanted)} "
                            f"were not deleted within {timeout_s:g} s", {"mode": "serve"})
        time.sleep(0.5)
    base = f"http://{'127.0.0.1' if cfg.serve.host in ('0.0.0.0', '::') else cfg.serve.host}:{cfg.serve.port}"
    return {
        "mode": "serve", "app": cfg.serve.app_name, "endpoint": f"{base}/predict", "docs": f"{base}/docs",
        "models": f"{base}/models", "oip": f"{base}/v2/models/{settings.model_name}/infer",
        "feedback": f"{base}/feedback", "monitoring": f"{base}/monitoring" if settings.monitor else None,
        "capture": settings.capture.root if settings.capture.enabled else None,
        "dashboard": session.dashboard_url if session else None,
        "metrics": session.metrics_url if session else None,
        "versions": [r.model_dump() for r in traffic.routes],
        "shadows": [m.model_dump() for m in traffic.shadows],
        "source": source,
        "access": enforcement(cfg.serve.auth.required, cfg.serve.host, len(cfg.serve.auth["keys"]))[1],
    }


def replicas(app_name: str) -> dict[str, list[dict[str, Any]]]:
    """Deployment -> its replicas (the controller's view), across the ingress application and
    every version application beside it."""
    return {d: details.get("replicas", []) for name, deployments in ray_compat.all_serve_deployments().items()
            if name == app_name or name.startswith(f"{app_name}-") for d, details in deployments.items()}


def undeploy(app_name: str) -> None:
    """Delete the ingress application and every version application beside it."""
    for name in ray_compat.serve_app_configs():
        if name == app_name or name.startswith(f"{app_name}-"):
            serve.delete(name)


def run_serve(cfg: DictConfig, session: Any) -> dict[str, Any]:
    trained = None
    if cfg.serve.train_if_empty:
        reg = Registry(storage.resolve_root(cfg.registry.root), cfg.registry.model_name)
        if not reg.versions():
            from mlplatform.training.job import run_train

            log.info("the registry is empty: training %s first", cfg.model._target_)
            trained = run_train(cfg)
            if trained["gate"]["verdict"] != "blessed":
                raise JobFailed(f"the first model was rejected by the gate: {trained['gate']['reasons']}",
                                {"mode": "serve", "trained": trained})
    summary = deploy(cfg, session)
    if trained:
        summary["trained"] = {k: trained[k] for k in ("version", "metrics", "model_card")}
    block = cfg.serve.block
    block = session.started if block == "auto" else str(block).lower() == "true"
    for key in ("access", "endpoint", "docs", "feedback", "monitoring", "dashboard", "metrics"):
        print(f"{key:>10}: {summary[key]}", flush=True)
    if not block:
        return summary
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print("serving; Ctrl-C or SIGTERM stops", flush=True)
    stop.wait()
    serve.shutdown()
    return {**summary, "stopped": True}
