"""Health that tells the truth: readiness from the replicas' live state, fast 503s while a
version has no replica, a batch whose replica died retried once, and the OIP error body.

Real Ray and Serve: replicas are killed with ray.kill (what a kill -9 or a lost node does to
them) while clients send requests in a closed loop."""

from __future__ import annotations

import io
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from mlplatform.data import synthetic
from mlplatform.registry.store import Registry

from .conftest import SERVE_PORT, ClosedLoop, compose, wait_for

PORT = SERVE_PORT
URL = f"http://127.0.0.1:{PORT}"
MODEL = "species-classifier"
APP = "health-test"

pytestmark = pytest.mark.ray


def _deploy(root: Path, replicas: int) -> None:
    from mlplatform.deployments.serve_mode import deploy

    deploy(compose("+mode=serve", "+experiment=smoke", f"paths.root={root}", f"serve.port={PORT}",
                   f"serve.app_name={APP}", "serve.deployment.num_cpus=0.25",
                   f"serve.deployment.min_replicas={replicas}", f"serve.deployment.max_replicas={replicas}",
                   "serve.versions=[{ref: v1, role: stable, weight: 100}]", "monitor.enabled=false"))


def _details(status: str, trigger: str, *states: str, min_replicas: int = 1) -> dict:
    return {"status": status, "status_trigger": trigger,
            "deployment_config": {"autoscaling_config": {"min_replicas": min_replicas}},
            "replicas": [{"state": s, "actor_name": f"r{i}"} for i, s in enumerate(states)]}


def test_a_version_is_down_only_when_it_lost_replicas_it_must_keep() -> None:
    from mlplatform.deployments.health import tally

    alive = {"r0", "r1"}
    counts, kept, updating = tally({"v1": _details("HEALTHY", "CONFIG_UPDATE_COMPLETED", "RUNNING")}, alive, set())
    assert counts == {"v1": 1} and kept == {"v1"} and not updating
    # A redeploy (new user_config, or replicas replaced): none RUNNING for a moment, on purpose.
    counts, kept, updating = tally({"v1": _details("UPDATING", "CONFIG_UPDATE_STARTED", "UPDATING")}, alive, kept)
    assert counts == {"v1": 0} and kept == {"v1"} and updating == {"v1"}
    # Its replica killed: RUNNING in the controller's eyes, gone from the GCS.
    counts, kept, updating = tally({"v1": _details("HEALTHY", "CONFIG_UPDATE_COMPLETED", "RUNNING")}, set(), kept)
    assert counts == {"v1": 0} and kept == {"v1"} and not updating
    counts, kept, updating = tally({"v1": _details("UNHEALTHY", "HEALTH_CHECK_FAILED", "STARTING")}, alive, kept)
    assert counts == {"v1": 0} and kept == {"v1"} and not updating
    # Never seen live, or scaled to zero on purpose: not kept up.
    assert tally({"v2": _details("UPDATING", "CONFIG_UPDATE_STARTED", "STARTING")}, alive, set())[1] == set()
    assert tally({"v1": _details("HEALTHY", "AUTOSCALING", min_replicas=0)}, alive, {"v1"})[1] == set()


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    from mlplatform.deployments.serve_mode import undeploy
    from mlplatform.training.job import run_train

    root = tmp_path_factory.mktemp("health")
    run_train(compose("+mode=train", "+experiment=smoke", f"paths.root={root}", "logger=none"))
    assert Registry(str(root / "registry"), MODEL).get("v1")
    _deploy(root, 2)
    wait_for(lambda: requests.get(URL + "/v2/health/ready", timeout=5).status_code == 200, timeout=60)
    yield root
    undeploy(APP)


def _jpeg() -> bytes:
    buf = io.BytesIO()
    synthetic.render(3, 0, 48).save(buf, format="JPEG")
    return buf.getvalue()


def _replicas() -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{APP}-v1#model-v1#")]  # v1 is an application of its own


def _kill(names: list[str]) -> None:
    import ray

    for name in names:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def _ready() -> tuple[int, int]:
    return (requests.get(URL + "/v2/health/ready", timeout=5).status_code,
            requests.get(f"{URL}/v2/models/{MODEL}/ready", timeout=5).status_code)


