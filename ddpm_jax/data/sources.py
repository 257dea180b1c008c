"""Data sources: random-access sequences of single examples, before batching.

Every source is a sequence (``len(src)`` and ``src[i]``) whose examples are

* images (digits, image, folder, tfds): ``uint8 [H, W, C]`` with
  ``H = W = data.image_size`` and ``C = data.num_channels`` (resized, cropped
  and converted here, so the pipeline only flips and rescales);
* toy2d: ``float32 [2]``, standardised with the training split's statistics.

Splits:

* digits: scikit-learn's 1,797 digits in their shipped order; ``"train"`` is the
  first 1,500, ``"test"`` the last 297 (a fixed split, independent of any seed).
* toy2d: ``"train"`` and ``"test"`` are ``data.toy_num_points`` fresh samples
  each, drawn with a fixed seed per split (the CRC32 of the split's name), so
  "test" is new data from the same distribution.
* image: ``data.train_split`` is ``data.repeat_single_image`` copies of the one
  picture; any other split is the picture once.
* folder: every split is the whole folder.
* tfds: the dataset's own splits (see ``tfds_source.py``).
"""

from __future__ import annotations

import functools
import os
import zlib
from typing import Any, Sequence

import numpy as np
from PIL import Image

SOURCE_NAMES = ("digits", "toy2d", "image", "folder", "tfds")
TOY_NAMES = ("swiss_roll", "s_curve", "moons")
# Noise of each toy set (sklearn units; swiss roll and S-curve keep their x and z coordinates).
_TOY_NOISE = {"swiss_roll": 0.5, "s_curve": 0.05, "moons": 0.05}
DIGITS_NUM_TRAIN = 1500  # The last 1797 - 1500 = 297 digits are the test split.
BUILTIN_SPLITS = ("train", "test")  # Splits of digits and toy2d.
# scikit-image pictures that ship inside the package (no download needed).
SKIMAGE_PICTURES = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins",
    "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo",
    "microaneurysms", "moon", "page", "retina", "rocket", "text",
)
IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
)


# ---- Validation ------------------------------------------------------------------------------


def validate_config(cfg: Any) -> None:
    """Raises ValueError (one line: the problem and the fix) for a bad ``config.data``."""
    source = cfg.source
    if source not in SOURCE_NAMES:
        raise ValueError(
            f"Unknown data.source {source!r}: use one of {', '.join(SOURCE_NAMES)}."
        )
    if source == "toy2d":
        if cfg.toy_name not in TOY_NAMES:
            raise ValueError(
                f"Unknown data.toy_name {cfg.toy_name!r}: use one of {', '.join(TOY_NAMES)}."
            )
        if int(cfg.toy_num_points) < 1:
            raise ValueError(
                f"data.toy_num_points must be >= 1 (got {cfg.toy_num_points}): set a positive count."
            )
        return
    if cfg.num_channels not in (1, 3):
        raise ValueError(
            f"data.num_channels must be 1 (grayscale) or 3 (RGB), got {cfg.num_channels}."
        )
    if int(cfg.image_size) < 1:
        raise ValueError(f"data.image_size must be >= 1 (got {cfg.image_size}).")
    if source == "image":
        if not cfg.path:
            raise ValueError(
                "data.path is empty: give an image file or a scikit-image picture name "
                f"({', '.join(SKIMAGE_PICTURES)})."
            )
        if not os.path.isfile(cfg.path) and cfg.path not in SKIMAGE_PICTURES:
            raise ValueError(
                f"data.path {cfg.path!r} is neither an existing image file nor a scikit-image "
                f"picture name: give a file path or one of {', '.join(SKIMAGE_PICTURES)}."
            )
        if int(cfg.repeat_single_image) < 1:
            raise ValueError(
                f"data.repeat_single_image must be >= 1 (got {cfg.repeat_single_image})."
            )
    elif source == "folder":
        if not cfg.path:
            raise ValueError("data.path is empty: give a directory of images for data.source='folder'.")
        if not os.path.isdir(cfg.path):
            raise ValueError(
                f"Image folder data.path={cfg.path!r} does not exist or is not a directory: "
                "give an existing directory of images."
            )
    elif source == "tfds" and not cfg.tfds_name:
        raise ValueError(
            "data.tfds_name is empty: name a tfds dataset, e.g. --config.data.tfds_name=cifar10."
        )


def check_builtin_split(source: str, split: str) -> None:
    if split not in BUILTIN_SPLITS:
        raise ValueError(
            f"Unknown split {split!r} for data.source={source!r}: use one of "
            f"{', '.join(BUILTIN_SPLITS)}."
        )


def example_shape(cfg: Any) -> tuple[int, ...]:
    """Shape of one example: ``(2,)`` for toy2d, ``(image_size, image_size, num_channels)`` else."""
    validate_config(cfg)
    if cfg.source == "toy2d":
        return (2,)
    return (int(cfg.image_size), int(cfg.image_size), int(cfg.num_channels))


# ---- Image preprocessing ---------------------------------------------------------------------


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


