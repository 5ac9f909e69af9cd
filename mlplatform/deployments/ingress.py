"""The ingress: every HTTP route, REST and Open Inference Protocol v2, in one Serve deployment.

It validates and decodes the input, picks a version (canary weights, sticky header), hands
the image to that version's batcher, captures the answer, mirrors to shadows, and turns every
failure into the contract's JSON error; nothing escapes as a bare 500."""

import asyncio
import contextlib
import time
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram

from mlplatform import ray_compat
from mlplatform.capture.schema import prediction_record
from mlplatform.data.preprocess import PreprocessSpec, to_uint8
from mlplatform.deployments import decoding as D
from mlplatform.deployments import oip
from mlplatform.deployments import payload as P
from mlplatform.deployments.access import Access
from mlplatform.deployments.batcher import VersionBatcher, replica_lost
from mlplatform.deployments.errors import ApiError, error_response, is_oip_path
from mlplatform.deployments.feedback import FeedbackIndex
from mlplatform.deployments.health import REFRESH_S, ReplicaHealth
from mlplatform.deployments.logs import LATENCY_BOUNDARIES, json_logs, log, log_event, log_request
from mlplatform.deployments.settings import (
    ServeSettings,
    TrafficSettings,
    model_app_name,
    model_deployment_name,
)
from mlplatform.deployments.shadow import ShadowMirror
from mlplatform.deployments.traffic import TrafficPolicy
from mlplatform.deployments.urlfetch import UrlPolicy, fetch_url

# JSON request bodies up to this size are parsed (base64 included) on the event loop; larger
# ones in a worker thread, like large images (decoding.INLINE_DECODE_PIXELS).
INLINE_BODY_BYTES = 256 * 1024

app = FastAPI(title="mlplatform species classifier",
              description="REST /predict, /models and the Open Inference Protocol v2.")


async def _off_loop_if(large: bool, fn, *args, **kwargs):
    """fn(...) on the event loop, or in a worker thread when the input is large."""
    return await asyncio.to_thread(fn, *args, **kwargs) if large else fn(*args, **kwargs)


