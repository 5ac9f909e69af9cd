"""How full the forward passes are, and what fuller ones save, with the platform as deployed.

For each `serve.batching.batch_wait_timeout_s` given, starts `python run.py +mode=serve` as
bench_race.py does (API keys, capture and drift monitoring on), waits for it to go quiet, then
sends the 451x300 web JPEG (JSON, base64) from a closed loop of clients. Reports img/s, p50 and
p99, server CPU per image by process, and the images per forward pass, from the ingress's
request log (each answered request names the size of the pass it was in).

    python bench/bench_batching.py --waits 0.01 0.05 0.1 --seconds 15

Writes bench/results/batching.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import glob
import json
import os
import platform
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode  # noqa: E402
import bench_race as R  # noqa: E402

RAY_LOGS = "/tmp/ray/session_latest/logs/serve"


def _pass_sizes() -> list[int]:
    """The pass size of every answered request in the request logs of the newest Ray session."""
    sizes = []
    for path in glob.glob(f"{os.path.realpath(RAY_LOGS)}/requests_Ingress_*.jsonl"):
        for line in Path(path).read_text().splitlines():
            rec = json.loads(line)
            if rec.get("event") == "request" and rec.get("batch_size"):
                sizes.append(int(rec["batch_size"]))
    return sizes


def _one(root: str, wait: float, concurrency: int, seconds: float) -> dict:
    body = json.dumps({"image": base64.b64encode(bench_decode.request_kinds()["web JPEG 451x300"]).decode()}).encode()
    headers = {"authorization": f"Bearer {R.KEY}"}
    cmd = [*R.platform_cmd(root), f"serve.batching.batch_wait_timeout_s={wait}"]
    with R.serving(f"batching-{wait}", cmd, R.server_env(), R.PLATFORM_URL, body, "application/json",
                   headers) as (proc, _):
        asyncio.run(R._load(R.PLATFORM_URL, body, "application/json", 8, 3.0, headers))  # warm
        settle = R._settle(proc.pid)
        seen = len(_pass_sizes())
        before = R._cpu(proc.pid)
        res = asyncio.run(R._load(R.PLATFORM_URL, body, "application/json", concurrency, seconds, headers))
        res["cpu_ms_per_image"] = R._cpu_ms_per_image(before, R._cpu(proc.pid), res["images"])
        sizes = _pass_sizes()[seen:]
        res["images_per_pass"] = round(len(sizes) / sum(1 / s for s in sizes), 1) if sizes else None
        res["settle_s"] = settle
        return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--waits", type=float, nargs="+", default=[0.01, 0.05, 0.1])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--out", default=str(R.HERE / "results" / "batching.json"))
    args = ap.parse_args()
    from mlplatform.config import register_configs

    register_configs()
    out = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.platform(),
           "cpus": os.cpu_count(), "concurrency": args.concurrency, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        print("training mobilenet_v3_small at 224 px (one smoke epoch) ...", flush=True)
        R._train(tmp, "mobilenet_v3_small", 224)
        for wait in args.waits:
            print(f"batch_wait_timeout_s={wait} ...", flush=True)
            out["runs"][str(wait)] = _one(tmp, wait, args.concurrency, args.seconds)
    print(f"\n{'wait s':>7}{'img/pass':>10}{'img/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'model ms':>10}"
          f"{'ingress ms':>12}{'total ms':>10}")
    for wait, r in out["runs"].items():
        cpu = r["cpu_ms_per_image"]
        print(f"{wait:>7}{str(r['images_per_pass']):>10}{r['images_per_s']:>8}{r['p50_ms']:>8}{r['p99_ms']:>8}"
              f"{cpu.get('model replica', 0):>10}{cpu.get('ingress', 0):>12}{cpu['total']:>10}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
