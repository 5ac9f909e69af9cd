"""One registered version as a Serve deployment: loaded once, warmed up, batched."""

import logging
import time
from typing import Any

import numpy as np
from ray import serve
from ray.serve.metrics import Counter, Histogram

from mlplatform.deployments.logs import LATENCY_BOUNDARIES


@serve.deployment
class ModelServer:
    """One registered version: loaded once, warmed up, batched with @serve.batch.

    Each call is already a batch, formed by the ingress's `VersionBatcher`. `@serve.batch`
    (no wait) merges the calls queued here, from every ingress replica and the shadow
    mirror, into one batch, run in forward passes of at most `max_batch_size` images."""

    def __init__(self, registry_root: str, registry_model: str, version: str,
                 accelerator: dict[str, Any]) -> None:
        from mlplatform.deployments.extended import ExtendedModel

        self.model = ExtendedModel(registry_root, registry_model, version, **accelerator)
        self.version = self.model.version
        self.fail = False
        self.max_batch_size = 16
        self.model.warmup()
        if self.model.tuned:  # into this replica's Serve log
            logging.getLogger("ray.serve").info(
                "%s: %d 1x1 convolutions run on oneDNN at these batch sizes (serve.accelerator.autotune): %s",
                self.version, len(self.model.tuned), self.model.tuned)
        self.batch_sizes = Histogram("mlp_batch_size", description="Images per batched forward pass",
                                     boundaries=[1, 2, 4, 8, 16, 32, 64, 128], tag_keys=("version",))
        self.infer_latency = Histogram("mlp_stage_latency_seconds", description="Latency by stage",
                                       boundaries=LATENCY_BOUNDARIES, tag_keys=("version", "stage"))
        self.species = Counter("mlp_predictions_by_species_total", description="Top-1 predictions by species",
                               tag_keys=("version", "species"))

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Live batch settings and drills, applied without restarting the replica."""
        self.max_batch_size = int(config["max_batch_size"])
        self.predict.set_max_batch_size(self.max_batch_size)  # calls merged: each holds >= 1 image
        self.fail = bool(config.get("chaos_fail", False))

    def info(self) -> dict[str, Any]:
        return {"version": self.version, "labels": self.model.labels, "preprocess": self.model.spec.to_dict(),
                "num_classes": self.model.num_classes}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def predict(self, calls: list[tuple[np.ndarray, list[int], list[float]]]) -> list[dict[str, Any]]:
        """calls: (images uint8 (n, H, W, 3) resized with this version's spec, top_k per image,
        the wall-clock time each image was submitted at the ingress)."""
        if self.fail:
            raise RuntimeError(f"chaos: {self.version} is configured to fail (serve.chaos_fail_versions)")
        t0 = time.time()
        images = calls[0][0] if len(calls) == 1 else np.concatenate([c[0] for c in calls])
        ks = [int(k) for c in calls for k in c[1]]
        b = self.model.infer(images, ks, self.max_batch_size)
        tags = {"version": self.version}
        for size in b.passes:
            self.batch_sizes.observe(size, tags=tags)
        self.infer_latency.observe(time.time() - t0, tags={**tags, "stage": "inference"})
        queue_tags = {**tags, "stage": "queue"}
        for c in calls:
            for submitted in c[2]:
                self.infer_latency.observe(max(0.0, t0 - submitted), tags=queue_tags)
        for top in b.labels:
            self.species.inc(tags={**tags, "species": top[0]})
        sizes = b.pass_sizes()
        out, start = [], 0
        for c in calls:
            end = start + len(c[1])
            out.append({"labels": b.labels[start:end], "scores": b.scores[start:end],
                        "probabilities": b.probabilities[start:end], "embedding": b.embedding[start:end],
                        "batch_sizes": sizes[start:end]})
            start = end
        return out

    async def check_health(self) -> None:
        """Healthy means it can still predict, not just that the process is alive."""
        self.model.warmup()
