"""Untrusted request input to a checked RGB image: bytes, base64, media types and URLs.

Every way a client can hand the API an image ends here, and every bad input ends as an
`InputError` carrying the HTTP status the ingress answers with. Nothing else escapes for bad
input (programming errors, such as passing a `str` where bytes are expected, still raise):

    400  undecodable_image, empty_image, bad_base64
    413  too_many_bytes, too_many_pixels
    415  unsupported_format, unsupported_media_type
    422  image_too_small, missing_field, url_disabled, url_not_allowed, url_fetch_failed,
         too_many_redirects
    504  url_timeout

Decisions where the status is a judgement call:

* An empty body is 400 `empty_image` (the client sent something, and it is not an image).
* Bytes that carry the signature of a known format we do not decode (PDF, ZIP, gzip, HEIC,
  AVIF, MP4, JPEG XL, SVG, HTML) or of an image format Pillow reads but `InputLimits.formats`
  leaves out are 415 `unsupported_format`. Bytes with no recognisable signature at all,
  plain text and random garbage included, are 400 `undecodable_image`.
* A missing Content-Type is treated as a raw image (the bytes are sniffed anyway).
* An empty data-URI media type (`data:;base64,...`) is accepted; bytes are sniffed.

Decoding (`decode_image`) is synchronous and CPU-bound. In an event loop use
`decode_images`: headers are checked in the loop and the pixels of large images decoded in a
worker thread.
Pixel limits are checked on the header before any pixel is decoded. Pillow's own
decompression-bomb check is process-global (`Image.MAX_IMAGE_PIXELS`), so it is not relied
on: `InputLimits.max_pixels` is checked here; Pillow's hard error above twice its global
limit still applies on top. `warnings.catch_warnings` is not thread-safe in Python 3.11; a
race there can only lose the warning-to-error filter, which the explicit check backs up.
`Image.LOAD_TRUNCATED_IMAGES` is also process-global: if some other code sets it, truncated
files decode partially instead of failing with 400.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hashlib
import io
import ipaddress
import re
import socket
import ssl
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import unquote

import httpx
from PIL import Image, UnidentifiedImageError

from mlplatform.data.preprocess import to_rgb
from mlplatform.errors import ConfigError

__all__ = [
    "IMAGE_CONTENT_TYPES",
    "DecodedImage",
    "InputError",
    "InputLimits",
    "UrlPolicy",
    "check_content_type",
    "OpenedImage",
    "decode_image",
    "decode_images",
    "finish_decode",
    "open_image",
    "fetch_url",
    "parse_base64_image",
]


class InputError(Exception):
    """Bad client input: an HTTP status, a short machine code and one human sentence."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"InputError({self.status}, {self.code!r}, {self.message!r})"

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message}


# ----------------------------------------------------------------------------- config

def _fields_from(cls: type, d: Mapping[str, Any] | None, prefix: str,
                 ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """Known keys of `d` (a dict or DictConfig); unknown keys are a ConfigError."""
    if d is None:
        return {}
    names = {f.name for f in fields(cls)}
    out: dict[str, Any] = {}
    for key, value in d.items():
        if key in ignore:
            continue
        if key not in names:
            raise ConfigError(f"{prefix}.{key}", value, f"unknown key; expected one of {sorted(names)}")
        out[key] = value
    return out


_FORMAT_ALIASES = {"JPG": "JPEG", "TIF": "TIFF"}


@dataclass(frozen=True)
class InputLimits:
    """What an accepted image may be: `serve.inputs` (its `url` block is `UrlPolicy`)."""

    max_bytes: int = 10_000_000
    max_pixels: int = 40_000_000
    min_width: int = 16
    min_height: int = 16
    # Pillow format ids (Image.format): anything else is 415 even when Pillow could read it.
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "MPO")

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "min_width", "min_height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"serve.inputs.{name}", value, "must be an integer >= 1")
        formats = (self.formats,) if isinstance(self.formats, str) else self.formats
        norm = tuple(_FORMAT_ALIASES.get(str(f).strip().upper(), str(f).strip().upper())
                     for f in formats)
        if not norm or not all(norm):
            raise ConfigError("serve.inputs.formats", self.formats, "list at least one image format")
        object.__setattr__(self, "formats", norm)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> InputLimits:
        kw = _fields_from(cls, d, "serve.inputs", ignore=("url",))
        if "formats" in kw and not isinstance(kw["formats"], str):
            kw["formats"] = tuple(kw["formats"])
        return cls(**kw)


