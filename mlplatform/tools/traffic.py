"""Send synthetic species pictures to a running server, optionally drifted, optionally with
human feedback (the true species), for demos and the lifecycle walkthrough (docs/lifecycle.md).

    python -m mlplatform.tools.traffic --n 200                      # in-distribution
    python -m mlplatform.tools.traffic --n 200 --drifted --feedback # drifted, labelled

Prints one JSON line: requests, errors, versions served, accuracy against the truth.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections import Counter

import httpx

from mlplatform.config import DRIFT_KINDS
from mlplatform.data import synthetic


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--species", type=int, default=100, help="data.synthetic.num_classes of the served model")
    ap.add_argument("--size", type=int, default=64, help="image size in pixels")
    ap.add_argument("--drifted", action="store_true", help="apply every drift kind")
    ap.add_argument("--strength", type=float, default=0.6)
    ap.add_argument("--feedback", action="store_true", help="POST /feedback with the true species")
    ap.add_argument("--start", type=int, default=100_000, help="first image index (new pictures each run)")
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args(argv)
    names = synthetic.species_names(args.species)
    kinds = list(DRIFT_KINDS) if args.drifted else []
    counts: Counter[str] = Counter()
    correct = errors = 0
    lock = threading.Lock()

    def work(k: int) -> None:
        nonlocal correct, errors
        with httpx.Client(timeout=30) as client:
            for i in range(k, args.n, args.concurrency):
                species = i % args.species
                img = synthetic.render(species, args.start + i, args.size, 0, kinds, args.strength if kinds else 0.0)
                r = client.post(f"{args.url}/predict", content=synthetic.encode_jpeg(img),
                                headers={"content-type": "image/jpeg"})
                if r.status_code != 200:
                    with lock:
                        errors += 1
                    continue
                body = r.json()
                if args.feedback:
                    client.post(f"{args.url}/feedback", json={"request_id": body["request_id"],
                                                              "label": names[species]})
                with lock:
                    counts[body["version"]] += 1
                    correct += body["predictions"][0]["label"] == names[species]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = sum(counts.values())
    print(json.dumps({"requests": args.n, "errors": errors, "versions": dict(counts),
                      "accuracy": round(correct / ok, 4) if ok else None, "drifted": args.drifted,
                      "feedback": args.feedback}))
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
