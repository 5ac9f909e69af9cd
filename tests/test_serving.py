"""Serving against real Ray Serve over HTTP: routes, errors, canary, shadow, GitOps, OIP."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from mlplatform.data import synthetic
from mlplatform.errors import ConfigError

from .conftest import SERVE_PORT, ClosedLoop, accelerator, compose, trained_with_copies, wait_for

PORT = SERVE_PORT
URL = f"http://127.0.0.1:{PORT}"
MODEL = "species-classifier"

pytestmark = pytest.mark.ray


def _serve_overrides(root: Path, *extra: str) -> list[str]:
    return ["+mode=serve", "+experiment=smoke", f"paths.root={root}", f"serve.port={PORT}",
            "serve.deployment.num_cpus=0.25", "serve.deployment.min_replicas=1",
            "serve.deployment.max_replicas=1", "serve.inputs.max_bytes=300000",
            "serve.inputs.max_pixels=4000000", *extra]


def _traffic(v1: int, v2: int, shadow: str = "") -> list[str]:
    items = [f"{{ref: v1, role: stable, weight: {v1}}}", f"{{ref: v2, role: canary, weight: {v2}}}"]
    out = [f"serve.versions=[{', '.join(items)}]"]
    if shadow:
        out.append(f"serve.shadows=[{{ref: {shadow}, mirror: 1.0}}]")
    return out


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    """Train v1, register copies v2 (canary) and v3 (a shadow that always fails), deploy."""
    from mlplatform.deployments.serve_mode import deploy, undeploy

    root = tmp_path_factory.mktemp("serve")
    meta = trained_with_copies(root, 2)
    cfg = compose(*_serve_overrides(root, *_traffic(80, 20, shadow="v3"), "serve.chaos_fail_versions=[v3]"))
    summary = deploy(cfg)
    yield {"root": root, "summary": summary, "labels": meta["labels"]}
    undeploy(cfg.serve.app_name)


def _jpeg(species: int = 0, index: int = 0, size: int = 48, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    synthetic.render(species, index, size).save(buf, format=fmt)
    return buf.getvalue()


def _post(path: str = "/predict", **kw) -> requests.Response:
    return requests.post(URL + path, timeout=30, **kw)


def _assert_error(r: requests.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error", "request_id"} and body["error"]["code"] and body["error"]["message"]
    return body


def _assert_oip_error(r: requests.Response, status: int) -> str:
    """The Open Inference Protocol's error body on /v2/... routes: `{"error": "<message>"}`."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str) and r.json()["error"]
    return r.json()["error"]


# ----------------------------------------------------------------------------- routes


def test_every_input_route_predicts(served) -> None:
    img = _jpeg()
    b64 = base64.b64encode(img).decode()
    responses = [
        _post(files={"image": ("a.jpg", img, "image/jpeg")}),
        _post(data=img, headers={"content-type": "image/jpeg"}),
        _post(json={"image": b64}),
        _post(json={"image": f"data:image/jpeg;base64,{b64}", "top_k": 3}),
        _post(data=_jpeg(fmt="PNG"), headers={"content-type": "image/png"}, params={"top_k": 2}),
    ]
    for r in responses:
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"request_id", "model", "version", "predictions"}
        assert body["model"] == MODEL and body["version"] in ("v1", "v2")
        assert r.headers["x-model-version"] == body["version"]
        scores = [p["score"] for p in body["predictions"]]
        assert scores == sorted(scores, reverse=True) and all(p["label"] in served["labels"]
                                                             for p in body["predictions"])
    assert [len(r.json()["predictions"]) for r in responses] == [5, 5, 5, 3, 2]


def test_request_id_is_echoed(served) -> None:
    r = _post(data=_jpeg(), headers={"content-type": "image/jpeg", "x-request-id": "abc-123"})
    assert r.json()["request_id"] == "abc-123" and r.headers["x-request-id"] == "abc-123"


