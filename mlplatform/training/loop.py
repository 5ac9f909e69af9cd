"""The Ray Train (V2) training function: runs on every worker of a TorchTrainer.

Each epoch: train on this worker's shard, validate, all-reduce the metrics, checkpoint
(rank 0) and report. A restarted worker group resumes from the latest checkpoint. At the
end, rank 0 restores the best weights, evaluates the test split, samples the monitoring
reference from validation, logs to W&B and returns all of it to the driver.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra.utils import instantiate

from mlplatform import progress
from mlplatform.data.preprocess import PreprocessSpec, normalize_torch
from mlplatform.tracking import Tracker
from mlplatform.training import metrics as M
from mlplatform.training.evaluation import amp_dtype, autocast, forward_batches

log = logging.getLogger(__name__)
STATE = "state.pt"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _augment(x: torch.Tensor, hflip: bool, translate: int, gen: torch.Generator) -> torch.Tensor:
    """Random flips and translations of a uint8 NHWC batch (on its device)."""
    n = x.shape[0]
    if hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip.to(x.device).view(n, 1, 1, 1), x.flip(2), x)
    if translate > 0:
        h, w = x.shape[1], x.shape[2]
        padded = F.pad(x.permute(0, 3, 1, 2), (translate,) * 4).permute(0, 2, 3, 1)
        dx, dy = (int(v) for v in torch.randint(0, 2 * translate + 1, (2,), generator=gen))
        x = padded[:, dy:dy + h, dx:dx + w, :]
    return x


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _gather_node_ids() -> list[str]:
    """The Ray node id of every rank, by rank: where this worker group runs."""
    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [node]
    nodes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return nodes


def _better(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def _maybe_kill(epoch: int, chaos: dict[str, Any], marker_dir: str) -> None:
    """A fault-tolerance drill: the rank-0 worker process dies once, abruptly."""
    at = chaos.get("kill_worker_at_epoch")
    if at is None or epoch != at or ray.train.get_context().get_world_rank() != 0:
        return
    marker = os.path.join(marker_dir, f"chaos-killed-epoch-{epoch}")
    if os.path.exists(marker):
        return
    os.makedirs(marker_dir, exist_ok=True)
    open(marker, "w").close()
    log.warning("chaos: killing the rank-0 worker at epoch %d", epoch)
    os._exit(1)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    if not config.get("verbose"):
        progress.quiet_ray_worker()
    cfg = config["cfg"]
    tcfg = cfg["train"]
    labels: list[str] = config["labels"]
    spec = PreprocessSpec.from_dict(config["spec"])
    if tcfg.get("torch_threads"):
        torch.set_num_threads(int(tcfg["torch_threads"]))
    # Tune trials override a few keys of the train config.
    for key, value in (config.get("overrides") or {}).items():
        _set_path(cfg, key, value)
        tcfg = cfg["train"]

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(cfg["seed"] + rank)
    gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + rank)
    device = ray.train.torch.get_device()
    dtype = amp_dtype(tcfg["amp"], device)

    model = instantiate(cfg["model"], num_classes=len(labels))
    model = ray.train.torch.prepare_model(model)
    nodes = _gather_node_ids()
    optimizer = instantiate(tcfg["optimizer"])(params=model.parameters())
    scheduler = instantiate(tcfg["scheduler"])(optimizer=optimizer) if tcfg.get("scheduler") else None
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)

    start_epoch, best, best_epoch, bad_epochs = 0, None, -1, 0
    history: list[dict[str, float]] = []
    best_state: dict[str, torch.Tensor] | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE), map_location="cpu", weights_only=True)
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, best_epoch = state["epoch"] + 1, state["best"], state["best_epoch"]
        bad_epochs, history, best_state = state["bad_epochs"], state["history"], state["best_state"]
        log.info("resumed from checkpoint after epoch %d", state["epoch"])
    resumed_from = start_epoch if checkpoint is not None else None

    tracker = Tracker(cfg["logger"]["wandb"], config["run_id"], config["run_name"], cfg) if rank == 0 else None
    es, ck = tcfg["early_stopping"], tcfg["checkpoint"]
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    epoch = start_epoch - 1
    for epoch in range(start_epoch, tcfg["epochs"]):
        _maybe_kill(epoch, tcfg.get("chaos") or {}, config["chaos_dir"])
        t0 = time.time()
        model.train()
        loss_sum, n_seen, data_s = 0.0, 0, 0.0
        batches = iter(train_shard.iter_torch_batches(batch_size=tcfg["batch_size"], device=device,
                                                      local_shuffle_buffer_size=8 * tcfg["batch_size"],
                                                      local_shuffle_seed=cfg["seed"] + epoch))
        while True:
            tw = time.perf_counter()
            batch = next(batches, None)
            data_s += time.perf_counter() - tw
            if batch is None:
                break
            x = _augment(batch["image"], tcfg["augment"]["hflip"], tcfg["augment"]["translate"], gen)
            x = normalize_torch(x, spec)
            y = batch["label"]
            with autocast(device, dtype):
                loss = F.cross_entropy(model(x), y, label_smoothing=tcfg["label_smoothing"])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += float(loss.detach()) * len(y)
            n_seen += len(y)
        lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        train_s = time.time() - t0

        logits, y_val, _ = forward_batches(_unwrap(model), val_shard.iter_torch_batches(
            batch_size=tcfg["eval_batch_size"], device=device), spec, device, dtype=dtype)
        k = min(5, len(labels))
        if len(y_val):
            val_loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y_val), reduction="sum"))
            top = np.argsort(-logits, axis=1)[:, :k]
            correct, correct5 = float((top[:, 0] == y_val).sum()), float((top == y_val[:, None]).any(1).sum())
        else:
            val_loss = correct = correct5 = 0.0
        loss_sum, n_seen, val_loss, correct, correct5, n_val = _all_reduce(
            [loss_sum, n_seen, val_loss, correct, correct5, float(len(y_val))], device)
        metrics = {"epoch": epoch, "train/loss": loss_sum / max(n_seen, 1), "val/loss": val_loss / max(n_val, 1),
                   "val/acc": correct / max(n_val, 1), "val/top5": correct5 / max(n_val, 1), "lr": lr,
                   "epoch_seconds": time.time() - t0, "train/images": n_seen,
                   # Where the epoch went: waiting on the shard, the training pass as a whole, validation.
                   "time/data_wait_s": data_s, "time/train_s": train_s, "time/val_s": time.time() - t0 - train_s}
        history.append(metrics)
        score = metrics[es["metric"]]
        if _better(score, best, es["mode"], es["min_delta"]):
            best, best_epoch, bad_epochs = score, epoch, 0
            best_state = {k2: v.detach().cpu().clone() for k2, v in _unwrap(model).state_dict().items()}
        else:
            bad_epochs += 1
        metrics.update({"best/" + es["metric"]: best, "best/epoch": best_epoch})

        tc = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save({"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict() if scheduler is not None else None,
                            "epoch": epoch, "best": best, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                            "history": history, "best_state": best_state}, os.path.join(tmp, STATE))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, ck["metric"]: metrics[ck["metric"]]}, checkpoint=ckpt)
        # Known only after the report: kept in the history this function returns.
        metrics["time/checkpoint_s"] = time.perf_counter() - tc
        if tracker is not None:
            tracker.log(metrics, step=epoch)
        if bad_epochs >= es["patience"]:
            log.info("early stop at epoch %d: no %s gain for %d epochs", epoch, es["metric"], bad_epochs)
            break

    if rank != 0:
        return None
    return _finish(model, best_state, labels, spec, device, dtype, cfg, tracker,
                   {"best_epoch": best_epoch, "epochs_run": epoch + 1, "best_val": best,
                    "early_stopped": epoch + 1 < tcfg["epochs"], "history": history,
                    "resumed_from_epoch": resumed_from, "worker_nodes": nodes})


def _finish(model: torch.nn.Module, best_state: dict[str, torch.Tensor] | None, labels: list[str],
            spec: PreprocessSpec, device: torch.device, dtype: torch.dtype | None, cfg: dict[str, Any],
            tracker: Tracker | None, info: dict[str, Any]) -> dict[str, Any]:
    """Rank 0: best weights, test metrics, monitoring reference, W&B; returned to the driver."""
    tcfg = cfg["train"]
    net = _unwrap(model)
    if best_state is not None:
        net.load_state_dict(best_state)
    test = ray.train.get_dataset_shard("test")
    logits, y, _ = forward_batches(net, test.iter_torch_batches(batch_size=tcfg["eval_batch_size"],
                                                                device=device), spec, device, dtype=dtype)
    probs = M.softmax(logits)
    summary = M.summarize(probs, y, labels, prefix="test")
    ref_logits, _, ref_emb = forward_batches(net, ray.train.get_dataset_shard("reference").iter_torch_batches(
        batch_size=tcfg["eval_batch_size"], device=device), spec, device, embeddings=True, dtype=dtype)
    cm_png = M.confusion_matrix_png(summary["confusion_matrix"], labels, title="Test confusion matrix")
    reliability = M.reliability_png(probs, y)
    # Ray refuses torch tensors in a return value: numpy arrays cross to the driver instead.
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    if tracker is not None:
        scalars = M.scalar_metrics(summary)
        tracker.log(scalars)
        tracker.summary({**scalars, "best_epoch": info["best_epoch"]})
        tracker.log_image("test/confusion_matrix", cm_png)
        tracker.log_image("test/reliability", reliability)
        if tracker.run is not None:
            from safetensors.torch import save_file

            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "model.safetensors")
                save_file(state, path)
                tracker.log_model(path, name=f"{cfg['registry']['model_name']}",
                                  metadata={"labels": labels, **scalars})
        info["wandb_dir"] = tracker.dir
        tracker.finish()
    return {**info, "state": {k: v.numpy() for k, v in state.items()}, "test": summary, "confusion_png": cm_png, "reliability_png": reliability,
            "reference": {"embeddings": ref_emb, "logits": ref_logits}}


def _set_path(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value

