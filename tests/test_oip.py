"""The Open Inference Protocol codec against the real tritonclient: requests it builds, responses it reads."""

from __future__ import annotations

import base64
import io
import json
import struct

import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from mlplatform.deployments.oip import (
    HEADER_LENGTH,
    OIPError,
    RequestedOutput,
    build_infer_response,
    model_metadata,
    parse_infer_request,
    server_metadata,
)

CLASSES = ["setosa", "versicolor", "virginica", "sétula"]


def _image(fmt: str, color: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [
        _image("JPEG", (255, 0, 0)),
        _image("PNG", (0, 128, 255), (5, 7)),
        _image("JPEG", (10, 200, 30), (16, 16)),
    ]


def _triton_request(images, binary=True, outputs=None, shape=None, request_id=""):
    """Body and headers exactly as tritonclient's InferenceServerClient.infer would send them."""
    arr = np.array(images, dtype=np.object_)
    shape = shape or [len(images)]
    inp = httpclient.InferInput("image", shape, "BYTES")
    inp.set_data_from_numpy(arr.reshape(shape), binary_data=binary)
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [inp], outputs=outputs, request_id=request_id
    )
    headers = {} if json_size is None else {HEADER_LENGTH: str(json_size)}
    return body, headers


def _json_request(elements, shape=None, datatype="BYTES", name="image", **extra) -> bytes:
    tensor = {"name": name, "datatype": datatype,
              "shape": shape if shape is not None else [len(elements)], "data": elements}
    return json.dumps({"inputs": [tensor], **extra}).encode()


def _b64(images) -> list[str]:
    return [base64.b64encode(x).decode() for x in images]


def _status(body: bytes, headers=None, **kw) -> int:
    with pytest.raises(OIPError) as info:
        parse_infer_request(body, headers or {}, **kw)
    assert info.value.message
    return info.value.status


def _result(body: bytes, headers: dict[str, str]) -> httpclient.InferResult:
    length = headers.get(HEADER_LENGTH)
    return httpclient.InferResult.from_response_body(
        body, verbose=False, header_length=None if length is None else int(length)
    )


def _text(arr: np.ndarray) -> list:
    return [x.decode() if isinstance(x, bytes) else x for x in arr.ravel().tolist()]


def _probs(n: int, c: int = len(CLASSES), seed: int = 0) -> np.ndarray:
    p = np.random.default_rng(seed).random((n, c)).astype(np.float32)
    return p / p.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------ requests from tritonclient


def test_tritonclient_binary_request_round_trips_images(images):
    outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=True),
               httpclient.InferRequestedOutput("label", binary_data=False)]
    body, headers = _triton_request(images, outputs=outputs, request_id="req-7")
    assert headers  # binary extension in use
    req = parse_infer_request(body, headers)
    assert req.images == images
    assert req.id == "req-7"
    assert req.outputs == [RequestedOutput("probabilities", True, 0),
                           RequestedOutput("label", False, 0)]
    assert req.parameters["binary_data_output"] is False


def test_tritonclient_default_outputs_ask_for_binary(images):
    body, headers = _triton_request(images[:1])
    req = parse_infer_request(body, {k.lower(): v for k, v in headers.items()})
    assert req.images == images[:1]
    assert req.outputs == []
    assert req.parameters["binary_data_output"] is True
    assert req.id is None


def test_tritonclient_classification_output_and_column_shape(images):
    outputs = [httpclient.InferRequestedOutput("probabilities", class_count=2)]
    body, headers = _triton_request(images, outputs=outputs, shape=[len(images), 1])
    req = parse_infer_request(body, {k.upper(): v for k, v in headers.items()})
    assert req.images == images
    assert req.outputs == [RequestedOutput("probabilities", True, 2)]


def test_tritonclient_json_mode_with_base64_elements(images):
    encoded = [base64.b64encode(x) for x in images]
    body, headers = _triton_request(encoded, binary=False)
    assert headers == {}  # whole body is JSON
    assert parse_infer_request(body, headers).images == images


def test_tritonclient_json_mode_cannot_carry_raw_image_bytes(images):
    # Why JSON elements are base64: tritonclient sends str(element, "utf-8"), and PNG/JPEG aren't.
    with pytest.raises(InferenceServerException):
        _triton_request(images, binary=False)


