"""A multi-node Ray cluster on one machine: a head with no CPUs (as the RayService's head has)
and N worker nodes, each its own raylet started by `ray start`, with its own ports, temp dir
and a custom resource naming it ({"worker-1": 1}).

For tests, benchmarks and users who want to try a cluster without Kubernetes:

    python -m mlplatform.localcluster up [--workers 2] [--worker-cpus 1] [--python PY]
    python -m mlplatform.localcluster status
    python -m mlplatform.localcluster down

Jobs join it with `ray.address=<address>`; `serve deploy --address <dashboard_url>` deploys
onto it. Each node runs as one `ray start --block` process (its own session, so the cluster
outlives the shell that started it): that process is the parent of the node's raylet, agents
and workers, so a node is found, stopped or killed as one process tree, never by name.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlplatform.raycluster import _alive, _cmdline, _signal, serve_env

# The object store a node reserves in /dev/shm. Ray's default (30 % of memory per node) would
# reserve most of a small machine three times over; the platform's objects are small.
DEFAULT_OBJECT_STORE_BYTES = 256 * 1024 * 1024
START_TIMEOUT_S = 90.0
# A worker node's CPUs: one each keeps a 3-node cluster inside a 2-core machine (the Kubernetes
# worker group's size is deploy.worker_cpus, a different thing).
WORKER_CPUS = 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _free_ports(n: int) -> list[int]:
    """n distinct free ports (held open together, so no two are the same)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Node:
    name: str  # "head", "worker-1", ...
    pid: int  # the node's `ray start --block` process: the root of its process tree
    temp_dir: str
    ports: dict[str, int]
    cpus: int
    resources: dict[str, float] = field(default_factory=dict)
    node_id: str = ""  # Ray's, once the node is alive


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: the ppid follows the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def node_pids(node: Node) -> list[int]:
    """Every live process of a node: the tree under its `ray start` process, and any process
    whose command line names the node's temp dir (one that left the tree: Ray daemonises none
    today, but a kill that missed one would leave a node half alive)."""
    children = _children_map()
    found: list[int] = []
    stack = [node.pid] if _alive(node.pid) else []
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found.append(pid)
        stack.extend(children.get(pid, []))
    # Serve's HAProxy reloads (`-sf <old pid>`) leave the tree; their files are under the node's id.
    markers = [node.temp_dir.rstrip("/") + "/", *([f"/{node.node_id}/"] if node.node_id else [])]
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in found and int(entry) != os.getpid():
            cmd = _cmdline(int(entry))
            if any(m in cmd for m in markers):
                found.append(int(entry))
    return [p for p in found if _alive(p)]


def _get_json(url: str, token: str | None, timeout: float = 5.0):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
        return json.loads(resp.read())


