"""A seeded, deterministic generator of procedurally drawn "species" images.

Each species has its own shape, colour pair and texture; within a species the position,
scale, rotation, background, hue and noise vary, so a CNN has to learn the species and
not the pixels. The drifted variant draws the same species under changed conditions
(lighting, blur, noise, colour cast, new backgrounds) for the monitoring demos.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mlplatform import storage

ANIMALS = (
    "aardvark albatross alligator alpaca anteater antelope armadillo axolotl baboon badger "
    "barracuda bat beaver bison boar bobcat buffalo camel capybara caracal caribou cassowary "
    "chameleon cheetah chimpanzee chinchilla cobra condor cougar coyote crane crocodile dingo "
    "dolphin donkey dugong eagle echidna eel elephant elk emu falcon ferret flamingo fox gazelle "
    "gecko gibbon giraffe gnu gorilla heron hippo hyena ibex iguana impala jackal jaguar kangaroo "
    "kiwi koala lemur leopard lion llama lynx macaw manatee meerkat mongoose moose narwhal ocelot "
    "okapi orca ostrich otter owl panda pangolin panther peacock pelican penguin platypus puffin "
    "quokka raccoon reindeer rhino salamander seal sloth tapir tiger toucan walrus zebra"
).split()
assert len(ANIMALS) == 100

SHAPES = ("circle", "square", "triangle", "pentagon", "hexagon", "star", "ring", "cross", "diamond", "crescent")
TEXTURES = ("solid", "stripes", "dots", "checker")


def species_names(num_classes: int) -> list[str]:
    """The first 100 are animals; more species get a numbered suffix (zebra_2, ...)."""
    names = []
    for i in range(num_classes):
        base = ANIMALS[i % len(ANIMALS)]
        names.append(base if i < len(ANIMALS) else f"{base}_{i // len(ANIMALS) + 1}")
    return names


@dataclass(frozen=True)
class SpeciesStyle:
    shape: str
    hue: float
    hue2: float
    saturation: float
    texture: str
    aspect: float


def species_style(species: int, seed: int) -> SpeciesStyle:
    """Shape and hue bins are spread so that neighbouring species differ in two ways."""
    rng = np.random.default_rng([seed, 7919, species])
    shape = SHAPES[species % len(SHAPES)]
    hue = ((species // len(SHAPES)) % 10) / 10.0 + 0.035 * ((species // 100) % 3)
    texture = TEXTURES[(species + species // len(SHAPES)) % len(TEXTURES)]
    return SpeciesStyle(
        shape=shape,
        hue=hue % 1.0,
        hue2=(hue + 0.33 + 0.34 * ((species // 5) % 2)) % 1.0,
        saturation=float(rng.uniform(0.65, 0.95)),
        texture=texture,
        aspect=float(rng.uniform(0.75, 1.0)),
    )


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _polygon(n: int, cx: float, cy: float, r: float, rot: float, aspect: float = 1.0) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * aspect * math.sin(rot + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _shape_mask(style: SpeciesStyle, size: int, cx: float, cy: float, r: float, rot: float) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    a = style.aspect
    if style.shape == "circle":
        d.ellipse([cx - r, cy - r * a, cx + r, cy + r * a], fill=255)
    elif style.shape == "square":
        d.polygon(_polygon(4, cx, cy, r * 1.2, rot + math.pi / 4), fill=255)
    elif style.shape == "triangle":
        d.polygon(_polygon(3, cx, cy, r * 1.2, rot), fill=255)
    elif style.shape == "pentagon":
        d.polygon(_polygon(5, cx, cy, r * 1.1, rot), fill=255)
    elif style.shape == "hexagon":
        d.polygon(_polygon(6, cx, cy, r * 1.05, rot), fill=255)
    elif style.shape == "star":
        pts = []
        for k in range(10):
            rr = r * 1.2 if k % 2 == 0 else r * 0.5
            ang = rot + math.pi * k / 5
            pts.append((cx + rr * math.cos(ang), cy + rr * math.sin(ang)))
        d.polygon(pts, fill=255)
    elif style.shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        d.ellipse([cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55], fill=0)
    elif style.shape == "cross":
        w = r * 0.38
        arm1 = [(-r, -w), (r, -w), (r, w), (-r, w)]
        arm2 = [(-w, -r), (w, -r), (w, r), (-w, r)]
        c, s = math.cos(rot), math.sin(rot)
        for arm in (arm1, arm2):
            d.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in arm], fill=255)
    elif style.shape == "diamond":
        d.polygon(_polygon(4, cx, cy, r * 1.25, rot, aspect=0.55), fill=255)
    elif style.shape == "crescent":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, oy = r * 0.5 * math.cos(rot), r * 0.5 * math.sin(rot)
        d.ellipse([cx - r + ox, cy - r + oy, cx + r + ox, cy + r + oy], fill=0)
    return mask


def _texture(style: SpeciesStyle, size: int, c1: tuple[int, int, int], c2: tuple[int, int, int],
             rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = size / rng.uniform(5.0, 7.0)
    if style.texture == "solid":
        sel = np.zeros((size, size), bool)
    elif style.texture == "stripes":
        ang = rng.uniform(0, math.pi)
        sel = (np.sin((xx * math.cos(ang) + yy * math.sin(ang)) * 2 * math.pi / period) > 0)
    elif style.texture == "dots":
        ox, oy = rng.uniform(0, period, 2)
        sel = (((xx + ox) % period - period / 2) ** 2 + ((yy + oy) % period - period / 2) ** 2) < (period * 0.28) ** 2
    else:  # checker
        sel = (((xx // period) + (yy // period)) % 2).astype(bool)
    out = np.empty((size, size, 3), np.float32)
    out[:] = c1
    out[sel] = c2
    return out


def _background(size: int, rng: np.random.Generator, drifted: float) -> np.ndarray:
    """Low-saturation gradient with faint clutter; `drifted` blends in a saturated, busy style."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    h = rng.uniform(0, 1)
    a = np.array(_rgb(h, rng.uniform(0.0, 0.25), rng.uniform(0.35, 0.9)), np.float32)
    b = np.array(_rgb(h + rng.uniform(-0.1, 0.1), rng.uniform(0.0, 0.25), rng.uniform(0.35, 0.9)), np.float32)
    ang = rng.uniform(0, 2 * math.pi)
    t = np.clip(0.5 + (xx - 0.5) * math.cos(ang) + (yy - 0.5) * math.sin(ang), 0, 1)[..., None]
    bg = a * (1 - t) + b * t
    if drifted > 0:
        hb = rng.uniform(0, 1)
        c1 = np.array(_rgb(hb, 0.9, 0.9), np.float32)
        c2 = np.array(_rgb(hb + 0.5, 0.9, 0.4), np.float32)
        f = rng.uniform(8, 14)
        waves = (np.sin(xx * f * math.pi * 2) * np.cos(yy * f * math.pi * 1.3) > 0)[..., None]
        busy = np.where(waves, c1, c2)
        bg = bg * (1 - drifted) + busy * drifted
    return bg


