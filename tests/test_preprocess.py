"""The shared preprocessing: every still format Pillow decodes becomes the same RGB tensor."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mlplatform.data.ingest import inspect_one
from mlplatform.data.preprocess import PreprocessSpec, decode, preprocess_bytes

SPEC = PreprocessSpec(image_size=32, resize_size=36, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                      interpolation="bilinear")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _base() -> Image.Image:
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, :30] = (200, 30, 30)
    arr[:, 30:] = (30, 30, 200)
    return Image.fromarray(arr, "RGB")


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("jpeg", lambda b: _encode(b, "JPEG", quality=95)),
        ("progressive jpeg", lambda b: _encode(b, "JPEG", quality=95, progressive=True)),
        ("cmyk jpeg", lambda b: _encode(b.convert("CMYK"), "JPEG", quality=95)),
        ("png", lambda b: _encode(b, "PNG")),
        ("png rgba", lambda b: _encode(b.convert("RGBA"), "PNG")),
        ("png palette", lambda b: _encode(b.convert("P"), "PNG")),
        ("png 16-bit", lambda b: _encode(Image.fromarray(
            (np.asarray(b.convert("L"), np.uint16) * 257).astype(np.uint16)), "PNG")),
        ("webp", lambda b: _encode(b, "WEBP", lossless=True)),
        ("bmp", lambda b: _encode(b, "BMP")),
        ("tiff", lambda b: _encode(b, "TIFF")),
        ("gif", lambda b: _encode(b, "GIF")),
    ],
)
def test_formats_decode_to_rgb_tensor(name: str, make) -> None:
    data = make(_base())
    img = decode(data)
    assert img.mode == "RGB" and img.size == (60, 40), name
    arr = preprocess_bytes(data, SPEC)
    assert arr.shape == (3, 32, 32) and arr.dtype == np.float32
    assert np.isfinite(arr).all()


def test_animated_gif_uses_first_frame() -> None:
    red = Image.new("RGB", (40, 40), (255, 0, 0))
    green = Image.new("RGB", (40, 40), (0, 255, 0))
    data = _encode(red, "GIF", save_all=True, append_images=[green], duration=100)
    assert decode(data).getpixel((5, 5))[0] > 200


def test_exif_orientation_is_applied() -> None:
    img = _base()  # 60 wide, 40 high; red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = _encode(img, "JPEG", exif=exif.tobytes(), quality=95)
    out = decode(data)
    assert out.size == (40, 60)
    assert out.getpixel((20, 5))[0] > 150  # red is now on top


def test_same_picture_same_tensor_across_formats() -> None:
    png = preprocess_bytes(_encode(_base(), "PNG"), SPEC)
    bmp = preprocess_bytes(_encode(_base(), "BMP"), SPEC)
    assert np.array_equal(png, bmp)


def test_inspect_records_bombs_and_garbage_without_raising() -> None:
    bomb = Image.new("L", (1, 1))
    data = _encode(bomb, "PNG")
    old = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 0  # any image is now "too large": the path a real bomb takes
        rec = inspect_one(data)
    finally:
        Image.MAX_IMAGE_PIXELS = old
    assert rec["ok"] is False and "Decompression" in rec["error"]
    garbage = inspect_one(b"\x89PNG\r\n\x1a\n garbage")
    assert garbage["ok"] is False and garbage["sha256"]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize(("size", "resize"), [(224, 256), (64, 64), (32, 36), (112, 200)])
def test_cropped_resize_equals_resize_then_crop(interpolation: str, size: int, resize: int) -> None:
    """to_uint8 resizes only the crop's box: within 1/255 of resizing the whole photo, then
    cropping (bit-equal for nearest, which keeps the two steps). Real photos, both
    orientations, and one already at the resize size."""
    from skimage import data

    from mlplatform.data.preprocess import _INTERP, to_uint8

    photos = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in ("astronaut", "coffee", "rocket", "camera")]
    photos += [photos[2].transpose(Image.Transpose.ROTATE_90), photos[1].resize((resize, resize + 17))]
    spec = PreprocessSpec(size, resize, (0.5,) * 3, (0.5,) * 3, interpolation)
    for img in photos:
        w, h = img.size
        scale = resize / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        whole = img.resize((nw, nh), _INTERP[interpolation]) if (nw, nh) != (w, h) else img
        left, top = (nw - size) // 2, (nh - size) // 2
        expected = np.asarray(whole.crop((left, top, left + size, top + size)), np.int16)
        got = to_uint8(img, spec).astype(np.int16)
        assert got.shape == expected.shape == (size, size, 3)
        assert np.abs(got - expected).max() <= (0 if interpolation == "nearest" else 1), img.size


def test_torch_normalisation_equals_numpys() -> None:
    """Training, evaluation and serving normalise with torch;
    offline paths with numpy. The same pixels give the same tensor, up to float rounding,
    and the torch result keeps the channels_last strides the model runs in."""
    import torch

    from mlplatform.data.preprocess import normalize, normalize_torch, to_uint8

    batch = np.stack([to_uint8(Image.open(io.BytesIO(_encode(_base(), "PNG"))), SPEC),
                      np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)])
    batch[0, 0, 0] = (0, 255, 128)  # the extremes of the range
    got = normalize_torch(torch.from_numpy(batch), SPEC)
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(got.numpy(), normalize(batch, SPEC), rtol=0, atol=2e-6)
