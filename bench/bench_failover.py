"""A model replica killed (kill -9) under load: what the clients see, and how long until the
version serves again. One scenario per row, in one run: the version's only replica killed,
and one of its two replicas killed. 8 clients post a JPEG to /predict in a closed loop while
another polls /v2/health/ready every 0.2 s. Clients wait a 503's Retry-After before their
next request, as a well-behaved client does (--ignore-retry-after: they do not).

Per scenario: requests by status after the kill, the slowest refused request (a 503 must
come within about a second, not after serve.request_timeout_s), the first 503 and the next
200 of /v2/health/ready, and the time from the kill until every request succeeds again.
Prints a table, writes bench/results/failover.json.
Usage: python bench/bench_failover.py [--clients 8] [--after 25]
"""

import argparse
import io
import json
import os
import signal
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import ray
import requests
from hydra import compose, initialize_config_dir

from mlplatform import ray_compat
from mlplatform.config import register_configs, validate
from mlplatform.data import synthetic
from mlplatform.deployments.serve_mode import replicas as serve_replicas
from mlplatform.raycluster import apply_serve_env

CONF = str(Path(__file__).resolve().parents[1] / "conf")
PORT = 8792
URL = f"http://127.0.0.1:{PORT}"
APP = "failover"


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    validate(cfg)
    return cfg


def _jpeg() -> bytes:
    buf = io.BytesIO()
    synthetic.render(3, 1, 64).save(buf, format="JPEG")
    return buf.getvalue()


def _running_pids(deployment: str) -> list[int]:
    return [r["pid"] for r in serve_replicas(APP).get(deployment, []) if r.get("state") == "RUNNING"]


def _check_cost(n: int = 50) -> dict[str, float]:
    """ms per call of what each ingress replica asks every second (health.ReplicaHealth),
    from the driver: the controller's replica list and the GCS's named actors."""
    out = {}
    for key, fn in (("controller_replicas_ms", lambda: ray_compat.all_serve_deployments()),
                    ("gcs_named_actors_ms", lambda: ray.util.list_named_actors(all_namespaces=True))):
        fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out[key] = round(1000 * (time.perf_counter() - t0) / n, 2)
    return out


def _scenario(replicas: int, kill: int, version: str, clients: int, after_s: float,
              honor_retry_after: bool) -> dict:
    stop = threading.Event()
    results: list[tuple[float, float, int]] = []  # (sent, answered, status) in perf_counter seconds
    polls: list[tuple[float, int]] = []
    body = _jpeg()

    def client() -> None:
        session = requests.Session()
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = session.post(URL + "/predict", data=body, headers={"content-type": "image/jpeg"}, timeout=60)
                status = r.status_code
            except requests.RequestException:
                status, r = 0, None
            results.append((t0, time.perf_counter(), status))
            if honor_retry_after and r is not None and "retry-after" in r.headers:
                time.sleep(float(r.headers["retry-after"]))  # a well-behaved client

    def poller() -> None:
        while not stop.is_set():
            try:
                polls.append((time.perf_counter(), requests.get(URL + "/v2/health/ready", timeout=5).status_code))
            except requests.RequestException:
                polls.append((time.perf_counter(), 0))
            time.sleep(0.2)

    threads = [threading.Thread(target=client) for _ in range(clients)] + [threading.Thread(target=poller)]
    for t in threads:
        t.start()
    time.sleep(3)  # steady load first
    victims = _running_pids(f"model-{version}")[:kill]
    t_kill = time.perf_counter()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    time.sleep(after_s)
    stop.set()
    for t in threads:
        t.join()
    after = [(t0 - t_kill, t1 - t_kill, s) for t0, t1, s in results if t1 >= t_kill]
    failed = [(t0, t1, s) for t0, t1, s in after if s != 200]
    not_ready = [t - t_kill for t, s in polls if t >= t_kill and s != 200]
    ready_again = [t - t_kill for t, s in polls if not_ready and t - t_kill > not_ready[-1] and s == 200]
    return {
        "replicas": replicas, "killed": len(victims), "requests_after_kill": len(after),
        "ok": sum(1 for *_, s in after if s == 200),
        "failed_by_status": dict(Counter(str(s) for *_, s in failed)),
        "slowest_failed_s": round(max((t1 - t0 for t0, t1, _ in failed), default=0.0), 2),
        "ready_polls_after_kill": dict(Counter(str(s) for t, s in polls if t >= t_kill)),
        "not_ready_from_s": round(not_ready[0], 2) if not_ready else None,
        "ready_again_at_s": round(ready_again[0], 2) if ready_again else None,
        "all_ok_again_at_s": round(max((t1 for _, t1, _ in failed), default=0.0), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--after", type=float, default=25.0, help="seconds of load after the kill")
    ap.add_argument("--ignore-retry-after", action="store_true",
                    help="clients retry a 503 at once instead of waiting its Retry-After")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "failover.json"))
    args = ap.parse_args()
    register_configs()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = ["+experiment=smoke", f"paths.root={tmp}", "logger=none"]
        apply_serve_env(True)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)

        from mlplatform.deployments.serve_mode import deploy, undeploy
        from mlplatform.training.job import run_train

        version = run_train(_cfg(["+mode=train", *base]))["version"]
        cpus = 0.5 if (os.cpu_count() or 2) <= 4 else 1
        for key, replicas, kill in (("1_replica_kill_1", 1, 1), ("2_replicas_kill_1", 2, 1)):
            deploy(_cfg(["+mode=serve", *base, f"serve.port={PORT}", f"serve.app_name={APP}",
                         f"serve.versions=[{{ref: {version}, role: stable, weight: 100}}]",
                         f"serve.deployment.num_cpus={cpus}", f"serve.deployment.min_replicas={replicas}",
                         f"serve.deployment.max_replicas={replicas}"]))
            deadline = time.time() + 120
            while len(_running_pids(f"model-{version}")) < replicas or \
                    requests.get(URL + "/v2/health/ready", timeout=5).status_code != 200:
                if time.time() > deadline:
                    raise SystemExit(f"{key}: {replicas} replicas never came up")
                time.sleep(0.5)
            if replicas == 2:
                check_cost = _check_cost()
            rows[key] = _scenario(replicas, kill, version, args.clients, args.after, not args.ignore_retry_after)
        undeploy(APP)
        ray.shutdown()
    cols = ("replicas", "killed", "requests_after_kill", "ok", "failed_by_status", "slowest_failed_s",
            "not_ready_from_s", "ready_again_at_s", "all_ok_again_at_s")
    print(" | ".join(("scenario", *cols)))
    for key, row in rows.items():
        print(" | ".join((key, *(str(row[c]) for c in cols))))
    print("health check cost per call:", check_cost)
    meta = {"clients": args.clients, "honor_retry_after": not args.ignore_retry_after, "after_s": args.after,
            "cpus": os.cpu_count(), "health_check": check_cost,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "scenarios": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
