"""The performance race on real photographs: the platform as deployed (`python run.py
+mode=serve`, API keys, capture and drift monitoring on) against LitServe (bench/peers/
litserve_app.py: the same model file and preprocessing, one worker per core, batching,
fast_queue), one server at a time, with the same closed-loop aiohttp client, in one run.

Requests: real photographs from scikit-image (bench/bench_decode.py's kinds: a web JPEG of
451x300, a phone-sized JPEG of 4000x3000, a PNG), each sent as JSON {"image": base64} to both
servers (LitServe's image example takes JSON), and as raw bytes to the platform.

Measured in the same run:
- (a) the forward limit of the served model at the served batch size and thread count, in
  this process, as img/s and as CPU time per image (the floor the CPU target divides by);
- (b) decode plus resize alone per image for each kind, full and reduced-scale (bench_decode);
- the platform with `serve.inputs.reduced_decode=false` on the phone photo (the baseline of
  reduced-scale decoding);
- the platform with `monitor=scipy` (the drift backend without alibi-detect): cold start and
  idle memory only;
- for each server: cold start (launch to the first answer), img/s and p50/p99 at concurrency
  1, 8 and 32 per kind, server CPU per image split by process, and memory (PSS of the server's
  whole process tree) idle and under load.

Usage: python bench/bench_race.py [--seconds 6] [--model mobilenet_v3_small --image-size 224]
Prints a table, writes bench/results/race.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import bench_decode  # noqa: E402

CONCURRENCY = (1, 8, 32)
KEY = "bench-race-key-not-a-secret"
MODEL = "species-classifier"


async def _load(url: str, body: bytes, content_type: str, concurrency: int, seconds: float,
                headers: dict[str, str] | None = None) -> dict:
    latencies: list[float] = []
    errors: list[int] = []
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as client:
        async def worker() -> None:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                async with client.post(url, data=body, headers={"content-type": content_type, **(headers or {})}) as r:
                    await r.read()
                    (latencies.append(time.perf_counter() - t0) if r.status == 200 else errors.append(r.status))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"images_per_s": round(len(latencies) / wall, 1), "images": len(latencies), "errors": len(errors),
            "error_statuses": sorted(set(errors)),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None}


def _procs() -> dict[int, tuple[int, str, float]]:
    """Every process: pid -> (parent pid, command line, CPU seconds so far), from /proc."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{entry}/cmdline").read_text().replace("\0", " ")
        except OSError:
            continue
        out[int(entry)] = (int(stat[1]), cmd, (int(stat[11]) + int(stat[12])) / tick)
    return out


def _tree(pid: int, procs: dict[int, tuple[int, str, float]]) -> list[int]:
    """pid and all its descendants (a local Ray's GCS, raylet and workers descend from run.py)."""
    out, frontier = [pid], [pid]
    while frontier:
        frontier = [p for p, (ppid, _, _) in procs.items() if ppid in frontier]
        out += frontier
    return [p for p in out if p in procs]


def _pss_by_role(pid: int) -> dict[str, float]:
    """PSS in MB of the process tree under `pid`, by role."""
    procs, out = _procs(), {}
    for p in _tree(pid, procs):
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        kb = next((int(line.split()[1]) for line in text.splitlines() if line.startswith("Pss:")), 0)
        role = _role(p, procs[p][1], pid)
        out[role] = out.get(role, 0.0) + kb / 1024
    return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def _pss_mb(pid: int) -> float:
    return round(sum(_pss_by_role(pid).values()), 1)


ROLES = (("Ingress", "ingress"), (":model-v", "model replica"), ("DriftMonitor", "drift monitor"),
         ("haproxy", "HAProxy"), ("ProxyActor", "Serve proxy"), ("ServeController", "Serve controller"),
         ("raylet", "raylet"), ("gcs_server", "GCS"), ("dashboard", "dashboard"))


def _role(pid: int, cmd: str, root: int) -> str:
    for key, name in ROLES:
        if key in cmd:
            return name
    if pid == root:
        return "launcher (run.py)" if "run.py" in cmd else "main (HTTP)"
    return "workers" if "multiprocessing" in cmd else "other"


def _cpu(pid: int) -> dict[int, tuple[str, float]]:
    procs = _procs()
    return {p: (_role(p, procs[p][1], pid), procs[p][2]) for p in _tree(pid, procs)}