# ------------------------------------------------------------------ hand-written requests


def test_json_request_with_base64(images):
    body = _json_request(_b64(images), id="abc", parameters={"priority": 1})
    req = parse_infer_request(body, {"Content-Type": "application/json"})
    assert req.images == images
    assert req.id == "abc"
    assert req.parameters == {"priority": 1, "binary_data_output": False}


def test_json_nested_data_only_with_column_shape(images):
    nested = [[s] for s in _b64(images)]
    assert parse_infer_request(_json_request(nested, shape=[3, 1]), {}).images == images
    assert parse_infer_request(_json_request(_b64(images), shape=[3, 1]), {}).images == images
    assert _status(_json_request(nested, shape=[3])) == 422
    assert _status(_json_request([[s, s] for s in _b64(images)], shape=[3, 1])) == 422


def test_json_outputs_and_binary_default():
    body = json.dumps({
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": _b64([b"x"])}],
        "outputs": [{"name": "label"},
                    {"name": "probabilities", "parameters": {"binary_data": False}}],
        "parameters": {"binary_data_output": True},
    }).encode()
    req = parse_infer_request(body, {})
    assert req.outputs == [RequestedOutput("label", True, 0),
                           RequestedOutput("probabilities", False, 0)]


def test_malformed_json_is_400():
    assert _status(b'{"inputs": [') == 400
    assert _status(b"\xff\xfe") == 400
    assert _status(b"[1, 2]") == 400
    assert _status(b'{"id": 5, "inputs": []}') == 400
    assert _status(b'{"outputs": []}') == 400


def test_wrong_datatype_name_or_count_is_422(images):
    assert _status(_json_request(_b64(images), datatype="UINT8")) == 422
    assert _status(_json_request(_b64(images), name="images")) == 422
    two = json.loads(_json_request(_b64(images)))
    two["inputs"].append(dict(two["inputs"][0], name="extra"))
    assert _status(json.dumps(two).encode()) == 422


def test_shape_mismatch_is_422(images):
    assert _status(_json_request(_b64(images), shape=[2])) == 422
    assert _status(_json_request(_b64(images), shape=[3, 2])) == 422
    assert _status(_json_request(_b64(images), shape=[1, 3])) == 422
    body, headers = _triton_request(images)
    header = json.loads(body[: int(headers[HEADER_LENGTH])])
    header["inputs"][0]["shape"] = [2]
    assert _status(*_rebuild(header, body, headers)) == 422
    header["inputs"][0]["shape"] = [4]
    assert _status(*_rebuild(header, body, headers)) == 422


