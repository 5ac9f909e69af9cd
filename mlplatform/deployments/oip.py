"""Open Inference Protocol v2 (KServe / Triton) codec for the image classifier: no web framework, no Ray.

(Over 400 lines on purpose: one protocol's request and response codec, both encodings, read
top to bottom against the spec; the ingress only calls `parse_infer_request` and `build_infer_response`.)

The model contract:

- one input, ``image``, datatype ``BYTES``, shape ``[N]`` (``[N, 1]`` accepted); each element is
  one encoded image (JPEG/PNG bytes);
- outputs ``probabilities`` (``FP32``, ``[N, num_classes]``) and ``label`` (``BYTES``, ``[N]``, the
  top-1 species name).

Two request encodings are understood:

- **Binary tensor extension** (tritonclient's default): header ``Inference-Header-Content-Length``
  gives the size of the JSON header at the start of the body; the rest is the concatenated raw data
  of the inputs that declare ``parameters.binary_data_size``, in input order. A ``BYTES`` tensor's
  raw data is, per element, a little-endian uint32 length followed by that many bytes. Every size is
  checked exactly: truncation, overrun or trailing bytes are a 400.
- **Plain JSON**: ``"data"`` is a flat list of strings (or, only when the shape is ``[N, 1]``, a list
  of one-element lists).

Rule for ``BYTES`` in JSON: **every string element is standard base64** (RFC 4648 alphabet, padded,
no whitespace), always; there is no "raw string" mode. Triton's server and KServe read JSON
``BYTES`` elements as raw UTF-8 text instead, and tritonclient with ``binary_data=False`` sends
``str(element, "utf-8")``; but an encoded JPEG or PNG is never valid UTF-8 (PNG starts with 0x89,
JPEG with 0xFF 0xD8), so raw text can never carry one and base64 loses nothing. A tritonclient user
who wants JSON puts ``base64.b64encode(image)`` in the array and sets ``binary_data=False``. An input
``parameters.content_type``, if sent, must be ``"base64"`` (anything else is a 422) so that a client
that means another convention is told rather than misread.

Status codes carried by :class:`OIPError`: 400 malformed (bad JSON, bad base64, bad sizes),
422 valid syntax but against the contract (input name, datatype, shape, unknown output, empty
batch or element), 413 more than ``max_batch`` elements.

Responses follow the same two encodings per output (``binary_data`` per requested output, or the
request's ``binary_data_output`` flag when no outputs are named) and support Triton's
classification extension (``parameters.classification = k``): that output becomes ``BYTES``
``[N, k]`` of ``"score:index[:label]"`` strings, best first, as Triton's server writes them.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

INPUT_NAME = "image"
OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_LABEL = "label"
OUTPUT_NAMES = (OUTPUT_PROBABILITIES, OUTPUT_LABEL)
HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"
EXTENSIONS = ("binary_tensor_data", "classification")

_U32 = struct.Struct("<I")


class OIPError(Exception):
    """A request the protocol refuses: ``status`` is the HTTP status, ``message`` says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def to_json(self) -> bytes:
        """The OIP error body, ``{"error": message}`` (what tritonclient reads)."""
        return json.dumps({"error": self.message}).encode()


@dataclass
class RequestedOutput:
    """One entry of the request's ``outputs``: binary or JSON, and top-k classification (0 = off)."""

    name: str
    binary_data: bool = False
    class_count: int = 0


@dataclass
class InferRequest:
    """A parsed request: the images in order, the outputs asked for (empty = all), parameters."""

    id: str | None
    images: list[bytes]
    outputs: list[RequestedOutput] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Requests


