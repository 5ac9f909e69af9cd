"""Serving on a 3-node Ray cluster on this machine (mlplatform.localcluster: a head with no
CPUs and two worker nodes, each its own raylet), driven as an operator drives a cluster: every
change is `python run.py +mode=serve ray.address=<cluster> serve.block=false`, in place.

Real photographs (skimage's chelsea and astronaut, as 450x300 JPEGs, alternated) posted to
the head's Serve port by closed-loop clients (aiohttp, as bench_serve). The ingress runs 2
replicas, one per worker node; model replicas take 0.25 CPU each, so 3 fit on the 2 nodes.

(a) img/s and latency at concurrency 32 with 1, 2 and 3 model replicas (min = max);
(b) scale-up: a version at 1 replica that may grow to 3, load from idle at concurrency 32;
    time until the 2nd and the 3rd replica serve, p99 latency while scaling and after;
(c) node loss: 2 model replicas spread one per worker node (max_replicas_per_node: 1); one
    worker node SIGKILLed under load (its raylet and every process of it), a fresh node
    started at once as Kubernetes restarts a pod: failed requests, and the time until Serve
    is back at 2 RUNNING replicas of each deployment.
Prints a table, writes bench/results/cluster.json.
Usage: python bench/bench_cluster.py [--seconds 15] [--concurrency 32] [--worker-cpus 1]
"""

import argparse
import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import aiohttp
import numpy as np

from mlplatform.localcluster import LocalCluster

ROOT = Path(__file__).resolve().parents[1]
APP = "species"
SCALING = ("target_ongoing_requests: 2, upscale_delay_s: 5, downscale_delay_s: 30, "
           "metrics_interval_s: 2, look_back_period_s: 10")


