"""Decode one image file into the loaders' item format: a uint8 RGB tensor (3, H, W).

Pillow decodes everything (its JPEG path is libjpeg-turbo); torchvision's own decoders are
deprecated since 0.29, so kron does not depend on them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import corrupt

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def is_image(path: str | Path) -> bool:
    """True when the name has an image extension (case-insensitive, so `.JPEG` counts)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def read_image(path: str | Path, what: str = "image") -> torch.Tensor:
    """Read `path` as RGB uint8 (3, H, W); a corrupt file raises a `DatasetError` naming it."""
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise corrupt(what, path, "file not found", "Re-extract the dataset") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise corrupt(what, path, err, "Replace or delete this image file") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
