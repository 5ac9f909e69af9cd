"""The serving accelerator path on a GPU, against the CPU path, in one run.

The extended model of a registered version as plain eager PyTorch on CPU (fp32, the
reference), with the serving defaults on CPU, and on CUDA with the settings of
`serve.accelerator` (fp16, channels_last, fuse, torch.compile). Checks
that the GPU answers agree with the CPU (top-1, probabilities, embeddings) and measures
the raw forward throughput per batch size (the serving benchmark's "limit" on a GPU).
Needs no Ray. Usage: python bench/gpu_check.py --registry <root>/registry [--version v1]
"""

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from mlplatform.cli_check import compose_defaults
from mlplatform.data import synthetic
from mlplatform.data.preprocess import to_uint8
from mlplatform.deployments.extended import ExtendedModel


def _throughput(model: ExtendedModel, arr: np.ndarray, bs: int, seconds: float = 1.0) -> float:
    x = model.to_tensor(arr[:bs])
    for _ in range(3):
        model.forward(x)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model.forward(x)  # includes the copy of probabilities and embeddings back to the host
        n += bs
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--registry", required=True)
    ap.add_argument("--model-name", default="species-classifier")
    ap.add_argument("--version", default="v1")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench/results"), "gpu_check.json"))
    ap.add_argument("--device", default="cuda", help="cpu only to dry-run this script")
    ap.add_argument("--variants", default="", help="comma-separated names to run (default: all)")
    args = ap.parse_args()
    assert args.device == "cpu" or torch.cuda.is_available(), "no CUDA device"
    # The reference: plain eager PyTorch on CPU in fp32, none of the serving optimisations.
    defaults = OmegaConf.to_container(compose_defaults().serve.accelerator)
    cpu = ExtendedModel(args.registry, args.model_name, args.version,
                        **{**defaults, "device": "cpu", "fuse": False, "channels_last": False, "autotune": False})
    n_cls = cpu.num_classes
    size = max(cpu.spec.resize_size, cpu.spec.image_size)
    imgs = [synthetic.render(i % n_cls, 10_000 + i, size) for i in range(args.images)]
    arr = np.stack([to_uint8(im, cpu.spec) for im in imgs])
    ref_p, ref_e = cpu.forward(cpu.to_tensor(arr))
    # fuse (BatchNorm folded into the convolutions) and autotune are on unless a row says
    # "nofuse"; autotune must choose nothing off the CPU.
    variants = {
        "cpu_fp32_serving_defaults": dict(device="cpu"),
        "cuda_fp32": dict(device=args.device, half=False, channels_last=False),
        "cuda_fp32_nofuse": dict(device=args.device, half=False, channels_last=False, fuse=False),
        "cuda_fp32_channels_last": dict(device=args.device, half=False, channels_last=True),
        "cuda_fp32_compile": dict(device=args.device, half=False, channels_last=False, compile=True),
        "cuda_fp16": dict(device=args.device, half=True, channels_last=False),
        "cuda_fp16_nofuse": dict(device=args.device, half=True, channels_last=False, fuse=False),
        "cuda_fp16_channels_last": dict(device=args.device, half=True, channels_last=True),
        "cuda_fp16_channels_last_compile": dict(device=args.device, half=True, channels_last=True, compile=True),
    }
    if args.variants:
        unknown = set(args.variants.split(",")) - set(variants)
        assert not unknown, f"--variants: unknown {sorted(unknown)}; known: {sorted(variants)}"
        variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
    results: dict[str, dict] = {}
    for name, kw in variants.items():
        t0 = time.perf_counter()
        m = ExtendedModel(args.registry, args.model_name, args.version, **{**defaults, **kw})
        p, e = m.forward(m.to_tensor(arr))
        first = time.perf_counter() - t0
        cos = (e * ref_e).sum(1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(ref_e, axis=1) + 1e-12)
        preds = m.predict_arrays(arr[:8], 3)
        results[name] = {
            "top1_agreement_with_cpu": float((p.argmax(1) == ref_p.argmax(1)).mean()),
            "max_abs_prob_diff": float(np.abs(p - ref_p).max()),
            "min_embedding_cosine": float(cos.min()),
            "first_call_s": round(first, 2),
            "dtype": str(m.dtype), "channels_last": m.channels_last, "device": str(m.device),
            "fuse": kw.get("fuse", True), "autotuned_layers": len(m.tuned),
            "sample": [pr.labels[0] for pr in preds[:4]],
            "images_per_s": {bs: round(_throughput(m, arr, bs)) for bs in
                             ((1, 8, 32, 128, 512) if m.device.type == "cuda" else (1, 8, 32))},
        }
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "sample"}), flush=True)
    torch.set_num_threads(os.cpu_count() or 1)
    results["cpu_fp32"] = {"images_per_s": {bs: round(_throughput(cpu, arr, bs)) for bs in (1, 8, 32, 128)},
                           "threads": torch.get_num_threads()}
    info = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "torch": torch.__version__, "version": args.version,
            "model": cpu.meta["config"]["model"]["_target_"], "model_name": cpu.meta["config"]["model"].get("name"),
            "image_size": cpu.spec.image_size, "num_classes": n_cls, "images": args.images}
    print(json.dumps(info))
    print(f"{'variant':<34}{'top1 agree':>11}{'max|dp|':>10}{'min cos':>9}" +
          "".join(f"{'bs' + str(b):>9}" for b in (1, 8, 32, 128, 512)))
    for name, r in results.items():
        ips = r["images_per_s"]
        print(f"{name:<34}{r.get('top1_agreement_with_cpu', 1.0):>11.4f}{r.get('max_abs_prob_diff', 0.0):>10.4f}"
              f"{r.get('min_embedding_cosine', 1.0):>9.4f}" + "".join(f"{ips.get(b, '-'):>9}" for b in (1, 8, 32, 128, 512)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"info": info, "results": results}, indent=2))


if __name__ == "__main__":
    main()
