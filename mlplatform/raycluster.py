"""Start a local Ray, or join a cluster, and shut down only what this job started."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import ray
from omegaconf import DictConfig

from mlplatform import ray_compat

log = logging.getLogger(__name__)

# Ray Serve reads these when each of its processes starts, so they must be in the environment
# of the Ray that runs Serve: set here before a local ray.init, in the RayService manifest and
# Dockerfile for a cluster, or exported before `ray start`.
HIGH_THROUGHPUT_ENV = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED")


# A request whose ingress replica dies before answering (its node lost) is sent again to
# another by HAProxy ("empty-response"), instead of HAProxy's text/plain 500. Safe for the
# platform's routes: predict is idempotent and feedback is stored per request id.
HAPROXY_RETRY_ON = "conn-failure empty-response"


def serve_env(high_throughput: bool) -> dict[str, str]:
    env = {k: "1" if high_throughput else "0" for k in HIGH_THROUGHPUT_ENV}
    if high_throughput:
        env["RAY_SERVE_HAPROXY_RETRY_ON"] = HAPROXY_RETRY_ON
    return env


def apply_serve_env(high_throughput: bool) -> None:
    """For a Ray this process starts. The YAML decides, over whatever the shell exported."""
    os.environ.update(serve_env(high_throughput))
    # An ingress replica that stops keeps answering for this long so that load balancers see
    # it go (Ray's default is 30 s, right for a cluster's). A local Ray's only balancer is
    # Serve's own HAProxy: Ctrl-C then returns in about 10 s instead of 40.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "5")
    if high_throughput:
        # HAProxy's own metrics and stats listeners default to fixed ports (9101, 8404) on
        # every interface: a second local Ray on this machine could not start its HAProxy.
        # Each local Ray takes free ones (a child process started from here gets its own).
        for key in ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT"):
            os.environ[key] = str(_free_port())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Session:
    started: bool  # this process started Ray (and its cluster dies with it)

    @property
    def dashboard_url(self) -> str | None:
        return ray_compat.dashboard_url()

    @property
    def metrics_url(self) -> str | None:
        port = ray_compat.metrics_export_port()
        return f"http://127.0.0.1:{port}/metrics" if port else None


@contextlib.contextmanager
def ray_session(ray_cfg: DictConfig) -> Iterator[Session]:
    if ray.is_initialized():  # a test session or a caller already runs Ray: share it
        yield Session(started=False)
        return
    # Workers import mlplatform from the installed package; keep their logs quiet.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs: dict = {"log_to_driver": True}
    # ray.address null: a driver that Ray started for a job (`ray job submit`, a KubeRay RayJob)
    # joins that job's cluster, which Ray names in RAY_ADDRESS; anywhere else a local Ray starts.
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS") or None
    started = not address
    high_throughput = bool(ray_cfg.serve_high_throughput)
    if address:
        log.info("joining Ray cluster at %s (Serve runs in the mode that cluster was started with; "
                 "high-throughput needs %s=1 in its environment)", address, "/".join(HIGH_THROUGHPUT_ENV))
        ray.init(address=address, **kwargs)
    else:
        log.info("starting a local Ray (num_cpus=%s, serve high-throughput=%s)", ray_cfg.num_cpus, high_throughput)
        apply_serve_env(high_throughput)
        try:
            ray_compat.init_local(ray_cfg.metrics_export_port, num_cpus=ray_cfg.num_cpus,
                                  include_dashboard=ray_cfg.include_dashboard, **kwargs)
        except ValueError as exc:
            if "existing cluster" not in str(exc):
                raise
            # `ray start` runs a cluster on this machine, and ray.init finds it by itself:
            # use it (its own resources apply) rather than fail.
            log.warning("a Ray cluster already runs on this machine (ray start): joining it; "
                        "its resources apply, not ray.num_cpus")
            ray.init(address="auto", **kwargs)
            started = False
    node_id = ray.get_runtime_context().get_node_id() if started and high_throughput else None
    try:
        yield Session(started=started)
    finally:
        ray.shutdown()
        if node_id:
            stop_haproxy_reloads(node_id)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_haproxy_reloads(node_id: str) -> list[int]:
    """Serve reloads HAProxy with `-sf <old pid>` on every change of routes; the new process
    leaves Ray's process tree, and a local Ray stops without it, so it would keep holding
    serve.port (the next `+mode=serve` could not bind it). Its files are under the node's id."""
    marker = f"/haproxy-serve/{node_id}/"
    pids = [int(e) for e in os.listdir("/proc") if e.isdigit() and marker in _cmdline(int(e))]
    _signal(pids, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    _signal([p for p in pids if _alive(p)], signal.SIGKILL)
    if pids:
        log.info("stopped %d HAProxy process(es) left by Serve's reloads", len(pids))
    return pids
