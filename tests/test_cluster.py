"""The platform on a real 3-node Ray cluster on this machine (mlplatform.localcluster): a head
with no CPUs and two worker nodes, each its own raylet, running the platform as installed from
its built wheel in a fresh virtualenv.

- `serve deploy` of the serve_config.yaml that `+mode=deploy` writes, with Ray's own CLI, from
  an empty working directory, as an operator runs it: requests are answered and Serve's status
  shows the replicas on the worker nodes, never on the head.
- Node loss under load: 2 model replicas and 2 ingress replicas spread one per worker node;
  closed-loop clients; one worker node's raylet and every process of it SIGKILLed. Counted:
  failed requests, every non-200 answer a contract error, time until Serve is back at its target,
  captured records lost against the writer's flush bound.

One cluster for the whole module. Nothing here runs in the pytest process's own Ray: every
driver is a subprocess given the cluster's address (and its auth token by environment)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from mlplatform.localcluster import LocalCluster

from .conftest import ROOT, ClosedLoop, wait_for
from .test_deploy import _base_layer

MODEL = "species-classifier"
APP = "species"
FLUSH_S = 0.5  # +experiment=smoke's monitor.capture.flush_interval_s

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _jpeg(size: int = 96) -> bytes:
    """A real photograph (skimage's cat), JPEG-encoded at a size the smoke model takes quickly."""
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).resize((size, size)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _wheel_venv(tmp: Path) -> str:
    """python -m build --wheel of a copy of the tree, a fresh venv whose base layer (Ray, torch)
    is the project's venv through a .pth (a base image's layer), docker/install.sh of the wheel
    into it: returns the venv's python."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "mlplatform", "conf", "docker", "constraints.txt"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(src / "dist"), str(src)],
                   check=True, capture_output=True, text=True)
    wheel, = (src / "dist").glob("mlplatform-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site, = venv.glob("lib/python3*/site-packages")
    (site / "base-image-layer.pth").write_text(f"{_base_layer(tmp)}\n")
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["sh", str(src / "docker" / "install.sh"), str(wheel)], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return str(venv / "bin" / "python")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The wheel installed in a fresh venv, a 3-node cluster running that venv, a model trained
    on the cluster (a job joining it with ray.address) and served with `serve deploy`."""
    tmp = tmp_path_factory.mktemp("cluster")
    t0 = time.monotonic()
    python = _wheel_venv(tmp)
    times = {"wheel_venv_s": time.monotonic() - t0}
    root, empty = tmp / "root", tmp / "cwd"
    empty.mkdir()
    t0 = time.monotonic()
    with LocalCluster(python=python, workers=2, worker_cpus=1) as c:
        times["cluster_start_s"] = time.monotonic() - t0
        env = {**os.environ, **c.client_env()}
        env.pop("PYTHONPATH", None)
        env.pop("RAY_ADDRESS", None)

        def platform(*args: str, timeout: float = 300) -> dict:
            proc = subprocess.run([python, "-m", "mlplatform", *args], cwd=empty, env=env, capture_output=True,
                                  text=True, timeout=timeout)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
            return json.loads(proc.stdout.strip().splitlines()[-1])

        t0 = time.monotonic()
        platform("+mode=train", "+experiment=smoke", f"paths.root={root}", "logger=none", f"ray.address={c.address}")
        times["train_s"] = time.monotonic() - t0
        yield {"cluster": c, "python": python, "env": env, "root": root, "empty": empty, "platform": platform,
               "tmp": tmp, "times": times}
    print(f"\ntest_cluster times: {json.dumps({k: round(v, 1) for k, v in times.items()})}")


def _deploy_overrides(s: dict, *extra: str) -> list[str]:
    c: LocalCluster = s["cluster"]
    return ["+mode=deploy", "+experiment=smoke", f"paths.root={s['root']}",
            # This machine's disk is the cluster's shared storage: the same paths on every node.
            f"deploy.storage.mount_path={s['root']}", f"deploy.out_dir={s['tmp'] / 'deploy'}",
            f"serve.port={c.serve_port}", "deploy.serve_host=127.0.0.1",  # a cluster on this machine only
            "serve.versions=[{ref: v1, role: stable, weight: 100}]",
            "serve.deployment.num_cpus=0.25", "serve.deployment.min_replicas=2", "serve.deployment.max_replicas=2",
            "serve.deployment.max_replicas_per_node=1",
            "serve.ingress.min_replicas=2", "serve.ingress.max_replicas=2", "serve.ingress.max_replicas_per_node=1",
            "monitor.enabled=false", *extra]


def _serve_cli(s: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Ray's own `serve` CLI, run by the venv's python from a directory with no source tree."""
    return subprocess.run([s["python"], "-m", "ray.serve.scripts", *args], cwd=s["empty"], env=s["env"],
                          capture_output=True, text=True, timeout=timeout)


def _replicas(c: LocalCluster) -> dict[str, list[dict]]:
    """Deployment name -> its RUNNING replicas as the dashboard's Serve API lists them."""
    return {name: [r for r in d.get("replicas", []) if r.get("state") == "RUNNING"]
            for app in _apps(c).values() for name, d in app.get("deployments", {}).items()}


def _apps(c: LocalCluster) -> dict[str, dict]:
    """The ingress application and each version's application beside it."""
    apps = c.get("/api/serve/applications/")["applications"]
    return {n: a for n, a in apps.items() if n == APP or n.startswith(f"{APP}-")}


def _app_running(c: LocalCluster) -> bool:
    try:
        apps = _apps(c)
        return len(apps) > 1 and all(a["status"] == "RUNNING" for a in apps.values())
    except (OSError, ValueError, KeyError):
        return False


@pytest.fixture(scope="module")
def deployed(cluster):
    s = cluster
    c: LocalCluster = s["cluster"]
    t0 = time.monotonic()
    out = s["platform"](*_deploy_overrides(s))
    config = Path(out["serve_config"])
    # serve deploy reads the file it is given; the operator's working directory holds nothing else.
    shutil.copy(config, s["empty"] / "serve_config.yaml")
    proc = _serve_cli(s, "deploy", "serve_config.yaml", "--address", c.dashboard_url)
    (s["empty"] / "serve_config.yaml").unlink()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    wait_for(lambda: _app_running(c), timeout=180, interval=1,
             message=lambda: _serve_cli(s, "status", "--address", c.dashboard_url).stdout[-2000:])
    s["times"]["serve_deploy_s"] = time.monotonic() - t0
    return s


def _post(url: str, data: bytes, session=requests) -> requests.Response:
    return session.post(f"{url}/predict", data=data, headers={"content-type": "image/jpeg"}, timeout=30)


def _assert_contract_answer(r: requests.Response) -> None:
    """A 200 with the prediction body, or an error with the contract's JSON body."""
    assert r.headers.get("content-type", "").startswith("application/json"), (r.status_code, r.text[:300])
    body = r.json()
    if r.status_code == 200:
        assert body["version"] == "v1" and body["predictions"] and body["request_id"], body
    else:
        assert set(body) == {"error", "request_id"} and body["error"]["code"], (r.status_code, body)


def test_serve_deploy_from_the_wheel_serves_on_the_worker_nodes(deployed) -> None:
    c: LocalCluster = deployed["cluster"]
    data = _jpeg()
    for _ in range(5):
        r = _post(c.serve_url, data)
        assert r.status_code == 200, r.text[:500]
        _assert_contract_answer(r)
    top = r.json()["predictions"][0]
    assert set(top) >= {"label", "score"} and 0 <= top["score"] <= 1
    status = _serve_cli(deployed, "status", "--address", c.dashboard_url)
    assert status.returncode == 0 and "RUNNING" in status.stdout, status.stdout + status.stderr
    ids = c.node_ids()
    workers = {ids["worker-1"], ids["worker-2"]}
    replicas = _replicas(c)
    for name in ("Ingress", "model-v1"):
        nodes = [r["node_id"] for r in replicas[name]]
        # max_replicas_per_node: 1 spreads the two over both workers; the head has no CPU.
        assert sorted(nodes) == sorted(workers), (name, nodes, ids)
    # The replicas run the installed wheel, not this checkout.
    proc = subprocess.run([deployed["python"], "-c", "import mlplatform; print(mlplatform.__file__)"],
                          cwd=deployed["empty"], capture_output=True, text=True, check=True)
    assert "/venv/lib/" in proc.stdout and str(ROOT / "mlplatform") not in proc.stdout


class Load(ClosedLoop):
    """Closed-loop clients on /predict; each answer kept as (t_sent, t_done, status, body)."""

    def __init__(self, url: str, clients: int) -> None:
        super().__init__(clients)
        self.url, self.data = url, _jpeg()

    def request(self, session, t0: float) -> tuple[float, float, int, dict]:
        r = _post(self.url, self.data, session)
        try:
            _assert_contract_answer(r)
            body = r.json()
        except (AssertionError, ValueError) as exc:
            body = {"unstructured": r.text[:200], "why": str(exc)[:200]}
        return t0, time.time(), r.status_code, body

    def failed(self, exc: Exception, t0: float) -> tuple[float, float, int, dict]:
        return t0, time.time(), 0, {"exception": repr(exc)[:300]}


def _captured_ids(root: Path) -> set[str]:
    from mlplatform.capture.store import CaptureStore

    table = CaptureStore(str(root / "capture")).predictions(columns=["request_id"])
    return set(table.column("request_id").to_pylist())


def test_node_loss_under_load(deployed) -> None:
    c: LocalCluster = deployed["cluster"]
    wait_for(lambda: all(len(v) == 2 for v in _replicas(c).values()), timeout=60)
    victim = 1
    with Load(c.serve_url, clients=8) as load:
        wait_for(lambda: len(load.results) >= 50, timeout=60)
        t_kill = time.time()
        killed = c.kill_worker(victim)
        # Back at target: 2 running replicas of each deployment. The lost node's replicas come
        # back on a replacement node (this machine has no room for two on one worker node).
        time.sleep(2)
        c.add_worker()
        wait_for(lambda: all(len(v) == 2 for v in _replicas(c).values()), timeout=180, interval=0.5)
        t_back = time.time()
        time.sleep(3)  # load on the recovered cluster
    results = load.results
    codes = Counter(status for _, _, status, _ in results)
    failed = [r for r in results if r[2] != 200]
    # Lost with the node, no contract answer possible (docs/cluster.md, Node loss): a request in
    # flight on the killed node's ingress replica that HAProxy could not resend, answered by
    # its own text/plain 500 or by a closed connection.
    lost_with_node = [r for r in failed if "exception" in r[3]
                      or (r[2] == 500 and r[3].get("unstructured") == "Internal Server Error")]
    print(f"\nnode loss: {len(results)} requests, codes {dict(codes)}, {len(killed)} processes killed, "
          f"back at target after {t_back - t_kill:.1f} s; failed: "
          f"{[(round(t0 - t_kill, 2), s, b) for t0, _, s, b in failed][:12]}")
    assert len(results) > 100 and codes[200] > 0
    # Every other answer is the model's, or a contract error: never an unstructured one.
    assert not [r for r in failed if "unstructured" in r[3] and r not in lost_with_node], failed[:5]
    # With 2 replicas of each: the ingress retries a batch whose model replica died, and HAProxy
    # a request whose ingress replica died before answering (RAY_SERVE_HAPROXY_RETRY_ON):
    # 0 of 4,975 failed when run alone. In full-suite runs on 2 loaded cores, HAProxy's resend
    # did not always save them: 1 to 4 requests were lost with the node. At most the requests
    # one of the 2 ingress replicas holds from 8 closed-loop clients (4), sent within 2 s of
    # the kill, and nothing else.
    at_kill = [r for r in lost_with_node if abs(r[0] - t_kill) < 2]
    assert len(at_kill) <= 8 // 2 and len(failed) == len(at_kill), failed[:5]

    # Captured records: a killed ingress loses at most what it had not flushed, the records of
    # answers sent within one flush interval before the kill.
    time.sleep(FLUSH_S * 3)
    captured = _captured_ids(deployed["root"])
    answered = [(t1, b["request_id"]) for _, t1, s, b in results if s == 200]
    lost = [(round(t1 - t_kill, 2), rid) for t1, rid in answered if rid not in captured]
    # An answer received after the kill came from the live ingress, except those the dead one
    # sent just before it (in the network's buffers): 0.5 s of slack either side.
    beyond = [(dt, rid) for dt, rid in lost if not -(FLUSH_S + 0.5) <= dt <= 0.5]
    print(f"captured: {len(answered) - len(lost)} of {len(answered)} answered, lost {len(lost)}, "
          f"beyond the flush bound {len(beyond)}")
    assert not beyond, beyond[:10]