def _photos() -> list[bytes]:
    from PIL import Image
    from skimage import data

    out = []
    for image in (data.chelsea(), data.astronaut()):
        buf = io.BytesIO()
        Image.fromarray(image).resize((450, 300)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class Load:
    """`concurrency` closed-loop clients on a thread of their own: (sent, latency s, status)."""

    def __init__(self, url: str, bodies: list[bytes], concurrency: int) -> None:
        self.url, self.bodies, self.concurrency = f"{url}/predict", bodies, concurrency
        self.records: list[tuple[float, float, int]] = []
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as client:
            async def worker(i: int) -> None:
                n = i
                while not self.stop_flag.is_set():
                    body = self.bodies[n % len(self.bodies)]
                    n += 1
                    t0 = time.monotonic()
                    try:
                        async with client.post(self.url, data=body, headers={"content-type": "image/jpeg"}) as r:
                            await r.read()
                            status = r.status
                    except (TimeoutError, aiohttp.ClientError):
                        status = 0
                    self.records.append((t0, time.monotonic() - t0, status))

            await asyncio.gather(*(worker(i) for i in range(self.concurrency)))

    def start(self) -> "Load":
        self.thread.start()
        return self

    def stop(self) -> list[tuple[float, float, int]]:
        self.stop_flag.set()
        self.thread.join(timeout=90)
        return self.records


def _stats(records: list[tuple[float, float, int]], t0: float, t1: float) -> dict:
    """Answers sent in [t0, t1): img/s (200s), latency percentiles, failures by status."""
    window = [(s, lat, st) for s, lat, st in records if t0 <= s < t1]
    ok = np.array([lat for _, lat, st in window if st == 200]) * 1000
    return {"images_per_s": round(len(ok) / (t1 - t0), 1), "images": len(ok),
            "failed": dict(Counter(str(st) for *_, st in window if st != 200)),
            **{f"p{q}_ms": round(float(np.percentile(ok, q)), 1) if len(ok) else None for q in (50, 99)}}


def _running(c: LocalCluster) -> dict[str, int]:
    return c.running_replicas(APP)


def _within(predicate, timeout: float) -> float | None:
    """Seconds until predicate() holds (polled every 0.5 s); None after timeout."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(0.5)
    return time.monotonic() - t0


def _wait(predicate, timeout: float, what) -> float:
    took = _within(predicate, timeout)
    if took is None:
        raise SystemExit(f"not within {timeout:g} s: {what() if callable(what) else what}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=15.0, help="measured seconds per load point")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--worker-cpus", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cluster.json"))
    args = ap.parse_args()
    # A timeout's SIGTERM unwinds like Ctrl-C, so the cluster's `with` stops its nodes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    photos = _photos()
    rows: dict[str, dict] = {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="mlpbc-") as tmp, \
            LocalCluster(workers=2, worker_cpus=args.worker_cpus) as c:
        env = {**os.environ, **c.client_env()}
        env.pop("RAY_ADDRESS", None)

        def serve(replicas: str, *extra: str) -> None:
            """Apply the serve YAML with these overrides to the cluster, in place."""
            cmd = [sys.executable, str(ROOT / "run.py"), "+mode=serve", "+experiment=smoke", f"paths.root={tmp}",
                   "logger=none", f"ray.address={c.address}", "serve.block=false", "serve.train_if_empty=true",
                   f"serve.port={c.serve_port}", "monitor.enabled=false",
                   f"serve.versions=[{{ref: v1, role: stable, weight: 100, deployment: {{{replicas}}}}}]",
                   "serve.deployment.num_cpus=0.25", "serve.ingress.min_replicas=2", "serve.ingress.max_replicas=2",
                   "serve.ingress.max_replicas_per_node=1", *extra]
            proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=400)
            if proc.returncode:
                raise SystemExit(f"+mode=serve failed: {proc.stdout[-1500:]}{proc.stderr[-3000:]}")

        def settle(model: int) -> None:
            _wait(lambda: _running(c).get("model-v1") == model and _running(c).get("Ingress") == 2, 180,
                  lambda: f"{model} model replicas and 2 ingress replicas RUNNING (now {_running(c)})")

        # (a) throughput by replica count
        for n in (1, 2, 3):
            serve(f"min_replicas: {n}, max_replicas: {n}")
            settle(n)
            load = Load(c.serve_url, photos, args.concurrency).start()
            time.sleep(3)  # warm-up
            t0 = time.monotonic()
            time.sleep(args.seconds)
            rows[f"{n}_replicas"] = {"model_replicas": n, **_stats(load.stop(), t0, time.monotonic())}
            print(f"{n} replica(s): {rows[f'{n}_replicas']}", flush=True)

        # (b) scale-up from 1 under load
        serve("min_replicas: 1, max_replicas: 1")
        settle(1)
        serve(f"min_replicas: 1, max_replicas: 3, {SCALING}")
        time.sleep(12)  # idle: the autoscaler sees no load before it starts
        load = Load(c.serve_url, photos, args.concurrency).start()
        t0 = time.monotonic()
        to_2 = _wait(lambda: _running(c).get("model-v1", 0) >= 2, 120, "a 2nd replica")
        to_3 = _within(lambda: _running(c).get("model-v1", 0) >= 3, 45)  # None: the target never asked for it
        peak, to_peak = (3, to_2 + to_3) if to_3 is not None else (2, to_2)
        t_peak = t0 + to_peak
        time.sleep(args.seconds)
        records = load.stop()
        rows["scale_up"] = {"from": 1, "max_replicas": 3, "peak": peak, "to_2nd_replica_s": round(to_2, 1),
                            "to_peak_s": round(to_peak, 1), "while_scaling": _stats(records, t0, t_peak),
                            "after": _stats(records, t_peak, time.monotonic())}
        print(f"scale-up: {rows['scale_up']}", flush=True)

        # (c) a worker node SIGKILLed under load, 2 replicas spread over the worker nodes
        serve("min_replicas: 2, max_replicas: 2, max_replicas_per_node: 1")
        settle(2)
        load = Load(c.serve_url, photos, args.concurrency).start()
        time.sleep(5)
        before = _running(c)
        t_kill = time.monotonic()
        victim = min(c.worker_nodes)
        killed = c.kill_worker(victim)
        c.add_worker(wait=False)  # the replacement node, as a Kubernetes pod restart brings
        gone = _wait(lambda: _running(c).get("model-v1", 2) < 2 or _running(c).get("Ingress", 2) < 2, 60,
                     "Serve noticing the lost replicas")
        back = _wait(lambda: _running(c).get("model-v1") == 2 and _running(c).get("Ingress") == 2, 240,
                     lambda: f"2 RUNNING replicas of each deployment again (now {_running(c)})")
        time.sleep(5)
        records = load.stop()
        after = _stats(records, t_kill, time.monotonic())
        failed_at = [s + lat - t_kill for s, lat, st in records if st != 200]  # when each failure was answered
        rows["node_kill"] = {"model_replicas": 2, "running_before": before, "processes_killed": len(killed),
                             "requests_after_kill": after["images"] + sum(after["failed"].values()),
                             "failed": after["failed"], "last_failure_s": round(max(failed_at), 1) if failed_at else None,
                             "serve_saw_loss_s": round(gone, 1), "back_at_target_s": round(gone + back, 1),
                             "p99_ms_after_kill": after["p99_ms"]}
        print(f"node kill: {rows['node_kill']}", flush=True)

    print("\nrow | img/s | p50 ms | p99 ms | failed")
    for key in ("1_replicas", "2_replicas", "3_replicas"):
        r = rows[key]
        print(f"{key} | {r['images_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['failed']}")
    s = rows["scale_up"]
    print(f"scale-up 1 -> {s['peak']}: 2nd replica at {s['to_2nd_replica_s']} s, peak at {s['to_peak_s']} s; "
          f"p99 while scaling {s['while_scaling']['p99_ms']} ms, after {s['after']['p99_ms']} ms")
    k = rows["node_kill"]
    print(f"node kill, 2 replicas: {k['requests_after_kill']} requests, failed {k['failed']}, "
          f"back at target in {k['back_at_target_s']} s")
    meta = {"concurrency": args.concurrency, "seconds": args.seconds, "worker_nodes": 2,
            "worker_cpus": args.worker_cpus, "machine_cpus": os.cpu_count(), "scaling": SCALING, "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
