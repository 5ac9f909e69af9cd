"""Drift-detector latency per window on CPU, against window size and reference size.

Synthetic data: Gaussian embeddings (default 576 dimensions, the mobilenet_v3_small
embedding) and predictions as uniform random ints over 100 classes; reference and window
come from the same distribution (latency barely depends on whether there is drift).

(a) embedding detectors AlibiMMD (permutation test), AlibiKS and ScipyKS (KS per
    principal component) over a grid of reference sizes x window sizes;
(b) prediction detectors AlibiChiSquare and ScipyChiSquare over the same grid;
(c) AlibiMMDOnline: fit time (bootstrap threshold configuration) per reference size and
    the per-step latency (score of a 64-row window divided by 64).

Each detector is fitted once per reference size (the fit does not depend on the window;
the fit time is shown on every row of that reference size) after a small untimed warm-up,
then, per cell, one untimed `score(window)` and up to `--repeats` timed ones; the median
is reported per window (ms) and per sample (us), the fastest call is kept in the JSON. A
cell stops repeating once it has spent `--max-seconds-per-cell`, and is skipped when one
call is predicted to take longer than that (extrapolating the fastest call of the largest
measured cell as (n_ref + n)^2). A detector that raises on a cell is recorded as an error.
ScipyKS is the baseline for AlibiKS, and MMD is also shown relative to it at the same
sizes; the MMD timings (fastest call per cell, the least disturbed by other load on a
shared machine; the fit on medians is in the JSON too) are fitted to see how their cost
grows with n_ref + n: log t against log(n_ref + n), and t = a + b (n_ref + n)^2.
Prints tables, writes bench/results/drift.json.
Usage: python bench/bench_drift.py [--quick] [--dim 576] [--refs 100 500 1000 2000]
       [--windows 32 64 256 1024] [--repeats 5] [--max-seconds-per-cell 6]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore")
for _name in ("alibi_detect", "alibi_detect.cd", "alibi_detect.utils"):
    logging.getLogger(_name).setLevel(logging.ERROR)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mlplatform import storage  # noqa: E402
from mlplatform.monitoring import detectors as D  # noqa: E402


def _embeddings(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    return rng.standard_normal((n, dim)).astype(np.float32)


def _predictions(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    return rng.integers(0, num_classes, n).astype(np.int64)


def _timed(fn, *a) -> float:
    t0 = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t0


def _grid(name: str, make, feature: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Fit per reference size, time score() per window size; skip cells predicted too slow."""
    rng = np.random.default_rng(args.seed)

    def data(n: int) -> np.ndarray:
        if feature == "embedding":
            return _embeddings(rng, n, args.dim)
        return _predictions(rng, n, args.num_classes)

    # Untimed warm-up (lazy imports, thread pools, allocator): on a shared machine the first
    # calls of a process can be far slower than the steady state. Every class present once.
    warm = make()
    warm.fit(data(512) if feature == "embedding" else np.arange(args.num_classes).repeat(5),
             args.num_classes)
    window = data(256) if feature == "embedding" else np.arange(args.num_classes).repeat(3)
    t_end = time.perf_counter() + args.warmup_seconds
    for i in range(8):
        warm.score(window)
        if i >= 1 and time.perf_counter() > t_end:
            break

    rows: list[dict[str, Any]] = []
    largest: tuple[int, float] | None = None  # (n_ref + n, fastest call) of the largest measured cell
    for n_ref in args.refs:
        det = make()
        ref = data(n_ref)
        fit_s = _timed(det.fit, ref, args.num_classes)
        for n in args.windows:
            row: dict[str, Any] = {"detector": name, "feature": feature, "n_ref": n_ref, "window": n,
                                   "fit_s": round(fit_s, 4)}
            rows.append(row)
            if largest is not None:
                predicted = largest[1] * ((n_ref + n) / largest[0]) ** 2
                if predicted > args.max_seconds_per_cell:
                    row.update(status="skipped", reason=f"predicted {predicted:.1f} s per call > "
                               f"--max-seconds-per-cell {args.max_seconds_per_cell:g}")
                    print(f"  {name:<16} n_ref={n_ref:<5} window={n:<5} skipped", flush=True)
                    continue
            window = data(n)
            try:  # one untimed call per cell; it also counts towards the cell's time
                spent = _timed(det.score, window)
            except Exception as e:  # a detector that cannot score this cell: record why
                row.update(status="error", reason=f"{type(e).__name__}: {e}"[:200])
                print(f"  {name:<16} n_ref={n_ref:<5} window={n:<5} error: {row['reason'][:80]}",
                      flush=True)
                continue
            times: list[float] = []
            while len(times) < args.repeats and (not times or spent < args.max_seconds_per_cell):
                t = _timed(det.score, window)
                times.append(t)
                spent += t
            med, fastest = statistics.median(times), min(times)
            if largest is None or n_ref + n >= largest[0]:
                largest = (n_ref + n, fastest)
            row.update(status="ok", repeats=len(times), times_ms=[round(t * 1e3, 3) for t in times],
                       ms_per_window=round(med * 1e3, 3), min_ms_per_window=round(fastest * 1e3, 3),
                       us_per_sample=round(med / n * 1e6, 2))
            print(f"  {name:<16} n_ref={n_ref:<5} window={n:<5} {med * 1e3:10.2f} ms "
                  f"({len(times)} runs)", flush=True)
    return rows


