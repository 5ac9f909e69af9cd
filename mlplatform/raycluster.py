"""Start a local Ray, or join a cluster, and shut down only what this job started."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import ray
from omegaconf import DictConfig

log = logging.getLogger(__name__)


@contextlib.contextmanager
def ray_session(ray_cfg: DictConfig) -> Iterator[None]:
    if ray.is_initialized():  # a test session or a caller already runs Ray: share it
        yield
        return
    # Workers import mlplatform from the installed package; keep their logs quiet.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs: dict = {"log_to_driver": True}
    if ray_cfg.address:
        log.info("joining Ray cluster at %s", ray_cfg.address)
        ray.init(address=ray_cfg.address, **kwargs)
    else:
        log.info("starting a local Ray (num_cpus=%s)", ray_cfg.num_cpus)
        ray.init(num_cpus=ray_cfg.num_cpus, include_dashboard=ray_cfg.include_dashboard, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()
