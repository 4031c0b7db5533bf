"""Synthetic SVHN: house-number-like 32x32 digit crops rendered with Pillow's bundled font.

The stand-in dataset kron trains on when no real data is present. Each crop centres one digit
(the label) and, like real SVHN crops, often shows parts of neighbouring digits; colours,
size, stroke weight, rotation, shear, blur and noise vary. Rendering is deterministic for a
seed: one numpy Generator per split, derived from the seed, drives every random choice.

How hard the crops are is a :class:`Difficulty` (``easy``, the original set on which every
method lands near 99 %, or ``hard``: more clutter, closer distractor digits, lower contrast,
stronger blur and noise, scale jitter). See data/README.md and docs/design.md, D10.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

CANVAS = 80  # draw at about twice the output size, then crop and downscale
OUT = 32
_LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class Difficulty:
    """The renderer's knobs (ranges are uniform unless said otherwise).

    ``min_luma_gap``: least luminance difference between digit and background (0..255).
    Integer ranges (``gap``, ``blobs``: ``gap`` half-open, ``blobs`` inclusive) and float ranges
    are drawn uniformly per image.
    ``neighbour_prob``, ``gap``: chance of a distractor digit on each side and its spacing in
    canvas pixels (negative: touching or overlapping). ``band_prob``, ``edge_prob``: a shaded
    band and a plate edge behind the digits; ``blobs``: extra random rectangles/ellipses
    (clutter, possibly over the digit, drawn at ``blob_alpha`` opacity). ``centre_sd``:
    jitter of the centre digit (canvas pixels). ``crop_scale``: crop side relative to the
    font size (smaller: the digit fills more of the crop). ``blur``: Gaussian radius in output
    pixels. ``contrast``, ``brightness``: a global gain and offset. ``noise``: the largest
    per-image Gaussian noise sigma (grey levels).
    """

    min_luma_gap: float = 45.0
    neighbour_prob: float = 0.65
    gap: tuple[int, int] = (0, 8)
    band_prob: float = 0.5
    edge_prob: float = 0.3
    blobs: tuple[int, int] = (0, 0)
    blob_alpha: tuple[float, float] = (0.0, 0.0)
    centre_sd: float = 1.5
    crop_scale: tuple[float, float] = (0.8, 1.1)
    blur: tuple[float, float] = (0.0, 1.3)
    contrast: tuple[float, float] = (0.7, 1.15)
    brightness: float = 25.0
    noise: float = 14.0


LEVELS: dict[str, Difficulty] = {
    "easy": Difficulty(),
    "hard": Difficulty(min_luma_gap=30.0, neighbour_prob=0.85, gap=(-2, 4), band_prob=0.7,
                       edge_prob=0.5, blobs=(0, 3), blob_alpha=(0.2, 0.45), centre_sd=2.0,
                       crop_scale=(0.75, 1.25), blur=(0.2, 1.6), contrast=(0.55, 1.05),
                       brightness=30.0, noise=18.0),
}


def difficulty(level: str | Difficulty) -> Difficulty:
    """The :class:`Difficulty` named ``level`` (``easy`` or ``hard``), or ``level`` itself."""
    if isinstance(level, Difficulty):
        return level
    if level not in LEVELS:
        raise ValueError(f"unknown synthetic SVHN difficulty {level!r}; use one of "
                         f"{sorted(LEVELS)} (data.difficulty=...)")
    return LEVELS[level]


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _colours(rng: np.random.Generator, min_gap: float) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A background and a digit colour at least ``min_gap`` apart in luminance."""
    while True:
        bg, fg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if abs(float(_LUMA @ bg) - float(_LUMA @ fg)) > min_gap:
            return tuple(int(v) for v in bg), tuple(int(v) for v in fg)


