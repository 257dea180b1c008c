"""Input pipeline: datasets → host-local batches with grain (no TensorFlow at train time).

```python
from ddpm_jax import data
shape = data.example_shape(config.data)            # (H, W, C), or (2,) for toy2d
it = data.create_train_iterator(config.data, global_batch_size=128, seed=0,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
batch = next(it)                                    # {"x": float32 [128 // P, H, W, C] in [-1, 1]}
state = it.get_state()                              # JSON-able; it.set_state(state) resumes exactly
for batch in data.create_eval_iterator(config.data, "test", batch_size=256):
    ...                                             # {"x": ..., "mask": bool [256 // P]}
```

Sources (``config.data.source``): ``digits`` (scikit-learn, 8×8), ``toy2d``
(swiss roll, S-curve, moons), ``image`` (one picture), ``folder`` (a folder of
images) and ``tfds`` (a tensorflow-datasets dataset prepared once with
``python -m ddpm_jax.data.prepare``). See ``sources.py`` for the splits.
"""

from typing import Any

from ddpm_jax.data.pipeline import TrainIterator, create_eval_iterator, create_train_iterator
from ddpm_jax.data.sources import (
    SOURCE_NAMES,
    TOY_NAMES,
    example_shape,
    load_source,
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
    "load_source",
    "num_examples",
    "toy2d_statistics",
    "validate_config",
]


def num_examples(data_cfg: Any, split: str) -> int:
    """Number of examples in ``split`` (one epoch; before any padding or batching)."""
    return len(load_source(data_cfg, split))
