"""Synthetic handwritten-character glyphs: a learnable stand-in for CASIA-HWDB.

Each class (a GB2312 code) owns a fixed pattern of pen strokes chosen by a generator seeded by
the code alone, so every split and every seed agrees on what a class looks like: two components
from a shared pool of 48 (as Chinese characters share radicals, so some classes differ only in
one part) in a left-right, top-bottom or enclosing layout, plus one stroke of its own. A
sample redraws that pattern with per-sample jitter (a slight affine map, a shift, moved stroke
points, an occasional dropped stroke, stray strokes from no class, pen width, ink level,
blur-free pixel noise), so a classifier must learn the pattern rather than memorise pixels,
and the task is not solved by one template match. Bitmaps are uint8 with background 255, as
in the real `.gnt` files; `kron.data.synthetic` writes them as `.gnt` and HDF5.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .gnt import level1_codes

PATTERN_SEED = 0x48574442  # "HWDB": pattern generators depend on this and the class code only


N_RADICALS = 48  # shared components: classes built from common parts are confusable, as in HWDB
_LAYOUTS = (  # boxes (x0, y0, x1, y1) of the two components: left-right, top-bottom, enclosing
    ((0.05, 0.1, 0.5, 0.9), (0.45, 0.1, 0.95, 0.9)),
    ((0.1, 0.05, 0.9, 0.5), (0.1, 0.45, 0.9, 0.95)),
    ((0.05, 0.05, 0.95, 0.95), (0.3, 0.3, 0.7, 0.7)),
)


def _polylines(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """`count` pen strokes: polylines of 2-3 points in the unit square."""
    strokes = []
    for _ in range(count):
        points = [rng.uniform(0.1, 0.9, 2)]
        for _ in range(int(rng.integers(1, 3))):
            points.append(np.clip(points[-1] + rng.normal(0.0, 0.35, 2), 0.05, 0.95))
        strokes.append(np.stack(points))
    return strokes


def radicals() -> list[list[np.ndarray]]:
    """The shared pool of `N_RADICALS` components, 2-3 strokes each (fixed)."""
    rng = np.random.default_rng([PATTERN_SEED, 0])
    return [_polylines(rng, int(rng.integers(2, 4))) for _ in range(N_RADICALS)]


_POOL = radicals()


def class_strokes(code: int) -> list[np.ndarray]:
    """The fixed strokes of class `code`: two shared components in one of three layouts (so
    many classes share a part with others), plus one stroke of its own."""
    rng = np.random.default_rng([PATTERN_SEED, int(code)])
    layout = _LAYOUTS[int(rng.integers(len(_LAYOUTS)))]
    parts = rng.choice(N_RADICALS, 2, replace=False)
    strokes = []
    for (x0, y0, x1, y1), part in zip(layout, parts):
        scale = np.array([x1 - x0, y1 - y0])
        strokes.extend(s * scale + np.array([x0, y0]) for s in _POOL[int(part)])
    return strokes + _polylines(rng, 1)


def _affine(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A slight random affine map about the centre: rotation, anisotropic scale, shear, shift."""
    angle = rng.uniform(-0.17, 0.17)  # about +-10 degrees
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    scale = np.diag(rng.uniform(0.8, 1.05, 2))
    shear = np.array([[1.0, rng.uniform(-0.15, 0.15)], [0.0, 1.0]])
    return rot @ scale @ shear, rng.uniform(-0.07, 0.07, 2)


def render_glyph(strokes: list[np.ndarray], rng: np.random.Generator, h: int, w: int
                 ) -> np.ndarray:
    """One jittered drawing of `strokes` as an (h, w) uint8 bitmap, background 255."""
    matrix, shift = _affine(rng)
    keep = [s for s in strokes if rng.random() > 0.1] or strokes[:2]
    stray = [rng.uniform(0.1, 0.9, (2, 2)) for _ in range(int(rng.integers(0, 3)))]
    side = min(h, w)
    pen = max(1, int(round(side * rng.uniform(0.035, 0.08))))
    ink = int(rng.integers(0, 90))
    img = Image.new("L", (w, h), 255)
    draw = ImageDraw.Draw(img)
    for stroke in keep + stray:
        pts = stroke + rng.normal(0.0, 0.025, stroke.shape)
        pts = (pts - 0.5) @ matrix.T + 0.5 + shift
        xy = [(float(x * (w - 1)), float(y * (h - 1))) for x, y in pts]
        draw.line(xy, fill=ink, width=pen, joint="curve")
    noise = rng.normal(0.0, rng.uniform(3.0, 20.0), (h, w))
    return np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)


def glyph_records(n: int, seed: int = 0, num_classes: int | None = None,
                  sides: tuple[int, int] = (48, 80)) -> list[tuple[int, np.ndarray]]:
    """`n` (GB2312 code, bitmap) samples of class-dependent glyphs.

    Classes are the first `num_classes` GB2312 level-1 codes (labels 0..num_classes-1 in
    either label set), balanced in shuffled order; `None` draws uniformly from all 3,755.
    Each bitmap's height and width are drawn from `sides` (inclusive), as real samples vary.
    """
    rng = np.random.default_rng(seed)
    codes = level1_codes()
    if num_classes is None:
        labels = rng.integers(len(codes), size=n)
    else:
        if not 1 <= num_classes <= len(codes):
            raise ValueError(f"num_classes must be in 1..{len(codes)}, got {num_classes}")
        labels = rng.permutation(np.arange(n) % num_classes)
    out = []
    for label in labels:
        code = int(codes[label])
        h, w = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
        out.append((code, render_glyph(class_strokes(code), rng, h, w)))
    return out
