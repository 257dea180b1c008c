"""The source protocol shared by every data set: random access to images and their labels.

A source is a sequence: ``len(src)``, ``src[i]`` (the example's image, or a
toy2d point). A labelled source also has ``num_classes > 0`` and
``example(i)["cond"]["label"]``, its class in ``0..num_classes-1`` (the batch format
``{"x", "cond"}`` of ``conditioning.py``). ``read(indices)`` reads
several examples as stacked arrays (one gather for in-memory sources); the
pipelines call only ``example``, ``read`` and ``flip_rows`` (the random flip).
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np


class Source:
    """Base of every source: subclasses define ``__len__`` and ``__getitem__`` (the image)."""

    num_classes: int = 0  # 0: the source has no labels (no cond "label" in its examples).
    labels: np.ndarray | None = None  # int32 [len] where known up front (tfds reads them per record).

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def example(self, index: int) -> dict[str, np.ndarray]:
        """``{"x": image, "cond": {...}}``; a labelled source's cond holds ``"label"``, int32."""
        cond = {"label": np.int32(self.labels[index])} if self.num_classes else {}
        return {"x": self[index], "cond": cond}

    def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """The examples at ``indices``, stacked: ``{"x": [n, ...], "cond": {"label": int32 [n]}}`` (fresh arrays)."""
        examples = [self.example(int(i)) for i in indices]
        return jax.tree.map(lambda *rows: np.stack(rows), *examples)

    def flip_rows(self, batch: dict[str, np.ndarray], indices: np.ndarray, flips: np.ndarray) -> None:
        """Mirrors (in place) the rows of ``batch`` (read at ``indices``) where ``flips`` is True.

        Horizontal flip of NHWC images; a source whose examples are not images overrides it.
        """
        x = batch["x"]
        x[flips] = x[flips, :, ::-1]


class ArraySource(Source):
    """In-memory examples ``array[i]``, optionally labelled (``labels`` int32 [N])."""

    def __init__(self, array: np.ndarray, labels: np.ndarray | None = None, num_classes: int = 0):
        if (labels is None) != (num_classes == 0):
            raise ValueError("give both labels and num_classes > 0, or neither")
        if labels is not None and len(labels) != len(array):
            raise ValueError(f"{len(labels)} labels for {len(array)} examples")
        self.array = array
        self.labels = None if labels is None else np.asarray(labels, np.int32)
        self.num_classes = int(num_classes)

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.array[index]

    def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        cond = {"label": self.labels[indices]} if self.num_classes else {}
        return {"x": self.array[indices], "cond": cond}  # Fancy indexing copies: callers may write into it.


class RepeatedSource(Source):
    """One example repeated ``count`` times (the single-image data set; unlabelled)."""

    def __init__(self, example: np.ndarray, count: int):
        self.image = example
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> np.ndarray:
        return self.image
