"""The Ray Serve application: an ingress that validates and routes, one batched deployment
per served model version, canary weights and shadow mirroring from conf/serve.

`build_app(args)` is a typed application builder, so `serve run` and `serve deploy` work
with the same config that `python run.py +mode=serve` uses.
"""


import asyncio
import json
import logging
import os
import sys
import time
import uuid
from collections import OrderedDict
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Gauge, Histogram

from mlplatform.data.preprocess import PreprocessSpec, to_uint8
from mlplatform.deployments import inputs as I
from mlplatform.deployments import oip
from mlplatform.deployments.traffic import TrafficPolicy

log = logging.getLogger("mlplatform.serve")
LATENCY_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
DEFAULT_BATCHING: dict[str, Any] = {"max_batch_size": 16, "batch_wait_timeout_s": 0.01}
# JSON request bodies up to this size are parsed (base64 included) on the event loop; larger
# ones in a worker thread, like large images (inputs.INLINE_DECODE_PIXELS).
INLINE_BODY_BYTES = 256 * 1024


async def _off_loop_if(large: bool, fn, *args, **kwargs):
    """fn(...) on the event loop, or in a worker thread when the input is large."""
    return await asyncio.to_thread(fn, *args, **kwargs) if large else fn(*args, **kwargs)


class ServeSettings(BaseModel):
    """The resolved serving config handed to `build_app` (JSON-serialisable for `serve deploy`)."""

    registry_root: str
    registry_model: str
    model_name: str
    versions: list[dict[str, Any]] = []  # {"version", "role", "weight", "deployment": {...}}
    shadows: list[dict[str, Any]] = []  # {"version", "mirror", "deployment": {...}}
    sticky_header: str | None = None
    request_timeout_s: float = 10.0
    retry_after_s: int = 1
    top_k: int = 5
    batching: dict[str, Any] = DEFAULT_BATCHING
    accelerator: dict[str, Any] = {"device": "auto", "half": False, "channels_last": True, "compile": False,
                                   "fuse": True, "threads": 0, "autotune": True}
    inputs: dict[str, Any] = {}
    ingress_replicas: int = 1
    ingress_cpus: float = 0.25
    chaos_fail_versions: list[str] = []
    capture: dict[str, Any] = {"enabled": False}  # conf/monitor's capture section, resolved
    monitor: dict[str, Any] | None = None  # settings of the DriftMonitor deployment; None: off


def _json_logs(deployment: str) -> None:
    """One JSON object per request and line, in `requests_<deployment>_<pid>.jsonl` beside
    this replica's Serve log (the Ray logs directory's `serve/`). Written straight to the file:
    Serve's stderr capture would wrap each line in its own format and cost a stack walk per
    line. Falls back to the process's stderr when Serve's log directory is unknown."""
    if log.handlers:
        return
    serve_handlers = logging.getLogger("ray.serve").handlers  # Serve buffers in a MemoryHandler
    serve_files = [h.baseFilename for h in [*serve_handlers, *(getattr(h, "target", None) for h in serve_handlers)]
                   if isinstance(h, logging.FileHandler)]
    if serve_files:
        path = os.path.join(os.path.dirname(serve_files[0]), f"requests_{deployment}_{os.getpid()}.jsonl")
        handler: logging.Handler = logging.FileHandler(path, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.__stderr__)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


# ----------------------------------------------------------------------------- model replicas


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


