"""tensorflow-datasets sources, read without TensorFlow through ``tfds.data_source``.

A tfds dataset is prepared once as ArrayRecord files
(``python -m ddpm_jax.data.prepare``, which needs TensorFlow); training then
reads the records by index (random access, so grain can shuffle globally) and
decodes the images with PIL. Nothing here downloads: an unprepared dataset is a
``DatasetNotPreparedError`` naming the command that prepares it.

A dataset whose features have a ``label`` ClassLabel (CIFAR-10's) is a labelled
source: its examples' cond carries ``"label"``, and ``num_classes`` is the feature's.

Preprocessing follows the official DDPM code: CIFAR-10 as is (32×32);
CelebA-HQ and LSUN centre-cropped to a square and resized to
``data.image_size`` when their size differs (Lanczos, as the progressive GAN
dataset tool that made the paper's LSUN records).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from ddpm_jax.data.base import Source
from ddpm_jax.data.imagefit import fit_image

# Notes on preparing the paper's datasets with tfds (shown by `prepare` and in errors).
PREPARE_NOTES = {
    "cifar10": "downloads by itself.",
    "celeb_a_hq": (
        "needs a manual download: put the CelebA-HQ tar files (data2x2.tar ... data1024x1024.tar, "
        "made with https://github.com/tkarras/progressive_growing_of_gans#preparing-datasets-for-training) "
        "in DATA_DIR/downloads/manual/ (or pass --manual_dir) first."
    ),
    "lsun": (
        "downloads the LMDB archives from http://dl.yf.io/lsun/ and reads them with tensorflow-io: "
        "`pip install tensorflow-io` as well."
    ),
}


class DatasetNotPreparedError(ValueError):
    """A tfds dataset is not prepared as ArrayRecord in the data dir; the message says how to."""


def default_data_dir() -> str:
    """tfds' default data dir (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``)."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def prepare_command(name: str, data_dir: str | None) -> str:
    """The exact shell command that prepares ``name`` in ``data_dir``."""
    return f"python -m ddpm_jax.data.prepare --dataset={name} --data_dir={data_dir or default_data_dir()}"


def prepare_note(name: str) -> str:
    return PREPARE_NOTES.get(name.split("/")[0].split(":")[0], "")


def _not_prepared(name: str, split: str, data_dir: str | None, why: str) -> DatasetNotPreparedError:
    return DatasetNotPreparedError(
        f"tfds dataset {name!r} (split {split!r}) {why} in {data_dir or default_data_dir()}: prepare it "
        f"once with `{prepare_command(name, data_dir)}` (needs `pip install -r requirements-tf.txt`)"
        f" or set data.tfds_data_dir to where it is prepared."
    )


def open_data_source(name: str, split: str, data_dir: str | None) -> Sequence[dict]:
    """``tfds.data_source(name, split=split, data_dir=data_dir)`` without any download.

    Raises ``DatasetNotPreparedError`` when the dataset is not prepared as
    ArrayRecord in ``data_dir``, and a ``ValueError`` for an unknown dataset or split.
    """
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as err:  # Diagnose below; re-raised when none of the known causes fit.
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise ValueError(
                f"Unknown tfds dataset {name!r}: set data.tfds_name to a tfds name, e.g. cifar10, "
                "celeb_a_hq/256, lsun/church_outdoor."
            ) from None
        if not builder.is_prepared():
            raise _not_prepared(name, split, data_dir, "is not prepared") from None
        file_format = builder.info.file_format
        if file_format is None or file_format.value != "array_record":
            raise _not_prepared(
                name, split, data_dir,
                f"is prepared as {file_format.value if file_format else 'unknown'}, not ArrayRecord,",
            ) from None
        known = list(builder.info.splits)
        if split.split("[")[0] not in known:
            raise ValueError(
                f"tfds dataset {name!r} has no split {split!r}: use one of {', '.join(known)} "
                "(data.train_split / data.eval_split)."
            ) from None
        raise err


class TfdsSource(Source):
    """Images of a prepared tfds dataset, fitted to ``size``×``size``×``channels`` (uint8).

    Labelled (cond ``"label"``, ``num_classes``) when the dataset has a ``label`` ClassLabel feature.
    """

    def __init__(self, name: str, split: str, *, data_dir: str | None, size: int, channels: int):
        self.name = name
        self.source = open_data_source(name, split, data_dir)
        self.size = size
        self.channels = channels
        self.num_classes = _label_classes(self.source)

    def __len__(self) -> int:
        return len(self.source)

    def example(self, index: int) -> dict[str, np.ndarray]:
        # One record at a time: grain's reader threads read batches in parallel, and decoding
        # dominates the cost (the batched `__getitems__` is also broken under tfds' mock_data).
        record = self.source[int(index)]
        cond = {"label": np.int32(record["label"])} if self.num_classes else {}
        return {"x": fit_image(record["image"], self.size, self.channels), "cond": cond}

    def __getitem__(self, index: int) -> np.ndarray:
        return self.example(index)["x"]


def _label_classes(source: Any) -> int:
    """``num_classes`` of the dataset's ``label`` ClassLabel feature, 0 if it has none."""
    info = getattr(source, "dataset_info", None)
    features = getattr(info, "features", None)
    label = features["label"] if features is not None and "label" in features else None
    return int(getattr(label, "num_classes", 0) or 0)
