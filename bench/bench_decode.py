"""Decode plus resize per image, on real photographs, with full and reduced-scale JPEG decoding
(`serve.inputs.reduced_decode`), and what reduced decoding changes in the model's input and
answers.

Photos from scikit-image's `data` module (real photographs, not this project's generator):
- web: chelsea, its own 451x300, as a JPEG (quality 90);
- phone: coffee resized to 4000x3000 (LANCZOS) as a JPEG (quality 92): a phone photo's pixel
  count, though smoother than a sensor's;
- png: astronaut, 512x512, as a PNG (never reduced: only JPEG has DCT scaling);
- and each of skimage's photographs (`PHOTOS`) as a 1600x1200 JPEG, for the agreement figures.

Per request kind, the seconds of one decode plus resize to the model's input, single thread
(what one ingress core spends), full and reduced. Agreement: the mean absolute difference of
the uint8 model input (0-255) and its PSNR, and, with `--registry`, a registered model's top-1
agreement and largest score difference between full and reduced decode.

Usage: python bench/bench_decode.py [--image-size 224 --resize-size 256] [--registry DIR --ref production]
Prints a table and writes bench/results/decode.json.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

from mlplatform.data.preprocess import PreprocessSpec, to_uint8
from mlplatform.deployments.decoding import InputLimits, decode_image

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The photographs scikit-image ships (no download): colour, and greyscale (sent as greyscale JPEGs).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "camera", "clock", "coins", "moon", "brick", "grass", "gravel")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def request_kinds() -> dict[str, bytes]:
    from skimage import data

    return {
        "web JPEG 451x300": _encode(Image.fromarray(data.chelsea()), "JPEG", quality=90),
        "phone JPEG 4000x3000": _encode(Image.fromarray(data.coffee()).resize((4000, 3000), Image.LANCZOS),
                                        "JPEG", quality=92),
        "PNG 512x512": _encode(Image.fromarray(data.astronaut()), "PNG"),
    }


def agreement_photos() -> dict[str, bytes]:
    from skimage import data

    out = {}
    for name in PHOTOS:
        img = Image.fromarray(getattr(data, name)()).resize((1600, 1200), Image.LANCZOS)
        out[name] = _encode(img, "JPEG", quality=92)
    return out


def limits(reduced: bool) -> InputLimits:
    return InputLimits(max_bytes=50_000_000, max_pixels=40_000_000, min_width=16, min_height=16,
                       formats=("JPEG", "PNG"), reduced_decode=reduced)


def model_input(data: bytes, spec: PreprocessSpec, reduced: bool) -> np.ndarray:
    return to_uint8(decode_image(data, limits(reduced), draft_side=2 * spec.resize_size).image, spec)


def time_per_image(data: bytes, spec: PreprocessSpec, reduced: bool, seconds: float) -> float:
    model_input(data, spec, reduced)  # warm
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        model_input(data, spec, reduced)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def model_agreement(registry: str, model: str, ref: str, photos: dict[str, bytes]) -> dict:
    import torch

    from mlplatform.data.preprocess import normalize
    from mlplatform.models.load import load_model
    from mlplatform.registry.store import Registry

    net, spec, meta = load_model(Registry(registry, model), ref)
    net.eval()
    full = np.stack([model_input(d, spec, False) for d in photos.values()])
    reduced = np.stack([model_input(d, spec, True) for d in photos.values()])
    with torch.no_grad():
        pf = torch.softmax(net(torch.from_numpy(normalize(full, spec))), -1).numpy()
        pr = torch.softmax(net(torch.from_numpy(normalize(reduced, spec))), -1).numpy()
    return {"model": f"{model}:{meta.get('version', ref)}", "images": len(photos),
            "top1_agreement": float(np.mean(pf.argmax(-1) == pr.argmax(-1))),
            "max_score_difference": float(np.abs(pf - pr).max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--resize-size", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=2.0, help="timing per request kind and mode")
    ap.add_argument("--registry", help="a registry root: also the model's top-1 agreement")
    ap.add_argument("--model", default="species-classifier")
    ap.add_argument("--ref", default="production")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode.json"))
    args = ap.parse_args()
    spec = PreprocessSpec(args.image_size, args.resize_size, MEAN, STD, "bilinear")

    rows = []
    for kind, data in request_kinds().items():
        full = time_per_image(data, spec, False, args.seconds)
        reduced = time_per_image(data, spec, True, args.seconds)
        a, b = model_input(data, spec, False), model_input(data, spec, True)
        rows.append({"request": kind, "bytes": len(data), "full_ms": round(full * 1e3, 2),
                     "reduced_ms": round(reduced * 1e3, 2), "speedup": round(full / reduced, 2),
                     "mean_abs_diff": round(float(np.abs(a.astype(int) - b.astype(int)).mean()), 3),
                     "psnr_db": round(psnr(a, b), 1)})
    photos = agreement_photos()
    diffs = {name: (model_input(d, spec, False), model_input(d, spec, True)) for name, d in photos.items()}
    agreement = {"photos": sorted(photos), "size": "1600x1200 JPEG q92",
                 "mean_abs_diff_max": round(max(float(np.abs(a.astype(int) - b.astype(int)).mean())
                                                for a, b in diffs.values()), 3),
                 "psnr_db_min": round(min(psnr(a, b) for a, b in diffs.values()), 1)}
    if args.registry:
        agreement.update(model_agreement(args.registry, args.model, args.ref, photos))

    print(f"decode + resize to {args.image_size} px (short side {args.resize_size}), one thread, median per image")
    print(f"{'request':<24}{'bytes':>9}{'full ms':>10}{'reduced ms':>12}{'speedup':>9}{'|diff|':>8}{'PSNR dB':>9}")
    for r in rows:
        print(f"{r['request']:<24}{r['bytes']:>9}{r['full_ms']:>10}{r['reduced_ms']:>12}{r['speedup']:>9}"
              f"{r['mean_abs_diff']:>8}{r['psnr_db']:>9}")
    print("agreement, full vs reduced decode:", json.dumps(agreement))
    out = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.platform(),
           "cpus": __import__("os").cpu_count(), "image_size": args.image_size, "resize_size": args.resize_size,
           "rows": rows, "agreement": agreement}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
