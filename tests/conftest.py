"""Shared fixtures: one real local Ray cluster per test session, config composition, polling.

Every test that starts Ray carries the `ray` marker, so `pytest -m "not ray"` (make
test-fast) never starts it: a test that uses `ray_cluster`, or whose `run_cli` or own code
starts Ray, fails without the marker.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig

from mlplatform.cli_check import compose_checked
from mlplatform.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")

os.environ.setdefault("WANDB_MODE", "offline")
register_configs()


# Serve's HTTP host and port are fixed when Serve first starts in a Ray cluster, and stay for
# the session: every module that serves on the shared Ray uses this one port.
SERVE_PORT = 8765


def compose(*overrides: str) -> DictConfig:
    """The config exactly as `python run.py <overrides>` would see it, validated."""
    return compose_checked(CONF, list(overrides))


def wait_for(predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.2,
             message: str | Callable[[], str] = "") -> Any:
    """Poll until `predicate()` is truthy and return its value; fail after `timeout` seconds.

    `message` (or a function that builds it, called only on failure) says what never happened.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = message() if callable(message) else message
            raise AssertionError(f"not within {timeout:g} s: {detail}")
        time.sleep(interval)


_current: dict[str, pytest.Item] = {}


def _ray_marked() -> bool:
    item = _current.get("item")
    return item is not None and item.get_closest_marker("ray") is not None


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python run.py <args>` in a subprocess. In a test without the `ray` marker the child
    gets a Ray temp dir of its own (RAY_TMPDIR), and a Ray session found there fails the test."""
    env = dict(os.environ)
    probe = None if _ray_marked() else tempfile.mkdtemp(prefix="mlp-noray-")  # short: Ray's socket paths
    if probe:
        env["RAY_TMPDIR"] = probe
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT, env=env)
        if probe and list(Path(probe).glob("ray/session_*")):
            pytest.fail(f"run_cli{args} started Ray in a test without the `ray` marker", pytrace=False)
    finally:
        if probe:
            shutil.rmtree(probe, ignore_errors=True)
    return proc


def _ray_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before any fixture runs (a module fixture may call run_cli), so an unmarked test fails
    # without starting Ray first.
    _current["item"] = item
    if "ray_cluster" in getattr(item, "fixturenames", ()) and item.get_closest_marker("ray") is None:
        pytest.fail(f"{item.nodeid} uses ray_cluster without the `ray` marker", pytrace=False)


@pytest.fixture(autouse=True)
def _ray_only_when_marked(request: pytest.FixtureRequest):
    """An unmarked test that leaves Ray running fails."""
    was_up = _ray_up()
    yield
    if not was_up and _ray_up() and request.node.get_closest_marker("ray") is None:
        sys.modules["ray"].shutdown()  # the tests after this one run as they would without it
        pytest.fail(f"{request.node.nodeid} started Ray without the `ray` marker", pytrace=False)


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
    """Run work(k) for k in range(threads) on threads, wait for all of them, and raise the
    first error a thread raised (a failed assertion in a thread fails the test)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(work, k) for k in range(threads)]
    for f in futures:
        f.result()


def accelerator(**overrides) -> dict:
    """conf/serve's accelerator settings (what a model replica gets), with test overrides."""
    from omegaconf import OmegaConf

    return {**OmegaConf.to_container(compose().serve.accelerator), **overrides}


class ClosedLoop:
    """Closed-loop HTTP clients, one thread each: a client sends its next request when the
    last is answered, until the `with` block ends. A subclass says what one request is and
    what it keeps of it (`request`), and what a request with no HTTP answer leaves (`failed`);
    `results` holds them in answer order."""

    def __init__(self, clients: int, join_s: float = 60) -> None:
        import requests

        self._transport_error = requests.RequestException
        self._session = requests.Session
        self.stop, self.join_s = threading.Event(), join_s
        self.results: list[Any] = []
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def request(self, session: Any, t0: float) -> Any:
        raise NotImplementedError

    def failed(self, exc: Exception, t0: float) -> Any:
        return (0, repr(exc)[:300])

    def _client(self) -> None:
        session = self._session()
        while not self.stop.is_set():
            t0 = time.time()
            try:
                self.results.append(self.request(session, t0))
            except self._transport_error as exc:
                self.results.append(self.failed(exc, t0))
                session = self._session()  # a closed connection: start afresh

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(self.join_s)


def trained_with_copies(root: Path, copies: int) -> Any:
    """Train the smoke model into root's registry as v1, and register `copies` copies of it
    (v2, v3, ...): versions that answer alike, to route, mirror or break on purpose."""
    from mlplatform.registry.store import Registry
    from mlplatform.training.job import run_train

    run_train(compose("+mode=train", "+experiment=smoke", f"paths.root={root}", "logger=none"))
    cfg = compose("+mode=train", f"paths.root={root}")
    reg = Registry(str(root / "registry"), cfg.registry.model_name)
    meta = {k: v for k, v in reg.get("v1").items() if k not in ("version", "created", "files", "weights_sha256")}
    state = reg.load_state_dict("v1")
    for _ in range(copies):
        reg.register(state, {**meta, "source": "copy-of-v1"})
    return meta