def _request_log(ids: set[str], timeout: float = 10) -> dict[str, dict]:
    """The structured lines of these request ids, from the Ray logs' serve/requests_Ingress_<pid>.jsonl."""
    import glob

    from mlplatform import ray_compat

    logs = ray_compat.logs_dir()
    deadline, found = time.time() + timeout, {}
    while time.time() < deadline and len(found) < len(ids):
        for path in glob.glob(f"{logs}/serve/requests_Ingress_*.jsonl"):
            for line in Path(path).read_text().splitlines():
                rec = json.loads(line)  # every line is one JSON object
                if rec.get("event") == "request" and rec.get("request_id") in ids:
                    found[rec["request_id"]] = rec
        time.sleep(0.2)
    return found


def test_structured_request_logs(served) -> None:
    ok = _post(data=_jpeg(), headers={"content-type": "image/jpeg", "x-request-id": "log-ok"})
    bad = _post(data=b"hello", headers={"content-type": "image/jpeg", "x-request-id": "log-bad"})
    assert ok.status_code == 200 and bad.status_code == 400
    found = _request_log({"log-ok", "log-bad"})
    assert found["log-ok"]["status"] == 200 and found["log-ok"]["version"] == ok.json()["version"]
    assert found["log-bad"]["status"] == 400 and found["log-ok"]["route"] == "predict"
    assert found["log-ok"]["batch_size"] >= 1 and "batch_size" not in found["log-bad"]
    assert all(rec["latency_ms"] > 0 for rec in found.values())


def _model_replicas() -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if "model-v" in a["name"] or "Ingress" in a["name"]}


def test_batches_form_under_load_and_resize_live(served) -> None:
    """Concurrent single-image requests share forward passes of at most max_batch_size; a new
    size in YAML applies to the running replicas (user_config), restarting none."""
    from concurrent.futures import ThreadPoolExecutor

    from mlplatform.deployments.serve_mode import deploy

    base = [*_traffic(100, 0, shadow="v3"), "serve.chaos_fail_versions=[v3]"]
    img = _jpeg()

    def burst(tag: str) -> dict[str, dict]:
        ids = {f"{tag}-{i}" for i in range(48)}
        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(lambda rid: _post(data=img, headers={"content-type": "image/jpeg",
                                                                        "x-request-id": rid}).status_code, ids))
        assert codes == [200] * len(ids)
        found = _request_log(ids)
        assert set(found) == ids
        return found

    try:
        deploy(compose(*_serve_overrides(served["root"], *base, "serve.batching.max_batch_size=4",
                                         "serve.batching.batch_wait_timeout_s=0.05")))
        before = _model_replicas()
        sizes = Counter(rec["batch_size"] for rec in burst("b4").values())
        assert set(sizes) <= {1, 2, 3, 4} and max(sizes) > 1, sizes
        deploy(compose(*_serve_overrides(served["root"], *base, "serve.batching.max_batch_size=1",
                                         "serve.batching.batch_wait_timeout_s=0.05")))
        assert {rec["batch_size"] for rec in burst("b1").values()} == {1}
        assert _model_replicas() == before
    finally:
        deploy(compose(*_serve_overrides(served["root"], *_traffic(80, 20, shadow="v3"),
                                         "serve.chaos_fail_versions=[v3]")))