def _rebuild(header: dict, body: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    """Replace the JSON header of a binary request, keeping its binary part."""
    new = json.dumps(header).encode()
    return new + body[int(headers[HEADER_LENGTH]):], {HEADER_LENGTH: str(len(new))}


def test_truncated_or_oversized_binary_is_400(images):
    body, headers = _triton_request(images)
    assert _status(body[:-1], headers) == 400  # last element cut short
    assert _status(body + b"\x00", headers) == 400  # trailing byte
    length = int(headers[HEADER_LENGTH])
    header = json.loads(body[:length])
    # An element whose declared length runs past the declared tensor size.
    blob = struct.pack("<I", 100) + b"abc"
    header["inputs"][0]["parameters"]["binary_data_size"] = len(blob)
    header["inputs"][0]["shape"] = [1]
    new = json.dumps(header).encode()
    assert _status(new + blob, {HEADER_LENGTH: str(len(new))}) == 400
    # Fewer than 4 bytes left for a length prefix.
    blob = struct.pack("<I", 1) + b"a" + b"\x01\x00"
    header["inputs"][0]["parameters"]["binary_data_size"] = len(blob)
    new = json.dumps(header).encode()
    assert _status(new + blob, {HEADER_LENGTH: str(len(new))}) == 400


def test_header_length_larger_than_body_or_bad_is_400(images):
    body, headers = _triton_request(images)
    assert _status(body, {HEADER_LENGTH: str(len(body) + 1)}) == 400
    assert _status(body, {HEADER_LENGTH: "abc"}) == 400
    assert _status(body, {HEADER_LENGTH: "-3"}) == 400
    assert _status(body, {HEADER_LENGTH: "0"}) == 400
    # Header length pointing into the middle of the JSON.
    assert _status(body, {HEADER_LENGTH: str(int(headers[HEADER_LENGTH]) - 1)}) == 400
    # binary_data_size but no header at all.
    assert _status(body, {}) == 400


def test_batch_too_large_is_413(images):
    assert _status(_json_request(_b64(images)), max_batch=2) == 413
    body, headers = _triton_request(images)
    assert _status(body, headers, max_batch=2) == 413
    assert parse_infer_request(body, headers, max_batch=3).images == images


def test_invalid_base64_or_non_string_is_400(images):
    good = _b64(images)
    assert _status(_json_request([good[0], "not base64!"])) == 400
    assert _status(_json_request([good[0][:-1]])) == 400  # bad padding
    assert _status(_json_request(["aG*k="])) == 400  # lenient decoders would read b"hi"
    assert _status(_json_request(["aGk=\n"])) == 400  # no whitespace
    assert _status(_json_request([good[0], 42])) == 400
    assert _status(_json_request([good[0], "é"])) == 400


def test_empty_batch_or_element_is_422():
    assert _status(_json_request([])) == 422
    assert _status(_json_request([""])) == 422


def test_output_requests_are_validated(images):
    def with_outputs(outputs):
        return _json_request(_b64(images), outputs=outputs)

    assert _status(with_outputs([{"name": "logits"}])) == 422
    assert _status(with_outputs([{"name": "label"}, {"name": "label"}])) == 422
    assert _status(with_outputs([{"name": "label", "parameters": {"classification": 2}}])) == 422
    assert _status(with_outputs([{"name": "label", "parameters": {"binary_data": "yes"}}])) == 400
    assert _status(with_outputs([{"nom": "label"}])) == 400


def test_non_base64_content_type_is_refused(images):
    body = json.loads(_json_request(_b64(images)))
    body["inputs"][0]["parameters"] = {"content_type": "str"}
    assert _status(json.dumps(body).encode()) == 422
    body["inputs"][0]["parameters"] = {"content_type": "base64"}
    assert parse_infer_request(json.dumps(body).encode(), {}).images == images


# ------------------------------------------------------------------ responses read by tritonclient


@pytest.mark.parametrize("binary", [False, True])
def test_response_round_trips_through_tritonclient(binary):
    probs = _probs(3)
    labels = [CLASSES[i] for i in probs.argmax(axis=1)]
    outputs = [RequestedOutput("probabilities", binary), RequestedOutput("label", binary)]
    body, headers = build_infer_response("iris", "2", "r1", probs, labels, outputs)
    if binary:
        assert headers["Content-Type"] == "application/octet-stream"
        assert int(headers[HEADER_LENGTH]) < len(body)
    else:
        assert headers == {"Content-Type": "application/json"}
    result = _result(body, headers)
    got = result.as_numpy("probabilities")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, probs)
    assert result.as_numpy("label").shape == (3,)
    assert _text(result.as_numpy("label")) == labels
    meta = result.get_response()
    assert (meta["model_name"], meta["model_version"], meta["id"]) == ("iris", "2", "r1")


def test_mixed_response_and_order():
    probs = _probs(2)
    outputs = [RequestedOutput("label", False), RequestedOutput("probabilities", True)]
    body, headers = build_infer_response("m", None, None, probs, ["a", "sétula"], outputs)
    result = _result(body, headers)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["label", "probabilities"]
    assert "id" not in result.get_response() and "model_version" not in result.get_response()
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probs)
    assert _text(result.as_numpy("label")) == ["a", "sétula"]


@pytest.mark.parametrize("binary_default", [False, True])
def test_default_outputs_are_both(binary_default):
    probs = _probs(2)
    body, headers = build_infer_response("m", "1", None, probs, ["x", "y"], [],
                                         binary_default=binary_default)
    assert (HEADER_LENGTH in headers) is binary_default
    result = _result(body, headers)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probs)
    assert _text(result.as_numpy("label")) == ["x", "y"]