@dataclass(frozen=True)
class UrlPolicy:
    """`serve.inputs.url`: whether and where the API may fetch an image from a URL.

    Deny by default: off unless `enabled`, and then only hosts in `allowed_hosts` (an exact
    name or IP, or `.example.com` for any subdomain of example.com, not the apex itself).
    Hosts that resolve to a private, loopback, link-local, multicast, reserved or otherwise
    non-global address are refused unless `allow_private` is True (then nothing is resolved
    up front and the name is connected to as is).
    """

    enabled: bool = False
    allowed_hosts: tuple[str, ...] = ()
    allow_private: bool = False
    timeout_s: float = 5.0
    max_bytes: int = 10_000_000
    max_redirects: int = 3
    schemes: tuple[str, ...] = ("http", "https")

    def __post_init__(self) -> None:
        p = "serve.inputs.url"
        if not isinstance(self.timeout_s, int | float) or not self.timeout_s > 0:
            raise ConfigError(f"{p}.timeout_s", self.timeout_s, "must be > 0")
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            raise ConfigError(f"{p}.max_bytes", self.max_bytes, "must be an integer >= 1")
        if (isinstance(self.max_redirects, bool) or not isinstance(self.max_redirects, int)
                or self.max_redirects < 0):
            raise ConfigError(f"{p}.max_redirects", self.max_redirects, "must be an integer >= 0")
        schemes = tuple(str(s).strip().lower() for s in self.schemes)
        if not schemes or not set(schemes) <= {"http", "https"}:
            raise ConfigError(f"{p}.schemes", self.schemes, "must be a non-empty subset of http, https")
        hosts = (self.allowed_hosts,) if isinstance(self.allowed_hosts, str) else self.allowed_hosts
        norm = []
        for entry in hosts:
            try:
                norm.append(_normalize_entry(str(entry)))
            except ValueError as e:
                raise ConfigError(f"{p}.allowed_hosts", entry, str(e)) from None
        object.__setattr__(self, "schemes", schemes)
        object.__setattr__(self, "allowed_hosts", tuple(norm))
        object.__setattr__(self, "enabled", bool(self.enabled))
        object.__setattr__(self, "allow_private", bool(self.allow_private))
        object.__setattr__(self, "timeout_s", float(self.timeout_s))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> UrlPolicy:
        kw = _fields_from(cls, d, "serve.inputs.url")
        for key in ("allowed_hosts", "schemes"):
            if key in kw and not isinstance(kw[key], str):
                kw[key] = tuple(kw[key])
        return cls(**kw)


# ----------------------------------------------------------------------------- decoding

@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied, first frame
    format: str  # Pillow's format id: JPEG, PNG, ...
    width: int  # of `image`, i.e. after orientation
    height: int
    mode: str  # the file's own mode before conversion: P, RGBA, I;16, CMYK, ...
    num_bytes: int
    sha256: str  # of the raw bytes


# Up to this many pixels per request an event loop decodes them itself (512x512: about 3 ms
# for a JPEG here); more go to a worker thread (`decode_images`).
INLINE_DECODE_PIXELS = 512 * 512

_SVG_RE = re.compile(rb"<svg[\s>]", re.IGNORECASE)
_HTML_RE = re.compile(rb"^(<!doctype\s+html|<html[\s>]|<head[\s>]|<body[\s>])", re.IGNORECASE)
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}


def _sniff_other(data: bytes) -> str | None:
    """The name of a recognisable non-decodable format, from its signature; None if unknown."""
    head = data[:32]
    if head.startswith(b"%PDF-"):
        return "PDF"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "ZIP"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _HEIF_BRANDS:
            return "HEIC/HEIF"
        if brand in (b"avif", b"avis"):
            return "AVIF"
        return "MP4/QuickTime"
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n"):
        return "JPEG XL"
    if head.startswith(b"RIFF") and head[8:12] in (b"WAVE", b"AVI "):
        return "RIFF audio/video"
    text = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n")
    if _SVG_RE.search(text) and text.startswith((b"<?xml", b"<svg", b"<!--", b"<!DOCTYPE svg")):
        return "SVG"
    if _HTML_RE.match(text):
        return "HTML"
    return None


