"""What a request body says: where its image is (the Content-Type, base64 text or a data:
URI, the JSON body of POST /predict), its `top_k`, and a POST /feedback body. Bad input is an `InputError` (400 bad_base64
and bad_json, 413 too_many_bytes, 415 unsupported_media_type, 422 missing_field and
bad_top_k); the bytes then go to `decoding`, which identifies them from their signature
whatever the request claimed. So:

* A missing Content-Type is treated as a raw image.
* An empty data-URI media type (`data:;base64,...`) is accepted.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any
from urllib.parse import unquote

from mlplatform.deployments.decoding import InputError

__all__ = ["IMAGE_CONTENT_TYPES", "check_content_type", "parse_base64_image", "parse_feedback_body", "parse_json_body",
           "parse_top_k"]


# ----------------------------------------------------------------------------- base64

_B64_URL = re.compile(r"[A-Za-z0-9\-_]*")


def _bad_b64(message: str) -> InputError:
    return InputError(400, "bad_base64", message)


def _decode_plain(payload: str, max_bytes: int) -> bytes | None:
    """The common case, at C speed: standard base64 in one piece, checked by the decoder
    itself (validate=True). A regex over the text first cost 5 ms per MB and joining it
    around whitespace 0.6: most of what a phone photo's JSON body took. None: not this case."""
    if not payload or 3 * len(payload) // 4 > max_bytes or len(payload) % 4 == 1:
        return None
    try:
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except ValueError:  # binascii.Error, or a str that is not ASCII
        return None


def _decode_checked(payload: str, max_bytes: int) -> bytes:
    """`payload` without whitespace or padding, either alphabet; every failure named."""
    if 3 * len(payload) // 4 > max_bytes:
        raise InputError(413, "too_many_bytes",
                         f"The base64 image decodes to about {3 * len(payload) // 4} bytes; "
                         f"the limit is {max_bytes}.")
    if not payload:
        raise _bad_b64("The base64 image is empty.")
    if len(payload) % 4 == 1:
        raise _bad_b64("The base64 text has an impossible length (truncated?).")
    padded = payload + "=" * (-len(payload) % 4)
    try:
        return base64.b64decode(padded, validate=True)
    except ValueError:
        if not _B64_URL.fullmatch(payload):
            raise _bad_b64("The text is not valid base64 (unexpected characters).") from None
    try:
        return base64.b64decode(padded, altchars=b"-_", validate=True)
    except ValueError:
        raise _bad_b64("The text is not valid base64.") from None


def parse_base64_image(value: str, max_bytes: int) -> bytes:
    """Base64 text (standard or URL-safe, padding optional, whitespace ignored) or a
    `data:<image media type>;base64,...` URI, to bytes.

    400 bad_base64 for anything malformed, 415 for a data URI whose media type is not an
    image, 413 when the text is long enough to decode to more than `max_bytes` (checked
    before decoding).
    """
    if not isinstance(value, str):
        raise _bad_b64("The image must be a base64 string.")
    payload = value.strip()
    if payload[:5].lower() == "data:":
        header, sep, payload = payload[5:].partition(",")
        if not sep:
            raise _bad_b64("The data URI has no ',' before its data.")
        media_type, *params = (p.strip().lower() for p in header.split(";"))
        if media_type and not (media_type.startswith("image/") or media_type == "application/octet-stream"):
            raise InputError(415, "unsupported_media_type",
                             f"The data URI's media type is {media_type!r}; it must be an image type.")
        if "base64" not in params:
            raise _bad_b64("The data URI must be base64-encoded (data:image/...;base64,...).")
        if "%" in payload:  # '%' is not in either alphabet: percent-encoding is safe to undo
            payload = unquote(payload)
    out = _decode_plain(payload.rstrip("="), max_bytes)
    if out is None:  # whitespace inside, the URL-safe alphabet, or an error to name
        out = _decode_checked("".join(payload.split()).rstrip("="), max_bytes)
    if len(out) > max_bytes:
        raise InputError(413, "too_many_bytes",
                         f"The image is {len(out)} bytes; the limit is {max_bytes}.")
    return out


# ----------------------------------------------------------------------------- media types

IMAGE_CONTENT_TYPES: frozenset[str] = frozenset({
    "image/jpeg", "image/jpg", "image/png", "image/webp", "image/bmp", "image/x-ms-bmp",
    "image/tiff", "image/gif", "application/octet-stream",
})


def check_content_type(content_type: str | None) -> str:
    """A request's Content-Type to "multipart", "json" or "image" (a raw body), else 415.

    Parameters (charset, boundary) are ignored. A missing header counts as a raw image: the
    bytes are identified from their signature in any case.
    """
    if content_type is None or not content_type.strip():
        return "image"
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        return "multipart"
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return "json"
    if media in IMAGE_CONTENT_TYPES:
        return "image"
    hint = ""
    if media == "application/x-www-form-urlencoded":
        hint = " (curl: use --data-binary with -H 'Content-Type: image/jpeg', or -F 'image=@img.jpg')"
    raise InputError(415, "unsupported_media_type",
                     f"Content-Type {media!r} is not accepted; send multipart/form-data, "
                     f"application/json or a raw image{hint}.")


def parse_json_body(body: bytes, max_bytes: int) -> tuple[Any, bytes, str | None]:
    """A JSON /predict body: (top_k, the image's bytes, or the URL to fetch them from)."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InputError(400, "bad_json", "the body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise InputError(422, "missing_field", "the JSON body must be an object with 'image' or 'url'")
    if "image" in payload:
        if not isinstance(payload["image"], str):
            raise InputError(422, "missing_field", "'image' must be a base64 string or data: URI")
        return payload.get("top_k"), parse_base64_image(payload["image"], max_bytes), None
    if "url" in payload:
        if not isinstance(payload["url"], str):
            raise InputError(422, "missing_field", "'url' must be a string")
        return payload.get("top_k"), b"", payload["url"]
    raise InputError(422, "missing_field", "the JSON body needs 'image' (base64) or 'url'")


def parse_feedback_body(body: bytes) -> tuple[str, str]:
    """A POST /feedback body: (request_id, label), both non-empty strings."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InputError(400, "bad_json", "the body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise InputError(422, "missing_field", "the JSON body must be an object with request_id and label")
    rid, label = payload.get("request_id"), payload.get("label")
    for key, value in (("request_id", rid), ("label", label)):
        if not isinstance(value, str) or not value:
            raise InputError(422, "missing_field", f"'{key}' (a non-empty string) is required")
    return rid, label


def parse_top_k(value: Any, default: int, num_labels: int) -> int:
    """`top_k` from the query or the JSON body: an integer from 1 to the number of species
    (422 bad_top_k); `default` when absent. `num_labels` 0: no upper bound known."""
    if value is None:
        return default
    n = num_labels or 10**9
    try:
        k = int(value)
        if str(value).strip() not in (str(k), f"{k}.0") and not isinstance(value, int):
            raise ValueError
    except (TypeError, ValueError):
        raise InputError(422, "bad_top_k", f"top_k={value!r} is not an integer") from None
    if not 1 <= k <= n:
        raise InputError(422, "bad_top_k", f"top_k={k} must be between 1 and {n}")
    return k