def _online(args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = np.random.default_rng(args.seed + 1)
    rows = []
    for n_ref in args.online_refs:
        det = D.AlibiMMDOnline(ert=args.ert, window_size=args.online_window, n_bootstraps=args.n_bootstraps)
        fit_s = _timed(det.fit, _embeddings(rng, n_ref, args.dim), args.num_classes)
        window = _embeddings(rng, args.online_steps, args.dim)
        times = [_timed(det.score, window) for _ in range(args.repeats)]
        med = statistics.median(times)
        rows.append({"detector": "AlibiMMDOnline", "feature": "embedding", "n_ref": n_ref,
                     "ert": args.ert, "window_size": args.online_window, "n_bootstraps": args.n_bootstraps,
                     "fit_s": round(fit_s, 4), "steps": args.online_steps, "repeats": len(times),
                     "ms_per_window": round(med * 1e3, 3),
                     "us_per_step": round(med / args.online_steps * 1e6, 2)})
        print(f"  AlibiMMDOnline   n_ref={n_ref:<5} fit {fit_s:.2f} s, "
              f"{med / args.online_steps * 1e6:.0f} us/step", flush=True)
    return rows


def _mmd_growth(rows: list[dict[str, Any]], key: str = "min_ms_per_window") -> dict[str, Any]:
    """Fit the measured MMD times (by default each cell's fastest call, the least disturbed
    by other load): log t = c + k log(n_ref + n), and t = a + b (n_ref + n)^2."""
    measured = [r for r in rows if r["status"] == "ok"]
    pts = [(r["n_ref"] + r["window"], r[key] / 1e3) for r in measured]
    if len(pts) < 3:
        return {"cells": len(pts), "note": "too few measured cells to fit"}
    big_n = np.array([p[0] for p in pts], np.float64)
    t = np.array([p[1] for p in pts], np.float64)

    def exponent(mask: np.ndarray) -> float | None:
        if mask.sum() < 2 or len(set(big_n[mask])) < 2:
            return None
        return float(np.polyfit(np.log(big_n[mask]), np.log(t[mask]), 1)[0])

    large = big_n >= 1000
    design = np.stack([np.ones_like(big_n), big_n ** 2], 1)
    (a, b), *_ = np.linalg.lstsq(design, t, rcond=None)
    resid = t - design @ np.array([a, b])
    r2 = 1 - float(resid @ resid) / float(((t - t.mean()) ** 2).sum())
    ratio_ns = t / big_n ** 2 * 1e9
    return {
        "cells": len(pts), "timing": key,
        "exponent_all_cells": round(exponent(np.ones_like(big_n, bool)), 3),
        "exponent_n_ge_1000": None if exponent(large) is None else round(exponent(large), 3),
        "cells_n_ge_1000": int(large.sum()),
        "quadratic_fit": {"intercept_ms": round(float(a) * 1e3, 3), "ns_per_pair": round(float(b) * 1e9, 4),
                          "r2": round(r2, 4)},
        "ns_per_pair_by_cell": [{"n_ref": r["n_ref"], "window": r["window"], "ns_per_pair": round(float(x), 4)}
                                for r, x in zip(measured, ratio_ns, strict=True)],
        "ns_per_pair_n_ge_1000": {"min": round(float(ratio_ns[large].min()), 4),
                                  "max": round(float(ratio_ns[large].max()), 4)} if large.any() else None,
    }


def _relative(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["detector"], r["n_ref"], r["window"]): r for r in cells if r["status"] == "ok"}
    out = []
    for (det, n_ref, n), base in by.items():
        if det != "ScipyKS":
            continue
        row: dict[str, Any] = {"n_ref": n_ref, "window": n, "scipy_ks_ms": base["ms_per_window"]}
        for other, key in (("AlibiKS", "alibi_ks_over_scipy_ks"), ("AlibiMMD", "mmd_over_scipy_ks")):
            o = by.get((other, n_ref, n))
            row[key] = round(o["ms_per_window"] / base["ms_per_window"], 2) if o else None
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small grid, for a smoke run")
    ap.add_argument("--dim", type=int, default=576, help="embedding dimension")
    ap.add_argument("--num-classes", type=int, default=100)
    ap.add_argument("--refs", type=int, nargs="+", default=[100, 500, 1000, 2000])
    ap.add_argument("--windows", type=int, nargs="+", default=[32, 64, 256, 1024])
    ap.add_argument("--online-refs", type=int, nargs="+", default=[100, 500, 1000])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-seconds-per-cell", type=float, default=6.0)
    ap.add_argument("--warmup-seconds", type=float, default=2.0, help="untimed warm-up per detector")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    ap.add_argument("--n-permutations", type=int, default=100)
    ap.add_argument("--n-components", type=int, default=8)
    ap.add_argument("--ert", type=float, default=500)
    ap.add_argument("--online-window", type=int, default=16)
    ap.add_argument("--n-bootstraps", type=int, default=1000)
    ap.add_argument("--online-steps", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "drift.json"))
    args = ap.parse_args()
    if args.quick:
        args.refs, args.windows, args.online_refs = [100, 500], [32, 256], [100]
        args.repeats = min(args.repeats, 2)

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    import alibi_detect.cd  # noqa: F401  (imported up front so the first fit does not pay for it)

    for name in ("alibi_detect", "alibi_detect.cd", "alibi_detect.utils"):
        logging.getLogger(name).setLevel(logging.ERROR)
    load_before = os.getloadavg()

    embedding = [
        ("AlibiMMD", lambda: D.AlibiMMD(n_permutations=args.n_permutations, device="cpu")),
        ("AlibiKS", lambda: D.AlibiKS(n_components=args.n_components)),
        ("ScipyKS", lambda: D.ScipyKS(n_components=args.n_components)),
    ]
    prediction = [("AlibiChiSquare", D.AlibiChiSquare), ("ScipyChiSquare", D.ScipyChiSquare)]
    cells: list[dict[str, Any]] = []
    for name, make in embedding:
        cells += _grid(name, make, "embedding", args)
    for name, make in prediction:
        cells += _grid(name, make, "prediction", args)
    online = _online(args)
    mmd_rows = [r for r in cells if r["detector"] == "AlibiMMD"]
    growth = _mmd_growth(mmd_rows)
    growth["using_median"] = _mmd_growth(mmd_rows, "ms_per_window")
    relative = _relative(cells)
    total_s = time.perf_counter() - t_start

    print()
    print(f"{'detector':<16}{'n_ref':>7}{'window':>8}{'fit s':>9}{'ms/window':>12}{'us/sample':>12}")
    for r in cells:
        if r["status"] != "ok":
            print(f"{r['detector']:<16}{r['n_ref']:>7}{r['window']:>8}{r['fit_s']:>9.3f}"
                  f"{r['status']:>12}{'':>12}  ({r['reason'][:70]})")
        else:
            print(f"{r['detector']:<16}{r['n_ref']:>7}{r['window']:>8}{r['fit_s']:>9.3f}"
                  f"{r['ms_per_window']:>12.2f}{r['us_per_sample']:>12.1f}")
    for r in online:
        print(f"{'AlibiMMDOnline':<16}{r['n_ref']:>7}{'1 step':>8}{r['fit_s']:>9.3f}"
              f"{r['ms_per_window'] / r['steps']:>12.2f}{r['us_per_step']:>12.1f}")
    print(f"(AlibiMMDOnline: ert={args.ert:g}, window_size={args.online_window}, "
          f"n_bootstraps={args.n_bootstraps}; per step = score of {args.online_steps} rows / "
          f"{args.online_steps})")

    print()
    print(f"{'n_ref':>7}{'window':>8}{'ScipyKS ms':>12}{'AlibiKS/ScipyKS':>17}{'MMD/ScipyKS':>13}")
    for r in relative:
        ks = "-" if r["alibi_ks_over_scipy_ks"] is None else f"{r['alibi_ks_over_scipy_ks']:.2f}x"
        mmd = "skipped" if r["mmd_over_scipy_ks"] is None else f"{r['mmd_over_scipy_ks']:.0f}x"
        print(f"{r['n_ref']:>7}{r['window']:>8}{r['scipy_ks_ms']:>12.2f}{ks:>17}{mmd:>13}")

    print()
    if "exponent_all_cells" in growth:
        q = growth["quadratic_fit"]
        k_big = growth["exponent_n_ge_1000"]
        big = "" if k_big is None else (f"; k={k_big:.2f} over the {growth['cells_n_ge_1000']} cells "
                                        f"with n_ref+n >= 1000")
        conclusion = (f"MMD cost grows ~ (n_ref+n)^k with k={growth['exponent_all_cells']:.2f} "
                      f"(least squares over {growth['cells']} cells' fastest calls{big}); "
                      f"t = {q['intercept_ms']:.1f} ms "
                      f"+ {q['ns_per_pair']:.3f} ns x (n_ref+n)^2 fits with R^2={q['r2']:.3f} "
                      f"({args.n_permutations} permutations)")
    else:
        conclusion = "MMD growth: " + growth["note"]
    growth["conclusion"] = conclusion
    print(conclusion)
    print(f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, dim {args.dim}, "
          f"load average before {load_before[0]:.2f}; total {total_s:.1f} s")

    results = {
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "versions": {"torch": torch.__version__, "numpy": np.__version__,
                     "alibi_detect": __import__("alibi_detect").__version__,
                     "scipy": __import__("scipy").__version__},
        "cells": cells, "online": online, "relative_to_scipy_ks": relative, "mmd_growth": growth,
        "total_s": round(total_s, 1),
    }
    storage.write_json(args.out, results)
    print(json.dumps({k: results[k] for k in ("cpus", "torch_threads", "total_s")}))


if __name__ == "__main__":
    main()
