"""Serving throughput and latency: the raw model limit, a naive server, and the platform
with batching off and on, at several client concurrencies, in one run.

(a) limit: the extended model's forward pass at its best batch size, in-process, once the
    machine is quiet after training, best of two sweeps;
(b) naive: a one-request-at-a-time FastAPI + uvicorn server of the same model;
(c) platform, batching off (max_batch_size=1); (d) platform, batching on; both with capture
and drift monitoring on, as deployed; (e) batching on without capture and monitoring;
(f) batching on with Serve's standard Python proxy (ray.serve_high_throughput=false);
(g) the HTTP floor: the ingress alone answering, no model (what no such app beats here);
(h) the cost of authentication: (d) at concurrency 32 with API keys on and off, alternated in
    place on the same replicas (target: keys cost under 3% of throughput).
(c)-(e) run in Ray Serve's high-throughput mode, the default (HAProxy ingress, gRPC between
replicas); (f) restarts Ray without it. The ingress batches per version and sends one call
per batch to the model replica.
Single-image JPEG requests over HTTP on loopback. Prints a table, writes
bench/results/serve.json. Usage: python bench/bench_serve.py [--seconds 6] [--model mobilenet_v3_small]
"""

import argparse
import asyncio
import io
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import ray
from hydra import compose, initialize_config_dir

from mlplatform import storage
from mlplatform.config import register_configs, validate
from mlplatform.data import synthetic
from mlplatform.raycluster import apply_serve_env

CONF = str(Path(__file__).resolve().parents[1] / "conf")
CONCURRENCY = (1, 8, 32, 64)


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    validate(cfg)
    return cfg


def _jpeg(size: int = 64) -> bytes:
    buf = io.BytesIO()
    synthetic.render(3, 1, size).save(buf, format="JPEG")
    return buf.getvalue()


async def _load(url: str, body: bytes, concurrency: int, seconds: float,
                headers: dict[str, str] | None = None) -> dict[str, float]:
    """`concurrency` clients, each posting the image again as soon as its answer arrives.
    aiohttp: the load generator shares the machine's cores, and httpx cost 2.3 ms of CPU per
    request at concurrency 32 (5.5 ms at 64), capping any server near 430 req/s; aiohttp
    costs 0.07 ms."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as client:
        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                async with client.post(url, data=body, headers={"content-type": "image/jpeg", **(headers or {})}) as r:
                    await r.read()
                    if r.status == 200:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"images_per_s": round(len(latencies) / wall, 1), "images": len(latencies), "errors": errors,
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p95_ms": round(float(np.percentile(lat, 95)), 1) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None}


def _cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of every process on this machine, by pid (Linux /proc; {} elsewhere)."""
    out: dict[int, tuple[str, float]] = {}
    if not os.path.isdir("/proc"):
        return out
    tick = os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
        except OSError:
            continue
        out[int(pid)] = (cmd, (int(stat[11]) + int(stat[12])) / tick)
    return out