@pytest.mark.parametrize("binary", [False, True])
def test_classification_extension(binary):
    probs = np.array([[0.1, 0.6, 0.05, 0.25], [0.7, 0.1, 0.15, 0.05]], dtype=np.float32)
    outputs = [RequestedOutput("probabilities", binary, class_count=2)]
    body, headers = build_infer_response("m", "1", None, probs, ["b", "a"], outputs,
                                         label_names=CLASSES)
    result = _result(body, headers)
    out = result.get_output("probabilities")
    assert out["datatype"] == "BYTES" and out["shape"] == [2, 2]
    got = result.as_numpy("probabilities")
    assert got.shape == (2, 2)
    rows = [[s.split(":") for s in row] for row in [_text(r) for r in got]]
    assert [[(int(i), name) for _, i, name in row] for row in rows] == [
        [(1, "versicolor"), (3, "sétula")], [(0, "setosa"), (2, "virginica")]]
    for r, row in enumerate(rows):
        for score, i, _ in row:
            assert np.float32(score) == probs[r, int(i)]


def test_classification_without_names_and_clamped_to_classes():
    probs = _probs(1, c=3)
    outputs = [RequestedOutput("probabilities", False, class_count=10)]
    body, headers = build_infer_response("m", "1", None, probs, ["z"], outputs)
    got = _result(body, headers).as_numpy("probabilities")
    assert got.shape == (1, 3)
    idx = [int(s.split(":")[1]) for s in _text(got)]
    assert idx == list(np.argsort(-probs[0]))
    assert all(len(s.split(":")) == 2 for s in _text(got))


def test_end_to_end_tritonclient_request_to_result(images):
    outputs = [httpclient.InferRequestedOutput("label"),
               httpclient.InferRequestedOutput("probabilities", binary_data=False)]
    body, headers = _triton_request(images, outputs=outputs, request_id="e2e")
    req = parse_infer_request(body, headers)
    probs = _probs(len(req.images), seed=3)
    labels = [CLASSES[i] for i in probs.argmax(axis=1)]
    out_body, out_headers = build_infer_response("iris", "1", req.id, probs, labels, req.outputs)
    result = _result(out_body, out_headers)
    assert result.get_response()["id"] == "e2e"
    assert _text(result.as_numpy("label")) == labels
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probs)


def test_build_rejects_inconsistent_arguments():
    with pytest.raises(ValueError):
        build_infer_response("m", "1", None, np.zeros(3, np.float32), ["a"], [])
    with pytest.raises(ValueError):
        build_infer_response("m", "1", None, _probs(2), ["a"], [])
    with pytest.raises(ValueError):
        build_infer_response("m", "1", None, _probs(1), ["a"], [], label_names=["x"])


# ------------------------------------------------------------------ metadata


def test_metadata():
    meta = model_metadata("iris", ["1", "2"], num_classes=4)
    assert meta["name"] == "iris" and meta["versions"] == ["1", "2"]
    assert meta["platform"] == "pytorch"
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
    ]
    server = server_metadata("mlplatform", "0.1.0")
    assert server["name"] == "mlplatform" and server["version"] == "0.1.0"
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])


def test_error_body_is_the_protocols_on_v2_routes_and_the_contracts_on_rest():
    """Same status and headers on both; the body is `{"error": "<message>"}` on /v2/...,
    which tritonclient raises as the message itself."""
    from mlplatform.deployments.errors import error_response, is_oip_path

    headers = {"Retry-After": "1"}
    oip = error_response(503, "unavailable", "v1 has no live replica", "rid-1", headers, oip=True)
    rest = error_response(503, "unavailable", "v1 has no live replica", "rid-1", headers)
    assert json.loads(oip.body) == {"error": "v1 has no live replica"}
    assert json.loads(rest.body) == {"error": {"code": "unavailable", "message": "v1 has no live replica"},
                                     "request_id": "rid-1"}
    for r in (oip, rest):
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert [is_oip_path(p) for p in ("/v2", "/v2/health/ready", "/v2/models/m/infer", "/predict", "/v2x")] == [
        True, True, True, False, False]