def _running() -> set[str]:
    """Replicas of v1 the controller has RUNNING: a replacement is a named actor while it is
    still STARTING, and killing the only RUNNING one then leaves v1 down, rightly."""
    from mlplatform import ray_compat

    return {r["actor_name"] for r in ray_compat.serve_replicas(f"{APP}-v1").get("model-v1", [])
            if r.get("state") == "RUNNING"}


def _wait_replicas(n: int) -> None:
    wait_for(lambda: len(_replicas()) == n and len(_running() & set(_replicas())) == n
             and _ready() == (200, 200), timeout=120, interval=0.5)


class Load(ClosedLoop):
    """Clients in a closed loop on /predict, each result kept as (status, seconds, body)."""

    def __init__(self, clients: int) -> None:
        super().__init__(clients)
        self.data = _jpeg()

    def request(self, session, t0: float) -> tuple[int, float, dict]:
        r = session.post(URL + "/predict", data=self.data, headers={"content-type": "image/jpeg"}, timeout=30)
        return r.status_code, time.time() - t0, r.json()

    def failed(self, exc: Exception, t0: float) -> tuple[int, float, dict]:
        return 0, time.time() - t0, {"exception": repr(exc)}


def _gauge() -> set[float]:
    """mlp_version_healthy_replicas{version="v1"} of this app on Ray's metrics endpoint."""
    from mlplatform import ray_compat

    text = requests.get(f"http://127.0.0.1:{ray_compat.metrics_export_port()}/metrics", timeout=10).text
    return {float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("ray_mlp_version_healthy_replicas{") and 'version="v1"' in line
            and f'application="{APP}"' in line}


EXPORT_S = 10  # Ray's metrics report period


def test_ready_follows_the_replicas_and_the_gauge_counts_them(served) -> None:
    _wait_replicas(2)
    assert _ready() == (200, 200)
    wait_for(lambda: _gauge() == {2.0}, timeout=60, interval=1)
    _kill(_replicas())
    t0 = time.monotonic()
    wait_for(lambda: _ready() == (503, 503), timeout=10, interval=0.1)
    assert time.monotonic() - t0 < 5  # not the controller's 10 s health-check period
    body = requests.get(URL + "/v2/health/ready", timeout=5).json()
    assert body == {"ready": False}
    # The gauge reaches the metrics endpoint once per export period (Ray's 10 s): an outage
    # that outlasts it must show there (0, or 1 once one replica is back); a shorter one may not.
    dropped, back_at, deadline = False, None, time.monotonic() + 30
    while not dropped and time.monotonic() < deadline:
        dropped = min(_gauge(), default=2.0) < 2.0
        if back_at is None and len(_replicas()) == 2 and _ready() == (200, 200):
            back_at = time.monotonic()
        time.sleep(0.5)
    assert dropped or (back_at is not None and back_at - t0 < EXPORT_S + 2), (_gauge(), back_at and back_at - t0)
    # While there is none, a request is refused at once, on each API in its own error body.
    t0 = time.perf_counter()
    r = requests.post(URL + "/predict", data=_jpeg(), headers={"content-type": "image/jpeg"}, timeout=30)
    if r.status_code == 503:  # not yet replaced
        assert time.perf_counter() - t0 < 2 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "unavailable" and "v1" in r.json()["error"]["message"]
    else:
        assert r.status_code == 200, r.text
    _wait_replicas(2)  # Serve replaced both: ready again


def test_oip_errors_use_the_protocols_body(served) -> None:
    r = requests.post(f"{URL}/v2/models/{MODEL}/infer", data=b"{bad", timeout=10)
    assert r.status_code == 400 and set(r.json()) == {"error"} and isinstance(r.json()["error"], str)
    assert r.headers["x-request-id"]
    r = requests.get(f"{URL}/v2/models/nope/ready", timeout=10)
    assert r.status_code == 404 and r.json() == {"error": "model 'nope' is not served; try 'species-classifier'"}
    rest = requests.post(URL + "/predict", data=b"not an image", headers={"content-type": "image/jpeg"}, timeout=10)
    assert rest.status_code == 400 and set(rest.json()) == {"error", "request_id"}
    assert set(rest.json()["error"]) == {"code", "message"}


