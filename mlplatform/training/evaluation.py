"""One forward pass over batches, shared by the training loop, evaluation and the gate."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from mlplatform.data.preprocess import PreprocessSpec, normalize_torch


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision on GPU only: bf16 where the card supports it, else fp16."""
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "bf16" or (setting == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def forward_batches(model: torch.nn.Module, batches: Iterable[dict[str, Any]], spec: PreprocessSpec,
                    device: torch.device, embeddings: bool = False,
                    dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Logits, labels and (optionally) penultimate embeddings for uint8 NHWC batches."""
    model.eval()
    all_logits, all_labels, all_emb = [], [], []
    for batch in batches:
        image = batch["image"]  # Ray Data hands out read-only numpy arrays: copy, then move
        x = (torch.from_numpy(np.array(image)) if isinstance(image, np.ndarray) else image).to(device)
        x = normalize_torch(x, spec)
        with autocast(device, dtype):
            emb = model.embed(x)
            logits = model.head(emb)
        all_logits.append(logits.float().cpu().numpy())
        labels = batch["label"]
        all_labels.append(np.array(labels.cpu() if isinstance(labels, torch.Tensor) else labels, np.int64))
        if embeddings:
            all_emb.append(emb.float().cpu().numpy())
    if not all_logits:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int64), None
    return (np.concatenate(all_logits), np.concatenate(all_labels),
            np.concatenate(all_emb) if embeddings else None)