@functools.cache
def _registered() -> frozenset[str]:
    Image.init()
    return frozenset(Image.OPEN)


def _pillow_format(data: bytes) -> str | None:
    """Which format Pillow would read these bytes as, reading the header only."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format
    except Exception:
        return None


def _open(data: bytes, limits: InputLimits) -> Image.Image:
    allowed = tuple(f for f in limits.formats if f in _registered())
    accepted = ", ".join(limits.formats)
    try:
        return Image.open(io.BytesIO(data), formats=allowed)
    except UnidentifiedImageError:
        pass
    known = _pillow_format(data) or _sniff_other(data)
    if known:
        raise InputError(415, "unsupported_format",
                         f"{known} is not an accepted image format; send one of {accepted}.")
    raise InputError(400, "undecodable_image",
                     f"The data is not a recognisable image; send one of {accepted}.")


def _too_many_pixels(w: int, h: int, limits: InputLimits) -> InputError:
    return InputError(413, "too_many_pixels",
                      f"The image is {w}x{h} = {w * h} pixels; the limit is {limits.max_pixels}.")


@contextlib.contextmanager
def _pillow_errors(limits: InputLimits, fmt: list[str]) -> Iterator[None]:
    """Pillow's exceptions for bad input, as InputErrors (fmt[0]: the format, once known)."""
    # Pillow warns past its global MAX_IMAGE_PIXELS: an error when that is within our own
    # limit (we would refuse anyway), ignored when our limit is larger (our check decides).
    pil_max = Image.MAX_IMAGE_PIXELS
    action = "error" if pil_max is None or limits.max_pixels <= pil_max else "ignore"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter(action, Image.DecompressionBombWarning)
            # Pillow's complaints about corrupt metadata: attacker-chosen text, log noise.
            warnings.simplefilter("ignore", UserWarning)
            yield
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(413, "too_many_pixels",
                         "The image has too many pixels to decode (decompression bomb guard).") from None
    except MemoryError:
        raise InputError(413, "too_many_pixels", "The image is too large to decode.") from None
    except Exception:
        raise InputError(400, "undecodable_image",
                         f"The {fmt[0]} data is truncated or corrupt and cannot be decoded.") from None


@dataclass
class OpenedImage:
    """An image whose header has passed every check (bytes, format, pixel count) and whose
    pixels are not decoded yet: `finish_decode` does that, the CPU-bound part."""

    image: Image.Image  # open, lazy
    format: str
    mode: str
    num_bytes: int
    raw: bytes

    @property
    def pixels(self) -> int:
        w, h = self.image.size
        return max(w, 1) * max(h, 1)


def open_image(data: bytes | bytearray | memoryview, limits: InputLimits | None = None) -> OpenedImage:
    """The cheap checks, from the header alone (tens of microseconds): byte count (413),
    empty (400), format (400/415), pixel count (413, before any pixel is decoded)."""
    limits = limits or InputLimits()
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"decode_image wants bytes, got {type(data).__name__}")
    n = data.nbytes if isinstance(data, memoryview) else len(data)
    if n > limits.max_bytes:
        raise InputError(413, "too_many_bytes",
                         f"The image is {n} bytes; the limit is {limits.max_bytes}.")
    if n == 0:
        raise InputError(400, "empty_image", "The image is empty (0 bytes).")
    raw = bytes(data)
    fmt = ["image"]
    with _pillow_errors(limits, fmt):
        img = _open(raw, limits)
        try:
            fmt[0] = img.format or "image"
            # Phone JPEGs with an MP extension open as MPO through the JPEG plugin.
            jpeg_family = fmt[0] == "MPO" and "JPEG" in limits.formats
            if fmt[0] not in limits.formats and not jpeg_family:
                raise InputError(415, "unsupported_format",
                                 f"{fmt[0]} is not an accepted image format; send one of "
                                 f"{', '.join(limits.formats)}.")
            w, h = img.size
            if max(w, 1) * max(h, 1) > limits.max_pixels:
                raise _too_many_pixels(w, h, limits)
            return OpenedImage(image=img, format=fmt[0], mode=img.mode, num_bytes=n, raw=raw)
        except BaseException:
            img.close()
            raise