def render(species: int, index: int, image_size: int = 64, seed: int = 0,
           drift_kinds: Sequence[str] = (), drift_strength: float = 0.0) -> Image.Image:
    """One RGB image of `species`; identical arguments give identical pixels."""
    style = species_style(species, seed)
    drift_tag = ",".join(sorted(drift_kinds)) if drift_kinds else ""
    rng = np.random.default_rng([seed, species, index, 1 if drift_tag else 0])
    scale = 2  # draw large, downsample: anti-aliased edges
    size = image_size * scale
    bg_drift = drift_strength if "background" in drift_kinds else 0.0
    canvas = _background(size, rng, bg_drift)

    r = size * rng.uniform(0.2, 0.32)
    cx = size / 2 + rng.uniform(-0.18, 0.18) * size
    cy = size / 2 + rng.uniform(-0.18, 0.18) * size
    rot = rng.uniform(0, 2 * math.pi)
    v = rng.uniform(0.6, 0.95)
    c1 = _rgb(style.hue + rng.uniform(-0.025, 0.025), style.saturation, v)
    c2 = _rgb(style.hue2 + rng.uniform(-0.025, 0.025), style.saturation, v * rng.uniform(0.6, 0.9))
    tex = _texture(style, size, c1, c2, rng)
    mask = np.asarray(_shape_mask(style, size, cx, cy, r, rot), np.float32)[..., None] / 255.0
    img = canvas * (1 - mask) + tex * mask

    img = np.asarray(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).resize(
        (image_size, image_size), Image.BILINEAR), np.float32)

    s = drift_strength
    if "brightness" in drift_kinds:
        img = img * (1.0 + (0.7 if rng.uniform() < 0.5 else -0.6) * s)
    if "color_cast" in drift_kinds:
        img = img + np.array([-40.0, 10.0, 60.0], np.float32) * s
    noise_sigma = rng.uniform(0.0, 6.0) + (45.0 * s if "noise" in drift_kinds else 0.0)
    img = img + rng.normal(0.0, noise_sigma, img.shape).astype(np.float32)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    if "blur" in drift_kinds and s > 0:
        out = out.filter(ImageFilter.GaussianBlur(radius=2.5 * s * image_size / 64))
    return out


def encode_jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def params_fingerprint(num_classes: int, images_per_class: int, image_size: int, seed: int,
                       drift_kinds: Sequence[str], drift_strength: float) -> str:
    key = f"{num_classes}|{images_per_class}|{image_size}|{seed}|{','.join(sorted(drift_kinds))}|{drift_strength}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def write_species(root: str, species: int, name: str, images_per_class: int, image_size: int, seed: int,
                  drift_kinds: Sequence[str], drift_strength: float) -> int:
    """Write every image of one species under root/<name>/; returns how many were written."""
    for index in range(images_per_class):
        img = render(species, index, image_size, seed, drift_kinds, drift_strength)
        storage.write_bytes(storage.join(root, name, f"{name}_{index:05d}.jpg"), encode_jpeg(img))
    return images_per_class
