"""Untrusted image bytes to a checked RGB image, within `serve.inputs` (`InputLimits`).

Every way a client can hand the API an image ends here (`payload` takes the bytes out of
the request, `urlfetch` fetches a URL first), and every bad input ends as an `InputError`
carrying the HTTP status the ingress answers with. Nothing else escapes for bad input (programming errors, such as
passing a `str` where bytes are expected, still raise):

    400  undecodable_image, empty_image
    413  too_many_bytes, too_many_pixels
    415  unsupported_format
    422  image_too_small

Decisions where the status is a judgement call:

* An empty body is 400 `empty_image` (the client sent something, and it is not an image).
* Bytes that carry the signature of a known format we do not decode (PDF, ZIP, gzip, HEIC,
  AVIF, MP4, JPEG XL, SVG, HTML) or of an image format Pillow reads but `InputLimits.formats`
  leaves out are 415 `unsupported_format`. Bytes with no recognisable signature at all,
  plain text and random garbage included, are 400 `undecodable_image`.

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
import contextlib
import functools
import hashlib
import io
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

from PIL import Image, UnidentifiedImageError

from mlplatform.errors import ConfigError

__all__ = [
    "DecodedImage",
    "InputError",
    "InputLimits",
    "OpenedImage",
    "decode_image",
    "decode_images",
    "finish_decode",
    "open_image",
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

def fields_from(cls: type, d: Mapping[str, Any], prefix: str,
                 ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keys of `d` (a dict or DictConfig) for `cls`: an unknown or a missing key is a
    ConfigError (the values come from conf/serve, never from defaults here)."""
    names = {f.name for f in fields(cls)}
    out: dict[str, Any] = {}
    for key, value in d.items():
        if key in ignore:
            continue
        if key not in names:
            raise ConfigError(f"{prefix}.{key}", value, f"unknown key; expected one of {sorted(names)}")
        out[key] = value
    for key in sorted(names - set(out)):
        raise ConfigError(f"{prefix}.{key}", None, "missing")
    return out


_FORMAT_ALIASES = {"JPG": "JPEG", "TIF": "TIFF"}


@dataclass(frozen=True)
class InputLimits:
    """What an accepted image may be: `serve.inputs` (its `url` block is `UrlPolicy`)."""

    max_bytes: int
    max_pixels: int
    min_width: int
    min_height: int
    # Pillow format ids (Image.format): anything else is 415 even when Pillow could read it.
    formats: tuple[str, ...]
    # JPEGs decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) where the short side
    # stays at least `draft_side` (the ingress passes twice the model's resize size).
    reduced_decode: bool

    def __post_init__(self) -> None:
        if not isinstance(self.reduced_decode, bool):
            raise ConfigError("serve.inputs.reduced_decode", self.reduced_decode, "must be true or false")
        for name in ("max_bytes", "max_pixels", "min_width", "min_height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"serve.inputs.{name}", value, "must be an integer >= 1")
        formats = (self.formats,) if isinstance(self.formats, str) else self.formats
        norm = tuple(_FORMAT_ALIASES.get(str(f).strip().upper(), str(f).strip().upper())
                     for f in formats)
        if not norm or not all(norm):
            raise ConfigError("serve.inputs.formats", self.formats, "list at least one image format")
        # MPO (multi-picture JPEG, from cameras) is opened by Pillow's JPEG plugin.
        unknown = sorted(set(norm) - _registered() - {"MPO"})
        if unknown:
            raise ConfigError("serve.inputs.formats", ",".join(unknown),
                              "not an image format Pillow opens (its ids: JPEG, PNG, WEBP, TIFF, ...)")
        object.__setattr__(self, "formats", norm)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputLimits:
        kw = fields_from(cls, d, "serve.inputs", ignore=("url",))
        if "formats" in kw and not isinstance(kw["formats"], str):
            kw["formats"] = tuple(kw["formats"])
        return cls(**kw)



# ----------------------------------------------------------------------------- decoding

@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied, first frame; smaller when reduced_decode
    format: str  # Pillow's format id: JPEG, PNG, ...
    width: int  # of the file's full image, after orientation (not of a reduced `image`)
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


def open_image(data: bytes | bytearray | memoryview, limits: InputLimits) -> OpenedImage:
    """The cheap checks, from the header alone (tens of microseconds): byte count (413),
    empty (400), format (400/415), pixel count (413, before any pixel is decoded)."""
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


def _draft(img: Image.Image, fmt: str, side: int | None) -> bool:
    """Ask libjpeg for the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides at least
    `side`: a 4000x3000 photo for a 256 px resize decodes as 1000x750, 16 times fewer pixels.
    Whether the image was reduced."""
    if not side or fmt not in ("JPEG", "MPO"):
        return False
    size = img.size
    img.draft(img.mode, (side, side))
    return img.size != size


def finish_decode(opened: OpenedImage, limits: InputLimits, draft_side: int | None = None) -> DecodedImage:
    """The pixels (400 when truncated or corrupt), RGB with EXIF orientation (`to_rgb`), and
    the minimum size of the oriented image (422). Pillow releases the GIL while it decodes
    and resizes, so a large image can go to a worker thread and leave the event loop free.
    With `limits.reduced_decode` and a `draft_side`, a large JPEG is decoded at reduced scale
    (`_draft`); width and height stay the file's."""
    # Imported here: config validation imports this module for InputLimits, without torch.
    from mlplatform.data.preprocess import to_rgb

    img = opened.image
    full = img.size
    with _pillow_errors(limits, [opened.format]):
        try:
            reduced = limits.reduced_decode and _draft(img, opened.format, draft_side)
            img.load()
            w, h = img.size
            if max(w, 1) * max(h, 1) > limits.max_pixels:
                raise _too_many_pixels(w, h, limits)
            rgb = to_rgb(img)
        finally:
            img.close()
    w, h = rgb.size
    if reduced:  # the file's size, oriented as `rgb` is
        w, h = full if (w >= h) == (full[0] >= full[1]) else full[::-1]
    if w < limits.min_width or h < limits.min_height:
        raise InputError(422, "image_too_small",
                         f"The image is {w}x{h}; the minimum is {limits.min_width}x{limits.min_height}.")
    return DecodedImage(image=rgb, format=opened.format, width=w, height=h, mode=opened.mode,
                        num_bytes=opened.num_bytes, sha256=hashlib.sha256(opened.raw).hexdigest())


def decode_image(data: bytes | bytearray | memoryview, limits: InputLimits,
                 draft_side: int | None = None) -> DecodedImage:
    """Raw bytes to a checked RGB image, or an `InputError`: `open_image` then
    `finish_decode`, synchronously.

    Order: byte count (413), empty (400), format identified from the header (400/415),
    pixel count from the header (413, before any pixel is decoded), decode (400 when
    truncated or corrupt), RGB conversion with EXIF orientation (`to_rgb`), minimum size
    on the oriented image (422).
    """
    return finish_decode(open_image(data, limits), limits, draft_side)


async def decode_images(datas: list[bytes], limits: InputLimits, inline_pixels: int = INLINE_DECODE_PIXELS,
                        draft_side: int | None = None) -> list[DecodedImage]:
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
            return [finish_decode(o, limits, draft_side) for o in opened]
        finally:  # after an error, the images not reached (closing one twice is harmless)
            for o in opened:
                o.image.close()

    if sum(o.pixels for o in opened) <= inline_pixels:
        return finish()
    return await asyncio.to_thread(finish)