def _blobs(img: Image.Image, rng: np.random.Generator, level: Difficulty) -> Image.Image:
    """Random translucent rectangles and ellipses anywhere on the canvas (stickers, dirt,
    shadows); drawn after the digits, so they may partly cover the label."""
    for _ in range(int(rng.integers(level.blobs[0], level.blobs[1] + 1))):
        layer = Image.new("RGB", img.size, tuple(int(v) for v in rng.integers(0, 256, 3)))
        mask = Image.new("L", img.size, 0)
        x0, y0 = (int(v) for v in rng.integers(0, CANVAS, 2))
        w, h = (int(v) for v in rng.integers(6, 30, 2))
        alpha = int(255 * rng.uniform(*level.blob_alpha))
        shape = ImageDraw.Draw(mask).ellipse if rng.random() < 0.5 else \
            ImageDraw.Draw(mask).rectangle
        shape((x0, y0, x0 + w, y0 + h), fill=alpha)
        img = Image.composite(layer, img, mask)
    return img


def render_digit(label: int, rng: np.random.Generator,
                 level: str | Difficulty = "easy") -> np.ndarray:
    """One (32, 32, 3) uint8 crop whose centre digit is `label`."""
    level = difficulty(level)
    bg, fg = _colours(rng, level.min_luma_gap)
    img = Image.new("RGB", (CANVAS, CANVAS), bg)
    draw = ImageDraw.Draw(img)
    # background clutter: a gradient band and a plate edge, as on real house fronts
    if rng.random() < level.band_prob:
        shade = tuple(int(np.clip(c + rng.integers(-60, 61), 0, 255)) for c in bg)
        y0 = int(rng.integers(0, CANVAS))
        draw.rectangle((0, y0, CANVAS, y0 + int(rng.integers(4, 24))), fill=shade)
    if rng.random() < level.edge_prob:
        edge = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0 = int(rng.integers(0, CANVAS))
        draw.line((x0, 0, x0 + int(rng.integers(-20, 21)), CANVAS), fill=edge,
                  width=int(rng.integers(1, 4)))
    size = int(rng.integers(30, 52))
    font, stroke = _font(size), int(rng.integers(0, 3))
    gap = int(rng.integers(level.gap[0], level.gap[1]))
    cx = CANVAS / 2 + rng.normal(0, level.centre_sd)
    cy = CANVAS / 2 + rng.normal(0, level.centre_sd)
    digits = [(int(label), cx)]
    width = draw.textlength(str(label), font=font) + 2 * stroke
    for side in (-1, 1):  # neighbouring digits, partly inside the crop
        if rng.random() < level.neighbour_prob:
            d = int(rng.integers(0, 10))
            w = draw.textlength(str(d), font=font) + 2 * stroke
            digits.append((d, cx + side * (width / 2 + gap + w / 2)))
    for d, x in digits:
        draw.text((x, cy), str(d), font=font, fill=fg, anchor="mm", stroke_width=stroke,
                  stroke_fill=fg)
    if level.blobs[1] > 0:
        img = _blobs(img, rng, level)
    angle = float(rng.uniform(-15, 15))
    shear = float(rng.uniform(-0.25, 0.25))
    img = img.transform(img.size, Image.Transform.AFFINE,
                        (1, shear, -shear * CANVAS / 2, 0, 1, 0),
                        resample=Image.Resampling.BILINEAR, fillcolor=bg)
    img = img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=bg)
    # crop a square around the centre digit: its side sets the digit's scale in the output
    side = float(rng.uniform(*level.crop_scale)) * max(size * 1.05, 36)
    side = min(side, 2 * min(cx, cy, CANVAS - cx, CANVAS - cy))
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    img = img.resize((OUT, OUT), Image.Resampling.BILINEAR, box=box)
    radius = float(rng.uniform(*level.blur))
    if radius > 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr * rng.uniform(*level.contrast) + rng.uniform(-level.brightness, level.brightness)
    arr += rng.normal(0, rng.uniform(0, level.noise), arr.shape)
    return np.clip(arr + 0.5, 0, 255).astype(np.uint8)


def render_split(n: int, seed: int, split_index: int,
                 level: str | Difficulty = "easy") -> tuple[np.ndarray, np.ndarray]:
    """`n` crops (N, 32, 32, 3) and labels (N,) in 0..9, deterministic for (seed, split_index).

    Splits use independent streams, so resizing the training set leaves the test set alone.
    """
    level = difficulty(level)
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(split_index + 1)[split_index])
    labels = rng.integers(0, 10, n)
    images = np.empty((n, OUT, OUT, 3), dtype=np.uint8)
    for i in range(n):
        images[i] = render_digit(int(labels[i]), rng, level)
    return images, labels.astype(np.int64)