def test_versions_added_and_retired_under_load_fail_no_request(served) -> None:
    """A canary and a shadow added, then retired, in place: each version is an application of
    its own, so the ingress and v1's replica keep running and no request fails."""
    from mlplatform.deployments.serve_mode import deploy

    class Load(ClosedLoop):
        def request(self, session, t0: float) -> tuple[int, str]:
            r = session.post(URL + "/predict", data=img, headers={"content-type": "image/jpeg"}, timeout=30)
            return r.status_code, r.json().get("version") if r.status_code == 200 else r.text[:200]

    img, load = _jpeg(), Load(4, join_s=30)
    answers = load.results

    def versions_since(n: int) -> Counter:
        return Counter(v for status, v in answers[n:] if status == 200)

    try:
        deploy(compose(*_serve_overrides(served["root"], "serve.versions=[{ref: v1, role: stable, weight: 100}]")))
        before = {n for n in _model_replicas() if "Ingress" in n or "model-v1" in n}
        with load:
            wait_for(lambda: len(answers) >= 20, timeout=60)
            mark = len(answers)
            deploy(compose(*_serve_overrides(served["root"], *_traffic(50, 50, shadow="v3"))))
            wait_for(lambda: versions_since(mark)["v2"] >= 10, timeout=60)
            deploy(compose(*_serve_overrides(served["root"], "serve.versions=[{ref: v1, role: stable, weight: 100}]")))
            mark = len(answers)  # answered after the retirement was applied
            wait_for(lambda: len(answers) >= mark + 20, timeout=60)
        assert set(versions_since(mark)) == {"v1"}
        # Retired: their applications are gone when deploy returns, their actors a moment later.
        wait_for(lambda: not [n for n in _model_replicas() if "model-v2" in n or "model-v3" in n], timeout=30)
    finally:
        deploy(compose(*_serve_overrides(served["root"], *_traffic(80, 20, shadow="v3"),
                                         "serve.chaos_fail_versions=[v3]")))
    failed = [a for a in answers if a[0] != 200]
    assert len(answers) > 60 and not failed, (len(answers), failed[:5])
    # Nothing restarted: the same ingress and v1 replicas answered throughout.
    assert before <= _model_replicas(), (before, _model_replicas())


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"data": b"\x89PNG\r\n\x1a\nnot really", "headers": {"content-type": "image/png"}}, 400),
        ({"json": {"image": "!!!not base64!!!"}}, 400),
        ({"data": b"{not json", "headers": {"content-type": "application/json"}}, 400),
        ({"data": b"x" * 400_000, "headers": {"content-type": "image/jpeg"}}, 413),
        ({"data": b"hello", "headers": {"content-type": "text/plain"}}, 415),
        ({"json": {"picture": "x"}}, 422),
        ({"json": {"url": "http://example.com/cat.jpg"}}, 422),  # URL input is off by default
        ({"files": {"other": ("a.jpg", b"x", "image/jpeg")}}, 422),
    ],
)
def test_error_classes(served, kwargs, status) -> None:
    _assert_error(_post(**kwargs), status)


def test_pixel_bomb_tiny_image_unsupported_format_and_top_k(served) -> None:
    buf = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buf, format="PNG")  # tiny file, 25 Mpx declared
    _assert_error(_post(data=buf.getvalue(), headers={"content-type": "image/png"}), 413)
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    _assert_error(_post(data=buf.getvalue(), headers={"content-type": "image/png"}), 422)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="ICO")
    _assert_error(_post(data=buf.getvalue(), headers={"content-type": "application/octet-stream"}), 415)
    for bad in ("0", "9", "abc", "2.5"):
        _assert_error(_post(data=_jpeg(), headers={"content-type": "image/jpeg"}, params={"top_k": bad}), 422)
    ok = _post(data=_jpeg(), headers={"content-type": "image/jpeg"}, params={"top_k": 8})
    assert ok.status_code == 200 and len(ok.json()["predictions"]) == 8


def test_hostile_input_never_poisons_the_server(served) -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        r = _post(data=rng.bytes(int(rng.integers(1, 5000))), headers={"content-type": "image/jpeg"})
        assert r.status_code in (400, 413, 415, 422) and r.json()["error"]
    assert _post(data=_jpeg(), headers={"content-type": "image/jpeg"}).status_code == 200
    assert requests.get(URL + "/v2/health/ready", timeout=10).status_code == 200