class LocalCluster:
    """Start with .start() (or `with LocalCluster(...) as c:`); .address is the GCS address for
    ray.init / `ray.address=`, .dashboard_url is what `serve deploy --address` takes."""

    def __init__(self, python: str = sys.executable, workers: int = 2, worker_cpus: int = WORKER_CPUS,
                 high_throughput: bool = True, object_store_bytes: int = DEFAULT_OBJECT_STORE_BYTES,
                 base_dir: str | None = None, env: dict[str, str] | None = None,
                 serve_port: int | None = None, auth: bool = True) -> None:
        if workers < 0:
            raise ValueError(f"workers={workers}: must be 0 or more")
        if worker_cpus < 1:
            raise ValueError(f"worker_cpus={worker_cpus}: a worker node needs at least 1 CPU")
        self.python = python
        self.workers = workers
        self.worker_cpus = worker_cpus
        self.high_throughput = high_throughput
        self.object_store_bytes = object_store_bytes
        self.extra_env = dict(env or {})
        # Serve's HTTP port on the head (what serve_config.yaml's http_options.port must say to
        # be reachable here); worker nodes' proxies each bind a free port of their own.
        self.serve_port = serve_port or _free_port()
        self.base_dir = base_dir
        # Ray's token authentication, as a production cluster runs it: a token of this
        # cluster's own (so what ~/.ray holds, or whether it exists, changes nothing); clients
        # get it from client_env() or send it as `Authorization: Bearer <token>`.
        self.auth = auth
        self.token: str | None = None
        self.head: Node | None = None
        self.worker_nodes: dict[int, Node] = {}  # index (1-based) -> node; killed ones are removed
        self._next_index = 1
        self._owns_base = False
        self._procs: dict[int, subprocess.Popen] = {}  # the nodes this process started (to reap)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> LocalCluster:
        if self.head is not None:
            raise RuntimeError("this LocalCluster is already started")
        if self.base_dir is None:
            # Short: Ray's unix sockets live under it and their paths are limited to 107 chars.
            self.base_dir = tempfile.mkdtemp(prefix="mlpc-", dir="/tmp")
            self._owns_base = True
        Path(self.base_dir).mkdir(parents=True, exist_ok=True)
        if self.auth:
            self.token = secrets.token_hex(32)
            token_path = self._token_path()
            token_path.touch(mode=0o600)
            token_path.write_text(self.token)
        try:
            self._start_head()
            for _ in range(self.workers):
                self.add_worker(wait=False)
            self.wait_for_nodes()
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def address(self) -> str:
        assert self.head is not None, "not started"
        return f"127.0.0.1:{self.head.ports['gcs']}"

    @property
    def dashboard_url(self) -> str:
        assert self.head is not None, "not started"
        return f"http://127.0.0.1:{self.head.ports['dashboard']}"

    @property
    def serve_url(self) -> str:
        return f"http://127.0.0.1:{self.serve_port}"

    def _token_path(self) -> Path:
        assert self.base_dir is not None
        return Path(self.base_dir, "auth_token")

    def client_env(self) -> dict[str, str]:
        """What a process needs in its environment to use this cluster (ray.init, the `ray` and
        `serve` CLIs, `ray job submit`), besides the address."""
        if not self.auth:
            return {"RAY_AUTH_MODE": "disabled"}
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self._token_path())}

    def get(self, path: str, timeout: float = 10.0):
        """GET <dashboard_url><path> as JSON (authenticated)."""
        return _get_json(f"{self.dashboard_url}{path}", self.token, timeout=timeout)

    def _env(self, node_name: str, ports: dict[str, int]) -> dict[str, str]:
        env = dict(os.environ)
        # This cluster is found by its address only, never by what the caller's shell points at.
        for key in ("RAY_ADDRESS", "PYTHONPATH", "RAY_AUTH_TOKEN"):
            env.pop(key, None)
        env.update(self.client_env())
        env.update(serve_env(self.high_throughput))
        # Every node's HAProxy would bind the same default stats and metrics ports (and a second
        # HAProxy on this machine could not start); each node gets free ones.
        env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(ports["haproxy_metrics"])
        env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(ports["haproxy_stats"])
        if node_name != "head":
            # Each node runs a Serve proxy on http_options.port; on one machine only the head's
            # may: a worker's binds a port of its own (Serve's override for co-located proxies).
            env["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] = str(ports["serve_http"])
            env["RAY_SERVE_WORKER_PROXY_GRPC_PORT"] = str(ports["serve_grpc"])
        bindir = os.path.dirname(self.python)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env.update(self.extra_env)
        return env

    def _launch(self, name: str, cpus: int, resources: dict[str, float], head: bool) -> Node:
        assert self.base_dir is not None
        temp_dir = os.path.join(self.base_dir, name.replace("worker-", "w"))
        Path(temp_dir).mkdir(parents=True, exist_ok=True)
        keys = ["node_manager", "object_manager", "metrics", "agent_listen", "agent_grpc", "runtime_env_agent",
                "haproxy_metrics", "haproxy_stats"]
        keys += ["gcs", "dashboard", "client"] if head else ["serve_http", "serve_grpc"]
        ports = dict(zip(keys, _free_ports(len(keys)), strict=True))
        cmd = [self.python, "-m", "ray.scripts.scripts", "start", "--block",
               "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", f"--num-cpus={cpus}", "--num-gpus=0",
               f"--resources={json.dumps(resources)}", f"--object-store-memory={self.object_store_bytes}",
               f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}",
               f"--metrics-export-port={ports['metrics']}",
               f"--dashboard-agent-listen-port={ports['agent_listen']}",
               f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
               f"--runtime-env-agent-port={ports['runtime_env_agent']}", "--disable-usage-stats"]
        if head:
            ports["serve_http"] = self.serve_port
            cmd += ["--head", f"--port={ports['gcs']}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={ports['dashboard']}", f"--ray-client-server-port={ports['client']}"]
        else:
            cmd += [f"--address={self.address}"]
        log = open(os.path.join(temp_dir, "ray-start.log"), "ab")  # noqa: SIM115 - the child keeps it
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self._env(name, ports), cwd=temp_dir, start_new_session=True)
        finally:
            log.close()
        node = Node(name=name, pid=proc.pid, temp_dir=temp_dir, ports=ports, cpus=cpus, resources=resources)
        self._procs[proc.pid] = proc
        return node

    def _start_head(self) -> None:
        self.head = self._launch("head", 0, {"head": 1}, head=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        # `ray start` writes the address file once the head is up; the dashboard follows.
        address_file = os.path.join(self.head.temp_dir, "ray_current_cluster")
        while not os.path.exists(address_file) or not self._dashboard_up():
            self._check_running(self.head)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the head did not start within {START_TIMEOUT_S:g} s: {self._log_tail(self.head)}")
            time.sleep(0.25)

    def _dashboard_up(self) -> bool:
        try:
            self.get("/api/version", timeout=2)
            return True
        except (OSError, ValueError):
            return False

    def _check_running(self, node: Node) -> None:
        proc = self._procs.get(node.pid)
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{node.name} exited ({proc.returncode}): {self._log_tail(node)}")

    @staticmethod
    def _log_tail(node: Node, lines: int = 15) -> str:
        try:
            text = Path(node.temp_dir, "ray-start.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:])

    def add_worker(self, cpus: int | None = None, wait: bool = True) -> int:
        """Start one more worker node; returns its index (its resource is worker-<index>)."""
        index = self._next_index
        self._next_index += 1
        name = f"worker-{index}"
        node = self._launch(name, cpus or self.worker_cpus, {name: 1}, head=False)
        self.worker_nodes[index] = node
        if wait:
            self.wait_for_nodes()
        return index

    def running_replicas(self, app: str) -> dict[str, int]:
        """Deployment -> RUNNING replicas of application `app` and of each version's application
        beside it (`<app>-<version>`), from the dashboard's Serve REST API; {} while it has none."""
        try:
            apps = self.get("/api/serve/applications/")["applications"]
        except (OSError, ValueError, KeyError):
            return {}
        return {name: sum(r.get("state") == "RUNNING" for r in d.get("replicas", []))
                for app_name, a in apps.items() if app_name == app or app_name.startswith(f"{app}-")
                for name, d in a.get("deployments", {}).items()}

    def nodes(self) -> list[dict]:
        """The cluster's nodes as its dashboard lists them (state API), alive and dead."""
        body = self.get("/api/v0/nodes?limit=1000&detail=true")
        return body["data"]["result"]["result"]

    def node_ids(self) -> dict[str, str]:
        """Node name (head, worker-<i>) -> Ray node id, for the nodes alive now."""
        out = {}
        for n in self.nodes():
            if n.get("state") != "ALIVE":
                continue
            names = [r for r in (n.get("resources_total") or {}) if r == "head" or r.startswith("worker-")]
            if names:
                out[names[0]] = n["node_id"]
        return out

    def wait_for_nodes(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until every node this object started and has not killed is alive in the cluster."""
        expected = {"head", *(f"worker-{i}" for i in self.worker_nodes)}
        deadline = time.monotonic() + timeout
        while True:
            for node in [self.head, *self.worker_nodes.values()]:
                assert node is not None
                self._check_running(node)
            try:
                ids = self.node_ids()
                if expected <= set(ids):
                    for node in [self.head, *self.worker_nodes.values()]:
                        assert node is not None
                        node.node_id = ids[node.name]
                    return
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes {sorted(expected)} not all alive within {timeout:g} s")
            time.sleep(0.5)

    def worker_pids(self, index: int) -> list[int]:
        return node_pids(self.worker_nodes[index])

    def kill_worker(self, index: int) -> list[int]:
        """SIGKILL every process of worker node <index> at once (its raylet, agents, workers and
        the replicas and HAProxy they run), as a machine that dies would; returns the pids."""
        node = self.worker_nodes.pop(index)
        pids = node_pids(node)
        # The `ray start --block` parent first would otherwise see its raylet die and stop the
        # rest gracefully; SIGSTOP all, then SIGKILL all, so none reacts to another's death.
        _signal(pids, signal.SIGSTOP)
        _signal(pids, signal.SIGKILL)
        self._reap(node)
        return pids

    def _reap(self, node: Node, timeout: float = 10.0) -> None:
        proc = self._procs.pop(node.pid, None)
        if proc is not None:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass

    def stop(self, timeout: float = 15.0) -> None:
        """Stop this cluster's processes only (workers first, then the head), by process tree."""
        nodes = [*self.worker_nodes.values(), *([self.head] if self.head else [])]
        trees = {n.name: node_pids(n) for n in nodes}
        for node in nodes:
            _signal([node.pid], signal.SIGTERM)  # `ray start --block` stops its node's processes
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive(p) for pids in trees.values() for p in pids):
            time.sleep(0.2)
        for pids in trees.values():
            _signal([p for p in pids if _alive(p)], signal.SIGKILL)
        for node in nodes:
            _signal(node_pids(node), signal.SIGKILL)  # anything started during the shutdown
            self._reap(node, timeout=2)
        self.worker_nodes.clear()
        self.head = None
        if self._owns_base and self.base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    # -- state for the CLI -------------------------------------------------------------------

    def state(self) -> dict:
        assert self.head is not None
        return {"address": self.address, "dashboard_url": self.dashboard_url, "serve_url": self.serve_url,
                "python": self.python, "base_dir": self.base_dir, "owns_base": self._owns_base,
                "serve_port": self.serve_port, "auth": self.auth, "token": self.token, "head": asdict(self.head),
                "workers": {str(i): asdict(n) for i, n in self.worker_nodes.items()}}

    @classmethod
    def from_state(cls, state: dict) -> LocalCluster:
        c = cls(python=state["python"], workers=0, base_dir=state["base_dir"], serve_port=state["serve_port"],
                auth=state["auth"])
        c.token = state["token"]
        c.head = Node(**state["head"])
        c.worker_nodes = {int(i): Node(**n) for i, n in state["workers"].items()}
        c._next_index = max(c.worker_nodes, default=0) + 1
        c._owns_base = state["owns_base"]
        return c


def _default_state_path() -> str:
    from mlplatform.cli_check import compose_defaults

    root = str(compose_defaults().paths.root)
    if "://" in root:
        raise SystemExit(f"error: paths.root={root}: the cluster's state file needs a local path; pass --state")
    return os.path.join(root, "localcluster.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlplatform.localcluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--state", help="the cluster's state file (default: <paths.root>/localcluster.json)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-cpus", type=int, default=WORKER_CPUS)
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs `ray start`")
    parser.add_argument("--serve-port", type=int, default=8000, help="Serve's HTTP port on the head")
    args = parser.parse_args(argv)
    state_path = Path(args.state or _default_state_path())

    existing = json.loads(state_path.read_text()) if state_path.exists() else None
    if args.command == "up":
        if existing and _alive(existing["head"]["pid"]):
            print(f"error: a cluster from {state_path} is running (address {existing['address']}): "
                  "`down` it first", file=sys.stderr)
            return 1
        cluster = LocalCluster(python=args.python, workers=args.workers, worker_cpus=args.worker_cpus,
                               serve_port=args.serve_port).start()
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps(cluster.state(), indent=1))
        print(json.dumps({"address": cluster.address, "dashboard_url": cluster.dashboard_url,
                          "serve_url": cluster.serve_url, "state": str(state_path)}))
        return 0
    if existing is None:
        print(f"no cluster: {state_path} does not exist", file=sys.stderr)
        return 1
    cluster = LocalCluster.from_state(existing)
    if args.command == "down":
        cluster.stop()
        state_path.unlink()
        print(json.dumps({"stopped": existing["address"]}))
        return 0
    up = _alive(existing["head"]["pid"])
    status = {"address": existing["address"], "dashboard_url": existing["dashboard_url"],
              "serve_url": existing["serve_url"], "head": "alive" if up else "dead"}
    if up:
        try:
            status["nodes"] = cluster.node_ids()
        except (OSError, ValueError, KeyError) as exc:
            status["nodes"] = f"unreadable: {exc}"
    print(json.dumps(status))
    return 0 if up else 1


if __name__ == "__main__":
    sys.exit(main())