class ArraySource:
    """In-memory examples ``array[i]`` (also serves batched reads with one gather)."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.array[index]

    def _getitems(self, indices: Sequence[int]) -> list[np.ndarray]:
        return list(self.array[np.asarray(indices, dtype=np.int64)])


class RepeatedSource:
    """One example repeated ``count`` times (the single-image data set)."""

    def __init__(self, example: np.ndarray, count: int):
        self.example = example
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> np.ndarray:
        return self.example


class FolderSource:
    """Image files read lazily, each fitted to ``size``×``size``×``channels``."""

    def __init__(self, files: Sequence[str], size: int, channels: int):
        self.files = list(files)
        self.size = size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> np.ndarray:
        with Image.open(self.files[index]) as image:
            return fit_pil(image, self.size, self.channels)


def list_images(folder: str) -> list[str]:
    """All image files under ``folder`` (recursively), sorted, so the order is reproducible."""
    if not os.path.isdir(folder):
        raise ValueError(
            f"Image folder {folder!r} does not exist or is not a directory: give an existing directory."
        )
    files = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs.sort()
        files.extend(
            os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)
        )
    if not files:
        raise ValueError(
            f"Image folder {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}): "
            "point data.path at a folder with images."
        )
    return files


# ---- Built-in data ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def digits_uint8() -> np.ndarray:
    """scikit-learn's 1,797 8×8 digits, values 0..16 mapped to uint8 0..255, shape [N, 8, 8, 1]."""
    from sklearn.datasets import load_digits

    images = load_digits().images  # float64 [1797, 8, 8], integers 0..16
    return np.rint(images * (255.0 / 16.0)).astype(np.uint8)[..., None]


def toy_points(name: str, num_points: int, split: str) -> np.ndarray:
    """Raw (unstandardised) float64 [num_points, 2] samples of a scikit-learn toy set."""
    from sklearn import datasets

    seed = zlib.crc32(split.encode()) % 2**31  # Fixed per split: "test" is fresh data.
    noise = _TOY_NOISE[name]
    if name == "swiss_roll":
        points = datasets.make_swiss_roll(num_points, noise=noise, random_state=seed)[0][:, [0, 2]]
    elif name == "s_curve":
        points = datasets.make_s_curve(num_points, noise=noise, random_state=seed)[0][:, [0, 2]]
    else:
        points = datasets.make_moons(num_points, noise=noise, random_state=seed)[0]
    return points.astype(np.float64)


@functools.lru_cache(maxsize=8)
def _toy_statistics(name: str, num_points: int) -> tuple[np.ndarray, np.ndarray]:
    points = toy_points(name, num_points, "train")
    return points.mean(axis=0), points.std(axis=0)


def toy2d_statistics(cfg: Any) -> dict[str, np.ndarray]:
    """``{"mean": [2], "std": [2]}`` of the toy2d training set (float64).

    Examples are ``(raw - mean) / std``; map model samples back to the data's
    coordinates with ``x * std + mean``.
    """
    validate_config(cfg)
    if cfg.source != "toy2d":
        raise ValueError(f"toy2d_statistics needs data.source='toy2d', got {cfg.source!r}.")
    mean, std = _toy_statistics(cfg.toy_name, int(cfg.toy_num_points))
    return {"mean": mean.copy(), "std": std.copy()}


def load_picture(path: str, size: int, channels: int) -> np.ndarray:
    """One picture (a file, or a scikit-image picture name) as uint8 [size, size, channels]."""
    if os.path.isfile(path):
        with Image.open(path) as image:
            return fit_pil(image, size, channels)
    if path in SKIMAGE_PICTURES:
        import skimage.data

        return fit_image(getattr(skimage.data, path)(), size, channels)
    raise ValueError(
        f"Image {path!r} not found: give an existing file or one of {', '.join(SKIMAGE_PICTURES)}."
    )


def load_source(cfg: Any, split: str) -> Sequence[np.ndarray]:
    """The random-access source of ``split`` for ``config.data`` (see the module docstring)."""
    validate_config(cfg)
    source = cfg.source
    size, channels = int(cfg.image_size), int(cfg.num_channels)
    if source == "digits":
        check_builtin_split(source, split)
        digits = digits_uint8()
        digits = digits[:DIGITS_NUM_TRAIN] if split == "train" else digits[DIGITS_NUM_TRAIN:]
        if (size, channels) != (8, 1):
            digits = np.stack([fit_image(d, size, channels) for d in digits])
        return ArraySource(digits)
    if source == "toy2d":
        check_builtin_split(source, split)
        mean, std = _toy_statistics(cfg.toy_name, int(cfg.toy_num_points))
        points = toy_points(cfg.toy_name, int(cfg.toy_num_points), split)
        return ArraySource(((points - mean) / std).astype(np.float32))
    if source == "image":
        count = int(cfg.repeat_single_image) if split == cfg.train_split else 1
        return RepeatedSource(load_picture(cfg.path, size, channels), count)
    if source == "folder":
        return FolderSource(list_images(cfg.path), size, channels)
    from ddpm_jax.data import tfds_source

    return tfds_source.TfdsSource(
        cfg.tfds_name, split, data_dir=cfg.tfds_data_dir or None, size=size, channels=channels
    )


def source_fingerprint(cfg: Any, split: str, length: int) -> str:
    """A short name of what a source reads, stored with iterator states to catch mismatches."""
    if cfg.source == "toy2d":
        what = f"toy2d:{cfg.toy_name}"
    elif cfg.source == "tfds":
        what = f"tfds:{cfg.tfds_name}"
    elif cfg.source in ("image", "folder"):
        what = f"{cfg.source}:{cfg.path}"
    else:
        what = cfg.source
    return f"{what}:{split}:{length}"
