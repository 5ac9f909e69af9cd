"""Request inputs: every still format decodes to RGB, bad input is exactly one InputError.

Real Pillow on real encoded files; URL fetching against a real HTTP server on 127.0.0.1
(plus httpx.MockTransport with a stub resolver where the test needs public addresses).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import multiprocessing
import resource
import socket
import struct
import threading
import time
import warnings
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import httpx
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from mlplatform.deployments import decoding, urlfetch
from mlplatform.deployments.decoding import InputError, InputLimits
from mlplatform.deployments.payload import (
    IMAGE_CONTENT_TYPES,
    check_content_type,
    parse_base64_image,
)
from mlplatform.deployments.urlfetch import UrlPolicy, fetch_url
from mlplatform.errors import ConfigError

from .conftest import compose

RED, BLUE = (200, 30, 30), (30, 30, 200)

# conf/serve's input settings: a test states only what it changes.
INPUTS = OmegaConf.to_container(compose().serve.inputs)


def make_limits(**overrides) -> InputLimits:
    return InputLimits.from_dict({**{k: v for k, v in INPUTS.items() if k != "url"}, **overrides})


def make_policy(**overrides) -> UrlPolicy:
    return UrlPolicy.from_dict({**INPUTS["url"], **overrides})


def decode_image(data: bytes, limits_: InputLimits | None = None) -> decoding.DecodedImage:
    return decoding.decode_image(data, limits_ or make_limits())




def _base(w: int = 60, h: int = 40) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = RED
    arr[:, w // 2:] = BLUE
    return Image.fromarray(arr, "RGB")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _err(fn, *args, **kw) -> InputError:
    with pytest.raises(InputError) as info:
        fn(*args, **kw)
    return info.value


def _close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 40) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def _gray16(img: Image.Image) -> Image.Image:
    return Image.fromarray(np.asarray(img.convert("L"), np.uint16) * 257)


def _alpha_corner() -> Image.Image:
    img = _base().convert("RGBA")
    img.putpixel((0, 0), (0, 0, 0, 0))
    return img


def _bilevel(img: Image.Image) -> Image.Image:
    return img.convert("L").point(lambda v: 255 if v > 65 else 0).convert("1", dither=Image.Dither.NONE)


def _animated(fmt: str) -> bytes:
    frames = [_base(), Image.new("RGB", (60, 40), (0, 200, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _png_rgba_transparent_left() -> bytes:
    img = _base().convert("RGBA")
    img.paste((0, 0, 0, 0), (0, 0, 30, 40))
    return _encode(img, "PNG")


# (name, bytes, expected format, expected original mode, colour kept)
CASES = [
    ("jpeg", lambda: _encode(_base(), "JPEG", quality=95), "JPEG", "RGB", True),
    ("jpeg progressive", lambda: _encode(_base(), "JPEG", quality=95, progressive=True), "JPEG", "RGB", True),
    ("jpeg cmyk", lambda: _encode(_base().convert("CMYK"), "JPEG", quality=95), "JPEG", "CMYK", True),
    ("jpeg gray", lambda: _encode(_base().convert("L"), "JPEG"), "JPEG", "L", False),
    ("png", lambda: _encode(_base(), "PNG"), "PNG", "RGB", True),
    ("png rgba", lambda: _encode(_base().convert("RGBA"), "PNG"), "PNG", "RGBA", True),
    ("png palette", lambda: _encode(_base().convert("P"), "PNG"), "PNG", "P", True),
    ("png 16-bit", lambda: _encode(_gray16(_base()), "PNG"), "PNG", "I;16", False),
    ("png gray+alpha", lambda: _encode(_base().convert("LA"), "PNG"), "PNG", "LA", False),
    ("png 1-bit", lambda: _encode(_bilevel(_base()), "PNG"), "PNG", "1", False),
    ("webp lossy", lambda: _encode(_base(), "WEBP", quality=95), "WEBP", "RGB", True),
    ("webp lossless rgba", lambda: _encode(_alpha_corner(), "WEBP", lossless=True), "WEBP", "RGBA", True),
    ("bmp", lambda: _encode(_base(), "BMP"), "BMP", "RGB", True),
    ("tiff", lambda: _encode(_base(), "TIFF"), "TIFF", "RGB", True),
    ("tiff cmyk", lambda: _encode(_base().convert("CMYK"), "TIFF"), "TIFF", "CMYK", True),
    ("tiff 16-bit", lambda: _encode(_gray16(_base()), "TIFF"), "TIFF", "I;16", False),
    ("tiff lzw", lambda: _encode(_base(), "TIFF", compression="tiff_lzw"), "TIFF", "RGB", True),
    ("gif", lambda: _encode(_base(), "GIF"), "GIF", "P", True),
    ("gif animated: first frame", lambda: _animated("GIF"), "GIF", "P", True),
    ("mpo: first frame", lambda: _animated("MPO"), "MPO", "RGB", True),
]


@pytest.mark.parametrize(("name", "make", "fmt", "mode", "colour"), CASES, ids=[c[0] for c in CASES])
def test_every_still_format_decodes_to_rgb(name, make, fmt, mode, colour) -> None:
    data = make()
    d = decode_image(data, make_limits())
    assert d.image.mode == "RGB"
    assert (d.width, d.height) == d.image.size == (60, 40)
    assert (d.format, d.mode) == (fmt, mode)
    assert d.num_bytes == len(data)
    assert d.sha256 == hashlib.sha256(data).hexdigest()
    left, right = d.image.getpixel((10, 20)), d.image.getpixel((50, 20))
    if colour:
        assert _close(left, RED) and _close(right, BLUE), (left, right)
    else:  # grayscale: the left half is brighter than the right, and stays gray
        assert left[0] > right[0] + 20 and max(left) - min(left) <= 2


def test_transparent_pixels_become_white() -> None:
    d = decode_image(_png_rgba_transparent_left())
    assert d.image.getpixel((10, 20)) == (255, 255, 255)
    assert d.image.getpixel((50, 20)) == BLUE


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_orientation_is_applied(fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _encode(_base(), fmt, exif=exif.tobytes()) if fmt != "TIFF" else _encode(
        _base(), fmt, tiffinfo={0x0112: 6})
    d = decode_image(data)
    assert (d.width, d.height) == (40, 60)
    # The left (red) half of the stored pixels ends up on top.
    assert _close(d.image.getpixel((20, 10)), RED)
    assert _close(d.image.getpixel((20, 50)), BLUE)


def test_min_size_is_checked_after_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(_base(40, 10), "JPEG", exif=exif.tobytes())  # stored 40x10, shown 10x40
    e = _err(decode_image, data, make_limits(min_width=16, min_height=8))
    assert (e.status, e.code) == (422, "image_too_small")
    assert decode_image(data, make_limits(min_width=8, min_height=16)).image.size == (10, 40)


def test_tiny_image_is_422_and_the_boundary_passes() -> None:
    e = _err(decode_image, _encode(_base(4, 4), "PNG"), make_limits())
    assert (e.status, e.code) == (422, "image_too_small")
    assert "4x4" in e.message and str(e) == e.message
    assert _err(decode_image, _encode(_base(16, 15), "PNG")).status == 422
    assert decode_image(_encode(_base(16, 16), "PNG")).image.size == (16, 16)


def test_too_many_bytes_is_413_before_anything_else() -> None:
    limits = make_limits(max_bytes=1000)
    e = _err(decode_image, b"\x00" * 1001, limits)  # garbage, but the size is checked first
    assert (e.status, e.code) == (413, "too_many_bytes")
    png = _encode(_base(), "PNG")
    assert len(png) < 5000
    assert _err(decode_image, png, make_limits(max_bytes=len(png) - 1)).status == 413
    assert decode_image(png, make_limits(max_bytes=len(png))).num_bytes == len(png)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(w: int, h: int) -> bytes:
    """A complete, valid 1-bit PNG of w x h black pixels, compressed without materialising it."""
    row = 1 + (w + 7) // 8
    comp, parts, done = zlib.compressobj(9), [], 0
    while done < h:
        n = min(1000, h - done)
        parts.append(comp.compress(b"\x00" * (row * n)))
        done += n
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = _png_bomb(30000, 30000)
    assert len(data) < 200_000  # 900 Mpixel behind ~110 kB
    return data


def _decode_peak_mb(data: bytes, limits: InputLimits) -> tuple[int, str, float]:
    """decode_image with Pillow's pixel guard off, run in a fresh (spawned) process: the
    InputError's status and code, and how far the process's peak RSS grew meanwhile (MB)."""
    Image.MAX_IMAGE_PIXELS = None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        decode_image(data, limits)
        status, code = 200, ""
    except InputError as e:
        status, code = e.status, e.code
    return status, code, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def test_decompression_bomb_is_413_without_decoding(bomb: bytes, monkeypatch) -> None:
    e = _err(decode_image, bomb, make_limits())
    assert (e.status, e.code) == (413, "too_many_pixels")
    # Pillow's own, process-global guard switched off: the header check alone must hold.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    e = _err(decode_image, bomb, make_limits())
    assert (e.status, e.code) == (413, "too_many_pixels")
    assert "30000x30000" in e.message
    # Memory in a process of its own: this one's peak RSS already holds what earlier tests
    # allocated, and a decode that stayed under it would not show.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        status, code, grown_mb = pool.submit(_decode_peak_mb, bomb, make_limits()).result(timeout=120)
    assert (status, code) == (413, "too_many_pixels")
    assert grown_mb < 200  # decoding would take ~900 MB


def test_pixel_limit_is_ours_not_pillows(monkeypatch) -> None:
    png = _encode(_base(100, 100), "PNG")
    e = _err(decode_image, png, make_limits(max_pixels=9999))
    assert (e.status, e.code) == (413, "too_many_pixels")
    assert decode_image(png, make_limits(max_pixels=10_000)).image.size == (100, 100)
    # Pillow's global limit lower than ours: its warning must neither fail nor leak.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_image(png, make_limits()).image.size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == 6000


def test_disallowed_formats_are_415() -> None:
    only = make_limits(formats=("jpeg", "png"))  # normalised to upper case
    assert only.formats == ("JPEG", "PNG")
    for fmt in ("GIF", "WEBP", "BMP", "TIFF"):
        e = _err(decode_image, _encode(_base(), fmt), only)
        assert (e.status, e.code) == (415, "unsupported_format"), fmt
        assert fmt in e.message
    assert decode_image(_animated("MPO"), make_limits(formats=("JPEG",))).format == "MPO"
    # Formats Pillow reads that the default list leaves out.
    for fmt in ("TGA", "PCX", "ICO", "PPM"):
        e = _err(decode_image, _encode(_base(), fmt))
        assert (e.status, e.code) == (415, "unsupported_format"), fmt


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"", 400, "empty_image"),
        (b"just some text, not an image\n" * 20, 400, "undecodable_image"),
        (b'{"image": "not here"}', 400, "undecodable_image"),
        (bytes(range(256)) * 8, 400, "undecodable_image"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", 415, "unsupported_format"),
        (b"PK\x03\x04\x14\x00\x00\x00\x08\x00", 415, "unsupported_format"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"></svg>', 415,
         "unsupported_format"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", 415, "unsupported_format"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1", 415, "unsupported_format"),
        (b"<!DOCTYPE html><html><body>404</body></html>", 415, "unsupported_format"),
    ],
    ids=["empty", "text", "json", "garbage", "pdf", "zip", "svg", "heic", "avif", "html"],
)
def test_non_images(data: bytes, status: int, code: str) -> None:
    e = _err(decode_image, data)
    assert (e.status, e.code) == (status, code)


def _noise(w: int = 64, h: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), np.uint8))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP"])
def test_truncated_files_are_400(fmt: str) -> None:
    data = _encode(_noise(), fmt)
    e = _err(decode_image, data[: len(data) // 2])
    assert (e.status, e.code) == (400, "undecodable_image")


def test_decode_images_keeps_large_pixels_off_the_event_loop(monkeypatch) -> None:
    """Headers are checked in the loop, and a bad one fails the request before any pixel
    is decoded; few pixels decode in the loop, many in a worker thread; the answers are
    decode_image's either way."""
    threads: list[int] = []
    real = decoding.finish_decode

    def finish(opened, limits=None, draft_side=None):
        threads.append(threading.get_ident())
        return real(opened, limits, draft_side)

    monkeypatch.setattr(decoding, "finish_decode", finish)
    small, large = _encode(_noise(100, 80), "PNG"), _encode(_noise(700, 500), "JPEG")

    async def run(datas, **kw):
        return threading.get_ident(), await decoding.decode_images(datas, **{"limits": make_limits(), **kw})

    loop_thread, out = asyncio.run(run([small, small]))
    assert threads == [loop_thread] * 2
    threads.clear()
    loop_thread, out = asyncio.run(run([small, large]))
    assert len(threads) == 2 and loop_thread not in threads
    for got, data in zip(out, [small, large], strict=True):
        want = decode_image(data)
        assert (got.width, got.height, got.format, got.sha256) == (want.width, want.height, want.format, want.sha256)
        assert np.array_equal(np.asarray(got.image), np.asarray(want.image))
    threads.clear()
    loop_thread, _ = asyncio.run(run([large], inline_pixels=10**9))
    assert threads == [loop_thread]
    # A bad header anywhere: the request fails before anything is decoded.
    threads.clear()
    with pytest.raises(InputError) as info:
        asyncio.run(run([large, b"not an image"]))
    assert (info.value.status, threads) == (400, [])
    bomb = _encode(Image.new("RGB", (5000, 5000)), "PNG")
    with pytest.raises(InputError) as info:
        asyncio.run(run([small, bomb], limits=make_limits(max_pixels=1_000_000)))
    assert (info.value.status, threads) == (413, [])
    # Pixels that fail to decode in the worker thread are the same 400.
    with pytest.raises(InputError) as info:
        asyncio.run(run([small, large[: len(large) // 2]]))
    assert (info.value.status, info.value.code) == (400, "undecodable_image") and len(threads) == 2


def test_mangled_files_only_ever_raise_input_error() -> None:
    rng = np.random.default_rng(1)
    limits = make_limits(max_pixels=1_000_000)
    seen: set[int] = set()
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP"):
        data = _encode(_noise(32, 32), fmt)
        variants = [data[:n] for n in rng.integers(1, len(data), 15)]
        for _ in range(40):
            b = bytearray(data)
            for pos in rng.integers(0, min(len(b), 200), rng.integers(1, 4)):
                b[pos] = int(rng.integers(0, 256))
            variants.append(bytes(b))
        for v in variants:
            try:
                d = decode_image(v, limits)
                assert d.image.mode == "RGB"
            except InputError as e:
                assert e.status in (400, 413, 415, 422), e
                seen.add(e.status)
    assert 400 in seen


def test_input_limits_from_config() -> None:
    node = compose("serve.inputs.max_pixels=123456", "serve.inputs.formats=[jpg,tif]").serve.inputs
    got = InputLimits.from_dict({k: v for k, v in node.items() if k != "url"})
    assert got.max_pixels == 123_456 and got.formats == ("JPEG", "TIFF")  # normalised
    assert got.min_width == INPUTS["min_width"]
    with pytest.raises(ConfigError, match="serve.inputs.max_pixel"):
        InputLimits.from_dict({**INPUTS, "max_pixel": 10})
    with pytest.raises(ConfigError, match="serve.inputs.min_width"):
        make_limits(min_width=0)
    with pytest.raises(ConfigError, match=r"serve.inputs.min_height=None: missing"):
        InputLimits.from_dict({k: v for k, v in INPUTS.items() if k not in ("url", "min_height")})
    assert UrlPolicy.from_dict(node.url) == make_policy()
    p = make_policy(enabled=True, allowed_hosts=["Images.Example.COM.", ".cdn.example"])
    assert p.allowed_hosts == ("images.example.com", ".cdn.example")
    with pytest.raises(ConfigError, match="allowed_hosts"):
        make_policy(allowed_hosts=["https://images.example.com/"])
    with pytest.raises(ConfigError, match="schemes"):
        make_policy(schemes=["ftp"])


# ----------------------------------------------------------------------------- base64

PNG = _encode(_base(), "PNG")


@pytest.mark.parametrize(
    "text",
    [
        base64.b64encode(PNG).decode(),
        base64.urlsafe_b64encode(PNG).decode(),
        base64.urlsafe_b64encode(PNG).decode().rstrip("="),
        base64.b64encode(PNG).decode().rstrip("="),
        base64.encodebytes(PNG).decode(),  # MIME: newline every 76 characters
        "  \n" + base64.b64encode(PNG).decode() + "\r\n\t ",
        "data:image/png;base64," + base64.b64encode(PNG).decode(),
        "DATA:IMAGE/PNG;BASE64," + base64.b64encode(PNG).decode(),
        "data:image/png;name=a.png;base64," + base64.encodebytes(PNG).decode(),
        "data:application/octet-stream;base64," + base64.b64encode(PNG).decode(),
        "data:;base64," + base64.b64encode(PNG).decode(),
        "data:image/png;base64," + base64.b64encode(PNG).decode().replace("+", "%2B").replace("/", "%2F"),
    ],
    ids=["std", "urlsafe", "urlsafe-unpadded", "std-unpadded", "mime-lines", "padded-ws",
         "data-uri", "data-uri-upper", "data-uri-params", "data-uri-octet", "data-uri-empty-type",
         "data-uri-percent"],
)
def test_base64_accepted(text: str) -> None:
    assert parse_base64_image(text, max_bytes=len(PNG)) == PNG


def test_base64_all_lengths_unpadded() -> None:
    for n in range(1, 8):
        raw = bytes(range(250, 250 - n, -1))
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            assert parse_base64_image(enc(raw).decode().rstrip("="), 100) == raw


@pytest.mark.parametrize(
    ("text", "status", "code"),
    [
        ("data:text/plain;base64,aGVsbG8=", 415, "unsupported_media_type"),
        ("data:application/pdf;base64,aGVsbG8=", 415, "unsupported_media_type"),
        ("data:text/plain,hello", 415, "unsupported_media_type"),
        ("data:image/png,%89PNG", 400, "bad_base64"),
        ("data:image/png;base64", 400, "bad_base64"),
        ("!!! not base64 !!!", 400, "bad_base64"),
        ("aGVsbG8gd29ybGQ=?", 400, "bad_base64"),
        ("ab+_cd", 400, "bad_base64"),  # two alphabets at once
        ("abcde", 400, "bad_base64"),  # 5 characters: no valid length
        ("ab==cd==", 400, "bad_base64"),  # padding in the middle
        ("", 400, "bad_base64"),
        ("   \n", 400, "bad_base64"),
        ("héllo", 400, "bad_base64"),
    ],
)
def test_base64_rejected(text: str, status: int, code: str) -> None:
    e = _err(parse_base64_image, text, 1000)
    assert (e.status, e.code) == (status, code)


def _reference_b64(text: str, max_bytes: int) -> bytes:
    """The decoder's rules in their plainest form (no data URIs): whitespace out, padding
    off, one alphabet by regex, then a strict decode. The fast path must agree with it."""
    import binascii
    import re

    payload = "".join(text.strip().split()).rstrip("=")
    if 3 * len(payload) // 4 > max_bytes:
        raise InputError(413, "too_many_bytes", "")
    if not payload or len(payload) % 4 == 1:
        raise InputError(400, "bad_base64", "")
    if re.fullmatch(r"[A-Za-z0-9+/]*", payload):
        alt = None
    elif re.fullmatch(r"[A-Za-z0-9\-_]*", payload):
        alt = b"-_"
    else:
        raise InputError(400, "bad_base64", "")
    try:
        out = base64.b64decode(payload + "=" * (-len(payload) % 4), altchars=alt, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(400, "bad_base64", "") from None
    if len(out) > max_bytes:
        raise InputError(413, "too_many_bytes", "")
    return out


def test_base64_fast_path_agrees_with_the_plain_rules() -> None:
    """Random texts built from both alphabets, padding, whitespace and stray characters:
    the same bytes, or the same status and code, as the plain rules."""
    rng = np.random.default_rng(7)
    pieces = [*"ABCxyz019+/-_=", " ", "\n", "\t", "!", "é", "=="]
    outcomes = set()
    for _ in range(3000):
        raw = rng.bytes(int(rng.integers(0, 40)))
        text = (base64.b64encode if rng.random() < 0.5 else base64.urlsafe_b64encode)(raw).decode()
        chars = list(text)
        for _ in range(int(rng.integers(0, 3))):  # mutate: insert, replace or delete
            i = int(rng.integers(0, len(chars) + 1))
            op = rng.integers(0, 3)
            if op == 0:
                chars.insert(i, str(rng.choice(pieces)))
            elif chars and i < len(chars):
                chars[i] = str(rng.choice(pieces)) if op == 1 else ""
        text = "".join(chars)
        limit = int(rng.integers(0, 40))
        try:
            want = _reference_b64(text, limit)
        except InputError as e:
            want = (e.status, e.code)
        try:
            got = parse_base64_image(text, limit)
        except InputError as e:
            got = (e.status, e.code)
        assert got == want, (text, limit)
        outcomes.add(want if isinstance(want, tuple) else "ok")
    assert outcomes == {"ok", (400, "bad_base64"), (413, "too_many_bytes")}  # every branch was reached


def test_base64_non_string_is_400() -> None:
    assert _err(parse_base64_image, 12345, 1000).code == "bad_base64"
    assert _err(parse_base64_image, None, 1000).code == "bad_base64"


def test_oversize_base64_is_413_before_decoding() -> None:
    # Ends in a character that decoding would reject: only the length can have been looked at.
    e = _err(parse_base64_image, "A" * 40_000 + "!", 10_000)
    assert (e.status, e.code) == (413, "too_many_bytes")
    e = _err(parse_base64_image, "data:image/png;base64," + "A" * 40_000, 10_000)
    assert e.status == 413
    # The boundary: 10_000 bytes encode to 13_336 characters.
    assert len(parse_base64_image(base64.b64encode(b"\x01" * 10_000).decode(), 10_000)) == 10_000
    assert _err(parse_base64_image, base64.b64encode(b"\x01" * 10_001).decode(), 10_000).status == 413


# ----------------------------------------------------------------------------- media types

@pytest.mark.parametrize(
    ("ct", "kind"),
    [
        ("multipart/form-data; boundary=----abc", "multipart"),
        ("Multipart/Form-Data;boundary=x", "multipart"),
        ("application/json", "json"),
        ("application/json; charset=utf-8", "json"),
        ("application/vnd.api+json", "json"),
        ("image/jpeg", "image"),
        ("IMAGE/PNG", "image"),
        ("image/webp", "image"),
        ("image/bmp", "image"),
        ("image/x-ms-bmp", "image"),
        ("image/tiff", "image"),
        ("image/gif", "image"),
        ("application/octet-stream", "image"),
        (" image/jpeg ; q=1", "image"),
        (None, "image"),
        ("", "image"),
    ],
)
def test_content_types_accepted(ct, kind) -> None:
    assert check_content_type(ct) == kind


@pytest.mark.parametrize(
    "ct",
    ["text/plain", "text/plain; charset=utf-8", "application/xml", "text/html", "image/svg+xml",
     "image/heic", "application/x-www-form-urlencoded", "multipart/mixed; boundary=x",
     "application/pdf", "video/mp4", "garbage"],
)
def test_content_types_rejected(ct: str) -> None:
    e = _err(check_content_type, ct)
    assert (e.status, e.code) == (415, "unsupported_media_type")


def test_image_content_types_set() -> None:
    assert {"image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff", "image/gif",
            "image/x-ms-bmp", "application/octet-stream"} <= IMAGE_CONTENT_TYPES
    assert all(check_content_type(ct) == "image" for ct in IMAGE_CONTENT_TYPES)


# ----------------------------------------------------------------------------- URLs

class _Server:
    def __init__(self) -> None:
        self.hits: list[str] = []
        self.png = _encode(_base(), "PNG")
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, status: int, body: bytes = b"", length: bool = True, **headers) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k.replace("_", "-"), v)
                if length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                outer.hits.append(self.path)
                path, _, query = self.path.partition("?")
                try:
                    if path == "/img.png":
                        self._send(200, outer.png, Content_Type="image/png")
                    elif path == "/big":
                        self._send(200, b"\x00" * 5000)
                    elif path == "/stream":  # no Content-Length: the body ends when the socket closes
                        self.send_response(200)
                        self.end_headers()
                        for _ in range(10):
                            self.wfile.write(b"\x01" * 500)
                            self.wfile.flush()
                    elif path.startswith("/chain/"):
                        n = int(path.rsplit("/", 1)[1])
                        if n == 0:
                            self._send(200, outer.png)
                        else:
                            self._send(302, Location=f"/chain/{n - 1}")
                    elif path == "/redirect":
                        self._send(302, Location=unquote(query.removeprefix("to=")))
                    elif path == "/slow":
                        time.sleep(2)
                        self._send(200, outer.png)
                    elif path == "/trickle":  # each read is quick; the whole body is not
                        self.send_response(200)
                        self.send_header("Content-Length", "3000")
                        self.end_headers()
                        for _ in range(30):
                            self.wfile.write(b"\x01" * 100)
                            self.wfile.flush()
                            time.sleep(0.1)
                    else:
                        self._send(404, b"not found")
                except OSError:  # the client hung up on purpose
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


LOCAL = make_policy(enabled=True, allowed_hosts=("127.0.0.1",), allow_private=True, timeout_s=3.0)


def _fetch(url: str, policy: UrlPolicy, **kw) -> bytes:
    return asyncio.run(fetch_url(url, policy, **kw))


def _fetch_err(url: str, policy: UrlPolicy, **kw) -> InputError:
    with pytest.raises(InputError) as info:
        _fetch(url, policy, **kw)
    return info.value


def test_url_fetch_ok(server: _Server) -> None:
    data = _fetch(server.url("/img.png"), LOCAL)
    assert data == server.png
    assert decode_image(data).format == "PNG"
    assert _fetch(server.url("/redirect?to=/img.png"), LOCAL) == server.png  # relative Location
    assert len(_fetch(server.url("/stream"), LOCAL)) == 5000


def test_url_disabled_is_422(server: _Server) -> None:
    e = _fetch_err(server.url("/img.png"), make_policy(allowed_hosts=("127.0.0.1",), allow_private=True))
    assert (e.status, e.code) == (422, "url_disabled")
    assert "serve.inputs.url.enabled" in e.message


@pytest.mark.parametrize(
    "url",
    ["ftp://127.0.0.1/img.png", "file:///etc/passwd", "gopher://127.0.0.1/", "127.0.0.1/img.png",
     "http://user:pw@127.0.0.1/img.png", "http://[::1", "http:///img.png", "http://example.com/a.png"],
)
def test_url_not_allowed(url: str, server: _Server) -> None:
    hits = len(server.hits)
    e = _fetch_err(url, LOCAL)
    assert (e.status, e.code) == (422, "url_not_allowed")
    assert len(server.hits) == hits


def test_empty_allowlist_denies_everything(server: _Server) -> None:
    e = _fetch_err(server.url("/img.png"), make_policy(enabled=True, allow_private=True))
    assert (e.status, e.code) == (422, "url_not_allowed")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_loopback_is_refused_unless_allow_private(host: str, server: _Server) -> None:
    policy = make_policy(enabled=True, allowed_hosts=("127.0.0.1", "localhost"), allow_private=False)
    hits = len(server.hits)
    e = _fetch_err(server.url("/img.png", host), policy)
    assert (e.status, e.code) == (422, "url_not_allowed")
    assert "127.0.0.1" not in e.message or host == "127.0.0.1"  # resolved addresses are not echoed
    assert len(server.hits) == hits  # refused before connecting


def test_redirect_to_a_host_not_allowed_is_422(server: _Server) -> None:
    for target in ("http://evil.example/x.png", "ftp://127.0.0.1/x.png", "http://localhost:1/x"):
        e = _fetch_err(server.url(f"/redirect?to={target}"), LOCAL)
        assert (e.status, e.code) == (422, "url_not_allowed"), target


def test_redirect_limit(server: _Server) -> None:
    policy = make_policy(enabled=True, allowed_hosts=("127.0.0.1",), allow_private=True, max_redirects=3)
    assert _fetch(server.url("/chain/3"), policy) == server.png
    e = _fetch_err(server.url("/chain/4"), policy)
    assert (e.status, e.code) == (422, "too_many_redirects")
    none = make_policy(enabled=True, allowed_hosts=("127.0.0.1",), allow_private=True, max_redirects=0)
    assert _fetch_err(server.url("/chain/1"), none).status == 422


def test_url_body_limit(server: _Server) -> None:
    policy = make_policy(enabled=True, allowed_hosts=("127.0.0.1",), allow_private=True, max_bytes=1000)
    e = _fetch_err(server.url("/big"), policy)  # declared by Content-Length
    assert (e.status, e.code) == (413, "too_many_bytes")
    e = _fetch_err(server.url("/stream"), policy)  # only visible while streaming
    assert (e.status, e.code) == (413, "too_many_bytes")


@pytest.mark.parametrize("path", ["/slow", "/trickle"])
def test_url_timeout_is_504(path: str, server: _Server) -> None:
    policy = make_policy(enabled=True, allowed_hosts=("127.0.0.1",), allow_private=True, timeout_s=0.5)
    t0 = time.monotonic()
    e = _fetch_err(server.url(path), policy)
    assert (e.status, e.code) == (504, "url_timeout")
    assert time.monotonic() - t0 < 1.5


def test_upstream_error_and_refused_connection_are_422(server: _Server) -> None:
    e = _fetch_err(server.url("/missing"), LOCAL)
    assert (e.status, e.code) == (422, "url_fetch_failed")
    assert "404" in e.message
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    e = _fetch_err(f"http://127.0.0.1:{port}/img.png", LOCAL)
    assert (e.status, e.code) == (422, "url_fetch_failed")


@pytest.mark.parametrize(
    ("addr", "private"),
    [
        ("10.0.0.1", True), ("172.16.5.4", True), ("192.168.1.1", True), ("127.0.0.1", True),
        ("169.254.169.254", True), ("0.0.0.0", True), ("100.64.0.1", True), ("224.0.0.1", True),
        ("255.255.255.255", True), ("240.0.0.1", True), ("::1", True), ("::", True),
        ("fe80::1", True), ("fc00::1", True), ("fec0::1", True), ("ff02::1", True),
        ("::ffff:127.0.0.1", True), ("::ffff:10.0.0.1", True), ("2002:7f00:1::1", True),
        ("64:ff9b::a00:1", True), ("fe80::1%eth0", True), ("not-an-ip", True),
        ("93.184.216.34", False), ("8.8.8.8", False), ("2606:4700:4700::1111", False),
        ("::ffff:8.8.8.8", False),
    ],
)
def test_non_public_addresses(addr: str, private: bool) -> None:
    assert urlfetch._non_public(addr) is private


def _stub_dns(monkeypatch, table: dict[str, list[str]]) -> list[str]:
    calls: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        return table[host]

    monkeypatch.setattr(urlfetch, "_resolve", resolve)
    return calls


def test_connection_is_pinned_to_the_checked_address(monkeypatch) -> None:
    """The public name is resolved once per hop and the request goes to that very address."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])  # a rebinding resolver
    calls: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        return next(answers)

    monkeypatch.setattr(urlfetch, "_resolve", resolve)
    seen: list[tuple[str, str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, request.headers["host"], request.extensions.get("sni_hostname")))
        return httpx.Response(200, content=PNG)

    policy = make_policy(enabled=True, allowed_hosts=(".example.com",))
    data = _fetch("https://img.example.com/a.png", policy, transport=httpx.MockTransport(handler))
    assert data == PNG
    assert calls == ["img.example.com"]
    assert seen == [("93.184.216.34", "img.example.com", "img.example.com")]
    # The next lookup answers loopback: refused before any request.
    e = _fetch_err("http://img.example.com:8080/a.png", policy, transport=httpx.MockTransport(handler))
    assert (e.status, e.code) == (422, "url_not_allowed")
    assert len(seen) == 1


def test_any_private_answer_refuses_and_redirects_are_rechecked(monkeypatch) -> None:
    calls = _stub_dns(monkeypatch, {"public.example": ["93.184.216.34"],
                                    "mixed.example": ["93.184.216.34", "10.1.2.3"],
                                    "internal.example": ["10.0.0.7"]})
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.headers['host']}@{request.url.host}{request.url.path}")
        if request.url.path == "/hop":
            return httpx.Response(302, headers={"Location": "http://internal.example/x.png"})
        return httpx.Response(200, content=PNG)

    transport = httpx.MockTransport(handler)
    policy = make_policy(enabled=True, allowed_hosts=("public.example", "mixed.example", "internal.example"))
    assert _fetch("http://public.example/a.png", policy, transport=transport) == PNG
    e = _fetch_err("http://mixed.example/a.png", policy, transport=transport)
    assert (e.status, e.code) == (422, "url_not_allowed")
    e = _fetch_err("http://public.example/hop", policy, transport=transport)
    assert (e.status, e.code) == (422, "url_not_allowed")
    assert "10.0.0.7" not in e.message
    assert seen == ["public.example@93.184.216.34/a.png", "public.example@93.184.216.34/hop"]
    assert calls == ["public.example", "mixed.example", "public.example", "internal.example"]
    e = _fetch_err("http://nowhere.example/a.png",
                   make_policy(enabled=True, allowed_hosts=("nowhere.example",)), transport=transport)
    assert (e.status, e.code) == (422, "url_fetch_failed")


def test_suffix_entries_match_subdomains_only() -> None:
    allowed = make_policy(allowed_hosts=(".example.com", "exact.org", "::1")).allowed_hosts
    assert urlfetch._host_allowed("a.example.com", allowed)
    assert urlfetch._host_allowed("a.b.example.com", allowed)
    assert not urlfetch._host_allowed("example.com", allowed)
    assert not urlfetch._host_allowed("badexample.com", allowed)
    assert urlfetch._host_allowed("exact.org", allowed)
    assert not urlfetch._host_allowed("sub.exact.org", allowed)
    assert urlfetch._host_allowed("::1", allowed)


# ----------------------------------------------------------------------------- reduced-scale decoding


def _photo_jpegs() -> dict[str, bytes]:
    """Real photographs (scikit-image's), at their own resolution: colour, greyscale, CMYK,
    and one stored sideways with an EXIF orientation."""
    from skimage import data

    out = {name: _encode(Image.fromarray(getattr(data, name)()), "JPEG", quality=92)
           for name in ("astronaut", "chelsea", "coffee", "rocket", "retina", "camera", "moon")}
    out["coffee cmyk"] = _encode(Image.fromarray(data.coffee()).convert("CMYK"), "JPEG", quality=92)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 640x427, shown 427x640
    out["rocket sideways"] = _encode(Image.fromarray(data.rocket()), "JPEG", quality=92, exif=exif.tobytes())
    return out


@pytest.mark.parametrize("resize", [32, 64, 128])
def test_reduced_decoding_stays_within_its_stated_bounds_on_real_photos(resize: int) -> None:
    """The bounds docs/serving.md states: the model's uint8 input differs from full decoding by
    at most 2.0 on average (of 255), at a PSNR of at least 38 dB (measured: 1.86 and 39.6 dB at
    worst, a 512 px photo decoded at 1/8 for a 32 px model); sizes are the file's."""
    from mlplatform.data.preprocess import PreprocessSpec, to_uint8

    spec = PreprocessSpec(resize * 7 // 8, resize, (0.5,) * 3, (0.5,) * 3, "bilinear")
    full_limits, reduced_limits = make_limits(reduced_decode=False), make_limits(reduced_decode=True)
    shrunk = 0
    for name, data in _photo_jpegs().items():
        full = decoding.decode_image(data, full_limits, draft_side=2 * resize)
        reduced = decoding.decode_image(data, reduced_limits, draft_side=2 * resize)
        assert (reduced.width, reduced.height) == (full.width, full.height) == full.image.size, name
        assert min(reduced.image.size) >= min(2 * resize, min(full.image.size)), name
        shrunk += reduced.image.size != full.image.size
        a = to_uint8(full.image, spec).astype(np.float64)
        b = to_uint8(reduced.image, spec).astype(np.float64)
        mse = float(np.mean((a - b) ** 2))
        assert np.abs(a - b).mean() <= 2.0 and (mse == 0 or 10 * np.log10(255 ** 2 / mse) >= 38), name
    assert shrunk >= 3  # most of these photos are large enough to be reduced at this size


def test_reduced_decoding_leaves_other_formats_and_small_jpegs_alone() -> None:
    from skimage import data

    photo = Image.fromarray(data.chelsea())  # 451x300
    limits = make_limits(reduced_decode=True)
    for fmt in ("PNG", "WEBP", "TIFF"):
        encoded = _encode(photo, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        assert decoding.decode_image(encoded, limits, draft_side=64).image.tobytes() == photo.tobytes()
    jpeg = _encode(photo, "JPEG", quality=90)
    full = decoding.decode_image(jpeg, make_limits(reduced_decode=False), draft_side=64).image
    assert decoding.decode_image(jpeg, limits, draft_side=512).image.tobytes() == full.tobytes()  # too small
    assert decoding.decode_image(jpeg, limits).image.tobytes() == full.tobytes()  # no side: full
    assert decoding.decode_image(jpeg, limits, draft_side=64).image.size == (113, 75)  # 1/4


def test_reduced_decoding_is_a_boolean_in_config() -> None:
    with pytest.raises(ConfigError, match=r"serve.inputs.reduced_decode=yes: must be true or false"):
        make_limits(reduced_decode="yes")
