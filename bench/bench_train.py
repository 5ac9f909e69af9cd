"""Training throughput: the platform's Ray Train path against a plain PyTorch loop.

Same model, data, batch size, optimizer and epoch count, in one run; the plain loop runs
before and after Ray Train and its epochs are pooled. The plain loop holds
the decoded split in memory and does exactly the per-epoch work of the Ray Train worker
(augment, normalise, forward, backward, validate) in this process, with no Ray at all.

Prints a table and writes bench/results/train-<data>.json.
Usage: python bench/bench_train.py [--data default|smoke] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mlplatform import storage
from mlplatform.config import register_configs, validate
from mlplatform.data.preprocess import decode, normalize_torch, to_uint8
from mlplatform.training import datasets
from mlplatform.training.job import fit, make_trainer, prepare, run_name
from mlplatform.training.loop import _augment

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def plain_loop(cfg, snap, spec) -> dict[str, float]:
    """What a user would write without the platform: one process, tensors in memory."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        items = datasets.split_items(snap, split, snap.labels)
        x = np.stack([to_uint8(decode(storage.read_bytes(it["path"])), spec) for it in items])
        return torch.from_numpy(x), torch.tensor([it["label"] for it in items])

    xt, yt = load("train")
    xv, yv = load("val")
    model = instantiate(cfg.model, num_classes=len(snap.labels))
    opt = instantiate(cfg.train.optimizer)(params=model.parameters())
    sched = instantiate(cfg.train.scheduler)(optimizer=opt)
    bs, epoch_times = cfg.train.batch_size, []
    for _ in range(cfg.train.epochs):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(yt), generator=gen)
        for i in range(0, len(yt), bs):
            idx = perm[i:i + bs]
            x = normalize_torch(_augment(xt[idx], cfg.train.augment.hflip, cfg.train.augment.translate, gen), spec)
            loss = F.cross_entropy(model(x), yt[idx], label_smoothing=cfg.train.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        with torch.no_grad():
            for i in range(0, len(yv), cfg.train.eval_batch_size):
                model(normalize_torch(xv[i:i + cfg.train.eval_batch_size], spec))
        epoch_times.append(time.perf_counter() - t0)
    return {"n_train": len(yt), "epoch_seconds": epoch_times}


def main() -> None:
    ap = argparse.ArgumentParser()
    # default: the default data and train config (100 species x 100 images of 64 px, batch 128,
    # mobilenet_v3_small); smoke: +experiment=smoke (8 species of 32 px, tiny_cnn, batch 32).
    ap.add_argument("--data", choices=["default", "smoke"], default="default")
    ap.add_argument("--epochs", type=int, default=3)
    # Ray gives a 1-CPU worker one intra-op thread (OMP_NUM_THREADS=1); the plain loop uses
    # every core. --torch-threads 2 gives the worker the same threads as the baseline.
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.out is None:
        args.out = str(Path(__file__).parent / "results" / f"train-{args.data}.json")
    register_configs()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = ["+mode=train", f"paths.root={tmp}", "logger=none", f"train.epochs={args.epochs}",
                     "train.early_stopping.patience=100", f"train.torch_threads={args.torch_threads}"]
        if args.data == "smoke":
            overrides.insert(1, "+experiment=smoke")
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        validate(cfg)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        snap, spec, dsets = prepare(cfg)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        # The plain loop runs before and after Ray Train: this shared machine's speed drifts
        # by tens of percent over minutes, and one run on each side brackets it.
        plain_before = plain_loop(cfg, snap, spec)
        name = run_name("bench")
        t0 = time.perf_counter()
        result = fit(make_trainer(cfg, resolved, spec, dsets, name, storage.join(tmp, "ray_results")), name)
        ray_total = time.perf_counter() - t0
        history = result.return_value["history"]
        # An epoch ends when its checkpoint is reported: the next one cannot start sooner.
        ray_epochs = [h["epoch_seconds"] + h["time/checkpoint_s"] for h in history]
        stages = {k: round(statistics.median(h[k] for h in history), 3)
                  for k in ("time/data_wait_s", "time/train_s", "time/val_s", "time/checkpoint_s")}
        n_train = result.return_value["history"][0]["train/images"]
        ray.shutdown()
        plain_after = plain_loop(cfg, snap, spec)
        plain = {"n_train": plain_after["n_train"],
                 "epoch_seconds": plain_before["epoch_seconds"] + plain_after["epoch_seconds"]}

    ray_steady = n_train / statistics.median(ray_epochs)
    plain_steady = plain["n_train"] / statistics.median(plain["epoch_seconds"])
    res = {
        "data": args.data, "model": cfg.model.name if "name" in cfg.model else cfg.model._target_,
        "batch_size": cfg.train.batch_size, "epochs": args.epochs, "worker_torch_threads": args.torch_threads,
        "plain_torch_threads": torch.get_num_threads(), "train_images": n_train,
        "image_size": cfg.data.preprocess.image_size, "ray_stage_seconds_median": stages,
        "plain_epoch_seconds_median": round(statistics.median(plain["epoch_seconds"]), 3),
        "plain_epoch_seconds": {"before": [round(t, 3) for t in plain_before["epoch_seconds"]],
                                "after": [round(t, 3) for t in plain_after["epoch_seconds"]]},
        "ray_train_images_per_s_steady": round(ray_steady, 1),
        "plain_loop_images_per_s_steady": round(plain_steady, 1),
        "ratio_steady": round(ray_steady / plain_steady, 3),
        "ray_train_images_per_s_end_to_end": round(n_train * args.epochs / ray_total, 1),
        "plain_loop_images_per_s_end_to_end": round(2 * n_train * args.epochs / sum(plain["epoch_seconds"]), 1),
        "ray_train_fit_seconds": round(ray_total, 2),
        "ray_epochs": [{k: round(v, 3) for k, v in h.items() if k.startswith("time/") or k == "epoch_seconds"}
                       for h in history],
    }
    print(f"{'path':<34}{'steady img/s':>14}{'end-to-end img/s':>18}")
    print(f"{'plain PyTorch loop (no Ray)':<34}{res['plain_loop_images_per_s_steady']:>14}"
          f"{res['plain_loop_images_per_s_end_to_end']:>18}")
    print(f"{'Ray Train TorchTrainer, 1 worker':<34}{res['ray_train_images_per_s_steady']:>14}"
          f"{res['ray_train_images_per_s_end_to_end']:>18}")
    print("Ray Train epoch, median seconds by stage: " + ", ".join(f"{k[5:-2]} {v}" for k, v in stages.items())
          + f"; plain loop epoch {res['plain_epoch_seconds_median']}")
    print(f"ratio (Ray Train / plain, steady state): {res['ratio_steady']}; "
          f"fit() incl. worker start-up {res['ray_train_fit_seconds']} s")
    storage.write_json(args.out, res)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
