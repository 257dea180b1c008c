"""Captions for MNIST digits from their label and pixels, a source whose examples carry their
captions' token ids (`CaptionedSource`), and the tokenizer file of a run.

Each digit's caption names its class and up to three attributes measured on its 28×28 pixels
(p in [0, 1], ink = p >= 0.5), e.g. "a small thick seven slanted right", "an upright eight":

* thickness: mean stroke width in pixels, ink mass sum(p) over the length of the ink's skeleton
  (`skimage.morphology.skeletonize`). Mass alone measures the digit as much as the pen (a one
  has half an eight's ink): its class medians run 59 (one) to 139 (zero), while the width's
  run 2.6 to 3.3, so one pair of thresholds serves every class. "thin" below the training
  set's lower tertile, "thick" above its upper tertile, no word between.
* size: the ink's bounding-box area h·w. MNIST scales every digit's larger side to 20 px, so h
  is 20 for over 75% of digits and the area mostly tells the class (class medians 180 for one,
  360 for zero); it is therefore judged within the class: "small" below the class's lower
  tertile, "large" above its upper tertile (per class, from the training split).
* slant: the shear of the pixel mass, s = cov(x, y) / var(y) with y pointing up (second moments,
  as in the classic MNIST deskewing): s > 0 leans right (the top is right of the bottom).
  Writers lean right (median s = 0.14, about 8°), so the split is 20/60/20 of the training
  set: "slanted left" below its 20% quantile (s < -0.091, leaning left by more than 5°),
  "slanted right" above its 80% quantile (s > 0.386, about 21°), "upright" between.

Measured on the 4,000 training digits (`mnist.split_indices("train")`), quantiles
0 / 10% / 33% / 50% / 67% / 90% / 100%:

    stroke width (px)  1.11 / 2.05 / 2.53 / 2.82 / 3.15 / 3.99 / 9.89
    bbox area (px²)      40 /  200 /  280 /  300 /  320 /  380 /  400   (class medians 180 .. 360)
    slant s          -0.914 / -0.213 / 0.010 / 0.138 / 0.260 / 0.500 / 1.475   (20%: -0.091, 80%: 0.386)

So on the training split 33.3% of captions say "thin" and 33.3% "thick"; 25.3% "small" and 26.1%
"large" (fewer than a third: areas are products of integers and tie at the tertiles, e.g. the
ones' (120, 220)); 20% "slanted left", 20% "slanted right", 60% "upright"; 246 distinct
captions of at most 6 words over 20 words (the test split: 220 distinct).

The thresholds are computed from the training split (fixed, whatever the config's seed), so
the captions are a deterministic function of the pixels and the label; `THRESHOLDS_DOC` holds
the values above and tests/test_captions.py checks they are what the code measures.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np

from ddpm_jax import files
from ddpm_jax.data import folder, mnist
from ddpm_jax.data.base import Source
from ddpm_jax.models.text import Tokenizer
from ddpm_jax.models.text import words as text_words

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
INK_LEVEL = 0.5  # A pixel is ink at half intensity or more.
SLANT_QUANTILES = (0.2, 0.8)
TERTILES = (1 / 3, 2 / 3)
# The measured training-split thresholds (documented above; checked by the tests).
THRESHOLDS_DOC = {"width": (2.525, 3.149), "slant": (-0.091, 0.386)}
TOKENIZER_FILE = "tokenizer.json"


def _as_unit(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3:
        raise ValueError(f"caption attributes need gray digits [N, H, W] or [N, H, W, 1], got {images.shape}.")
    return images.astype(np.float64) / 255.0 if images.dtype == np.uint8 else images.astype(np.float64)


def attributes(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: stroke ``width`` (px), bounding-box ``area`` (px²) and ``slant`` s (float64 [N]).

    ``images``: uint8 (0..255) or float (0..1) gray digits [N, H, W(, 1)]; an image without ink
    has width 0, area 0 and slant 0."""
    from skimage.morphology import skeletonize

    p = _as_unit(images)
    ink = p >= INK_LEVEL
    mass = p.sum(axis=(1, 2))
    skeleton = np.array([skeletonize(m).sum() for m in ink], np.float64)
    width = np.where(skeleton > 0, mass / np.maximum(skeleton, 1.0), 0.0)

    def extent(any_ink: np.ndarray) -> np.ndarray:
        first = any_ink.argmax(axis=1)
        last = any_ink.shape[1] - 1 - any_ink[:, ::-1].argmax(axis=1)
        return np.where(any_ink.any(axis=1), last - first + 1, 0)

    area = (extent(ink.any(axis=2)) * extent(ink.any(axis=1))).astype(np.float64)
    ys, xs = np.mgrid[0:p.shape[1], 0:p.shape[2]].astype(np.float64)
    weights = p / np.maximum(mass, 1e-12)[:, None, None]
    cx, cy = (weights * xs).sum(axis=(1, 2)), (weights * ys).sum(axis=(1, 2))
    dx, dy = xs - cx[:, None, None], cy[:, None, None] - ys  # y up: rows grow downwards.
    var_y = (weights * dy * dy).sum(axis=(1, 2))
    slant = np.where(var_y > 0, (weights * dx * dy).sum(axis=(1, 2)) / np.maximum(var_y, 1e-12), 0.0)
    return {"width": width, "area": area, "slant": slant}


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Cut points: stroke width (thin, thick), slant (left, right), bbox area per class (small, large)."""

    width: tuple[float, float]
    slant: tuple[float, float]
    area: tuple[tuple[float, float], ...]  # One (small, large) pair per class.

    @classmethod
    def from_data(cls, images: np.ndarray, labels: np.ndarray, num_classes: int = 10) -> "Thresholds":
        """The tertiles / 20-80% quantiles (module docstring) of the attributes of ``images``."""
        a = attributes(images)
        labels = np.asarray(labels)
        missing = [c for c in range(num_classes) if not np.any(labels == c)]
        if missing:
            raise ValueError(f"caption thresholds need examples of every class; none of {missing}.")
        pair = lambda v, q: tuple(float(x) for x in np.quantile(v, q))  # noqa: E731
        return cls(width=pair(a["width"], TERTILES), slant=pair(a["slant"], SLANT_QUANTILES),
                   area=tuple(pair(a["area"][labels == c], TERTILES) for c in range(num_classes)))


@functools.lru_cache(maxsize=1)
def mnist_thresholds() -> Thresholds:
    """The thresholds measured on MNIST's training split (28×28, as shipped)."""
    images, labels = mnist.mnist_arrays()
    train = mnist.split_indices("train")
    return Thresholds.from_data(images[train], labels[train], mnist.NUM_CLASSES)


