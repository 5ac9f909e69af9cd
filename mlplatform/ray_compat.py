"""Every private Ray API the platform uses, in one place, for the Ray it was written against.

Ray's underscore names (`ray._private`, `ray.serve.context._get_*`, a Serve client's
`_wait_for_application_running`, `ray.init(_metrics_export_port=...)`) change between minor
releases without notice. Keeping them here means an upgrade is checked in one file, and a
test (tests/test_imports.py) fails when another module reaches for one.

Importing this module on another Ray minor version fails with a message saying so, rather
than warning: a changed private API breaks deep inside a Serve replica (every request's id,
say) or at shutdown, far from its cause, while this fails at start with the cause named.
pyproject.toml pins the version that passes; after testing another, update SUPPORTED_RAY.
"""

from __future__ import annotations

from typing import Any

import ray

SUPPORTED_RAY = "2.60"  # major.minor; any patch release of it


def check_ray_version(version: str) -> None:
    """RuntimeError unless `version` is a SUPPORTED_RAY release."""
    if version.split(".")[:2] != SUPPORTED_RAY.split("."):
        raise RuntimeError(
            f"mlplatform uses private Ray APIs written for Ray {SUPPORTED_RAY}.x, but Ray {version} is "
            f"installed: install ray=={SUPPORTED_RAY}.* (pyproject.toml pins it), or check each function "
            f"of mlplatform/ray_compat.py against Ray {version} and update SUPPORTED_RAY.")


check_ray_version(ray.__version__)


# ----------------------------------------------------------------------------- the local node


def init_local(metrics_export_port: int | None, **kwargs: Any) -> Any:
    """`ray.init` for a Ray this process starts, with its metrics on a fixed port."""
    return ray.init(_metrics_export_port=metrics_export_port, **kwargs)


def dashboard_url() -> str | None:
    """The connected cluster's dashboard, with a scheme; None without one."""
    from ray._private.worker import get_dashboard_url

    url = get_dashboard_url()
    return f"http://{url}" if url and not url.startswith("http") else url


def metrics_export_port() -> int | None:
    """The port this node's Prometheus metrics are served on; None when not connected."""
    node = getattr(ray._private.worker.global_worker, "node", None)
    return getattr(node, "metrics_export_port", None)


def logs_dir() -> str:
    """This node's Ray logs directory (Serve's logs are in its `serve/`)."""
    return ray._private.worker.global_worker.node.get_logs_dir_path()


# ----------------------------------------------------------------------------- Serve


def serve_request_id() -> str | None:
    """The id Serve's proxy gave the request being handled (the client's x-request-id, or
    its own), in a replica; None outside a request."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or None


def deploy_apps(schema: Any) -> None:
    """Apply a `ServeDeploySchema` as the cluster's whole Serve state, as `serve deploy`
    does (`serve.run` takes built applications, not the declarative config)."""
    from ray.serve.context import _get_global_client

    _get_global_client().deploy_apps(schema)


def wait_for_application(name: str, timeout_s: float) -> None:
    """Block until the application is RUNNING; RuntimeError if it failed to deploy,
    TimeoutError after `timeout_s`."""
    from ray.serve.context import _get_global_client

    _get_global_client()._wait_for_application_running(name, timeout_s=timeout_s)


def serve_deployments(app_name: str) -> dict[str, dict[str, Any]]:
    """Each deployment of `app_name` -> the controller's details: `replicas` (each with
    `state`, `actor_name`, `pid`, ...) and `deployment_config`. One controller call. The
    controller's states lag a killed replica by up to its `health_check_period_s`, so callers
    pair this with actor liveness."""
    return all_serve_deployments().get(app_name, {})


def all_serve_deployments() -> dict[str, dict[str, dict[str, Any]]]:
    """Application -> deployment -> the controller's details (`serve_deployments`), for every
    application, in one controller call."""
    from ray.serve.context import _get_global_client

    apps = _get_global_client().get_serve_details().get("applications", {})
    return {name: dict(a.get("deployments", {})) for name, a in apps.items()}


def serve_app_configs() -> dict[str, dict[str, Any]]:
    """Each Serve application -> the config it was deployed with (as `serve deploy` took it),
    from the controller; {} when Serve is not running."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return {}
    apps = client.get_serve_details().get("applications", {})
    return {name: a["deployed_app_config"] for name, a in apps.items() if a.get("deployed_app_config")}


def serve_replicas(app_name: str) -> dict[str, list[dict[str, Any]]]:
    """Each deployment of `app_name` -> its replicas as the controller sees them."""
    return {name: d.get("replicas", []) for name, d in serve_deployments(app_name).items()}


def config_updating(details: dict[str, Any]) -> bool:
    """Serve is rolling a deployment to a new config (replicas replaced on purpose), as opposed
    to replacing ones that died (UNHEALTHY, HEALTH_CHECK_FAILED)."""
    return details.get("status") == "UPDATING" and details.get("status_trigger") == "CONFIG_UPDATE_STARTED"


def min_replicas(details: dict[str, Any]) -> int:
    """The replicas a deployment keeps at least: autoscaling's floor, else its fixed count."""
    config = details.get("deployment_config") or {}
    auto = config.get("autoscaling_config")
    return int(auto["min_replicas"]) if auto else int(config.get("num_replicas") or 0)