def finish_decode(opened: OpenedImage, limits: InputLimits | None = None) -> DecodedImage:
    """The pixels (400 when truncated or corrupt), RGB with EXIF orientation (`to_rgb`), and
    the minimum size of the oriented image (422). Pillow releases the GIL while it decodes
    and resizes, so a large image can go to a worker thread and leave the event loop free."""
    limits = limits or InputLimits()
    img = opened.image
    with _pillow_errors(limits, [opened.format]):
        try:
            img.load()
            w, h = img.size
            if max(w, 1) * max(h, 1) > limits.max_pixels:
                raise _too_many_pixels(w, h, limits)
            rgb = to_rgb(img)
        finally:
            img.close()
    w, h = rgb.size
    if w < limits.min_width or h < limits.min_height:
        raise InputError(422, "image_too_small",
                         f"The image is {w}x{h}; the minimum is {limits.min_width}x{limits.min_height}.")
    return DecodedImage(image=rgb, format=opened.format, width=w, height=h, mode=opened.mode,
                        num_bytes=opened.num_bytes, sha256=hashlib.sha256(opened.raw).hexdigest())


def decode_image(data: bytes | bytearray | memoryview, limits: InputLimits | None = None) -> DecodedImage:
    """Raw bytes to a checked RGB image, or an `InputError`: `open_image` then
    `finish_decode`, synchronously.

    Order: byte count (413), empty (400), format identified from the header (400/415),
    pixel count from the header (413, before any pixel is decoded), decode (400 when
    truncated or corrupt), RGB conversion with EXIF orientation (`to_rgb`), minimum size
    on the oriented image (422).
    """
    return finish_decode(open_image(data, limits), limits)


async def decode_images(datas: list[bytes], limits: InputLimits | None = None,
                        inline_pixels: int = INLINE_DECODE_PIXELS) -> list[DecodedImage]:
    """`decode_image` for an event loop: every header is checked first, in the loop; the
    pixels are decoded in the loop when they are few (up to `inline_pixels` in all: a thread
    hop would cost more than the decoding), else in a worker thread, so that one 12 MP photo
    (about 110 ms to decode here) does not stall every other request of the replica."""
    opened: list[OpenedImage] = []
    try:
        for data in datas:
            opened.append(open_image(data, limits))
    except BaseException:
        for o in opened:
            o.image.close()
        raise

    def finish() -> list[DecodedImage]:
        try:
            return [finish_decode(o, limits) for o in opened]
        finally:  # after an error, the images not reached (closing one twice is harmless)
            for o in opened:
                o.image.close()

    if sum(o.pixels for o in opened) <= inline_pixels:
        return finish()
    return await asyncio.to_thread(finish)


# ----------------------------------------------------------------------------- base64

_B64_STD = re.compile(r"[A-Za-z0-9+/]*")
_B64_URL = re.compile(r"[A-Za-z0-9\-_]*")


