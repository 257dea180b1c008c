"""Fitting one image to the data's shape: mode conversion, centre crop, Lanczos resize.

Shared by every image source (``sources``, ``folder``, ``tfds_source``, ``mnist``);
it imports nothing else of the package, so none of them import each other for it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def fit_pil(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """Converts to L/RGB, centre-crops to a square and resizes to ``size`` (Lanczos).

    As the LSUN preprocessing the DDPM paper used (progressive GAN's dataset
    tool): crop the centre square of side min(H, W), then resize with an
    antialiasing filter. Returns ``uint8 [size, size, channels]``.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit PNGs: rescale, do not clip.
        arr = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.rint(arr * 255.0 / max(arr.max(), 1.0)).astype(np.uint8))
    image = image.convert("RGB" if channels == 3 else "L")
    width, height = image.size
    if (width, height) != (size, size):
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        if side != size:
            image = image.resize((size, size), Image.LANCZOS)
    arr = np.asarray(image, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def fit_image(image: np.ndarray, size: int, channels: int) -> np.ndarray:
    """``fit_pil`` for an array (H×W, H×W×1, H×W×3 or H×W×4; uint8 or bool)."""
    image = np.asarray(image)
    if image.shape == (size, size, channels) and image.dtype == np.uint8:
        return image  # Already right (e.g. CIFAR-10 at 32x32): no resampling.
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        raise ValueError(f"Expected a uint8 image, got dtype {image.dtype}: convert it to uint8.")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return fit_pil(Image.fromarray(image), size, channels)
