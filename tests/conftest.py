"""Shared fixtures: one real local Ray cluster per test session, and config composition."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig

from mlplatform.cli_check import compose_checked
from mlplatform.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")

os.environ.setdefault("WANDB_MODE", "offline")
register_configs()


def compose(*overrides: str) -> DictConfig:
    """The config exactly as `python run.py <overrides>` would see it, validated."""
    return compose_checked(CONF, list(overrides))


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray, started once: a fresh ray.init costs about 6 s here."""
    import ray

    from mlplatform.raycluster import apply_serve_env

    if not ray.is_initialized():
        apply_serve_env(True)  # the serving tests run in the mode production runs in
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def parallel(work, threads: int) -> None:
    """Run work(k) for k in range(threads) on threads and wait for all of them."""
    import threading

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