def describe(label: int, width: float, area: float, slant: float, thresholds: Thresholds) -> str:
    """The caption of one digit: "a[n] [small|large] [thin|thick] [upright] <digit>[ slanted left|right]"."""
    label = int(label)
    if not 0 <= label < len(DIGIT_WORDS):
        raise ValueError(f"digit label {label} is not in 0..9.")
    small, large = thresholds.area[label]
    thin, thick = thresholds.width
    left, right = thresholds.slant
    words = ["small" if area < small else "large" if area > large else None,
             "thin" if width < thin else "thick" if width > thick else None]
    tail = " slanted left" if slant < left else " slanted right" if slant > right else ""
    if not tail:
        words.append("upright")
    words = [w for w in words if w] + [DIGIT_WORDS[label]]
    article = "an" if words[0][0] in "aeiou" else "a"
    return f"{article} {' '.join(words)}{tail}"


def caption_digits(images: np.ndarray, labels: np.ndarray, thresholds: Thresholds) -> list[str]:
    """The caption of every digit (``images`` 28×28 gray, ``labels`` 0..9), in order."""
    a = attributes(images)
    return [describe(label, width, area, slant, thresholds)
            for label, width, area, slant in zip(labels, a["width"], a["area"], a["slant"])]


@functools.lru_cache(maxsize=2)
def _mnist_captions(split: str) -> tuple[str, ...]:
    images, labels = mnist.mnist_arrays()
    indices = mnist.split_indices(split)
    return tuple(caption_digits(images[indices], labels[indices], mnist_thresholds()))


def mnist_captions(split: str) -> list[str]:
    """Captions of ``split``'s digits in ``mnist.load_split(split, ...)`` order (train thresholds)."""
    return list(_mnist_captions(split))


CAPTIONED_SOURCES = ("mnist", "folder")
EVAL_SPLIT_CAPTIONS = "eval_split"  # sampling.captions: the eval split's captions, example i for image i


def split_captions(cfg: Any, split: str, pixels: Source | None = None) -> list[str]:
    """The captions of ``config.data``'s ``split``, aligned with its examples (``pixels``: a folder's
    source, which read them beside its images)."""
    if cfg.source == "mnist":
        return mnist_captions(split)
    if cfg.source == "folder":
        if pixels is None:
            return folder.read_captions(folder.list_images(cfg.path))
        return list(pixels.captions)
    raise ValueError(f"data.captions needs captioned data (data.source one of {CAPTIONED_SOURCES}), but "
                     f"data.source={cfg.source!r}; set --config.data.captions=False.")


@functools.lru_cache(maxsize=4)
def _tokenizer(source: str, path: str, train_split: str) -> Tokenizer:
    cfg = SimpleNamespace(source=source, path=path)
    return Tokenizer.build(split_captions(cfg, train_split))


def tokenizer_for(cfg: Any) -> Tokenizer:
    """The vocabulary of a text-conditioned run: the words of ``config.data``'s training captions
    (deterministic, so training and sampling build the same one; training also saves it)."""
    return _tokenizer(str(cfg.source), str(cfg.path), str(cfg.train_split))


def named_class(caption: str) -> int | None:
    """The digit an MNIST caption names (its one digit word), or None (no digit word, or several)."""
    found = [DIGIT_WORDS.index(w) for w in text_words(caption) if w in DIGIT_WORDS]
    return found[0] if len(found) == 1 else None


