"""Ingest throughput: Ray Data inspection (hash, decode, describe) against a plain Python loop.

Same files, same per-image work, one run. Prints a table and writes bench/results/data.json.
Usage: python bench/bench_data.py [--species 20] [--per-class 100] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import ray

from mlplatform import storage
from mlplatform.data import ingest, synthetic


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--species", type=int, default=20)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "data.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for i, name in enumerate(synthetic.species_names(args.species)):
            synthetic.write_species(tmp, i, name, args.per_class, args.size, 0, [], 0.0)
        gen_s = time.perf_counter() - t0
        items, _ = ingest.list_images(tmp, [".jpg"])
        n = len(items)

        t0 = time.perf_counter()
        baseline = [ingest.inspect_one(storage.read_bytes(it["path"])) for it in items]
        base_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - t0
        ingest.inspect(items[: args.batch_size], args.batch_size)  # warm the worker pool
        t0 = time.perf_counter()
        rows = ingest.inspect(items, args.batch_size)
        ray_s = time.perf_counter() - t0
        ray.shutdown()
        assert [r["sha256"] for r in rows] == [b["sha256"] for b in baseline]

    results = {
        "images": n, "image_size": args.size, "cpus": os.cpu_count(),
        "generate_images_per_s": round(n / gen_s, 1),
        "baseline_loop_images_per_s": round(n / base_s, 1),
        "ray_data_images_per_s": round(n / ray_s, 1),
        "speedup": round(base_s / ray_s, 2),
        "ray_init_s": round(init_s, 2),
    }
    print(f"{'path':<28}{'images/s':>12}")
    print(f"{'synthetic generation':<28}{results['generate_images_per_s']:>12}")
    print(f"{'plain Python loop':<28}{results['baseline_loop_images_per_s']:>12}")
    print(f"{'Ray Data map_batches':<28}{results['ray_data_images_per_s']:>12}")
    print(f"speed-up over the loop: {results['speedup']}x on {results['cpus']} CPUs "
          f"({n} images of {args.size}px; ray.init {results['ray_init_s']} s, not counted)")
    storage.write_json(args.out, results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