def _retried_batches() -> int:
    """batch_retried lines in the ingress's JSON logs (deployments/logs.py)."""
    import glob
    import json

    from mlplatform import ray_compat

    return sum(json.loads(line).get("event") == "batch_retried"
               for path in glob.glob(f"{ray_compat.logs_dir()}/serve/requests_Ingress_*.jsonl")
               for line in Path(path).read_text().splitlines())


def test_killing_one_of_two_replicas_fails_no_request(served) -> None:
    _wait_replicas(2)
    retried = _retried_batches()
    with Load(clients=8) as load:
        wait_for(lambda: len(load.results) >= 20, timeout=60)
        _kill(_replicas()[:1])  # 8 clients keep both replicas busy: batches die with it
        before = len(load.results)
        wait_for(lambda: len(load.results) >= before + 100, timeout=120)
    statuses = Counter(s for s, _, _ in load.results)
    assert set(statuses) == {200}, (statuses, [b for s, _, b in load.results if s != 200][:3])
    print(f"batches retried: {_retried_batches() - retried}")  # whether one was in flight there is luck


def test_a_batch_whose_replica_dies_is_retried_once_on_a_live_one(ray_cluster, tmp_path: Path) -> None:
    """Deterministic, unlike a kill from outside: the replica that gets the batch exits
    (os._exit, like a kill -9) and the batcher's one retry reaches the other replica. It dies
    a moment after starting the call: a replica that dies before the router has its
    acceptance is retried by Serve's router itself, which is not what is tested here."""
    import asyncio
    import os

    import numpy as np
    from ray import serve

    from mlplatform.deployments.batcher import VersionBatcher

    @serve.deployment(num_replicas=2, max_ongoing_requests=8, ray_actor_options={"num_cpus": 0})
    class DiesOnce:
        def __init__(self, marker: str) -> None:
            self.marker = marker

        async def predict(self, call: tuple) -> dict:
            images, ks, _ = call
            if not os.path.exists(self.marker):
                Path(self.marker).write_text(str(os.getpid()))
                await asyncio.sleep(0.5)
                os._exit(1)
            ids = [int(x) for x in images[:, 0, 0, 0]]
            return {"labels": [[str(i)] for i in ids], "scores": [[1.0]] * len(ids),
                    "probabilities": images[:, 0, 0, :].astype(np.float32),
                    "embedding": images[:, 0, :, 0].astype(np.float32), "batch_sizes": [len(ids)] * len(ids)}

    marker = tmp_path / "died"
    serve.run(DiesOnce.bind(str(marker)), name="retry-test", route_prefix=None)
    lost: list[int] = []

    async def main() -> None:
        batcher = VersionBatcher(serve.get_deployment_handle("DiesOnce", "retry-test"), 4, 0.0,
                                 on_replica_lost=lambda: lost.append(1))
        answer = await asyncio.wait_for(batcher.submit(np.full((8, 8, 3), 7, np.uint8), 1), timeout=60)
        assert answer["labels"] == ["7"]

    try:
        asyncio.run(main())
    finally:
        serve.delete("retry-test")
    assert marker.exists() and lost == [1]  # one replica died with the batch, retried once


def test_killing_the_only_replica_gives_fast_503s_only(served) -> None:
    _deploy(served, 1)
    _wait_replicas(1)
    with Load(clients=8) as load:
        wait_for(lambda: len(load.results) >= 20, timeout=60)
        _kill(_replicas())
        wait_for(lambda: any(s == 503 for s, _, _ in load.results), timeout=30)
        wait_for(lambda: len(_replicas()) == 1 and _ready() == (200, 200), timeout=120, interval=0.5)
        after = len(load.results)
        wait_for(lambda: len(load.results) >= after + 20, timeout=60)  # serving again
    statuses = Counter(s for s, _, _ in load.results)
    assert set(statuses) <= {200, 503}, (statuses, [b for s, _, b in load.results if s not in (200, 503)][:3])
    refused = [(t, b) for s, t, b in load.results if s == 503]
    assert all(b["error"]["code"] == "unavailable" for _, b in refused), refused[:3]
    assert max(t for t, _ in refused) < 2.5, sorted(t for t, _ in refused)[-5:]
    assert [s for s, _, _ in load.results[-10:]] == [200] * 10