def sampling_captions(spec: str, cfg: Any) -> list[str]:
    """``sampling.captions`` as a list: '' -> [""] (the null caption), 'a|b' -> ["a", "b"],
    'eval_split' -> the captions of ``data.eval_split`` in order. A caption the model cannot read
    whole is given as it reads it (`as_seen`), with a one-line warning, so grids are labelled
    with what the model saw."""
    spec = str(spec).strip()
    if spec == EVAL_SPLIT_CAPTIONS:
        return split_captions(cfg, str(cfg.eval_split))
    given = [" ".join(c.split()) for c in spec.split("|")] if spec else [""]
    tokenizer = tokenizer_for(cfg)
    return [_seen_with_warning(c, tokenizer) for c in given]


_WARNED: set[tuple[str, str]] = set()  # each changed caption is announced once per process


def as_seen(caption: str, tokenizer: Tokenizer) -> str | None:
    """The caption as the model reads it when some of it is lost, else None: its words, a word out
    of the vocabulary as <unk>, what is no word (e.g. "7": words are runs of letters) dropped."""
    known = set(tokenizer.vocab)
    lost = any(not text_words(t) or any(w not in known for w in text_words(t)) for t in caption.split())
    if not lost:
        return None
    return " ".join(w if w in known else "<unk>" for w in text_words(caption))


def _seen_with_warning(caption: str, tokenizer: Tokenizer) -> str:
    seen = as_seen(caption, tokenizer)
    if seen is None:
        return caption
    if (caption, seen) not in _WARNED:
        _WARNED.add((caption, seen))
        print(f"warning: caption {caption!r} is read as {seen!r} (the vocabulary is the training captions' "
              f"{tokenizer.vocab_size} words; letters only); the grid is labelled with it.", flush=True)
    return seen


class CaptionedSource(Source):
    """``source`` with each example's caption as token ids: ``example(i)["cond"]["tokens"]`` int32 [L].

    The captions are encoded once, up front (a too-long caption fails here, naming it), so a
    batch's cond ``"tokens"`` come from the same gather as its images and labels: they stay paired
    through shuffling, host sharding, padding (all ``<pad>``: the fully masked context) and resume.
    """

    def __init__(self, source: Source, captions: Sequence[str], tokenizer: Tokenizer,
                 context_length: int | None = None):
        if len(captions) != len(source):
            raise ValueError(f"{len(captions)} captions for {len(source)} examples; give one caption per example.")
        self.source = source
        self.captions = list(captions)
        # Padded to the split's longest caption: the encoder masks padding, so the length is free.
        longest = max((len(tokenizer.ids(c)) for c in self.captions), default=1)
        self.tokens, _ = tokenizer.encode(self.captions, longest if context_length is None else context_length)
        self.num_classes = source.num_classes
        self.labels = source.labels

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.source[index]

    def example(self, index: int) -> dict[str, np.ndarray]:
        return _with_tokens(self.source.example(index), self.tokens[int(index)].copy())

    def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        return _with_tokens(self.source.read(indices), self.tokens[indices])

    def flip_rows(self, batch: dict[str, np.ndarray], indices: np.ndarray, flips: np.ndarray) -> None:
        # The caption is not mirrored: keep data.random_flip off where captions say left or right (MNIST's).
        self.source.flip_rows(batch, indices, flips)


def _with_tokens(example: dict, tokens: np.ndarray) -> dict:
    """`example` with `tokens` added to its cond (its labels kept beside them)."""
    return {**example, "cond": {**example["cond"], "tokens": tokens}}


def save_tokenizer(workdir: str, tokenizer: Tokenizer) -> str:
    """Writes ``workdir/tokenizer.json`` atomically (the vocabulary sampling must reuse)."""
    return files.write_text(os.path.join(workdir, TOKENIZER_FILE), tokenizer.to_json() + "\n")


def check_saved_tokenizer(workdir: str, tokenizer: Tokenizer, *, save: bool = False) -> None:
    """Refuses (one line) a workdir whose saved vocabulary is not ``tokenizer``; with ``save``, writes
    it where there is none yet (a training run's first start)."""
    path = os.path.join(workdir, TOKENIZER_FILE)
    if not os.path.isfile(path):
        if save:
            save_tokenizer(workdir, tokenizer)
        return
    saved = load_tokenizer(workdir)
    if saved != tokenizer:
        extra = sorted(set(tokenizer.vocab) ^ set(saved.vocab))[:3]
        raise ValueError(f"{workdir} was trained on captions with another vocabulary ({saved.vocab_size} ids in "
                         f"{path}, {tokenizer.vocab_size} from data's captions; e.g. {extra}); use the data it was "
                         "trained on or a fresh --workdir.")


def load_tokenizer(workdir: str) -> Tokenizer:
    """The tokenizer a training run saved in ``workdir`` (one-line error if there is none)."""
    path = os.path.join(workdir, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"no tokenizer file {path!r}: a text-conditioned run writes it when training starts; "
                         "give the training run's workdir.")
    with open(path, encoding="utf-8") as f:
        return Tokenizer.from_json(f.read())
