"""`+mode=serve`: resolve conf/serve against the registry, deploy on Ray Serve, block.

Run against a running cluster (`ray.address=auto`) it applies the YAML in place and
returns: a changed weight only touches the ingress's user_config, so no replica restarts.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from omegaconf import DictConfig, OmegaConf
from ray import serve
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from mlplatform import storage
from mlplatform.errors import ConfigError, JobFailed
from mlplatform.registry import ChecksumError, Registry, RegistryError

log = logging.getLogger(__name__)
IMPORT_PATH = "mlplatform.deployments.app:build_app"
# Settings that live in user_config: changing them never restarts a replica.
TRAFFIC_KEYS = ("sticky_header", "request_timeout_s", "top_k", "batching", "chaos_fail_versions")


def resolve_settings(cfg: DictConfig) -> dict[str, Any]:
    """conf/serve with aliases resolved to versions, checksums verified, deployments merged."""
    s = cfg.serve
    reg = Registry(storage.resolve_root(cfg.registry.root), cfg.registry.model_name)
    base = OmegaConf.to_container(s.deployment, resolve=True)

    def entry(key: str, item: DictConfig) -> dict[str, Any]:
        try:
            version = reg.resolve(item.ref)
            reg.load_state_dict(version)  # never serve a version whose checksum fails
        except ChecksumError as exc:
            raise JobFailed(f"refusing to serve {item.ref}: {exc}", {"mode": "serve"}) from None
        except RegistryError as exc:
            raise ConfigError(key, item.ref, str(exc)) from None
        return {**OmegaConf.to_container(item, resolve=True), "version": version,
                "deployment": {**base, **OmegaConf.to_container(item.deployment, resolve=True)}}

    versions = [entry(f"serve.versions[{i}].ref", v) for i, v in enumerate(s.versions)]
    shadows = [entry(f"serve.shadows[{i}].ref", v) for i, v in enumerate(s.shadows)]
    served = [v["version"] for v in versions]
    if len(set(served)) != len(served):
        raise ConfigError("serve.versions", [v.ref for v in s.versions], f"two refs name one version: {served}")
    for sh in shadows:
        if sh["version"] in served:
            raise ConfigError("serve.shadows", sh["ref"], f"{sh['version']} is already served")
    return {
        "registry_root": reg.root, "registry_model": cfg.registry.model_name,
        "model_name": s.model_name or cfg.registry.model_name,
        "versions": versions, "shadows": shadows, "sticky_header": s.sticky_header,
        "request_timeout_s": s.request_timeout_s, "retry_after_s": s.retry_after_s, "top_k": s.top_k,
        "batching": OmegaConf.to_container(s.batching, resolve=True),
        "accelerator": OmegaConf.to_container(s.accelerator, resolve=True),
        "inputs": OmegaConf.to_container(s.inputs, resolve=True),
        "ingress_replicas": s.ingress_replicas, "ingress_cpus": s.ingress_cpus,
        "chaos_fail_versions": list(s.chaos_fail_versions),
        **monitor_settings(cfg, reg.root),
    }


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
        monitor = {"registry_root": registry_root, "registry_model": cfg.registry.model_name,
                   "capture_root": capture["root"], "window_size": m["window_size"], "interval_s": m["interval_s"],
                   "max_windows_per_poll": m["max_windows_per_poll"],
                   "p_val_budget": m["p_val_budget"], "detectors": m["detectors"] or {}, "quality": m["quality"],
                   "alerts": alerts, "num_cpus": m["num_cpus"], "nice": m["nice"]}
    return {"capture": capture, "monitor": monitor}


def deploy_schema(cfg: DictConfig, settings: dict[str, Any]) -> ServeDeploySchema:
    """The declarative form: what `serve deploy` takes, and how updates stay in place.

    The import path and runtime env fix Serve's code version; with them unchanged, a
    change that only touches user_config (weights, batch size) is applied to the running
    replicas instead of replacing them.
    """
    from mlplatform.deployments.app import deployment_options, model_user_config, traffic_config

    # args fix the code version (Serve hashes them): only what needs new replicas goes there.
    static = {k: v for k, v in settings.items() if k not in TRAFFIC_KEYS}
    static["versions"] = [{"version": v["version"]} for v in settings["versions"]]
    static["shadows"] = [{"version": v["version"]} for v in settings["shadows"]]
    deployments = [{"name": "Ingress", "user_config": traffic_config(settings),
                    "num_replicas": settings["ingress_replicas"]}]
    for entry in [*settings["versions"], *settings["shadows"]]:
        deployments.append({"name": f"model-{entry['version']}",
                            "user_config": model_user_config(settings, entry["version"]),
                            **deployment_options(entry["deployment"])})
    app = ServeApplicationSchema(name=cfg.serve.app_name, route_prefix="/", import_path=IMPORT_PATH,
                                 args={"settings": static}, deployments=deployments)
    # Declarative, like `serve deploy`: this config is the cluster's whole Serve state.
    return ServeDeploySchema(http_options={"host": cfg.serve.host, "port": cfg.serve.port}, applications=[app])


def deploy(cfg: DictConfig, session: Any = None, timeout_s: float = 300) -> dict[str, Any]:
    """Deploy or update the application in place; returns what is served and where."""
    from ray.serve.context import _get_global_client

    settings = resolve_settings(cfg)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    client = _get_global_client()
    client.deploy_apps(deploy_schema(cfg, settings))
    try:
        client._wait_for_application_running(cfg.serve.app_name, timeout_s=timeout_s)
    except (RuntimeError, TimeoutError) as exc:
        raise JobFailed(f"serve: application {cfg.serve.app_name} did not start: {str(exc)[:2000]}",
                        {"mode": "serve"}) from None
    base = f"http://{'127.0.0.1' if cfg.serve.host in ('0.0.0.0', '::') else cfg.serve.host}:{cfg.serve.port}"
    return {
        "mode": "serve", "app": cfg.serve.app_name, "endpoint": f"{base}/predict", "docs": f"{base}/docs",
        "models": f"{base}/models", "oip": f"{base}/v2/models/{settings['model_name']}/infer",
        "feedback": f"{base}/feedback", "monitoring": f"{base}/monitoring" if settings["monitor"] else None,
        "capture": settings["capture"]["root"] if settings["capture"]["enabled"] else None,
        "dashboard": session.dashboard_url if session else None,
        "metrics": session.metrics_url if session else None,
        "versions": [{"version": v["version"], "role": v["role"], "weight": v["weight"]} for v in settings["versions"]],
        "shadows": [{"version": v["version"], "mirror": v["mirror"]} for v in settings["shadows"]],
    }


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
    for key in ("endpoint", "docs", "feedback", "monitoring", "dashboard", "metrics"):
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
