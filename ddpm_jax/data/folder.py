"""Image folders: every image file under a directory, checked when the source is built.

* Files are found recursively and sorted, so the order is reproducible.
* Labels: when every image lies inside a first-level sub-folder (``root/<class>/...``,
  torchvision's ``ImageFolder`` layout), the class of an image is the index of its
  sub-folder among the sorted names of the sub-folders that hold images; an image
  directly in ``root`` makes the folder unlabelled.
* Every file is decoded once when the source is built (cached per process while the
  files' sizes and modification times stay the same): an unreadable one is a one-line
  ValueError naming it, or, with ``skip_bad=True`` (``data.skip_bad_images``), left out
  with a warning that counts them. Training never meets a broken file at its first batch.
* Captions (``captions=True``, ``data.captions``): each image ``name.ext`` has its caption in
  ``name.txt`` beside it (UTF-8; whitespace collapsed; an empty file is the null caption ""),
  read when the source is built into ``FolderSource.captions``; a missing one is a one-line
  ValueError naming the image and the ``.txt`` path.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np
from absl import logging
from PIL import Image

from ddpm_jax.data.base import Source
from ddpm_jax.data.imagefit import fit_pil

IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
)
# What PIL raises for a file it cannot decode (truncated, not an image, too large, ...).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


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


def class_labels(folder: str, files: Sequence[str]) -> tuple[np.ndarray | None, list[str]]:
    """(int32 labels, sorted class names) from first-level sub-folders, or (None, []) if unlabelled."""
    tops = [os.path.relpath(f, folder).split(os.sep) for f in files]
    if any(len(parts) == 1 for parts in tops):
        return None, []
    names = sorted({parts[0] for parts in tops})
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[parts[0]] for parts in tops], np.int32), names


def decode_error(path: str) -> str | None:
    """Why PIL cannot decode the image at ``path`` (one line), or None if it can."""
    try:
        with Image.open(path) as image:
            image.load()
    except _DECODE_ERRORS as err:
        return " ".join(f"{type(err).__name__}: {err}".split())
    return None


@functools.lru_cache(maxsize=16)
def _bad_files(stamped: tuple[tuple[str, int, int], ...]) -> tuple[tuple[int, str], ...]:
    """(index, reason) of each undecodable file; keyed on (path, size, mtime) so edits re-check."""
    bad = []
    for i, (path, _, _) in enumerate(stamped):
        reason = decode_error(path)
        if reason is not None:
            bad.append((i, reason))
    return tuple(bad)


def caption_path(image_path: str) -> str:
    """Where the caption of ``image_path`` lives: the same name with the extension ``.txt``."""
    return os.path.splitext(image_path)[0] + ".txt"


def read_captions(image_files: Sequence[str]) -> list[str]:
    """The caption beside each image (see the module docstring), in order."""
    out = []
    for path in image_files:
        txt = caption_path(path)
        if not os.path.isfile(txt):
            raise ValueError(f"Image {path!r} has no caption file {txt!r}: add one (the caption as text) "
                             "beside every image, or set --config.data.captions=False.")
        with open(txt, encoding="utf-8") as f:
            out.append(" ".join(f.read().split()))
    return out


def _stamp(path: str) -> tuple[str, int, int]:
    st = os.stat(path)
    return path, st.st_size, st.st_mtime_ns


class FolderSource(Source):
    """Image files read lazily, each fitted to ``size``×``size``×``channels`` (uint8)."""

    def __init__(self, files: Sequence[str], size: int, channels: int,
                 labels: np.ndarray | None = None, num_classes: int = 0, skipped: int = 0,
                 captions: Sequence[str] | None = None):
        self.files = list(files)
        if captions is not None and len(captions) != len(self.files):
            raise ValueError(f"{len(captions)} captions for {len(self.files)} images")
        self.captions = None if captions is None else list(captions)  # One per image (data.captions).
        self.size = size
        self.channels = channels
        self.labels = None if labels is None else np.asarray(labels, np.int32)
        self.num_classes = int(num_classes)
        self.skipped = skipped  # Unreadable files left out (data.skip_bad_images).

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> np.ndarray:
        with Image.open(self.files[index]) as image:
            return fit_pil(image, self.size, self.channels)

    def native_shape(self, index: int) -> tuple[int, int, int]:
        """(height, width, channels) of file ``index`` as stored, before any fitting."""
        with Image.open(self.files[index]) as image:
            return image.height, image.width, 3 if image.mode == "P" else len(image.getbands())


def load_folder(folder: str, size: int, channels: int, *, skip_bad: bool = False,
                captions: bool = False, field: str = "data.path") -> FolderSource:
    """The checked, labelled (where the layout says so), optionally captioned source of ``folder``'s images.

    ``field`` is the config field that named the folder, as an unreadable file's error names it.
    """
    files = list_images(folder)
    labels, names = class_labels(folder, files)
    bad = _bad_files(tuple(_stamp(f) for f in files))
    if bad and not skip_bad:
        index, reason = bad[0]
        more = f" ({len(bad) - 1} more unreadable)" if len(bad) > 1 else ""
        fix = ("set --config.data.skip_bad_images=True to leave such files out" if field == "data.path"
               else f"point {field} at a folder of readable images")
        raise ValueError(f"Unreadable image {files[index]!r} in {field}={folder!r}: {reason}{more}; remove or "
                         f"replace it, or {fix}.")
    if bad:
        drop = {i for i, _ in bad}
        logging.warning("data.path=%r: skipped %d unreadable image(s) of %d (first: %s: %s)",
                        folder, len(bad), len(files), files[bad[0][0]], bad[0][1])
        keep = [i for i in range(len(files)) if i not in drop]
        if not keep:
            raise ValueError(f"Every image in data.path={folder!r} is unreadable ({len(files)} files): "
                             "point data.path at a folder of readable images.")
        files = [files[i] for i in keep]
        labels = None if labels is None else labels[keep]
    return FolderSource(files, size, channels, labels=labels, num_classes=len(names), skipped=len(bad),
                        captions=read_captions(files) if captions else None)