def _request_id(request: Request) -> str:
    """Serve's proxy echoes the client's x-request-id (or makes one) and sets the response
    header itself; the body carries the same id."""
    return ray_compat.serve_request_id() or request.headers.get("x-request-id") or uuid.uuid4().hex


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, settings: dict[str, Any], monitor: DeploymentHandle | None = None) -> None:
        json_logs("Ingress")
        self.s = ServeSettings.model_validate(settings)
        self.t: TrafficSettings | None = None  # from user_config: reconfigure runs right after __init__
        # Version -> its model deployment, in the version's own application: the traffic
        # (user_config) names the versions, so adding or retiring one restarts nothing here.
        self.models: dict[str, DeploymentHandle] = {}
        # Every version routed to since start, retired ones too (with their batchers): a
        # request that chose a version just before it was retired still reaches it, as its
        # application is deleted only after every ingress replica stopped routing to it.
        self.handles: dict[str, DeploymentHandle] = {}
        self.monitor = monitor
        cap = self.s.capture
        self.writer = self.feedback_index = None
        if cap.enabled:
            from mlplatform.capture.store import CaptureStore
            from mlplatform.capture.writer import CaptureWriter

            self.writer = CaptureWriter(cap.root, cap.flush_interval_s, cap.sample_images, metrics=True)
            self.feedback_index = FeedbackIndex(cap, self.writer, CaptureStore(cap.root),
                                                lambda: self.health.ingress_replicas())
        self.limits = D.InputLimits.from_dict(self.s.inputs.model_dump(exclude={"url"}))
        self.url_policy = UrlPolicy.from_dict(self.s.inputs.url.model_dump())
        self.specs: dict[str, PreprocessSpec] = {}
        self.labels: dict[str, list[str]] = {}
        # Traffic arrives through user_config (reconfigure runs right after __init__), so a
        # weight change never changes these init arguments and never restarts this replica.
        self.policy: TrafficPolicy | None = None
        self.batchers: dict[str, VersionBatcher] = {}  # sized by the traffic settings
        ctx = serve.get_replica_context()
        self.app_name = ctx.app_name
        self.health = ReplicaHealth({}, ingress=(ctx.app_name, ctx.deployment))
        # Keys and rates: from the traffic settings; each rate shared by the live ingress replicas.
        self.access = Access(self.health.ingress_replicas)
        self.shadows = ShadowMirror(self._infer, self._capture)
        self.requests = Counter("mlp_requests_total", description="Requests by version, route and status",
                                tag_keys=("version", "route", "status"))
        self.latency = Histogram("mlp_request_latency_seconds", description="Ingress latency by stage",
                                 boundaries=LATENCY_BOUNDARIES, tag_keys=("stage",))

    async def _meta(self, version: str) -> tuple[PreprocessSpec, list[str]]:
        if version not in self.specs:
            if self.health.down(version):  # the call would wait for a replica Serve has yet to start
                raise self._unavailable(version)
            try:
                info = await self.handles[version].info.remote()
            except BackPressureError:  # a fresh ingress replica asking a saturated version
                raise self._overloaded(version) from None
            self.specs[version] = PreprocessSpec.from_dict(info["preprocess"])
            self.labels[version] = info["labels"]
        return self.specs[version], self.labels[version]

    async def _draft_side_for(self, version: str) -> int | None:
        """How small a JPEG for `version` may be decoded (serve.inputs.reduced_decode): twice
        the largest resize size of the versions known here, the request's own included, so the
        resize that follows still averages 2+ decoded pixels per output pixel (a shadow with a
        larger size, not known yet, gets less). None: full decode."""
        if not self.limits.reduced_decode:
            return None
        if version not in self.specs:
            with contextlib.suppress(Exception):  # unavailable: the request fails after its input is checked
                await self._meta(version)
        return 2 * max(s.resize_size for s in self.specs.values()) if self.specs else None

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Traffic changes from YAML land here: weights, shadows, limits, and the versions
        routed to move in place. A version's application is up before traffic names it, and
        retired only after (serve_mode.rollout_phases)."""
        t = TrafficSettings.model_validate(config)
        wanted = [r.version for r in [*t.routes, *t.shadows]]
        for v in wanted:
            if v not in self.handles:
                self.handles[v] = serve.get_deployment_handle(model_deployment_name(v),
                                                              app_name=model_app_name(self.app_name, v))
        models = {v: self.handles[v] for v in wanted}
        policy = TrafficPolicy.from_config(config)
        self.access.configure(t.auth)
        # Swapped whole: a request picks its version from the policy, then finds it here.
        self.models, self.policy, self.t = models, policy, t
        self.health.track(models)
        for version, handle in models.items():
            if version in self.batchers:
                self.batchers[version].configure(t.batching.max_batch_size, t.batching.batch_wait_timeout_s)
            else:
                self.batchers[version] = VersionBatcher(handle, t.batching.max_batch_size,
                                                        t.batching.batch_wait_timeout_s, self.health.refresh_soon)
        log_event("traffic_reconfigured", routes=config["routes"], shadows=config.get("shadows", []))

    # ------------------------------------------------------------------ request handling

    async def _infer(self, version: str, image: D.DecodedImage, top_k: int) -> dict[str, Any]:
        spec, _ = await self._meta(version)
        # Resizing a large photo takes tens of ms: not on the event loop.
        arr = await _off_loop_if(image.image.width * image.image.height > D.INLINE_DECODE_PIXELS, to_uint8,
                                 image.image, spec)
        if self.health.down(version):
            raise self._unavailable(version)
        fut = self.batchers[version].submit(arr, top_k)
        deadline = time.monotonic() + self.t.request_timeout_s
        try:
            while True:
                # Waited in slices: when the version loses its last replica meanwhile, Serve
                # would hold the request until a new one is up; the client gets a 503 now.
                try:
                    return await asyncio.wait_for(asyncio.shield(fut),
                                                  max(0.0, min(REFRESH_S, deadline - time.monotonic())))
                except TimeoutError:
                    if self.health.down(version):
                        raise self._unavailable(version) from None
                    if time.monotonic() >= deadline:
                        raise ApiError(504, "timeout", f"no answer from {version} within "
                                       f"{self.t.request_timeout_s:g} s (serve.request_timeout_s)") from None
        except BackPressureError:
            raise self._overloaded(version) from None
        except Exception as exc:
            if replica_lost(exc):  # the batch's replica died, and so did the one it was retried on
                raise self._unavailable(version) from None
            raise
        finally:
            fut.cancel()  # the batcher drops it if still queued; a no-op once answered

    def _overloaded(self, version: str) -> ApiError:
        return ApiError(503, "overloaded", f"{version} is at capacity; retry shortly",
                        {"Retry-After": str(self.s.retry_after_s)})

    def _unavailable(self, version: str) -> ApiError:
        return ApiError(503, "unavailable", f"{version} has no live replica; Serve is starting one, "
                        "retry shortly", {"Retry-After": str(self.s.retry_after_s)})

    def _mirror(self, image: D.DecodedImage, primary: dict[str, Any], request_id: str) -> None:
        self.shadows.mirror(self.policy.shadows_for_request(), image, primary, request_id)

    async def _read_image(self, request: Request, draft_side: int | None) -> tuple[D.DecodedImage, int | None, bytes]:
        kind = P.check_content_type(request.headers.get("content-type"))
        top_k = None
        t0 = time.perf_counter()
        if kind == "multipart":
            form = await request.form()
            field = form.get("image")
            if field is None or isinstance(field, str):
                raise D.InputError(422, "missing_field", "multipart field 'image' (a file) is required")
            data = await field.read()
            if "top_k" in form:
                top_k = form["top_k"]
        elif kind == "json":
            body = await request.body()
            if len(body) > self.limits.max_bytes * 4 // 3 + 4096:
                raise D.InputError(413, "too_many_bytes", "JSON body larger than the image byte limit allows")
            # A 9 MB image is 12 MB of JSON: 40 ms to parse and decode, not on the event loop.
            top_k, data, url = await _off_loop_if(len(body) > INLINE_BODY_BYTES, P.parse_json_body, body,
                                                 self.limits.max_bytes)
            if url is not None:
                data = await fetch_url(url, self.url_policy)
        else:
            data = await request.body()
        (image,) = await D.decode_images([data], self.limits, draft_side=draft_side)
        self.latency.observe(time.perf_counter() - t0, tags={"stage": "decode"})
        return image, top_k, data

    def _finish(self, request: Request, request_id: str, version: str, route: str, status: int,
                started: float) -> None:
        latency = time.perf_counter() - started
        self.requests.inc(tags={"version": version, "route": route, "status": str(status)})
        self.latency.observe(latency, tags={"stage": "total"})
        log_request(request_id, route, version, status, latency, getattr(request.state, "batch_size", None))

    async def _guard(self, request: Request, route: str, handler) -> Response:
        """Every failure becomes the contract's JSON error; nothing escapes as a bare 500."""
        request_id = _request_id(request)
        started = time.perf_counter()
        version = "-"
        try:
            if self.t is None:  # deployed without its traffic (user_config): nothing to route by
                raise ApiError(503, "not_configured", "the ingress has no traffic settings yet",
                               {"Retry-After": str(self.s.retry_after_s)})
            # Before the handler reads anything: who calls (feedback trust reads key_id), may they.
            request.state.key_id = self.access.check(request.url.path, request.headers,
                                                     request.client.host if request.client else None)
            response, version = await handler(request_id)
            self._finish(request, request_id, version, route, response.status_code, started)
            return response
        except D.InputError as exc:
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
        return error_response(status, code, message, request_id, headers, oip=is_oip_path(request.url.path))

    # ------------------------------------------------------------------ capture and feedback

    def _role(self, version: str) -> str:
        return next((r.role for r in self.policy.routes if r.version == version), "stable")

    def _capture(self, request_id: str, version: str, role: str, route: str, image: D.DecodedImage,
                 res: dict[str, Any], started: float, data: bytes | None) -> None:
        """Hand the record to the background writer (no I/O here) and remember the request
        for /feedback. Capture problems are logged, never the client's problem."""
        if self.writer is None:
            return
        try:
            labels = self.labels.get(version) or []
            top1 = res["labels"][0]
            record = prediction_record(
                request_id, time.time(), version, role, route, (time.perf_counter() - started) * 1000,
                labels=list(res["labels"]), scores=[float(x) for x in res["scores"]], top1=top1,
                top1_index=labels.index(top1) if top1 in labels else -1, input_sha256=image.sha256,
                width=image.width, height=image.height, format=image.format, num_bytes=image.num_bytes,
                embedding=res.get("embedding"))
            sampled = data is not None and self.writer.wants_image()
            self.writer.add_prediction(record, data if sampled else None)
            if role != "shadow":
                self.feedback_index.remember(request_id, record, data, sampled)
        except Exception:
            log.exception("capture failed")

    def _capture_failure(self, request_id: str, version: str, route: str, status: int, started: float) -> None:
        """A routed request the platform failed (5xx): the error rate canary analysis needs."""
        if self.writer is None:
            return
        self.writer.add_prediction(prediction_record(request_id, time.time(), version, self._role(version), route,
                                                     (time.perf_counter() - started) * 1000, status))

    @app.post("/feedback", status_code=202)
    async def feedback(self, request: Request) -> Response:
        """A human label for a served prediction: stored, joined with the prediction, and
        turned into training data (data=captured)."""
        async def handle(request_id: str) -> tuple[Response, str]:
            rid, label = P.parse_feedback_body(await request.body())
            if self.feedback_index is None:
                raise ApiError(404, "unknown_request", "capture is off (monitor.capture.enabled=false), so no "
                               "prediction can be found for feedback")
            entry = await self.feedback_index.find(rid)  # 404 unknown, 422 older than its window
            version = entry["version"]
            _, labels = await self._meta(version)
            if label not in labels:
                raise ApiError(422, "unknown_label", f"label {label!r} is not one of the {len(labels)} species "
                               f"of {version}")
            # The key that sent it (set by authentication; None: open access) decides whether
            # the label may become training data (data.captured.trusted_keys).
            correct = self.feedback_index.record(rid, label, entry, getattr(request.state, "key_id", None))
            return JSONResponse({"request_id": rid, "status": "accepted", "version": version,
                                 "correct": correct}, status_code=202), version

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
            sticky = request.headers.get(self.t.sticky_header) if self.t.sticky_header else None
            version = self.policy.choose(sticky)
            image, top_k_body, data = await self._read_image(request, await self._draft_side_for(version))
            request.state.version = version
            await self._meta(version)
            top_k = P.parse_top_k(request.query_params.get("top_k", top_k_body), self.t.top_k,
                                  len(self.labels.get(version) or []))
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
    async def models(self, request: Request) -> Response:
        async def handle(request_id: str) -> tuple[Response, str]:
            return JSONResponse({"model": self.s.model_name, "versions": self.policy.describe()}), "-"

        return await self._guard(request, "models", handle)

    # ------------------------------------------------------------------ Open Inference Protocol v2

    @app.get("/v2")
    async def server_metadata(self, request: Request) -> Response:
        async def handle(request_id: str) -> tuple[Response, str]:
            return JSONResponse(oip.server_metadata("mlplatform", "0.1.0")), "-"

        return await self._guard(request, "metadata", handle)

    @app.get("/v2/health/live")
    async def live(self) -> Response:
        return JSONResponse({"live": True})

    async def _ready(self, versions: list[str]) -> bool:
        """Every version has a RUNNING, alive replica now (health.ReplicaHealth), not once."""
        return await self.health.ready_now(versions)

    @app.get("/v2/health/ready")
    async def ready(self) -> Response:
        ok = self.t is not None and await self._ready([r.version for r in self.policy.routes])
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
            ok = await self._ready([r.version for r in self.policy.routes])
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
                request.headers.get(self.t.sticky_header) if self.t.sticky_header else None)
            _, labels = await self._meta(version)
            started = time.perf_counter()
            images = await D.decode_images(req.images, self.limits, draft_side=await self._draft_side_for(version))
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