def parse_infer_request(
    body: bytes, headers: Mapping[str, str], max_batch: int = 64
) -> InferRequest:
    """Parse an OIP v2 infer request body (JSON or binary extension); raise :class:`OIPError`.

    ``parameters["binary_data_output"]`` is always set (bool, default False); each requested
    output's ``binary_data`` defaults to it when the output does not say.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    body = bytes(body)
    lowered = {str(k).lower(): v for k, v in headers.items()}
    raw_length = lowered.get(HEADER_LENGTH.lower())
    if raw_length is None:
        header, binary = body, None
    else:
        size = _header_length(raw_length, len(body))
        header, binary = body[:size], memoryview(body)[size:]

    doc = _load_json(header)
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise OIPError(400, "'id' must be a string")

    parameters = _dict_field(doc, "parameters", "request")
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise OIPError(400, "parameters.binary_data_output must be a boolean")
    parameters["binary_data_output"] = binary_default

    outputs = _parse_outputs(doc.get("outputs"), binary_default)
    images = _parse_inputs(doc.get("inputs"), binary, max_batch)
    return InferRequest(id=request_id, images=images, outputs=outputs, parameters=parameters)


def _header_length(raw: object, body_size: int) -> int:
    text = str(raw).strip()
    if not (text.isascii() and text.isdigit()):
        raise OIPError(400, f"{HEADER_LENGTH} must be a non-negative integer, got {raw!r}")
    size = int(text)
    if size == 0:
        raise OIPError(400, f"{HEADER_LENGTH} is 0: the JSON header is empty")
    if size > body_size:
        raise OIPError(400, f"{HEADER_LENGTH} is {size} but the body has only {body_size} bytes")
    return size


def _load_json(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
        raise OIPError(400, f"request header is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise OIPError(400, "request header must be a JSON object")
    return doc


def _dict_field(obj: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise OIPError(400, f"{where} '{key}' must be a JSON object")
    return dict(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_outputs(raw: object, binary_default: bool) -> list[RequestedOutput]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise OIPError(400, "'outputs' must be a list")
    result: list[RequestedOutput] = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise OIPError(400, f"outputs[{i}] must be an object with a string 'name'")
        name = entry["name"]
        if name not in OUTPUT_NAMES:
            raise OIPError(422, f"unknown output {name!r}; the model has {list(OUTPUT_NAMES)}")
        if any(o.name == name for o in result):
            raise OIPError(422, f"output {name!r} requested twice")
        params = _dict_field(entry, "parameters", f"output {name!r}")
        if any(k.startswith("shared_memory") for k in params):
            raise OIPError(422, f"output {name!r}: shared memory is not supported")
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise OIPError(400, f"output {name!r}: parameters.binary_data must be a boolean")
        count = params.get("classification", 0)
        if not _is_int(count):
            raise OIPError(400, f"output {name!r}: parameters.classification must be an integer")
        if count < 0:
            raise OIPError(422, f"output {name!r}: parameters.classification must be >= 0")
        if count and name != OUTPUT_PROBABILITIES:
            raise OIPError(
                422, f"classification applies to {OUTPUT_PROBABILITIES!r} only, not {name!r}"
            )
        result.append(RequestedOutput(name=name, binary_data=binary, class_count=count))
    return result


def _parse_inputs(raw: object, binary: memoryview | None, max_batch: int) -> list[bytes]:
    if not isinstance(raw, list) or not raw:
        raise OIPError(400, "'inputs' must be a non-empty list")
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise OIPError(400, f"inputs[{i}] must be an object")
        if not isinstance(entry.get("name"), str) or not isinstance(entry.get("datatype"), str):
            raise OIPError(400, f"inputs[{i}] needs a string 'name' and 'datatype'")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
            raise OIPError(400, f"inputs[{i}] 'shape' must be a list of integers")
    names = [entry["name"] for entry in raw]
    if names != [INPUT_NAME]:
        raise OIPError(422, f"expected exactly one input named {INPUT_NAME!r}, got {names}")
    tensor = raw[0]

    if tensor["datatype"] != "BYTES":
        raise OIPError(422, f"input {INPUT_NAME!r} must be BYTES, got {tensor['datatype']}")
    shape = tensor["shape"]
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 0:
        raise OIPError(422, f"input {INPUT_NAME!r} shape must be [N] or [N, 1], got {shape}")
    count = shape[0]
    if count == 0:
        raise OIPError(422, f"input {INPUT_NAME!r} is empty")
    if count > max_batch:
        raise OIPError(413, f"batch of {count} images exceeds the limit of {max_batch}")

    params = _dict_field(tensor, "parameters", f"input {INPUT_NAME!r}")
    if any(k.startswith("shared_memory") for k in params):
        raise OIPError(422, f"input {INPUT_NAME!r}: shared memory is not supported")
    content_type = params.get("content_type", "base64")
    if content_type != "base64":
        raise OIPError(
            422, f"input {INPUT_NAME!r}: content_type {content_type!r} unsupported; "
            "BYTES elements in JSON are base64"
        )

    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not _is_int(size) or size < 0:
            raise OIPError(400, "parameters.binary_data_size must be a non-negative integer")
        if binary is None:
            raise OIPError(400, f"binary_data_size given without the {HEADER_LENGTH} header")
        if "data" in tensor:
            raise OIPError(400, f"input {INPUT_NAME!r} has both 'data' and binary_data_size")
        if len(binary) < size:
            raise OIPError(
                400, f"binary data truncated: input {INPUT_NAME!r} declares {size} bytes, "
                f"{len(binary)} follow the header"
            )
        if len(binary) > size:
            raise OIPError(400, f"{len(binary) - size} unexpected bytes after the binary data")
        images = _deserialize_bytes(binary[:size], count)
    else:
        if binary is not None and len(binary):
            raise OIPError(400, f"{len(binary)} bytes after the header but no binary input")
        if "data" not in tensor:
            raise OIPError(400, f"input {INPUT_NAME!r} has neither 'data' nor binary_data_size")
        images = _decode_json_data(tensor["data"], shape)

    if len(images) != count:
        raise OIPError(422, f"shape {shape} does not match {len(images)} elements")
    for i, image in enumerate(images):
        if not image:
            raise OIPError(422, f"element {i} of {INPUT_NAME!r} is empty")
    return images


def _deserialize_bytes(buf: memoryview, expected: int) -> list[bytes]:
    """Triton's BYTES serialization: per element a little-endian uint32 length then the bytes."""
    items: list[bytes] = []
    offset, end = 0, len(buf)
    while offset < end:
        if end - offset < 4:
            raise OIPError(400, f"binary data truncated in the length of element {len(items)}")
        (length,) = _U32.unpack_from(buf, offset)
        offset += 4
        if length > end - offset:
            raise OIPError(
                400, f"binary data truncated: element {len(items)} declares {length} bytes, "
                f"{end - offset} remain"
            )
        items.append(bytes(buf[offset : offset + length]))
        offset += length
        if len(items) > expected:  # well-formed but too many: stop before decoding the rest
            raise OIPError(422, f"binary data holds more than the {expected} elements in shape")
    return items