def _settle(pid: int, quiet_cores: float = 0.1, timeout: float = 120.0) -> float:
    """Wait (at least 10 s) until the server's process tree uses under `quiet_cores` of CPU
    over 2 s: start-up work (the drift monitor fitting its detectors' thresholds, replicas
    tuning) is not counted per image. Returns the seconds waited."""
    t0 = time.monotonic()
    time.sleep(8)
    while time.monotonic() - t0 < timeout:
        before = sum(cpu for _, cpu in _cpu(pid).values())
        time.sleep(2)
        if sum(cpu for _, cpu in _cpu(pid).values()) - before < 2 * quiet_cores:
            break
    return round(time.monotonic() - t0, 1)


def _cpu_ms_per_image(before: dict, after: dict, images: int) -> dict[str, float]:
    by_role: dict[str, float] = {}
    for pid, (role, cpu) in after.items():
        by_role[role] = by_role.get(role, 0.0) + cpu - before.get(pid, (role, 0.0))[1]
    out = {k: round(1000 * v / max(images, 1), 2) for k, v in sorted(by_role.items(), key=lambda kv: -kv[1]) if v > 0}
    out["total"] = round(sum(out.values()), 2)
    return out


def _train(root: str, model: str, size: int) -> None:
    subprocess.run([sys.executable, "run.py", "+mode=train", "+experiment=smoke", f"model={model}",
                    f"paths.root={root}", "logger=none", "train.epochs=1", f"data.synthetic.image_size={size}",
                    "data.quality.min_images_per_split=0"], cwd=ROOT, check=True, capture_output=True)


def _limit(registry: str, batch: int, size: int) -> dict:
    import torch
    from bench_serve import _accelerator  # the served model's accelerator settings

    from mlplatform.cli_check import compose_defaults
    from mlplatform.deployments.extended import ExtendedModel

    accel = _accelerator()
    # As served: a replica's forward gets accelerator.threads, or one per CPU it reserves.
    threads = int(accel["threads"]) or max(1, int(compose_defaults().serve.deployment.num_cpus))
    torch.set_num_threads(threads)
    model = ExtendedModel(registry, MODEL, "v1", **{**accel, "threads": threads})
    x = model.to_tensor(np.random.default_rng(0).integers(0, 255, (batch, size, size, 3), np.uint8))
    model.forward(x)
    best, cpu = 0.0, float("inf")
    for _ in range(3):
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < 2.0:
            model.forward(x)
            n += batch
        best = max(best, n / (time.perf_counter() - t0))
        cpu = min(cpu, (time.process_time() - c0) / n)
    return {"batch_size": batch, "threads": threads, "images_per_s": round(best, 1),
            "ms_per_image": round(1000 / best, 2), "cpu_ms_per_image": round(1000 * cpu, 2)}


def _wait_first_answer(url: str, body: bytes, content_type: str, headers: dict, proc: subprocess.Popen,
                       timeout: float = 300) -> float:
    import requests

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if requests.post(url, data=body, headers={"content-type": content_type, **headers}, timeout=10).ok:
                return time.monotonic() - t0
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"no answer from {url} within {timeout} s")


PLATFORM_URL = "http://127.0.0.1:8791/predict"


def platform_cmd(root: str) -> list[str]:
    """`+mode=serve` as deployed: API keys (MLP_BENCH_KEY, no rate limit), capture and drift
    monitoring on, version v1 of the registry under `root`."""
    return [sys.executable, "run.py", "+mode=serve", f"paths.root={root}", "serve.port=8791",
            "serve.auth.required=true", "logger=none", "serve.versions=[{ref: v1, role: stable, weight: 100}]",
            "serve.auth.keys=[{id: bench, roles: [predict], rate: 1000000, burst: 1000000, "
            "secret_env: MLP_BENCH_KEY}]", "serve.auth.client.rate=1000000", "serve.auth.client.burst=1000000"]


def server_env() -> dict[str, str]:
    return {**os.environ, "MLP_BENCH_KEY": KEY, "PYTHONPATH": str(ROOT)}


