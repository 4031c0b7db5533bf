"""Synthetic SVHN: house-number-like 32x32 digit crops rendered with Pillow's bundled font.

The stand-in dataset kron trains on when no real data is present. Each crop centres one digit
(the label) and, like real SVHN crops, often shows parts of neighbouring digits; colours,
size, stroke weight, rotation, shear, blur and noise vary. Rendering is deterministic for a
seed: one numpy Generator per split, derived from the seed, drives every random choice.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

CANVAS = 80  # draw at about twice the output size, then crop and downscale
OUT = 32


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A background and a digit colour that differ enough in luminance to be readable."""
    weights = np.array([0.299, 0.587, 0.114])
    while True:
        bg, fg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if abs(float(weights @ bg) - float(weights @ fg)) > 45:
            return tuple(int(v) for v in bg), tuple(int(v) for v in fg)


def render_digit(label: int, rng: np.random.Generator) -> np.ndarray:
    """One (32, 32, 3) uint8 crop whose centre digit is `label`."""
    bg, fg = _colours(rng)
    img = Image.new("RGB", (CANVAS, CANVAS), bg)
    draw = ImageDraw.Draw(img)
    # background clutter: a gradient band and a plate edge, as on real house fronts
    if rng.random() < 0.5:
        shade = tuple(int(np.clip(c + rng.integers(-60, 61), 0, 255)) for c in bg)
        y0 = int(rng.integers(0, CANVAS))
        draw.rectangle((0, y0, CANVAS, y0 + int(rng.integers(4, 24))), fill=shade)
    if rng.random() < 0.3:
        edge = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0 = int(rng.integers(0, CANVAS))
        draw.line((x0, 0, x0 + int(rng.integers(-20, 21)), CANVAS), fill=edge,
                  width=int(rng.integers(1, 4)))
    size = int(rng.integers(30, 52))
    font, stroke = _font(size), int(rng.integers(0, 3))
    gap = int(rng.integers(0, 8))
    cx = CANVAS / 2 + rng.normal(0, 1.5)
    cy = CANVAS / 2 + rng.normal(0, 1.5)
    digits = [(int(label), cx)]
    width = draw.textlength(str(label), font=font) + 2 * stroke
    for side in (-1, 1):  # neighbouring digits, partly inside the crop
        if rng.random() < 0.65:
            d = int(rng.integers(0, 10))
            w = draw.textlength(str(d), font=font) + 2 * stroke
            digits.append((d, cx + side * (width / 2 + gap + w / 2)))
    for d, x in digits:
        draw.text((x, cy), str(d), font=font, fill=fg, anchor="mm", stroke_width=stroke,
                  stroke_fill=fg)
    angle = float(rng.uniform(-15, 15))
    shear = float(rng.uniform(-0.25, 0.25))
    img = img.transform(img.size, Image.Transform.AFFINE,
                        (1, shear, -shear * CANVAS / 2, 0, 1, 0),
                        resample=Image.Resampling.BILINEAR, fillcolor=bg)
    img = img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=bg)
    # crop a square around the centre digit: its side sets the digit's scale in the output
    side = float(rng.uniform(0.8, 1.1)) * max(size * 1.05, 36)
    side = min(side, 2 * min(cx, cy, CANVAS - cx, CANVAS - cy))
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    img = img.resize((OUT, OUT), Image.Resampling.BILINEAR, box=box)
    radius = float(rng.uniform(0, 1.3))
    if radius > 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr * rng.uniform(0.7, 1.15) + rng.uniform(-25, 25)  # contrast and brightness
    arr += rng.normal(0, rng.uniform(0, 14), arr.shape)
    return np.clip(arr + 0.5, 0, 255).astype(np.uint8)


def render_split(n: int, seed: int, split_index: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` crops (N, 32, 32, 3) and labels (N,) in 0..9, deterministic for (seed, split_index).

    Splits use independent streams, so resizing the training set leaves the test set alone.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(split_index + 1)[split_index])
    labels = rng.integers(0, 10, n)
    images = np.empty((n, OUT, OUT, 3), dtype=np.uint8)
    for i in range(n):
        images[i] = render_digit(int(labels[i]), rng)
    return images, labels.astype(np.int64)