class VersionBatcher:
    """The dynamic batcher for one served version, inside an ingress replica (where KServe
    puts its batcher: in front of the model server). Single-image requests wait here up to
    `batch_wait_timeout_s` for up to `max_batch_size` images, then go to the version's
    deployment as one handle call: one gRPC hop and one replica request per batch instead of
    per image, which on 2 CPU cores was most of Serve's cost per image. When none of this
    replica's batches for the version is in flight, a request goes at once: an idle model
    does not wait for company (at concurrency 1 and 64 px, p50 latency 20 -> 7 ms). Batches
    are sent without waiting for earlier ones, so Serve's max_ongoing_requests and
    max_queued_requests on the model deployment (counting batches) still apply backpressure."""

    # Serve's gRPC between replicas refuses messages over this (4 MiB unless the cluster sets
    # it): a call carries at most 90% of it in images (32 images of 224 px are 4.8 MB).
    MAX_CALL_BYTES = int(0.9 * int(os.environ.get("RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH", 4 << 20)))

    def __init__(self, handle: DeploymentHandle, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self.handle = handle
        self.max_batch_size = max_batch_size
        self.wait_s = batch_wait_timeout_s
        self.pending: list[tuple[np.ndarray, int, float, asyncio.Future]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task] = set()
        self.inflight = 0  # handle calls sent and not answered yet

    def configure(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self.max_batch_size, self.wait_s = max(1, int(max_batch_size)), max(0.0, float(batch_wait_timeout_s))
        if self.pending and len(self.pending) >= self._call_size():
            self._flush()

    def _call_size(self) -> int:
        """Images per handle call: the batch size, or fewer where they would pass gRPC's limit."""
        return min(self.max_batch_size, max(1, self.MAX_CALL_BYTES // max(1, self.pending[0][0].nbytes)))

    def submit(self, image: np.ndarray, top_k: int) -> asyncio.Future:
        """The caller awaits the future (with its own timeout: a cancelled future is dropped)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.pending.append((image, top_k, time.time(), fut))
        if self.inflight == 0 or len(self.pending) >= self._call_size():
            self._flush()
        elif self.timer is None:
            self.timer = loop.call_later(self.wait_s, self._flush)
        return fut

    def _flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while self.pending:
            size = self._call_size()
            batch, self.pending = self.pending[:size], self.pending[size:]
            batch = [item for item in batch if not item[3].done()]  # timed out while waiting
            if batch:
                self.inflight += 1
                task = asyncio.get_running_loop().create_task(self._send(batch))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            if not self.pending or len(self.pending) < self._call_size():
                break
        if self.pending:
            self.timer = asyncio.get_running_loop().call_later(self.wait_s, self._flush)

    async def _send(self, batch: list[tuple[np.ndarray, int, float, asyncio.Future]]) -> None:
        try:
            out = await self.handle.predict.remote((np.stack([b[0] for b in batch]), [b[1] for b in batch],
                                                    [b[2] for b in batch]))
        except Exception as exc:  # overload, a failed replica: every request of the batch gets it
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        except asyncio.CancelledError:  # the replica is shutting down
            for *_, fut in batch:
                fut.cancel()
            raise
        finally:
            self.inflight -= 1
        for i, (*_, fut) in enumerate(batch):
            if not fut.done():
                fut.set_result({"labels": out["labels"][i], "scores": out["scores"][i],
                                "probabilities": out["probabilities"][i], "embedding": out["embedding"][i],
                                "batch_size": out["batch_sizes"][i]})


# ----------------------------------------------------------------------------- the ingress

app = FastAPI(title="mlplatform species classifier",
              description="REST /predict, /models and the Open Inference Protocol v2.")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def _error(status: int, code: str, message: str, request_id: str,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}, "request_id": request_id},
                        status_code=status, headers=headers or {})


def _request_id(request: Request) -> str:
    """Serve's proxy echoes the client's x-request-id (or makes one) and sets the response
    header itself; the body carries the same id."""
    from ray.serve.context import _get_serve_request_context

    return (_get_serve_request_context().request_id or request.headers.get("x-request-id")
            or uuid.uuid4().hex)


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, settings: dict[str, Any], models: dict[str, DeploymentHandle],
                 monitor: DeploymentHandle | None = None) -> None:
        _json_logs("Ingress")
        self.s = ServeSettings(**settings)
        self.models = models
        self.monitor = monitor
        cap = self.s.capture
        self.writer = None
        if cap.get("enabled"):
            from mlplatform.monitoring.capture import CaptureStore, CaptureWriter

            self.writer = CaptureWriter(cap["root"], cap["flush_interval_s"], cap.get("sample_images", 0.0))
            self.store = CaptureStore(cap["root"])
        # Recent primary predictions for /feedback, and their images (bounded, in memory).
        self.index: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.images: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self.limits = I.InputLimits.from_dict(self.s.inputs)
        self.url_policy = I.UrlPolicy.from_dict(self.s.inputs.get("url", {}))
        self.specs: dict[str, PreprocessSpec] = {}
        self.labels: dict[str, list[str]] = {}
        # Traffic arrives through user_config (reconfigure runs right after __init__), so a
        # weight change never changes these init arguments and never restarts this replica.
        self.policy = TrafficPolicy.from_config({"routes": [{"version": v, "role": "stable", "weight": 100}
                                                            for v in list(models)[:1]]})
        batching = self.s.batching
        self.batchers = {v: VersionBatcher(h, int(batching["max_batch_size"]), float(batching["batch_wait_timeout_s"]))
                         for v, h in models.items()}
        self._background: set[asyncio.Task] = set()
        self.requests = Counter("mlp_requests_total", description="Requests by version, route and status",
                                tag_keys=("version", "route", "status"))
        self.latency = Histogram("mlp_request_latency_seconds", description="Ingress latency by stage",
                                 boundaries=LATENCY_BOUNDARIES, tag_keys=("stage",))
        self.shadow_total = Counter("mlp_shadow_requests_total", description="Mirrored requests by outcome",
                                    tag_keys=("version", "outcome"))
        self.shadow_agreement = Gauge("mlp_shadow_agreement", description="Top-1 agreement of shadow with primary",
                                      tag_keys=("version",))
        self.agree_counts: dict[str, list[int]] = {}

    async def _meta(self, version: str) -> tuple[PreprocessSpec, list[str]]:
        if version not in self.specs:
            info = await self.models[version].info.remote()
            self.specs[version] = PreprocessSpec.from_dict(info["preprocess"])
            self.labels[version] = info["labels"]
        return self.specs[version], self.labels[version]

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Traffic changes from YAML land here: weights, shadows and limits move in place."""
        unknown = [r["version"] for r in [*config["routes"], *config.get("shadows", [])]
                   if r["version"] not in self.models]
        if unknown:
            raise ValueError(f"traffic names versions this application does not serve: {unknown}")
        self.policy = TrafficPolicy.from_config(config)
        self.s.request_timeout_s = float(config.get("request_timeout_s", self.s.request_timeout_s))
        self.s.top_k = int(config.get("top_k", self.s.top_k))
        self.s.sticky_header = config.get("sticky_header")
        if config.get("batching"):
            for batcher in self.batchers.values():
                batcher.configure(config["batching"]["max_batch_size"], config["batching"]["batch_wait_timeout_s"])
        log.info(json.dumps({"event": "traffic_reconfigured", "routes": config["routes"],
                             "shadows": config.get("shadows", [])}))

    # ------------------------------------------------------------------ request handling

    async def _infer(self, version: str, image: I.DecodedImage, top_k: int) -> dict[str, Any]:
        spec, _ = await self._meta(version)
        # Resizing a large photo takes tens of ms: not on the event loop.
        arr = await _off_loop_if(image.width * image.height > I.INLINE_DECODE_PIXELS, to_uint8, image.image, spec)
        try:
            return await asyncio.wait_for(self.batchers[version].submit(arr, top_k),
                                          timeout=self.s.request_timeout_s)
        except TimeoutError:
            raise ApiError(504, "timeout", f"no answer from {version} within "
                           f"{self.s.request_timeout_s:g} s (serve.request_timeout_s)") from None
        except BackPressureError:
            raise ApiError(503, "overloaded", f"{version} is at capacity; retry shortly",
                           {"Retry-After": str(self.s.retry_after_s)}) from None

    def _mirror(self, image: I.DecodedImage, primary: dict[str, Any], request_id: str) -> None:
        for version in self.policy.shadows_for_request():
            task = asyncio.get_running_loop().create_task(self._shadow(version, image, primary, request_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _shadow(self, version: str, image: I.DecodedImage, primary: dict[str, Any], request_id: str) -> None:
        """Never affects the response: errors and timeouts are counted, then dropped."""
        try:
            started = time.perf_counter()
            res = await self._infer(version, image, 1)
            self._capture(request_id, version, "shadow", "shadow", image, res, started, None)
            agree = int(res["labels"][0] == primary["labels"][0])
            n = self.agree_counts.setdefault(version, [0, 0])
            n[0] += agree
            n[1] += 1
            self.shadow_agreement.set(n[0] / n[1], tags={"version": version})
            self.shadow_total.inc(tags={"version": version, "outcome": "agree" if agree else "disagree"})
        except Exception as exc:  # a failing shadow is data, never an error for the client
            self.shadow_total.inc(tags={"version": version, "outcome": "error"})
            log.warning(json.dumps({"event": "shadow_error", "version": version, "request_id": request_id,
                                    "error": f"{type(exc).__name__}: {exc}"[:300]}))

    async def _read_image(self, request: Request) -> tuple[I.DecodedImage, int | None, bytes]:
        kind = I.check_content_type(request.headers.get("content-type"))
        top_k = None
        t0 = time.perf_counter()
        if kind == "multipart":
            form = await request.form()
            field = form.get("image")
            if field is None or isinstance(field, str):
                raise I.InputError(422, "missing_field", "multipart field 'image' (a file) is required")
            data = await field.read()
            if "top_k" in form:
                top_k = form["top_k"]
        elif kind == "json":
            body = await request.body()
            if len(body) > self.limits.max_bytes * 4 // 3 + 4096:
                raise I.InputError(413, "too_many_bytes", "JSON body larger than the image byte limit allows")
            # A 9 MB image is 12 MB of JSON: 40 ms to parse and decode, not on the event loop.
            top_k, data, url = await _off_loop_if(len(body) > INLINE_BODY_BYTES, self._json_image, body)
            if url is not None:
                data = await I.fetch_url(url, self.url_policy)
        else:
            data = await request.body()
        (image,) = await I.decode_images([data], self.limits)
        self.latency.observe(time.perf_counter() - t0, tags={"stage": "decode"})
        return image, top_k, data

    def _json_image(self, body: bytes) -> tuple[Any, bytes, str | None]:
        """A JSON /predict body: (top_k, the image's bytes, or the URL to fetch them from)."""
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise I.InputError(400, "bad_json", "the body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise I.InputError(422, "missing_field", "the JSON body must be an object with 'image' or 'url'")
        if "image" in payload:
            if not isinstance(payload["image"], str):
                raise I.InputError(422, "missing_field", "'image' must be a base64 string or data: URI")
            return payload.get("top_k"), I.parse_base64_image(payload["image"], self.limits.max_bytes), None
        if "url" in payload:
            if not isinstance(payload["url"], str):
                raise I.InputError(422, "missing_field", "'url' must be a string")
            return payload.get("top_k"), b"", payload["url"]
        raise I.InputError(422, "missing_field", "the JSON body needs 'image' (base64) or 'url'")

    def _top_k(self, value: Any, version: str) -> int:
        if value is None:
            return self.s.top_k
        n = len(self.labels.get(version) or []) or 10**9
        try:
            k = int(value)
            if str(value).strip() not in (str(k), f"{k}.0") and not isinstance(value, int):
                raise ValueError
        except (TypeError, ValueError):
            raise ApiError(422, "bad_top_k", f"top_k={value!r} is not an integer") from None
        if not 1 <= k <= n:
            raise ApiError(422, "bad_top_k", f"top_k={k} must be between 1 and {n}")
        return k

    def _finish(self, request: Request, request_id: str, version: str, route: str, status: int,
                started: float) -> None:
        latency = time.perf_counter() - started
        self.requests.inc(tags={"version": version, "route": route, "status": str(status)})
        self.latency.observe(latency, tags={"stage": "total"})
        line = {"event": "request", "request_id": request_id, "route": route, "version": version,
                "status": status, "latency_ms": round(latency * 1000, 2)}
        batch_size = getattr(request.state, "batch_size", None)
        if batch_size is not None:  # images in the forward pass that answered (the largest, for several)
            line["batch_size"] = batch_size
        log.info(json.dumps(line))

    async def _guard(self, request: Request, route: str, handler) -> Response:
        """Every failure becomes the contract's JSON error; nothing escapes as a bare 500."""
        request_id = _request_id(request)
        started = time.perf_counter()
        version = "-"
        try:
            response, version = await handler(request_id)
            self._finish(request, request_id, version, route, response.status_code, started)
            return response
        except I.InputError as exc:
            status, code, message, headers = exc.status, exc.code, exc.message, {}
        except oip.OIPError as exc:
            status, code, message, headers = exc.status, "bad_inference_request", exc.message, {}
        except ApiError as exc:
            status, code, message, headers = exc.status, exc.code, exc.message, exc.headers
        except Exception as exc:
            log.exception("internal error")
            status, code, headers = 500, "internal", {}
            message = f"the platform failed: {type(exc).__name__}"
        version = getattr(request.state, "version", version)
        if status >= 500 and version != "-":
            self._capture_failure(request_id, version, route, status, started)
        self._finish(request, request_id, version, route, status, started)
        return _error(status, code, message, request_id, headers)

    # ------------------------------------------------------------------ capture and feedback

    def _role(self, version: str) -> str:
        return next((r.role for r in self.policy.routes if r.version == version), "stable")

    def _capture(self, request_id: str, version: str, role: str, route: str, image: I.DecodedImage,
                 res: dict[str, Any], started: float, data: bytes | None) -> None:
        """Hand the record to the background writer (no I/O here) and remember the request
        for /feedback. Capture problems are logged, never the client's problem."""
        if self.writer is None:
            return
        try:
            now = time.time()
            labels = self.labels.get(version) or []
            top1 = res["labels"][0]
            record = {"request_id": request_id, "ts": now, "version": version, "role": role, "route": route,
                      "labels": list(res["labels"]), "scores": [float(x) for x in res["scores"]], "top1": top1,
                      "top1_index": labels.index(top1) if top1 in labels else -1,
                      "input_sha256": image.sha256, "width": image.width, "height": image.height,
                      "format": image.format, "num_bytes": image.num_bytes,
                      "latency_ms": (time.perf_counter() - started) * 1000, "embedding": res.get("embedding"),
                      "image_path": None, "status": 200}
            sampled = data is not None and self.writer.wants_image()
            self.writer.add_prediction(record, data if sampled else None)
            if role == "shadow":
                return
            cap = self.s.capture
            self.index[request_id] = {"ts": now, "version": version, "top1": top1,
                                      "image_path": record["image_path"], "format": image.format}
            while len(self.index) > int(cap.get("index_size", 200000)):
                self.index.popitem(last=False)
            if data is not None and not sampled and cap.get("store_feedback_images", True):
                self.images[request_id] = (data, image.format)
                while len(self.images) > int(cap.get("image_cache", 2000)):
                    self.images.popitem(last=False)
        except Exception:
            log.exception("capture failed")

    def _capture_failure(self, request_id: str, version: str, route: str, status: int, started: float) -> None:
        """A routed request the platform failed (5xx): the error rate canary analysis needs."""
        if self.writer is None:
            return
        self.writer.add_prediction({"request_id": request_id, "ts": time.time(), "version": version,
                                    "role": self._role(version), "route": route, "labels": [], "scores": [],
                                    "top1": None, "top1_index": -1, "input_sha256": None, "width": None,
                                    "height": None, "format": None, "num_bytes": None,
                                    "latency_ms": (time.perf_counter() - started) * 1000, "embedding": None,
                                    "image_path": None, "status": status})

    def _lookup(self, request_id: str) -> dict[str, Any] | None:
        since = time.time() - 86400 * int(self.s.capture.get("lookup_days", 7))
        return self.store.find(request_id, since=since)

    @app.post("/feedback", status_code=202)
    async def feedback(self, request: Request) -> Response:
        """A human label for a served prediction: stored, joined with the prediction, and
        turned into training data (data=captured)."""
        async def handle(request_id: str) -> tuple[Response, str]:
            try:
                payload = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError):
                raise I.InputError(400, "bad_json", "the body is not valid JSON") from None
            if not isinstance(payload, dict):
                raise I.InputError(422, "missing_field", "the JSON body must be an object with request_id and label")
            rid, label = payload.get("request_id"), payload.get("label")
            for key, value in (("request_id", rid), ("label", label)):
                if not isinstance(value, str) or not value:
                    raise I.InputError(422, "missing_field", f"'{key}' (a non-empty string) is required")
            if self.writer is None:
                raise ApiError(404, "unknown_request", "capture is off (monitor.capture.enabled=false), so no "
                               "prediction can be found for feedback")
            entry = self.index.get(rid)
            if entry is None:
                entry = await asyncio.to_thread(self._lookup, rid)
                if entry is None and self.s.ingress_replicas > 1:
                    # Another ingress replica may hold it unflushed: wait one flush, look again.
                    await asyncio.sleep(float(self.s.capture["flush_interval_s"]) + 0.5)
                    entry = await asyncio.to_thread(self._lookup, rid)
            if entry is None:
                raise ApiError(404, "unknown_request", f"no served prediction has request_id {rid!r} "
                               f"(within monitor.capture.lookup_days={self.s.capture.get('lookup_days', 7)})")
            version = entry["version"]
            _, labels = await self._meta(version)
            if label not in labels:
                raise ApiError(422, "unknown_label", f"label {label!r} is not one of the {len(labels)} species "
                               f"of {version}")
            image = self.images.get(rid) if not entry.get("image_path") else None
            self.writer.add_feedback({"request_id": rid, "ts": time.time(), "label": label, "version": version,
                                      "predicted": entry["top1"], "correct": label == entry["top1"],
                                      "prediction_ts": entry["ts"], "image_path": entry.get("image_path")},
                                     image[0] if image else None, image[1] if image else "")
            return JSONResponse({"request_id": rid, "status": "accepted", "version": version,
                                 "correct": label == entry["top1"]}, status_code=202), version

        return await self._guard(request, "feedback", handle)

    @app.get("/monitoring")
    async def monitoring(self, request: Request) -> Response:
        """The live monitor's state: windows, detector results, live accuracy, alerts."""
        async def handle(request_id: str) -> tuple[Response, str]:
            if self.monitor is None:
                raise ApiError(404, "monitoring_off", "monitoring is off (monitor.enabled=false)")
            return JSONResponse(await self.monitor.status.remote()), "-"

        return await self._guard(request, "monitoring", handle)

    def __del__(self) -> None:
        """Serve calls this at a graceful shutdown: write out what capture still holds."""
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.close()

    # ------------------------------------------------------------------ REST

    @app.post("/predict")
    async def predict(self, request: Request) -> Response:
        async def handle(request_id: str) -> tuple[Response, str]:
            started = time.perf_counter()
            image, top_k_body, data = await self._read_image(request)
            sticky = request.headers.get(self.s.sticky_header) if self.s.sticky_header else None
            version = self.policy.choose(sticky)
            request.state.version = version
            await self._meta(version)
            top_k = self._top_k(request.query_params.get("top_k", top_k_body), version)
            res = await self._infer(version, image, top_k)
            request.state.batch_size = res["batch_size"]
            self._capture(request_id, version, self._role(version), "predict", image, res, started, data)
            self._mirror(image, res, request_id)
            body = {"request_id": request_id, "model": self.s.model_name, "version": version,
                    "predictions": [{"label": lab, "score": sc} for lab, sc in zip(res["labels"], res["scores"],
                                                                                  strict=True)]}
            return JSONResponse(body, headers={"x-model-version": version}), version

        return await self._guard(request, "predict", handle)

    @app.get("/models")
    async def models(self) -> dict[str, Any]:
        return {"model": self.s.model_name, "versions": self.policy.describe()}

    # ------------------------------------------------------------------ Open Inference Protocol v2

    @app.get("/v2")
    async def server_metadata(self) -> dict[str, Any]:
        return oip.server_metadata("mlplatform", "0.1.0")

    @app.get("/v2/health/live")
    async def live(self) -> Response:
        return JSONResponse({"live": True})

    async def _ready(self, versions: list[str]) -> bool:
        try:
            await asyncio.wait_for(asyncio.gather(*(self._meta(v) for v in versions)), timeout=5)
            return True
        except Exception:
            return False

    @app.get("/v2/health/ready")
    async def ready(self) -> Response:
        ok = await self._ready([r.version for r in self.policy.routes])
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    def _check_model(self, model: str, version: str | None = None) -> None:
        if model != self.s.model_name:
            raise ApiError(404, "unknown_model", f"model {model!r} is not served; try {self.s.model_name!r}")
        if version is not None and version not in self.models:
            raise ApiError(404, "unknown_version", f"version {version!r} is not served; "
                           f"served: {sorted(self.models)}")

    @app.get("/v2/models/{model}")
    async def model_metadata(self, model: str, request: Request) -> Response:
        async def handle(request_id: str) -> tuple[Response, str]:
            self._check_model(model)
            stable = self.policy.routes[0].version
            _, labels = await self._meta(stable)
            return JSONResponse(oip.model_metadata(model, sorted(self.models), len(labels))), stable

        return await self._guard(request, "metadata", handle)

    @app.get("/v2/models/{model}/ready")
    async def model_ready(self, model: str, request: Request) -> Response:
        async def handle(request_id: str) -> tuple[Response, str]:
            self._check_model(model)
            ok = await self._ready(sorted(self.models))
            return JSONResponse({"name": model, "ready": ok}, status_code=200 if ok else 503), "-"

        return await self._guard(request, "ready", handle)

    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def version_ready(self, model: str, version: str, request: Request) -> Response:
        async def handle(request_id: str) -> tuple[Response, str]:
            self._check_model(model, version)
            ok = await self._ready([version])
            return JSONResponse({"name": model, "version": version, "ready": ok},
                                status_code=200 if ok else 503), version

        return await self._guard(request, "ready", handle)

    async def _oip_infer(self, request: Request, model: str, pinned: str | None) -> Response:
        async def handle(request_id: str) -> tuple[Response, str]:
            self._check_model(model, pinned)
            body = await request.body()
            req = await _off_loop_if(len(body) > INLINE_BODY_BYTES, oip.parse_infer_request, body,
                                     dict(request.headers), max_batch=256)
            version = pinned or self.policy.choose(
                request.headers.get(self.s.sticky_header) if self.s.sticky_header else None)
            _, labels = await self._meta(version)
            started = time.perf_counter()
            images = await I.decode_images(req.images, self.limits)
            results = await asyncio.gather(*(self._infer(version, img, 1) for img in images))
            request.state.batch_size = max(r["batch_size"] for r in results)
            role = "pinned" if pinned else self._role(version)
            for i, (img, res, data) in enumerate(zip(images, results, req.images, strict=True)):
                self._capture(request_id if len(images) == 1 else f"{request_id}-{i}", version, role, "infer",
                              img, res, started, data)
            if not pinned:
                for img, res in zip(images, results, strict=True):
                    self._mirror(img, res, request_id)
            probs = np.stack([r["probabilities"] for r in results]).astype(np.float32)
            payload, headers = oip.build_infer_response(
                model, version, req.id or request_id, probs, [r["labels"][0] for r in results], req.outputs,
                label_names=labels, binary_default=bool(req.parameters.get("binary_data_output", False)))
            media = headers.pop("content-type", headers.pop("Content-Type", "application/json"))
            return Response(payload, media_type=media, headers={**headers, "x-model-version": version}), version

        return await self._guard(request, "infer", handle)

    @app.post("/v2/models/{model}/infer")
    async def infer(self, model: str, request: Request) -> Response:
        return await self._oip_infer(request, model, None)

    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer_version(self, model: str, version: str, request: Request) -> Response:
        return await self._oip_infer(request, model, version)


# ----------------------------------------------------------------------------- builders


def deployment_options(d: dict[str, Any]) -> dict[str, Any]:
    """Serve options for one version: autoscaling, resources, queue limits."""
    return {
        "autoscaling_config": {
            "min_replicas": int(d["min_replicas"]), "max_replicas": int(d["max_replicas"]),
            "initial_replicas": max(1, int(d["min_replicas"])),
            "target_ongoing_requests": float(d["target_ongoing_requests"]),
            "upscale_delay_s": float(d["upscale_delay_s"]), "downscale_delay_s": float(d["downscale_delay_s"]),
        },
        "ray_actor_options": {"num_cpus": float(d["num_cpus"]), "num_gpus": float(d["num_gpus"])},
        "max_ongoing_requests": int(d["max_ongoing_requests"]),
        "max_queued_requests": int(d["max_queued_requests"]),
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
    }


def traffic_config(s: dict[str, Any]) -> dict[str, Any]:
    """The ingress's user_config: everything a traffic change touches, nothing that restarts."""
    versions = s["versions"]
    return {"routes": [{"version": v["version"], "role": v.get("role", "stable" if i == 0 else "canary"),
                        "weight": v.get("weight", 100 if i == 0 else 0)} for i, v in enumerate(versions)],
            "shadows": [{"version": v["version"], "mirror": v.get("mirror", 0.0)} for v in s["shadows"]],
            "sticky_header": s.get("sticky_header"), "request_timeout_s": s.get("request_timeout_s", 10.0),
            "top_k": s.get("top_k", 5), "batching": _batching(s)}


def _batching(s: dict[str, Any]) -> dict[str, Any]:
    return dict(s.get("batching") or DEFAULT_BATCHING)


def model_user_config(s: dict[str, Any], version: str) -> dict[str, Any]:
    """A model deployment's user_config: the live forward-pass size and the failure drill
    (the wait belongs to the ingress's batcher)."""
    return {"max_batch_size": _batching(s)["max_batch_size"],
            "chaos_fail": version in (s.get("chaos_fail_versions") or [])}


class AppArgs(BaseModel):
    """The builder's typed arguments: Serve validates `args` against this model."""

    settings: dict[str, Any]


def build_app(args: AppArgs) -> serve.Application:
    """Typed application builder for `serve run` / `serve deploy` (import path
    `mlplatform.deployments.app:build_app`); `+mode=serve` deploys through it too."""
    raw = args.settings
    s = ServeSettings(**raw)
    handles: dict[str, Any] = {}
    for entry in [*s.versions, *s.shadows]:
        version = entry["version"]
        options = deployment_options(entry["deployment"]) if "deployment" in entry else {}
        handles[version] = ModelServer.options(
            name=f"model-{version}", user_config=model_user_config(raw, version), **options,
        ).bind(s.registry_root, s.registry_model, version, s.accelerator)
    monitor = None
    if s.monitor:
        from mlplatform.monitoring.monitor import DriftMonitor

        monitor = DriftMonitor.options(ray_actor_options={"num_cpus": float(s.monitor.get("num_cpus", 0.25))}
                                       ).bind({**s.monitor, "versions": list(handles)})
    static = s.model_dump(exclude={"versions", "shadows", "sticky_header", "request_timeout_s", "top_k"})
    return Ingress.options(
        num_replicas=s.ingress_replicas, ray_actor_options={"num_cpus": s.ingress_cpus},
        user_config=traffic_config(raw), max_ongoing_requests=1000,
    ).bind(static, handles, monitor)
