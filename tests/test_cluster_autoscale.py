"""Autoscaling, exercised on a real 3-node cluster on this machine (mlplatform.localcluster: a
head with no CPUs and two 1-CPU worker nodes).

A version served with `min_replicas: 1, max_replicas: 3`, a low `target_ongoing_requests` and
short delays, all from the serve YAML's per-version `deployment` overrides, and an ingress
autoscaled by `serve.ingress`: under closed-loop load of real photographs both grow, never past
their maximum; after the load stops both shrink back to 1, and not before the downscale delay.

The cluster is driven by a subprocess (`+mode=serve ray.address=<cluster> serve.block=false`),
as an operator applies the YAML to a running cluster; the pytest process joins no Ray."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections import Counter

import pytest

from mlplatform.localcluster import LocalCluster

from .conftest import ROOT, ClosedLoop, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]

APP = "species"
CLIENTS = 16
MAX_REPLICAS = 3
DOWNSCALE_DELAY_S = 6
# Fast reporting and a short averaging window: scaling decisions within seconds, not Serve's 10-30 s.
AUTOSCALING = (f"min_replicas: 1, max_replicas: {MAX_REPLICAS}, target_ongoing_requests: 1, upscale_delay_s: 1, "
               f"downscale_delay_s: {DOWNSCALE_DELAY_S}, metrics_interval_s: 0.5, look_back_period_s: 2")


def _photo() -> bytes:
    """A real photograph (skimage's cat), as a ~450x300 JPEG like a phone upload, scaled down."""
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, format="JPEG", quality=90)  # 451x300
    return buf.getvalue()


def _running(c: LocalCluster) -> dict[str, int]:
    return c.running_replicas(APP)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("autoscale")
    with LocalCluster(workers=2, worker_cpus=1) as c:
        env = {**os.environ, **c.client_env()}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.run(
            [sys.executable, str(ROOT / "run.py"), "+mode=serve", "+experiment=smoke", f"paths.root={root}",
             "logger=none", f"ray.address={c.address}", "serve.block=false", "serve.train_if_empty=true",
             f"serve.port={c.serve_port}", "monitor.enabled=false", "monitor.capture.enabled=false",
             "serve.batching.max_batch_size=4",
             f"serve.versions=[{{ref: v1, role: stable, weight: 100, deployment: {{{AUTOSCALING}, num_cpus: 0.25}}}}]",
             "serve.ingress.min_replicas=1", "serve.ingress.max_replicas=2", "serve.ingress.target_ongoing_requests=4",
             "serve.ingress.upscale_delay_s=1", f"serve.ingress.downscale_delay_s={DOWNSCALE_DELAY_S}",
             "serve.ingress.metrics_interval_s=0.5", "serve.ingress.look_back_period_s=2",
             "serve.ingress.num_cpus=0.1"],
            cwd=root, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        wait_for(lambda: _running(c).get("model-v1") == 1 and _running(c).get("Ingress") == 1, timeout=60,
                 interval=1, message=lambda: str(_running(c)))
        yield c


class Load(ClosedLoop):
    """CLIENTS closed-loop clients posting the photo until stopped; counts answers by status."""

    def __init__(self, url: str, body: bytes) -> None:
        super().__init__(CLIENTS, join_s=40)
        self.url, self.body = f"{url}/predict", body

    def request(self, session, t0: float) -> int:
        return session.post(self.url, data=self.body, headers={"content-type": "image/jpeg"}, timeout=30).status_code

    def failed(self, exc: Exception, t0: float) -> str:
        return type(exc).__name__

    @property
    def statuses(self) -> Counter[int | str]:
        return Counter(self.results)


def test_replicas_follow_load_up_and_back_down(served) -> None:
    c: LocalCluster = served
    seen: dict[str, int] = {"model-v1": 1, "Ingress": 1}

    def grown() -> bool:
        now = _running(c)
        for name in seen:
            seen[name] = max(seen[name], now.get(name, 0))
        return seen["model-v1"] > 1 and seen["Ingress"] > 1

    started = time.monotonic()
    with Load(c.serve_url, _photo()) as load:
        wait_for(grown, timeout=60, interval=0.5, message=lambda: f"peak {seen}, now {_running(c)}")
        scaled_up_s = time.monotonic() - started
        # More load time, for the model to reach what the target asks for (never past its maximum).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and seen["model-v1"] < MAX_REPLICAS:
            grown()
            time.sleep(0.5)
    stopped = time.monotonic()
    answered = sum(n for s, n in load.statuses.items() if s == 200)
    assert set(load.statuses) == {200}, load.statuses  # scaling up drops no request
    assert seen["model-v1"] <= MAX_REPLICAS and seen["Ingress"] <= 2, seen

    wait_for(lambda: _running(c).get("model-v1") == 1 and _running(c).get("Ingress") == 1, timeout=90,
             interval=0.5, message=lambda: f"still {_running(c)}")
    shrunk_s = time.monotonic() - stopped
    # Scaled down only once the need stayed low for downscale_delay_s.
    assert shrunk_s >= DOWNSCALE_DELAY_S, shrunk_s
    print(f"\nautoscale: {answered} answered; both grew in {scaled_up_s:.1f} s; peak {seen}; "
          f"back to 1 replica {shrunk_s:.1f} s after the load stopped")
