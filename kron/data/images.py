"""Decode one image file into the loaders' item format: a uint8 RGB tensor (3, H, W)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image, read_file

from .errors import corrupt

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
_FAST = (".jpg", ".jpeg", ".png")


def is_image(path: str | Path) -> bool:
    """True when the name has an image extension (case-insensitive, so `.JPEG` counts)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def read_image(path: str | Path, what: str = "image") -> torch.Tensor:
    """Read `path` as RGB uint8 (3, H, W); a corrupt file raises a `DatasetError` naming it.

    JPEG and PNG go through torchvision's libjpeg/libpng decoder (fast); anything else, or a
    file that decoder refuses, goes through Pillow.
    """
    path = Path(path)
    if path.suffix.lower() in _FAST:
        try:
            return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError):
            pass  # let Pillow try, and report its error if it fails too
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise corrupt(what, path, "file not found", "Re-extract the dataset") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise corrupt(what, path, err, "Replace or delete this image file") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