@contextlib.contextmanager
def serving(name: str, cmd: list[str], env: dict, url: str, body: bytes, content_type: str,
            headers: dict) -> Iterator[tuple[subprocess.Popen, float]]:
    """The server `cmd` started in a session of its own, up to its first answer: yields the
    process and its cold start in s; stops it (and the platform's Ray) on leaving."""
    # Its log goes to a file: a pipe nobody reads would block the server once full.
    log = HERE / "results" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    try:
        try:
            cold = _wait_first_answer(url, body, content_type, headers, proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; its log ends:\n{log.read_text()[-3000:]}") from None
        yield proc, cold
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        if "run.py" in cmd:
            subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)


def _race(name: str, cmd: list[str], url: str, requests_: dict[str, tuple[bytes, str]], headers: dict,
          seconds: float, env: dict, load: bool = True) -> dict:
    """Cold start, idle PSS and, with `load`, every request kind at each concurrency."""
    first_body, first_type = next(iter(requests_.values()))
    with serving(f"race-{name}", cmd, env, url, first_body, first_type, headers) as (proc, cold):
        out: dict = {"cold_start_s": round(cold, 1), "kinds": {}}
        for body, ctype in requests_.values():  # warm every path, then let it settle
            asyncio.run(_load(url, body, ctype, 4, 2.0, headers))
        out["settle_s"] = _settle(proc.pid)
        out["idle_pss_mb_by_process"] = _pss_by_role(proc.pid)
        out["idle_pss_mb"] = round(sum(out["idle_pss_mb_by_process"].values()), 1)
        for kind, (body, ctype) in requests_.items() if load else ():
            rows = {}
            for c in CONCURRENCY:
                before = _cpu(proc.pid)
                if c == 32:
                    pss_box: list[float] = []

                    async def run_and_sample(body=body, ctype=ctype, box=pss_box) -> dict:
                        task = asyncio.ensure_future(_load(url, body, ctype, 32, seconds, headers))
                        await asyncio.sleep(seconds / 2)
                        box.append(await asyncio.to_thread(_pss_mb, proc.pid))
                        return await task

                    rows[c] = asyncio.run(run_and_sample())
                    rows[c]["load_pss_mb"] = pss_box[0]
                else:
                    rows[c] = asyncio.run(_load(url, body, ctype, c, seconds, headers))
                rows[c]["cpu_ms_per_image"] = _cpu_ms_per_image(before, _cpu(proc.pid), rows[c]["images"])
            out["kinds"][kind] = rows
            print(f"  {name} {kind}: " + ", ".join(f"c={c} {r['images_per_s']} img/s" for c, r in rows.items()),
                  flush=True)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--model", default="mobilenet_v3_small")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--platform-only", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "race.json"))
    args = ap.parse_args()
    from mlplatform.config import register_configs

    register_configs()  # the structured schemas conf/ builds on
    kinds = bench_decode.request_kinds()
    size, resize = args.image_size, args.image_size * 8 // 7
    results: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.platform(),
                     "cpus": os.cpu_count(), "model": args.model, "image_size": size}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"training {args.model} at {size} px (one smoke epoch) ...", flush=True)
        _train(tmp, args.model, size)
        registry = str(Path(tmp) / "registry")
        from mlplatform.cli_check import compose_defaults

        batch = int(compose_defaults().serve.batching.max_batch_size)
        results["a_limit"] = _limit(registry, batch, size)
        spec = bench_decode.PreprocessSpec(size, resize, bench_decode.MEAN, bench_decode.STD, "bilinear")
        results["b_decode_resize_ms"] = {
            kind: {"full": round(1000 * bench_decode.time_per_image(data, spec, False, 2.0), 2),
                   "reduced": round(1000 * bench_decode.time_per_image(data, spec, True, 2.0), 2)}
            for kind, data in kinds.items()}
        as_json = {k: (json.dumps({"image": base64.b64encode(v).decode()}).encode(), "application/json")
                   for k, v in kinds.items()}
        raw = {f"{k} (raw bytes)": (v, "image/png" if k.startswith("PNG") else "image/jpeg") for k, v in kinds.items()}
        env = server_env()
        served = platform_cmd(tmp)
        print("platform ...", flush=True)
        results["platform"] = _race("platform", served, PLATFORM_URL, {**as_json, **raw},
                                    {"authorization": f"Bearer {KEY}"}, args.seconds, env)
        # Today's baseline for the phone photo: the platform decoding it in full.
        phone = next(k for k in raw if k.startswith("phone"))
        print("platform, full decoding ...", flush=True)
        results["platform_full_decode"] = _race("platform", [*served, "serve.inputs.reduced_decode=false"],
                                                PLATFORM_URL, {phone: raw[phone]},
                                                {"authorization": f"Bearer {KEY}"}, args.seconds, env)
        # The footprint with the permissively licensed drift backend: no alibi-detect, so the
        # monitor's process loads neither torch nor transformers.
        print("platform, monitor=scipy (start and footprint) ...", flush=True)
        results["platform_scipy_monitor"] = _race("platform", [*served, "monitor=scipy"], PLATFORM_URL,
                                                  {**as_json, **raw}, {"authorization": f"Bearer {KEY}"},
                                                  args.seconds, env, load=False)
        if not args.platform_only:
            print("LitServe ...", flush=True)
            lit_cmd = [sys.executable, str(HERE / "peers" / "litserve_app.py"), "--registry", registry,
                       "--ref", "v1", "--port", "8792", "--batch", str(batch)]
            results["litserve"] = _race("litserve", lit_cmd, "http://127.0.0.1:8792/predict", as_json, {},
                                        args.seconds, env)
    _report(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


def _report(r: dict) -> None:
    a = r["a_limit"]
    print(f"\n(a) forward limit at batch {a['batch_size']} and {a['threads']} thread(s), as served: "
          f"{a['images_per_s']} img/s, {a['cpu_ms_per_image']} ms CPU per image")
    print("(b) decode + resize per image, ms (full / reduced):",
          ", ".join(f"{k} {v['full']} / {v['reduced']}" for k, v in r["b_decode_resize_ms"].items()))
    print(f"\n{'server':<10}{'request':<36}{'conc':>5}{'img/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'CPU ms/img':>11}{'errors':>7}")
    for server in ("platform", "litserve"):
        if server not in r:
            continue
        for kind, rows in r[server]["kinds"].items():
            for c, row in rows.items():
                print(f"{server:<10}{kind:<36}{c:>5}{row['images_per_s']:>9}{str(row['p50_ms']):>9}"
                      f"{str(row['p99_ms']):>9}{row['cpu_ms_per_image']['total']:>11}{row['errors']:>7}")
    for server in ("platform", "litserve"):
        if server in r:
            s = r[server]
            web = s["kinds"]["web JPEG 451x300"][32]
            print(f"{server}: cold start {s['cold_start_s']} s, settled after {s.get('settle_s')} s, idle PSS {s['idle_pss_mb']} MB, under load "
                  f"{web['load_pss_mb']} MB; CPU per image at 32 (web JPEG): {web['cpu_ms_per_image']}")
            print(f"{server}: idle PSS by process, MB: {s['idle_pss_mb_by_process']}")
    if "platform_scipy_monitor" in r:
        s = r["platform_scipy_monitor"]
        print(f"platform, monitor=scipy: cold start {s['cold_start_s']} s, idle PSS {s['idle_pss_mb']} MB: "
              f"{s['idle_pss_mb_by_process']}")
    if "platform_full_decode" in r:
        (kind, rows), = r["platform_full_decode"]["kinds"].items()
        now, before = r["platform"]["kinds"][kind][32]["images_per_s"], rows[32]["images_per_s"]
        print(f"{kind} at 32: {now} img/s reduced against {before} decoded in full = {now / before:.2f}x "
              "(target >= 2x)")
    if "litserve" in r:
        p, q = r["platform"]["kinds"]["web JPEG 451x300"][32], r["litserve"]["kinds"]["web JPEG 451x300"][32]
        floor = r["b_decode_resize_ms"]["web JPEG 451x300"]["reduced"] + r["a_limit"]["cpu_ms_per_image"]
        print(f"web JPEG at 32: platform/LitServe = {p['images_per_s'] / q['images_per_s']:.2f}x (target >= 1.5x); "
              f"platform CPU per image / (decode+resize+forward) = {p['cpu_ms_per_image']['total'] / floor:.2f} "
              "(target <= 1.3)")


if __name__ == "__main__":
    main()