def _bad_b64(message: str) -> InputError:
    return InputError(400, "bad_base64", message)


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
    payload = "".join(payload.split()).rstrip("=")
    if 3 * len(payload) // 4 > max_bytes:
        raise InputError(413, "too_many_bytes",
                         f"The base64 image decodes to about {3 * len(payload) // 4} bytes; "
                         f"the limit is {max_bytes}.")
    if not payload:
        raise _bad_b64("The base64 image is empty.")
    if len(payload) % 4 == 1:
        raise _bad_b64("The base64 text has an impossible length (truncated?).")
    if _B64_STD.fullmatch(payload):
        altchars = None
    elif _B64_URL.fullmatch(payload):
        altchars = b"-_"
    else:
        raise _bad_b64("The text is not valid base64 (unexpected characters).")
    try:
        out = base64.b64decode(payload + "=" * (-len(payload) % 4), altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise _bad_b64("The text is not valid base64.") from None
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
        hint = " (curl: use --data-binary with -H 'Content-Type: image/jpeg', or -F 'file=@img.jpg')"
    raise InputError(415, "unsupported_media_type",
                     f"Content-Type {media!r} is not accepted; send multipart/form-data, "
                     f"application/json or a raw image{hint}.")


# ----------------------------------------------------------------------------- URLs

_HOSTNAME_RE = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REDIRECTS = {301, 302, 303, 307, 308}


def _as_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def _normalize_host(host: str) -> str:
    """Lower case, no brackets or trailing dot, IDNA; IPs in canonical form. ValueError if bad."""
    h = host.strip().lower()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    ip = _as_ip(h)
    if ip is not None:
        return str(ip)
    h = h.rstrip(".")
    if not h.isascii():
        h = httpx.URL(f"http://{h}/").raw_host.decode("ascii").rstrip(".")
    if len(h) > 253 or not _HOSTNAME_RE.fullmatch(h):
        raise ValueError(f"not a valid host name: {host!r}")
    return h


def _normalize_entry(entry: str) -> str:
    e = entry.strip()
    if any(c in e for c in "/@?#") or (e.count(":") == 1 and not e.startswith("[")):
        raise ValueError("list a bare host name or IP (no scheme, port or path)")
    if e.startswith("."):
        return "." + _normalize_host(e[1:])
    return _normalize_host(e)


def _host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    is_ip = _as_ip(host) is not None
    return any(host == e or (not is_ip and e.startswith(".") and host.endswith(e)) for e in allowed)


def _non_public(addr: str) -> bool:
    """True for anything but a plain global unicast address, looking inside IPv4-in-IPv6."""
    ip = _as_ip(addr)
    if ip is None:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:a.b.c.d is that IPv4 address, judged as such
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.sixtofour is not None:
            candidates.append(ip.sixtofour)
        if ip.teredo is not None:
            candidates.extend(ip.teredo)
        if ip in _NAT64:
            candidates.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    for c in candidates:
        if (c.is_private or c.is_loopback or c.is_link_local or c.is_multicast or c.is_reserved
                or c.is_unspecified or not c.is_global
                or (isinstance(c, ipaddress.IPv6Address) and c.is_site_local)):
            return True
    return False


def _not_allowed(message: str) -> InputError:
    return InputError(422, "url_not_allowed", message)


def _fetch_failed(message: str) -> InputError:
    return InputError(422, "url_fetch_failed", message)


def _check_url(raw: str, policy: UrlPolicy) -> tuple[httpx.URL, str, int]:
    """Scheme and host allowlist of one hop: (url, normalized host, port)."""
    try:
        url = httpx.URL(raw)
    except Exception:
        raise _not_allowed("The image URL is not a valid URL.") from None
    if url.scheme not in policy.schemes:
        raise _not_allowed(f"URL scheme {url.scheme or '(none)'!r} is not allowed; "
                           f"use {' or '.join(policy.schemes)}.")
    if url.userinfo:
        raise _not_allowed("URLs with credentials (user:password@) are not allowed.")
    try:
        host = _normalize_host(url.raw_host.decode("ascii"))
    except (ValueError, UnicodeError):
        raise _not_allowed("The image URL has no valid host.") from None
    port = url.port or (443 if url.scheme == "https" else 80)
    if not 0 < port < 65536:
        raise _not_allowed(f"Port {port} is not a valid TCP port.")
    if not _host_allowed(host, policy.allowed_hosts):
        raise _not_allowed(f"Host {host!r} is not in serve.inputs.url.allowed_hosts.")
    return url, host, port


async def _resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, in resolver order, without duplicates."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[str] = []
    for info in infos:
        addr = str(info[4][0]).split("%", 1)[0]
        if addr not in out:
            out.append(addr)
    return out


async def _addresses(host: str, port: int, policy: UrlPolicy) -> list[str] | None:
    """The checked addresses to connect to, or None to connect to the name as is."""
    if policy.allow_private:
        return None
    if _as_ip(host) is not None:
        if _non_public(host):
            raise _not_allowed(f"{host} is a private, loopback or otherwise non-public address.")
        return None
    try:
        addrs = await _resolve(host, port)
    except (OSError, UnicodeError):
        raise _fetch_failed(f"Host {host!r} could not be resolved.") from None
    if not addrs:
        raise _fetch_failed(f"Host {host!r} could not be resolved.")
    if any(_non_public(a) for a in addrs):
        # The address itself is not echoed: it would map the internal network for a caller.
        raise _not_allowed(f"Host {host!r} resolves to a private, loopback or otherwise "
                           "non-public address.")
    return addrs


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    return httpx.create_ssl_context()


async def _send(client: httpx.AsyncClient, url: httpx.URL, addrs: list[str] | None) -> httpx.Response:
    """GET `url`, pinned to the already checked `addrs` when given (first that connects)."""
    if addrs is None:
        return await client.send(client.build_request("GET", url), stream=True)
    headers = {"Host": url.netloc.decode("ascii")}
    ext = {"sni_hostname": url.raw_host.decode("ascii").rstrip(".")} if url.scheme == "https" else {}
    last: Exception | None = None
    for addr in addrs:
        request = client.build_request("GET", url.copy_with(host=addr), headers=headers, extensions=ext)
        try:
            return await client.send(request, stream=True)
        except httpx.ConnectError as e:
            last = e
    raise _fetch_failed(f"Could not connect to {url.host!r}.") from last


async def _fetch(raw: str, policy: UrlPolicy, transport: httpx.AsyncBaseTransport | None) -> bytes:
    timeout = httpx.Timeout(policy.timeout_s)
    headers = {"User-Agent": "mlplatform-image-fetch/1", "Accept": "image/*",
               "Accept-Encoding": "identity"}
    async with httpx.AsyncClient(transport=transport, verify=_ssl_context(), trust_env=False,
                                 follow_redirects=False, timeout=timeout, headers=headers) as client:
        url, host, port = _check_url(raw, policy)
        for _hop in range(policy.max_redirects + 1):
            addrs = await _addresses(host, port, policy)
            client.cookies.clear()
            response = await _send(client, url, addrs)
            try:
                status = response.status_code
                location = response.headers.get("location")
                if status in _REDIRECTS and location:
                    try:
                        target = str(url.join(location.strip()))
                    except Exception:
                        raise _fetch_failed("The URL redirected to an invalid location.") from None
                    url, host, port = _check_url(target, policy)
                    continue
                if not 200 <= status < 300:
                    raise _fetch_failed(f"Fetching the image URL failed: upstream answered HTTP {status}.")
                length = response.headers.get("content-length", "").strip()
                if length.isdigit() and int(length) > policy.max_bytes:
                    raise _too_many_url_bytes(int(length), policy)
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > policy.max_bytes:
                        raise _too_many_url_bytes(None, policy)
                return bytes(body)
            finally:
                await response.aclose()
        raise InputError(422, "too_many_redirects",
                         f"The image URL redirected more than {policy.max_redirects} times.")


def _too_many_url_bytes(n: int | None, policy: UrlPolicy) -> InputError:
    size = f"{n} bytes" if n is not None else f"more than {policy.max_bytes} bytes"
    return InputError(413, "too_many_bytes",
                      f"The image at the URL is {size}; the limit is {policy.max_bytes}.")


async def fetch_url(url: str, policy: UrlPolicy, *,
                    transport: httpx.AsyncBaseTransport | None = None) -> bytes:
    """The bytes at `url`, fetched under `policy`, or an `InputError`.

    Every hop (the URL and each redirect, at most `max_redirects`, followed by hand) is
    checked for scheme, host allowlist and, unless `allow_private`, the addresses its host
    resolves to: one non-public address refuses the host. The connection then goes to a
    checked address (the URL's host is replaced by the IP; the Host header and TLS SNI and
    certificate check keep the name), so a DNS answer that changes between the check and the
    connect (DNS rebinding) cannot redirect it. Residual risks: with `allow_private` nothing
    is checked; with a custom `transport` that ignores the URL's host, pinning is up to it.
    Environment proxies and .netrc are ignored. The body is streamed and cut off past
    `max_bytes` (after HTTP content decoding; identity encoding is requested). The whole
    fetch, redirects included, is bounded by `timeout_s` (504).
    """
    if not policy.enabled:
        raise InputError(422, "url_disabled",
                         "Image URLs are turned off on this server (serve.inputs.url.enabled).")
    if not isinstance(url, str) or not url.strip():
        raise InputError(422, "missing_field", "The image URL is empty.")
    try:
        return await asyncio.wait_for(_fetch(url.strip(), policy, transport), policy.timeout_s)
    except InputError:
        raise
    except (TimeoutError, httpx.TimeoutException):
        raise InputError(504, "url_timeout",
                         f"Fetching the image URL took longer than {policy.timeout_s:g} s.") from None
    except httpx.InvalidURL:
        raise _not_allowed("The image URL is not a valid URL.") from None
    except (httpx.HTTPError, httpx.StreamError, OSError, ValueError, UnicodeError):
        raise _fetch_failed("Fetching the image URL failed (connection or protocol error).") from None
