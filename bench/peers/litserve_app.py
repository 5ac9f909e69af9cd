"""The LitServe peer of bench/bench_race.py: the same registered model file and the same
preprocessing functions as the platform, served as LitServe's documentation advises on CPU
(one worker per core, `fast_queue=True`, batching via `max_batch_size`/`batch_timeout`), the
model in channels_last. Requests are JSON, {"image": "<base64>"}, LitServe's image example;
the photo is decoded in full (Pillow) as a user of LitServe would write it.

Usage: python bench/peers/litserve_app.py --registry DIR [--port 8792 --workers 2 --batch 16]
"""

from __future__ import annotations

import argparse
import base64
import io
import os

import litserve as ls
import numpy as np
import torch
from PIL import Image

from mlplatform.data.preprocess import normalize_torch, to_rgb, to_uint8
from mlplatform.models.load import load_model
from mlplatform.registry.store import Registry


class SpeciesAPI(ls.LitAPI):
    def __init__(self, registry: str, model: str, ref: str, threads: int, **kw) -> None:
        super().__init__(**kw)
        self.registry, self.model_name, self.ref, self.threads = registry, model, ref, threads

    def setup(self, device: str) -> None:
        torch.set_num_threads(self.threads)
        net, self.spec, meta = load_model(Registry(self.registry, self.model_name), self.ref)
        self.net = net.eval().to(memory_format=torch.channels_last)
        self.labels = list(meta["labels"])

    def decode_request(self, request: dict) -> np.ndarray:
        img = Image.open(io.BytesIO(base64.b64decode(request["image"])))
        img.load()
        return to_uint8(to_rgb(img), self.spec)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = normalize_torch(torch.from_numpy(batch), self.spec).contiguous(memory_format=torch.channels_last)
            return torch.softmax(self.net(x), dim=-1).numpy()

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, probs: np.ndarray) -> dict:
        top = np.argsort(-probs)[:5]
        return {"predictions": [{"label": self.labels[i], "score": float(probs[i])} for i in top]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--registry", required=True)
    ap.add_argument("--model", default="species-classifier")
    ap.add_argument("--ref", default="production")
    ap.add_argument("--port", type=int, default=8792)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="per device: one per core")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batch-timeout", type=float, default=0.01)
    args = ap.parse_args()
    api = SpeciesAPI(args.registry, args.model, args.ref, threads=1, max_batch_size=args.batch,
                     batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers, fast_queue=True)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
