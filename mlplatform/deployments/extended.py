"""The extended model: a registered version plus its own pre- and post-processing.

Decode and validation happen before this (see `inputs.py`); here a batch of RGB images
goes through the version's preprocessing spec, one batched forward pass on the chosen
device, and post-processing into top-k species with scores and the penultimate-layer
embedding. Serving and offline prediction both call `predict`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from mlplatform.data.preprocess import PreprocessSpec, normalize_torch, to_uint8
from mlplatform.registry import Registry
from mlplatform.training import metrics as M

log = logging.getLogger(__name__)


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("serve accelerator.device=cuda but no CUDA device is visible to this replica")
    return torch.device(setting)


def fuse_for_inference(body: torch.nn.Module, version: str) -> torch.nn.Module:
    """Fold each BatchNorm into the convolution before it (eval mode, same outputs up to float
    rounding): one pass over the activations fewer per layer. A body that torch.fx cannot
    trace stays as it is."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(body)
    except Exception as exc:  # untraceable control flow: serve the unfused body
        log.warning("%s: conv-bn fusion skipped (%s: %s)", version, type(exc).__name__, exc)
        return body


@dataclass
class Prediction:
    labels: list[str]
    scores: list[float]
    probabilities: np.ndarray  # (C,) float32
    embedding: np.ndarray  # (D,) float32


@dataclass
class BatchPrediction:
    """A batch's answers as arrays: cheap to send between processes (one buffer each)."""

    labels: list[list[str]]  # top-k per image, best first
    scores: list[list[float]]
    probabilities: np.ndarray  # (N, C) float32
    embedding: np.ndarray  # (N, D) float32
    passes: list[int]  # images per forward pass, in order

    def pass_sizes(self) -> list[int]:
        """For each image, the size of the forward pass it ran in."""
        return [size for size in self.passes for _ in range(size)]


class ExtendedModel:
    """A registry version, loaded once (checksum verified), ready for batched prediction."""

    def __init__(self, registry_root: str, model_name: str, version: str, device: str = "auto",
                 half: bool = False, channels_last: bool = True, compile: bool = False,
                 fuse: bool = True, threads: int = 0) -> None:
        from mlplatform.models.load import load_model

        if threads > 0:  # intra-op threads of this process (Ray's default: one per CPU reserved)
            torch.set_num_threads(int(threads))
        reg = Registry(registry_root, model_name)
        model, spec, meta = load_model(reg, version)  # raises ChecksumError on tampered weights
        self.version: str = meta["version"]
        self.model_name = model_name
        self.labels: list[str] = list(meta["labels"])
        self.spec: PreprocessSpec = spec
        self.meta = meta
        self.device = pick_device(device)
        self.dtype = torch.float16 if (half and self.device.type == "cuda") else torch.float32
        model = model.to(self.device, dtype=self.dtype).eval()
        if fuse:
            model.body = fuse_for_inference(model.body, self.version)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        self.model = model
        # The replica calls embed() and head(), not forward(): compile embed itself (compiling
        # the module would only compile forward, which serving never calls).
        self._embed = torch.compile(model.embed) if compile else model.embed

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_tensor(self, batch_uint8: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3), already resized and cropped with this version's spec."""
        x = normalize_torch(torch.from_numpy(np.ascontiguousarray(batch_uint8)).to(self.device), self.spec)
        x = x.to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        emb = self._embed(x)
        probs = torch.softmax(self.model.head(emb).float(), dim=1)
        return probs.cpu().numpy(), emb.float().cpu().numpy()

    def predict(self, images: list[Image.Image], top_k: int | list[int] = 5) -> list[Prediction]:
        """One batched forward pass over `images`; top_k may differ per image."""
        if not images:
            return []
        return self.predict_arrays(np.stack([to_uint8(img, self.spec) for img in images]), top_k)

    def predict_arrays(self, batch_uint8: np.ndarray, top_k: int | list[int] = 5) -> list[Prediction]:
        """The forward pass and post-processing for images already resized with this spec."""
        b = self.infer(batch_uint8, top_k)
        return [Prediction(labels=b.labels[i], scores=b.scores[i], probabilities=b.probabilities[i],
                           embedding=b.embedding[i]) for i in range(len(b.labels))]

    def infer(self, batch_uint8: np.ndarray, top_k: int | list[int] = 5,
              max_batch_size: int | None = None) -> BatchPrediction:
        """Forward passes of at most `max_batch_size` images (a memory bound, on GPU above
        all) over images already resized with this spec, then top-k per image."""
        n = len(batch_uint8)
        step = max(1, max_batch_size or n)
        parts = [self.forward(self.to_tensor(batch_uint8[i:i + step])) for i in range(0, n, step)]
        probs = parts[0][0] if len(parts) == 1 else np.concatenate([p for p, _ in parts])
        emb = parts[0][1] if len(parts) == 1 else np.concatenate([e for _, e in parts])
        ks = top_k if isinstance(top_k, list) else [top_k] * n
        kmax = min(max(ks), self.num_classes)
        idx, scores = M.top_k_from_probs(probs, kmax)
        ks = [min(k, self.num_classes) for k in ks]
        return BatchPrediction(labels=[[self.labels[j] for j in idx[i, :k]] for i, k in enumerate(ks)],
                               scores=[scores[i, :k].tolist() for i, k in enumerate(ks)],
                               probabilities=probs, embedding=emb, passes=[len(p) for p, _ in parts])

    def warmup(self) -> dict[str, Any]:
        """A real prediction on a synthetic image: proves the replica can still predict."""
        size = max(self.spec.resize_size, self.spec.image_size)
        img = Image.fromarray(np.full((size, size, 3), 127, np.uint8), "RGB")
        pred = self.predict([img], top_k=1)[0]
        if not np.isfinite(pred.probabilities).all():
            raise RuntimeError(f"{self.version}: non-finite probabilities on the warm-up image")
        return {"label": pred.labels[0], "score": pred.scores[0]}
