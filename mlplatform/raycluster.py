"""Start a local Ray, or join a cluster, and shut down only what this job started."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import ray
from omegaconf import DictConfig

log = logging.getLogger(__name__)


@dataclass
class Session:
    started: bool  # this process started Ray (and its cluster dies with it)

    @property
    def dashboard_url(self) -> str | None:
        from ray._private.worker import get_dashboard_url

        url = get_dashboard_url()
        return f"http://{url}" if url and not url.startswith("http") else url

    @property
    def metrics_url(self) -> str | None:
        node = getattr(ray._private.worker.global_worker, "node", None)
        port = getattr(node, "metrics_export_port", None)
        return f"http://127.0.0.1:{port}/metrics" if port else None


@contextlib.contextmanager
def ray_session(ray_cfg: DictConfig) -> Iterator[Session]:
    if ray.is_initialized():  # a test session or a caller already runs Ray: share it
        yield Session(started=False)
        return
    # Workers import mlplatform from the installed package; keep their logs quiet.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs: dict = {"log_to_driver": True}
    started = not ray_cfg.address
    if ray_cfg.address:
        log.info("joining Ray cluster at %s", ray_cfg.address)
        ray.init(address=ray_cfg.address, **kwargs)
    else:
        log.info("starting a local Ray (num_cpus=%s)", ray_cfg.num_cpus)
        try:
            ray.init(num_cpus=ray_cfg.num_cpus, include_dashboard=ray_cfg.include_dashboard,
                     _metrics_export_port=ray_cfg.metrics_export_port, **kwargs)
        except ValueError as exc:
            if "existing cluster" not in str(exc):
                raise
            # `ray start` runs a cluster on this machine, and ray.init finds it by itself:
            # use it (its own resources apply) rather than fail.
            log.warning("a Ray cluster already runs on this machine (ray start): joining it; "
                        "its resources apply, not ray.num_cpus")
            ray.init(address="auto", **kwargs)
            started = False
    try:
        yield Session(started=started)
    finally:
        ray.shutdown()