def _decode_json_data(data: object, shape: list[int]) -> list[bytes]:
    if not isinstance(data, list):
        raise OIPError(400, f"input {INPUT_NAME!r} 'data' must be a list")
    if any(isinstance(x, list) for x in data):
        if len(shape) != 2:
            raise OIPError(422, f"nested 'data' needs shape [N, 1], got {shape}")
        if not all(isinstance(x, list) and len(x) == 1 for x in data):
            raise OIPError(422, f"nested 'data' must be one-element lists for shape {shape}")
        data = [x[0] for x in data]
    if len(data) != shape[0]:
        raise OIPError(422, f"shape {shape} does not match {len(data)} elements")
    images = []
    for i, element in enumerate(data):
        if not isinstance(element, str):
            raise OIPError(400, f"element {i} of {INPUT_NAME!r} must be a base64 string")
        try:
            images.append(base64.b64decode(element, validate=True))
        except (binascii.Error, ValueError):
            raise OIPError(400, f"element {i} of {INPUT_NAME!r} is not valid base64") from None
    return images


# --------------------------------------------------------------------------------------------
# Responses


def build_infer_response(
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    probabilities: np.ndarray,
    labels: Sequence[str],
    outputs: Sequence[RequestedOutput],
    label_names: Sequence[str] | None = None,
    binary_default: bool = False,
) -> tuple[bytes, dict[str, str]]:
    """Encode an infer response; returns ``(body, headers)``.

    ``outputs`` empty means both outputs, binary iff ``binary_default``. ``label_names`` (one per
    class) are appended to classification strings. The headers carry ``Content-Type`` and, when
    any output is binary, ``Inference-Header-Content-Length``.
    """
    probs = np.asarray(probabilities, dtype=np.float32)
    if probs.ndim != 2:
        raise ValueError(f"probabilities must be (N, C), got shape {probs.shape}")
    n, c = probs.shape
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} rows of probabilities")
    if label_names is not None and len(label_names) != c:
        raise ValueError(f"{len(label_names)} label names for {c} classes")
    requested = list(outputs) or [
        RequestedOutput(OUTPUT_PROBABILITIES, binary_default),
        RequestedOutput(OUTPUT_LABEL, binary_default),
    ]

    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    any_binary = False
    for out in requested:
        values: np.ndarray | list[str]
        if out.name == OUTPUT_PROBABILITIES and out.class_count > 0:
            k = min(out.class_count, c)
            datatype, shape = "BYTES", [n, k]
            values = _classify(probs, k, label_names)
        elif out.name == OUTPUT_PROBABILITIES:
            datatype, shape, values = "FP32", [n, c], probs
        elif out.name == OUTPUT_LABEL:
            datatype, shape, values = "BYTES", [n], [str(x) for x in labels]
        else:
            raise ValueError(f"unknown output {out.name!r}")
        tensor: dict[str, Any] = {"name": out.name, "datatype": datatype, "shape": shape}
        if out.binary_data:
            blob = _serialize(values)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
            any_binary = True
        elif isinstance(values, np.ndarray):
            tensor["data"] = values.ravel().tolist()
        else:
            tensor["data"] = values
        tensors.append(tensor)

    doc: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        doc["model_version"] = model_version
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = tensors
    header = json.dumps(doc, separators=(",", ":")).encode()  # ASCII: len == byte length
    if not any_binary:
        return header, {"Content-Type": JSON_CONTENT_TYPE}
    return header + b"".join(blobs), {
        "Content-Type": BINARY_CONTENT_TYPE,
        HEADER_LENGTH: str(len(header)),
    }