def test_large_photos_decode_off_the_event_loop_with_the_same_answers(served) -> None:
    """Above 512x512 pixels the ingress decodes and resizes in a worker thread, and parses
    JSON bodies over 256 KiB there: the answers are those of the extended model offline (on
    the JPEG decoded at the reduced scale the ingress uses, serve.inputs.reduced_decode), in
    REST and OIP, and corrupt input is still a 400."""
    from mlplatform.deployments.decoding import INLINE_DECODE_PIXELS, InputLimits, decode_image
    from mlplatform.deployments.extended import ExtendedModel

    big = _jpeg(3, 7, size=900)
    assert 900 * 900 > INLINE_DECODE_PIXELS and len(big) < 300_000
    offline = ExtendedModel(str(served["root"] / "registry"), MODEL, "v1", **accelerator(device="cpu"))
    inputs = compose().serve.inputs  # what the served app was deployed with
    limits = InputLimits.from_dict({k: v for k, v in inputs.items() if k != "url"})
    draft = 2 * offline.spec.resize_size
    assert limits.reduced_decode and decode_image(big, limits, draft).image.size < decode_image(big, limits).image.size
    want = offline.predict([decode_image(big, limits, draft).image], top_k=3)[0]
    for _ in range(3):  # v1 and v2 hold the same weights
        r = _post(data=big, headers={"content-type": "image/jpeg"}, params={"top_k": 3})
        assert r.status_code == 200, r.text
        got = r.json()["predictions"]
        assert [p["label"] for p in got] == want.labels
        np.testing.assert_allclose([p["score"] for p in got], want.scores, atol=1e-4)
    oip = requests.post(f"{URL}/v2/models/{MODEL}/infer", timeout=30, json={"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [2],
         "data": [base64.b64encode(big).decode(), base64.b64encode(_jpeg()).decode()]}]})
    assert oip.status_code == 200, oip.text
    probs = next(o for o in oip.json()["outputs"] if o["name"] == "probabilities")["data"]
    np.testing.assert_allclose(probs[:len(served["labels"])], want.probabilities, atol=1e-4)
    _assert_error(_post(data=big[: len(big) // 2], headers={"content-type": "image/jpeg"}), 400)
    # JSON bodies over 256 KiB are parsed in a worker thread too: same answers, same errors.
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (500, 500, 3), np.uint8)).save(buf, "JPEG", quality=90)
    noisy = buf.getvalue()
    b64 = base64.b64encode(noisy).decode()
    assert 256 * 1024 < len(b64) < 400_000
    want = offline.predict([decode_image(noisy, limits, draft).image], top_k=2)[0]
    r = _post(json={"image": b64, "top_k": 2})
    assert r.status_code == 200, r.text
    assert [p["label"] for p in r.json()["predictions"]] == want.labels
    _assert_error(_post(data=b'{"image": "' + b64.encode() + b'"', headers={"content-type": "application/json"}), 400)
    _assert_error(_post(json={"image": b64[:-3] + "!!!"}), 400)
    oip = requests.post(f"{URL}/v2/models/{MODEL}/infer", timeout=30, json={"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}]})
    assert oip.status_code == 200, oip.text
    probs = next(o for o in oip.json()["outputs"] if o["name"] == "probabilities")["data"]
    np.testing.assert_allclose(probs, want.probabilities, atol=1e-4)
    assert requests.get(URL + "/v2/health/ready", timeout=10).status_code == 200


# ----------------------------------------------------------------------------- traffic


def test_models_lists_versions_roles_and_weights(served) -> None:
    body = requests.get(URL + "/models", timeout=10).json()
    assert body == {"model": MODEL, "versions": [
        {"version": "v1", "role": "stable", "weight": 80}, {"version": "v2", "role": "canary", "weight": 20},
        {"version": "v3", "role": "shadow", "mirror": 1.0}]}


def test_canary_split_within_binomial_bounds_and_failing_shadow_is_harmless(served) -> None:
    n, img = 300, _jpeg()
    counts: Counter = Counter()
    for _ in range(n):
        r = _post(data=img, headers={"content-type": "image/jpeg"})
        assert r.status_code == 200, r.text  # the shadow v3 raises on every mirrored request
        counts[r.json()["version"]] += 1
    assert set(counts) <= {"v1", "v2"}  # a shadow's answer is never returned
    sd = (n * 0.2 * 0.8) ** 0.5
    assert abs(counts["v2"] - n * 0.2) < 4 * sd, counts


def test_sticky_routing_pins_a_key_to_one_version(served) -> None:
    from mlplatform.deployments.serve_mode import deploy

    cfg = compose(*_serve_overrides(served["root"], *_traffic(50, 50), "serve.sticky_header=x-user-id"))
    deploy(cfg)
    try:
        img = _jpeg()
        for user in ("alice", "bob", "carol"):
            seen = {_post(data=img, headers={"content-type": "image/jpeg", "x-user-id": user}).json()["version"]
                    for _ in range(8)}
            assert len(seen) == 1, (user, seen)
    finally:
        deploy(compose(*_serve_overrides(served["root"], *_traffic(80, 20, shadow="v3"),
                                         "serve.chaos_fail_versions=[v3]")))


def test_weight_change_in_place_drops_no_request(served) -> None:
    from mlplatform.deployments.serve_mode import deploy

    before = _model_replicas()
    img, stop, results = _jpeg(), threading.Event(), []

    def load() -> None:
        with requests.Session() as s:
            while not stop.is_set():
                r = s.post(URL + "/predict", data=img, headers={"content-type": "image/jpeg"}, timeout=30)
                results.append((time.time(), r.status_code, r.json().get("version")))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) >= 20, 60, message="no answers before the change")
        changed_at = time.time()
        deploy(compose(*_serve_overrides(served["root"], *_traffic(100, 0, shadow="v3"),
                                         "serve.chaos_fail_versions=[v3]")))
        applied_at = time.time()
        wait_for(lambda: sum(ts > applied_at + 1 for ts, _, _ in results) >= 20, 60,
                 message="no answers after the change")
    finally:
        stop.set()
        for t in threads:
            t.join()
    try:
        assert results and all(status == 200 for _, status, _ in results), Counter(s for _, s, _ in results)
        assert any(ts < changed_at for ts, _, _ in results) and any(ts > applied_at for ts, _, _ in results)
        late = [v for ts, _, v in results if ts > applied_at + 1]
        assert late and set(late) == {"v1"}  # the new weights hold
        assert _model_replicas() == before  # no model or ingress replica restarted: the change was in place
    finally:
        deploy(compose(*_serve_overrides(served["root"], *_traffic(80, 20, shadow="v3"),
                                         "serve.chaos_fail_versions=[v3]")))


def test_invalid_traffic_configs_fail_before_deploying(served) -> None:
    from mlplatform.deployments.serve_mode import resolve_settings

    with pytest.raises(ConfigError, match="weights must sum to 100"):
        compose(*_serve_overrides(served["root"], *_traffic(50, 60)))
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        compose(*_serve_overrides(served["root"], "serve.deployment.max_ongoing_requests=4"))
    cfg = compose(*_serve_overrides(served["root"], "serve.versions=[{ref: v99, role: stable, weight: 100}]"))
    with pytest.raises(ConfigError, match=r"serve.versions\[0\].ref=v99"):
        resolve_settings(cfg)


# ----------------------------------------------------------------------------- health and OIP


def test_health_and_readiness(served) -> None:
    assert requests.get(URL + "/v2/health/live", timeout=10).json() == {"live": True}
    assert requests.get(URL + "/v2/health/ready", timeout=10).json() == {"ready": True}
    assert requests.get(f"{URL}/v2/models/{MODEL}/ready", timeout=10).status_code == 200
    assert requests.get(f"{URL}/v2/models/{MODEL}/versions/v2/ready", timeout=10).status_code == 200
    _assert_oip_error(requests.get(f"{URL}/v2/models/nope/ready", timeout=10), 404)
    meta = requests.get(f"{URL}/v2/models/{MODEL}", timeout=10).json()
    assert meta["name"] == MODEL and meta["inputs"][0]["name"] == "image"
    assert requests.get(URL + "/docs", timeout=10).status_code == 200


@pytest.mark.parametrize("binary", [True, False])
def test_oip_with_tritonclient(served, binary: bool) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{PORT}")
    assert client.is_server_live() and client.is_model_ready(MODEL)
    images = [_jpeg(s, 1) for s in range(3)]
    inp = httpclient.InferInput("image", [3], "BYTES")
    if binary:
        inp.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    else:
        inp.set_data_from_numpy(np.array([base64.b64encode(b) for b in images], dtype=np.object_),
                                binary_data=False)
    outs = [httpclient.InferRequestedOutput("probabilities", binary_data=binary),
            httpclient.InferRequestedOutput("label", binary_data=binary)]
    res = client.infer(MODEL, [inp], outputs=outs)
    probs = res.as_numpy("probabilities")
    assert probs.shape == (3, len(served["labels"])) and np.allclose(probs.sum(1), 1, atol=1e-4)
    labels = [x.decode() if isinstance(x, bytes) else x for x in res.as_numpy("label")]
    assert labels == [served["labels"][i] for i in probs.argmax(1)]
    pinned = client.infer(MODEL, [inp], outputs=outs, model_version="v2")
    assert pinned.get_response()["model_version"] == "v2"


def test_oip_errors_are_the_codecs_through_both_infer_routes(served) -> None:
    """What the OIP codec refuses (tests/test_oip.py) reaches the client through the real
    routes, the plain and the version-pinned one: the codec's status and message in the JSON
    error body, and the status in tritonclient's exception. Unknown versions are 404."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from mlplatform.deployments.oip import HEADER_LENGTH, OIPError, parse_infer_request

    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(_jpeg()).decode()]}
    inp = httpclient.InferInput("image", [2], "BYTES")
    inp.set_data_from_numpy(np.array([_jpeg(1), _jpeg(2)], dtype=np.object_), binary_data=True)
    binary, json_size = httpclient.InferenceServerClient.generate_request_body([inp])
    cases = [
        (b"{bad", {}),
        (json.dumps({"inputs": [{**tensor, "datatype": "FP32", "data": [1.0]}]}).encode(), {}),
        (json.dumps({"inputs": [{**tensor, "shape": [2]}]}).encode(), {}),
        (json.dumps({"inputs": [{**tensor, "data": ["not base64!"]}]}).encode(), {}),
        (json.dumps({"inputs": [tensor], "outputs": [{"name": "logits"}]}).encode(), {}),
        (binary[:-1], {HEADER_LENGTH: str(json_size)}),  # the last image cut short
    ]
    for path in (f"/v2/models/{MODEL}/infer", f"/v2/models/{MODEL}/versions/v2/infer"):
        for body, headers in cases:
            with pytest.raises(OIPError) as want:
                parse_infer_request(body, headers)
            r = requests.post(URL + path, data=body, headers=headers, timeout=10)
            assert _assert_oip_error(r, want.value.status) == want.value.message, (path, body[:100])
    client = httpclient.InferenceServerClient(f"127.0.0.1:{PORT}")
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, [inp], outputs=[httpclient.InferRequestedOutput("logits")])
    assert info.value.status() == "422" and info.value.message().startswith("unknown output 'logits'")
    body = {"inputs": [tensor]}
    _assert_oip_error(requests.post(f"{URL}/v2/models/{MODEL}/versions/v9/infer", json=body, timeout=10), 404)
    _assert_oip_error(requests.post(f"{URL}/v2/models/nope/infer", json=body, timeout=10), 404)


def test_serve_config_never_serves_a_tampered_version(served, tmp_path: Path) -> None:
    import os
    import shutil

    from mlplatform.deployments.serve_mode import resolve_settings
    from mlplatform.errors import JobFailed

    root = tmp_path / "copy"
    shutil.copytree(served["root"] / "registry", root / "registry")
    weights = root / "registry" / MODEL / "v1" / "model.safetensors"
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(JobFailed, match="refusing to serve"):
        resolve_settings(compose(*_serve_overrides(root, "serve.versions=[{ref: v1, role: stable, weight: 100}]")))


def test_deploy_summary_names_the_urls(served) -> None:
    summary = served["summary"]
    assert summary["endpoint"] == f"{URL}/predict" and summary["docs"] == f"{URL}/docs"
    assert summary["versions"] == [{"version": "v1", "role": "stable", "weight": 80},
                                   {"version": "v2", "role": "canary", "weight": 20}]
    assert json.loads(json.dumps(summary)) == summary


def test_deploy_writes_a_serve_config_ray_accepts_and_a_rayservice(served, tmp_path: Path) -> None:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from mlplatform.deployments.manifests import run_deploy

    cfg = compose(*_serve_overrides(served["root"], *_traffic(90, 10, shadow="v3"),
                                    "serve.deployment.num_gpus=0.5", f"deploy.out_dir={tmp_path}",
                                    "serve.auth.required=false"))
    out = run_deploy(cfg)
    config = yaml.safe_load(Path(out["serve_config"]).read_text())
    parsed = ServeDeploySchema.model_validate(config)  # Ray's own schema
    app = parsed.applications[0]
    assert app.import_path == "mlplatform.deployments.app:build_app"
    # One application per version beside the ingress's: adding or retiring one restarts none.
    assert [(a.name, a.route_prefix) for a in parsed.applications[1:]] == [
        (f"{app.name}-{v}", None) for v in ("v1", "v2", "v3")]
    by_name = {d.name: d.model_dump(exclude_unset=True) for a in parsed.applications for d in a.deployments}
    assert set(by_name) == {"Ingress", "DriftMonitor", "model-v1", "model-v2", "model-v3"}
    assert by_name["DriftMonitor"]["user_config"] == {"versions": ["v1", "v2", "v3"]}
    assert by_name["Ingress"]["user_config"]["routes"][1] == {"version": "v2", "role": "canary", "weight": 10}
    assert by_name["model-v1"]["ray_actor_options"]["num_gpus"] == 0.5
    assert by_name["model-v1"]["autoscaling_config"]["max_replicas"] == 1
    service = yaml.safe_load(Path(out["rayservice"]).read_text())
    assert service["kind"] == "RayService" and service["apiVersion"] == "ray.io/v1"
    ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    worker = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1" and out["gpu"] is True
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    for container in (head, worker):  # Serve's high-throughput mode, read at process start
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    # The image (the repository's Dockerfile, tests/test_deploy.py) FROM Ray's GPU image.
    assert "--build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu" in out["docker_build"]
    assert worker["image"] == head["image"] == cfg.deploy.image


def test_timeouts_give_504_and_backpressure_503_with_retry_after(served) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from mlplatform.deployments.serve_mode import deploy

    base = [*_traffic(80, 20, shadow="v3"), "serve.chaos_fail_versions=[v3]"]
    try:
        deploy(compose(*_serve_overrides(served["root"], *base, "serve.request_timeout_s=0.0001")))
        _assert_error(_post(data=_jpeg(), headers={"content-type": "image/jpeg"}), 504)
        deploy(compose(*_serve_overrides(served["root"], *base, "serve.batching.max_batch_size=1",
                                         "serve.batching.batch_wait_timeout_s=0",
                                         "serve.deployment.max_ongoing_requests=2",
                                         "serve.deployment.max_queued_requests=1")))
        img = _jpeg(size=256)
        with ThreadPoolExecutor(48) as pool:
            responses = list(pool.map(lambda _: _post(data=img, headers={"content-type": "image/jpeg"}),
                                      range(96)))
        codes = Counter(r.status_code for r in responses)
        assert set(codes) <= {200, 503} and codes[503] > 0 and codes[200] > 0, codes
        rejected = next(r for r in responses if r.status_code == 503)
        assert rejected.headers["retry-after"] == "1" and rejected.json()["error"]["code"] == "overloaded"
    finally:
        deploy(compose(*_serve_overrides(served["root"], *base)))
    assert _post(data=_jpeg(), headers={"content-type": "image/jpeg"}).status_code == 200


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="ignore")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_cli_serve_stops_on_sigint_and_leaves_no_process(served) -> None:
    """`python run.py +mode=serve` on a Ray of its own: it serves, and SIGINT stops Serve,
    HAProxy and Ray with every process it started gone."""
    import signal
    import subprocess
    import sys

    from .conftest import ROOT

    port = 8797
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), "+mode=serve", "+experiment=smoke", f"paths.root={served['root']}",
         f"serve.port={port}", "serve.versions=[{ref: v1, role: stable, weight: 100}]",
         "serve.deployment.num_cpus=0.25", "monitor.enabled=false", "ray.metrics_export_port=null"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 180
        while not any(line.startswith("serving;") for line in lines):
            assert proc.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
            time.sleep(0.5)
        r = requests.post(f"http://127.0.0.1:{port}/predict", data=_jpeg(),
                          headers={"content-type": "image/jpeg"}, timeout=30)
        assert r.status_code == 200 and r.json()["version"] == "v1"
        started = _descendants(proc.pid)
        assert any("haproxy" in _cmdline(p) for p in started), "the high-throughput mode runs HAProxy"
        # Serve reloads HAProxy as routes change (`-sf <old pid>`); a reloaded one leaves the tree.
        marker = next(re.search(r"/haproxy-serve/\w+/", _cmdline(p)).group(0) for p in started
                      if re.search(r"/haproxy-serve/\w+/", _cmdline(p)))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, "".join(lines)[-3000:]
        deadline = time.time() + 15
        while [p for p in started if _alive(p)] and time.time() < deadline:
            time.sleep(0.5)
        assert [p for p in started if _alive(p)] == []
        left = [int(e) for e in os.listdir("/proc") if e.isdigit() and marker in _cmdline(int(e)) and _alive(int(e))]
        assert left == [], f"HAProxy left holding port {port}: {[_cmdline(p) for p in left]}"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_haproxy_left_by_a_reload_is_stopped_with_its_ray() -> None:
    """Only processes naming the stopped node's HAProxy directory are stopped."""
    import subprocess

    from mlplatform.raycluster import stop_haproxy_reloads

    def fake(node: str) -> subprocess.Popen:
        return subprocess.Popen(["bash", "-c", f'exec -a "haproxy -f /tmp/haproxy-serve/{node}/haproxy.cfg" sleep 60'])

    ours, other = fake("a" * 56), fake("b" * 56)
    try:
        time.sleep(0.3)
        assert stop_haproxy_reloads("a" * 56) == [ours.pid]
        assert ours.wait(timeout=10) is not None and other.poll() is None
    finally:
        for p in (ours, other):
            p.kill()
            p.wait()


def test_version_batcher_splits_drops_and_fails_whole_batches(ray_cluster) -> None:
    """The ingress's batcher against a real Serve deployment: answers go back to the right
    request, a call never passes the gRPC byte limit, a request that gave up is not sent,
    and a failed call fails each request of its batch."""
    import asyncio

    from ray import serve

    from mlplatform.deployments.batcher import VersionBatcher

    @serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
    class Echo:
        def __init__(self) -> None:
            self.calls: list[int] = []

        async def predict(self, call: tuple) -> dict:
            images, ks, submitted = call
            if (images == 255).all():
                raise ValueError("refused by the model")
            if (images == 200).all():
                await asyncio.sleep(0.5)  # a slow batch: later requests wait for company
            self.calls.append(len(ks))
            ids = [int(x) for x in images[:, 0, 0, 0]]
            return {"labels": [[str(i)] for i in ids], "scores": [[1.0]] * len(ids),
                    "probabilities": images[:, 0, 0, :].astype(np.float32),
                    "embedding": images[:, 0, :, 0].astype(np.float32), "batch_sizes": [len(ids)] * len(ids)}

        def sizes(self) -> list[int]:
            return self.calls

    serve.run(Echo.bind(), name="batcher-test", route_prefix=None)
    handle = serve.get_deployment_handle("Echo", "batcher-test")

    def img(i: int) -> np.ndarray:
        return np.full((8, 8, 3), i, np.uint8)

    async def main() -> None:
        batcher = VersionBatcher(handle, max_batch_size=4, batch_wait_timeout_s=0.05)
        batcher.MAX_CALL_BYTES = 3 * img(0).nbytes  # as gRPC's limit would: at most 3 per call
        # The first goes at once (nothing in flight); the rest form calls of 3, not 4.
        answers = await asyncio.gather(*(batcher.submit(img(i), 1) for i in range(7)))
        assert [a["labels"] for a in answers] == [[str(i)] for i in range(7)]
        assert [a["batch_size"] for a in answers] == [1, 3, 3, 3, 3, 3, 3]
        slow = batcher.submit(img(200), 1)  # in flight for 0.5 s: what follows waits
        gone = batcher.submit(img(100), 1)
        gone.cancel()  # the request timed out while it waited: never sent
        assert (await batcher.submit(img(101), 1))["labels"] == ["101"]
        assert (await slow)["labels"] == ["200"]
        for outcome in await asyncio.gather(*(batcher.submit(img(255), 1) for _ in range(2)),
                                            return_exceptions=True):
            assert isinstance(outcome, Exception) and "refused by the model" in str(outcome)
        batcher.configure(1, 0.0)  # batching off, live
        assert len(await asyncio.gather(*(batcher.submit(img(i), 1) for i in range(3)))) == 3
        assert Counter(await handle.sizes.remote()) == Counter([1, 3, 3, 1, 1, 1, 1, 1])
        assert batcher.inflight == 0 and not batcher.pending

    try:
        asyncio.run(main())
    finally:
        serve.delete("batcher-test")
