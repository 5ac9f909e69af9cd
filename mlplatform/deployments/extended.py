"""The extended model: a registered version plus its own pre- and post-processing.

Decode and validation happen before this (see `inputs.py`); here a batch of RGB images
goes through the version's preprocessing spec, one batched forward pass on the chosen
device, and post-processing into top-k species with scores and the penultimate-layer
embedding. Serving and offline prediction both call `predict`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from mlplatform.data.preprocess import PreprocessSpec, normalize_torch, to_uint8
from mlplatform.registry.store import Registry
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


def prepare_for_inference(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, fuse: bool,
                          channels_last: bool, version: str) -> torch.nn.Module:
    """Eval mode, BatchNorm folded (in float32, before any cast: folded in float16 about a
    quarter of mobilenet_v3_small's weights came out different, and an H100 answered up to
    0.018 off in probability instead of 0.005), then device, dtype and memory format."""
    model = model.float().eval()
    if fuse:
        model.body = fuse_for_inference(model.body, version)
    model = model.to(device, dtype=dtype)
    return model.to(memory_format=torch.channels_last) if channels_last else model


class PointwiseConv(torch.nn.Module):
    """A 1x1 convolution that runs on oneDNN at the batch sizes where that was faster.

    PyTorch sends a single-threaded CPU 1x1 convolution with fewer than 16 images to its
    own GEMM path rather than oneDNN's. At 224 px with one thread that path is about 2x
    slower than oneDNN for most of mobilenet_v3_small's layers at batches of 2 to 15, the
    sizes a loaded replica forms; for small feature maps (64 px inputs) it is as fast or
    faster. `tune_pointwise_convs` times both and sets `onednn_at`: for each batch size
    up to the largest tried, whether to call oneDNN (larger batches follow the largest).
    It is the same convolution either way, up to float rounding."""

    def __init__(self, conv: torch.nn.Conv2d, onednn_at: list[bool]) -> None:
        super().__init__()
        self.conv = conv
        self.onednn_at = onednn_at

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        return _onednn_conv(self.conv, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = self.onednn_at
        if table[min(x.shape[0], len(table) - 1)] and x.dtype == torch.float32 and x.device.type == "cpu":
            return self._onednn(x)
        return self.conv._conv_forward(x, self.conv.weight, self.conv.bias)


def _onednn_conv(c: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return torch.mkldnn_convolution(x, c.weight, c.bias, c.padding, c.stride, c.dilation, c.groups)


def _is_pointwise(m: torch.nn.Module) -> bool:
    return (type(m) is torch.nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1)
            and m.dilation == (1, 1) and m.padding == (0, 0) and m.groups == 1
            and m.padding_mode == "zeros")


def tune_pointwise_convs(model: torch.nn.Module, example: torch.Tensor,
                         batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16), repeats: int = 5,
                         margin: float = 0.9) -> dict[str, list[int]]:
    """Time PyTorch's path against oneDNN's for each 1x1 convolution of `model` (CPU,
    float32) at each of `batch_sizes`, on the input shape that layer sees for `example`
    (best of `repeats` calls each, like cuDNN's benchmark mode). oneDNN is taken where it
    needs under `margin` of PyTorch's time; a batch of n images follows the result of the
    largest size tried <= n. Layers where oneDNN never wins stay as they are, so nothing
    is added to their calls. Takes well under a second for mobilenet_v3_small at 224 px;
    without oneDNN, or off the CPU, it changes nothing.
    Returns {layer: [batch sizes where oneDNN won]} for the layers it switched."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch, "mkldnn_convolution")):
        return {}
    if example.device.type != "cpu" or example.dtype != torch.float32:
        return {}
    found: dict[str, tuple[torch.nn.Module, str, torch.nn.Conv2d]] = {}
    for name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if _is_pointwise(child):
                found[f"{name}.{child_name}" if name else child_name] = (parent, child_name, child)
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:  # None: the inputs stay as they are
            shapes.setdefault(name, tuple(args[0].shape[1:]))
        return hook

    hooks = [conv.register_forward_pre_hook(recorder(n)) for n, (_, _, conv) in found.items()]
    try:
        with torch.inference_mode():
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()

    def best_of(fn, x: torch.Tensor) -> float:
        fn(x)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            best = min(best, time.perf_counter() - t0)
        return best

    channels_last = example.is_contiguous(memory_format=torch.channels_last)
    sizes = sorted(batch_sizes)
    chosen: dict[str, list[int]] = {}
    with torch.inference_mode():
        for name, (parent, child_name, conv) in found.items():
            if name not in shapes:  # not on the path the example takes
                continue
            wins = []
            for bs in sizes:
                x = torch.rand((bs, *shapes[name]))
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                if best_of(lambda t, c=conv: _onednn_conv(c, t), x) < margin * best_of(conv, x):
                    wins.append(bs)
            if not wins:
                continue
            table = [False] * (sizes[-1] + 1)
            for n in range(1, len(table)):
                tried = [bs for bs in sizes if bs <= n] or sizes[:1]
                table[n] = tried[-1] in wins
            setattr(parent, child_name, PointwiseConv(conv, table))
            chosen[name] = wins
    return chosen


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

    def __init__(self, registry_root: str, model_name: str, version: str, *, device: str, half: bool,
                 channels_last: bool, compile: bool, fuse: bool, threads: int, autotune: bool) -> None:
        """The keyword arguments are serve.accelerator's keys (conf/serve)."""
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
        model = prepare_for_inference(model, self.device, self.dtype, fuse, channels_last, self.version)
        self.channels_last = channels_last
        self.model = model
        self.tuned: dict[str, list[int]] = {}
        # Not under torch.compile: Inductor chooses its own kernels, and a per-batch-size
        # branch would make it specialise on every size.
        if autotune and not compile and self.device.type == "cpu" and self.dtype == torch.float32:
            t0 = time.perf_counter()
            example = torch.rand(1, 3, spec.image_size, spec.image_size)
            if channels_last:
                example = example.contiguous(memory_format=torch.channels_last)
            self.tuned = tune_pointwise_convs(model.body, example)
            log.info("%s: 1x1 convolutions on oneDNN at batch sizes %s (tuned in %.2f s)", self.version,
                     self.tuned, time.perf_counter() - t0)
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