def _classify(probs: np.ndarray, k: int, label_names: Sequence[str] | None) -> list[str]:
    """Top-k per row, row-major, as Triton writes them: ``"score:index"`` or ``"score:index:label"``."""
    result = []
    for row in probs:
        for idx in np.argsort(-row, kind="stable")[:k]:
            score = np.format_float_positional(row[idx], unique=True, trim="-")
            entry = f"{score}:{int(idx)}"
            if label_names is not None:
                entry += f":{label_names[idx]}"
            result.append(entry)
    return result


def _serialize(values: np.ndarray | list[str]) -> bytes:
    if isinstance(values, np.ndarray):
        return np.ascontiguousarray(values, dtype="<f4").tobytes()
    parts = []
    for value in values:
        raw = value.encode("utf-8")
        parts.append(_U32.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


# --------------------------------------------------------------------------------------------
# Metadata


def model_metadata(
    name: str, versions: list[str], num_classes: int, platform: str = "pytorch"
) -> dict[str, Any]:
    """``GET /v2/models/{name}``: the model's tensors per the OIP spec."""
    return {
        "name": name,
        "versions": [str(v) for v in versions],
        "platform": platform,
        "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": OUTPUT_PROBABILITIES, "datatype": "FP32", "shape": [-1, num_classes]},
            {"name": OUTPUT_LABEL, "datatype": "BYTES", "shape": [-1]},
        ],
    }


def server_metadata(name: str, version: str) -> dict[str, Any]:
    """``GET /v2``: server name, version and the protocol extensions supported."""
    return {"name": name, "version": version, "extensions": list(EXTENSIONS)}