def _cpu_per_image(before: dict, after: dict, images: int) -> dict[str, float]:
    """Where the CPU went during one load point: ms of CPU per answered image, by role."""
    roles = (("Ingress", "ingress"), ("model-v", "model replica"), ("DriftMonitor", "drift monitor"),
             ("haproxy", "HAProxy"), ("bench_serve", "load generator"))
    out: dict[str, float] = {}
    for pid, (cmd, cpu) in after.items():
        used = cpu - before.get(pid, (cmd, 0.0))[1]
        role = next((name for key, name in roles if key in cmd), "rest of Ray and the machine")
        out[role] = out.get(role, 0.0) + used
    return {k: round(1000 * v / max(images, 1), 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def _accelerator() -> dict:
    """conf/serve's accelerator: the naive server and the limit run the served model as deployed."""
    from omegaconf import OmegaConf

    from mlplatform.cli_check import compose_defaults

    return OmegaConf.to_container(compose_defaults().serve.accelerator)


def _naive_server(registry_root: str, model_name: str, version: str, port: int) -> None:
    """What a user would otherwise write: decode and predict inside the handler, one at a time."""
    import uvicorn
    from fastapi import FastAPI, Request

    from mlplatform.data.preprocess import decode
    from mlplatform.deployments.extended import ExtendedModel

    model = ExtendedModel(registry_root, model_name, version, **_accelerator())
    app = FastAPI()

    @app.post("/p")
    async def p(request: Request) -> dict:  # decode and predict in the handler, one at a time
        pred = model.predict([decode(await request.body())], 5)[0]
        return {"predictions": [{"label": a, "score": b} for a, b in zip(pred.labels, pred.scores, strict=True)]}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", workers=1)


def _start_ray(high_throughput: bool) -> None:
    """A local Ray on all cores; Serve reads its mode from the environment at process start."""
    apply_serve_env(high_throughput)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)


def _floor_app():
    """(g) The HTTP floor: HAProxy and an ingress replica that reads the body and answers,
    with no model and no hop to another replica. No Serve app with an HTTP ingress beats it
    on this machine, whatever its model costs."""
    from fastapi import FastAPI, Request
    from ray import serve

    app = FastAPI()

    @serve.deployment(max_ongoing_requests=256)
    @serve.ingress(app)
    class NoopIngress:
        @app.post("/predict")
        async def predict(self, request: Request) -> dict:
            return {"n": len(await request.body())}

    return NoopIngress.bind()


def _busy_fraction(seconds: float) -> float:
    """How busy the machine's CPUs were over the next `seconds` (Linux /proc/stat)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # total, idle + iowait

    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def _wait_for_quiet(max_s: float = 30.0) -> None:
    """Ray Train's workers wind down for a few seconds after training; the limit measured
    meanwhile came out 25% low (batch 1: 5x low) at 224 px."""
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline and os.path.exists("/proc/stat") and _busy_fraction(1.0) > 0.1:
        pass


def _limit(registry_root: str, model_name: str, version: str, size: int) -> dict[str, float]:
    from mlplatform.deployments.extended import ExtendedModel

    model = ExtendedModel(registry_root, model_name, version, **_accelerator())
    arr = np.stack([np.asarray(synthetic.render(3, i, size)) for i in range(64)])
    _wait_for_quiet()
    best: dict[int, float] = {}
    for _ in range(2):  # best of two sweeps: the limit is a ceiling, noise only lowers it
        for bs in (1, 8, 32, 64):
            x = model.to_tensor(arr[:bs])
            model.forward(x)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 1.5:
                model.forward(x)
                n += bs
            best[bs] = max(best.get(bs, 0.0), n / (time.perf_counter() - t0))
    top = max(best, key=best.get)
    return {"images_per_s": round(best[top], 1), "best_batch_size": top,
            "by_batch_size": {k: round(v, 1) for k, v in best.items()}}


BENCH_KEY = "bench-key-not-a-secret"


def _auth_cost(overrides: list[str], body: bytes, seconds: float, rounds: int = 3) -> dict:
    """(h) keys off, keys on, alternated `rounds` times on the running app (keys change in
    place: the same replicas), concurrency 32; each side's median img/s."""
    from mlplatform.deployments.serve_mode import deploy

    os.environ["MLP_BENCH_KEY"] = BENCH_KEY
    on = ["serve.auth.keys=[{id: bench, roles: [predict], rate: 1000000, burst: 1000000, "
          "secret_env: MLP_BENCH_KEY}]", "serve.auth.client.rate=1000000", "serve.auth.client.burst=1000000"]
    runs: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(rounds):
        for side in ("off", "on"):
            deploy(_cfg([*overrides, *(on if side == "on" else [])]))
            headers = {"authorization": f"Bearer {BENCH_KEY}"} if side == "on" else None
            asyncio.run(_load("http://127.0.0.1:8791/predict", body, 4, 1.0, headers))  # settle
            r = asyncio.run(_load("http://127.0.0.1:8791/predict", body, 32, seconds, headers))
            assert r["errors"] == 0, f"keys {side}: {r['errors']} errors"
            runs[side].append(r["images_per_s"])
    off, on_ = statistics.median(runs["off"]), statistics.median(runs["on"])
    return {"keys_off_images_per_s": off, "keys_on_images_per_s": on_, "runs": runs,
            "cost": round(1 - on_ / off, 3) if off else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--model", default="mobilenet_v3_small")
    ap.add_argument("--image-size", type=int, default=64,
                    help="the served model's input size (64 is the default config; 224 is typical of real photos)")
    ap.add_argument("--out", default=None, help="default: bench/results/serve.json (serve-<size>.json if not 64)")
    args = ap.parse_args()
    suffix = "" if args.image_size == 64 else f"-{args.image_size}"
    args.out = args.out or str(Path(__file__).parent / "results" / f"serve{suffix}.json")
    register_configs()
    body = _jpeg(args.image_size)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = ["+experiment=smoke", f"model={args.model}", f"paths.root={tmp}", "logger=none",
                "train.epochs=1", f"data.synthetic.image_size={args.image_size}", "data.quality.min_images_per_split=0"]
        _start_ray(high_throughput=True)
        from mlplatform.training.job import run_train

        trained = run_train(_cfg(["+mode=train", *base]))
        reg_root, name, version = str(Path(tmp) / "registry"), "species-classifier", trained["version"]
        results["a_limit"] = _limit(reg_root, name, version, args.image_size)

        proc = mp.get_context("spawn").Process(target=_naive_server, args=(reg_root, name, version, 8790),
                                               daemon=True)
        proc.start()
        for _ in range(120):
            try:
                httpx.post("http://127.0.0.1:8790/p", content=body, timeout=5)
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        results["b_naive"] = {c: asyncio.run(_load("http://127.0.0.1:8790/p", body, c, args.seconds))
                              for c in CONCURRENCY}
        proc.terminate()

        from ray import serve

        from mlplatform.deployments.serve_mode import deploy

        # The platform as deployed: capture and drift monitoring on, at their default intervals
        # (smoke's short ones are for tests); (e) shows what they cost on the same cores.
        monitor = ["monitor.capture.flush_interval_s=2", "monitor.interval_s=5", "monitor.window_size=64",
                   "monitor.max_windows_per_poll=2"]
        for key, batch, extra in (("c_batching_off", 1, monitor), ("d_batching_on", 32, monitor),
                                  ("e_batching_on_no_monitoring", 32,
                                   ["monitor.enabled=false", "monitor.capture.enabled=false"]),
                                  ("f_batching_on_python_proxy", 32, monitor)):
            if key.startswith("f_"):  # Serve reads its mode at process start: a fresh Ray
                serve.shutdown()
                ray.shutdown()
                _start_ray(high_throughput=False)
            overrides = ["+mode=serve", *base, *extra, "serve.port=8791",
                         f"serve.versions=[{{ref: {version}, role: stable, weight: 100}}]",
                         f"serve.batching.max_batch_size={batch}", "serve.batching.batch_wait_timeout_s=0.01",
                         "serve.deployment.num_cpus=1", "serve.deployment.min_replicas=1",
                         "serve.deployment.max_replicas=1", "serve.deployment.max_ongoing_requests=128",
                         "serve.deployment.max_queued_requests=-1", "serve.ingress.num_cpus=0.5",
                         "serve.ingress.max_replicas=1"]
            cfg = _cfg(overrides)
            deploy(cfg)
            asyncio.run(_load("http://127.0.0.1:8791/predict", body, 4, 1.0))  # warm up
            results[key] = {}
            for c in CONCURRENCY:
                before = _cpu_seconds()
                results[key][c] = asyncio.run(_load("http://127.0.0.1:8791/predict", body, c, args.seconds))
                if c == 32 and before:
                    results[key][c]["cpu_ms_per_image"] = _cpu_per_image(before, _cpu_seconds(),
                                                                         results[key][c]["images"])
            if key == "d_batching_on":
                results["h_auth_cost_at_32"] = _auth_cost(overrides, body, args.seconds)
        serve.shutdown()
        ray.shutdown()
        _start_ray(high_throughput=True)  # (g) in the default mode, on a fresh Ray
        serve.start(http_options={"host": "127.0.0.1", "port": 8791})
        serve.run(_floor_app(), name="floor", route_prefix="/")
        asyncio.run(_load("http://127.0.0.1:8791/predict", body, 4, 1.0))
        results["g_http_floor_no_model"] = {c: asyncio.run(_load("http://127.0.0.1:8791/predict", body, c,
                                                                  args.seconds)) for c in CONCURRENCY}
        serve.shutdown()
        ray.shutdown()

    limit = results["a_limit"]["images_per_s"]
    print(f"(a) limit: raw forward {limit} img/s at batch {results['a_limit']['best_batch_size']} "
          f"({results['a_limit']['by_batch_size']})")
    print(f"{'target':<28}{'conc':>6}{'img/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for key in ("b_naive", "c_batching_off", "d_batching_on", "e_batching_on_no_monitoring",
                "f_batching_on_python_proxy", "g_http_floor_no_model"):
        for c, r in results[key].items():
            print(f"{key:<28}{c:>6}{r['images_per_s']:>10}{str(r['p50_ms']):>10}{str(r['p95_ms']):>10}"
                  f"{str(r['p99_ms']):>10}{r['errors']:>8}")
    auth = results["h_auth_cost_at_32"]
    print(f"(h) at concurrency 32: keys off {auth['keys_off_images_per_s']} img/s, keys on "
          f"{auth['keys_on_images_per_s']} img/s: authentication costs {auth['cost']:.1%} (target: under 3%)")
    if "cpu_ms_per_image" in results["d_batching_on"][32]:
        print("(d) at concurrency 32, ms of CPU per image:", results["d_batching_on"][32]["cpu_ms_per_image"])
    on32, naive32 = results["d_batching_on"][32]["images_per_s"], results["b_naive"][32]["images_per_s"]
    summary = {"batching_on_vs_naive_at_32": round(on32 / naive32, 2) if naive32 else None,
               "batching_on_vs_limit_at_32": round(on32 / limit, 2) if limit else None,
               "high_throughput_vs_python_proxy_at_32": round(
                   on32 / results["f_batching_on_python_proxy"][32]["images_per_s"], 2),
               "http_floor_at_32": results["g_http_floor_no_model"][32]["images_per_s"],
               "auth_cost_at_32": results["h_auth_cost_at_32"]["cost"],
               "cpus": os.cpu_count(), "model": args.model, "image_size": args.image_size, "seconds_per_point": args.seconds}
    print(f"at concurrency 32: batching on = {summary['batching_on_vs_naive_at_32']}x the naive server, "
          f"{summary['batching_on_vs_limit_at_32']:.0%} of the limit (targets: >= 2x and >= 60%)")
    storage.write_json(args.out, {"results": results, "summary": summary,
                                  "median_p50_ms": statistics.median(
                                      r["p50_ms"] for r in results["d_batching_on"].values() if r["p50_ms"])})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
