"""grain pipelines: sources → shuffled, flipped, sharded host-local batches.

Training stream (one per run, the same on every host): epoch e is the source
in the order of a permutation drawn from (seed, e), each element flipped or
not by a coin drawn from (seed, e) too, and the epochs follow each other
forever. Global batch k is stream elements [k·G, (k+1)·G); host p of P reads
only its own block of it, [k·G + p·G/P, k·G + (p+1)·G/P). So hosts read
disjoint examples, their union over an epoch is the epoch, the global batch
(hosts concatenated in process order, as ``jax.make_array_from_process_local_data``
does) is the same whatever the number of hosts, and batches may straddle
epochs as with the official ``repeat().shuffle().batch()``.

A batch is ``{"x": ..., "cond": {...}}`` (``conditioning.py``): a labelled source's cond holds
``"label"`` (int32 classes), a captioned one's also ``"tokens"``, read by the same gather as
the images, so conditions and images stay paired through shuffling, host
sharding, padding (label 0, mask False) and resume; flips move only the pixels. A kind computed
from the images themselves (``Kind.derive``) is not in the batch: ``Conditioning.of_batch``
derives it.

Every random choice is a function of (seed, stream position), so the iterator
state is just the number of batches taken: an iterator restored from the state
of step k yields exactly the batches the uninterrupted one would, and every
host's state is the same. The stream is one grain ``MapDataset`` node that
reads a whole host batch with one gather (the per-element grain path costs
about 50 µs an element, too slow for the 2-D toys); grain's
``to_iter_dataset`` prefetches it in threads (``mp_prefetch`` in worker
processes when ``data.num_workers > 0``) and keeps the checkpointable state.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from typing import Any, Iterator

import grain
import jax
import numpy as np

from ddpm_jax import imaging
from ddpm_jax.data import sources
from ddpm_jax.data.base import Source

STATE_VERSION = 1


def _check_hosts(batch_size: int, process_index: int, process_count: int, name: str) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} is not in [0, process_count={process_count}): "
            "pass jax.process_index() and jax.process_count()."
        )
    if batch_size < 1:
        raise ValueError(f"{name}={batch_size} must be >= 1.")
    if batch_size % process_count:
        raise ValueError(
            f"{name}={batch_size} is not divisible by the process count {process_count}: "
            f"use a multiple of {process_count}."
        )


def _to_float_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Images to float32 in [-1, 1]; the cond and the eval mask as they are."""
    return {**batch, "x": imaging.as_float(batch["x"])}


def _read_options() -> grain.ReadOptions:
    threads = max(1, min(8, os.cpu_count() or 1))
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)


def _to_iterator(ds: grain.MapDataset, num_workers: int) -> grain.DatasetIterator:
    it_ds = ds.to_iter_dataset(_read_options())
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app use defaults.
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(it_ds)


class TrainIterator(Iterator[dict]):
    """Infinite iterator of host-local training batches ``{"x": float32 [B/P, ...], "cond": {...}}``.

    The cond holds ``"label"`` int32 [B/P] for a labelled source (``data.num_classes(cfg) > 0``),
    ``"tokens"`` for a captioned one; ``{}`` otherwise.

    ``get_state()`` is a JSON-able dict (the same on every host); ``set_state``
    restores it, refusing a state recorded for other data, seed or batch size.
    """

    def __init__(self, dataset: grain.MapDataset, *, num_workers: int, meta: dict[str, Any]):
        self._dataset = dataset
        self._num_workers = num_workers
        self._meta = meta
        self._step = 0
        self._iter = _to_iterator(dataset, num_workers)

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iter)
        self._step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """``{"version", "step", "grain", "source", "seed", "global_batch_size"}``, JSON-able."""
        return {"version": STATE_VERSION, "step": self._step, "grain": self._iter.get_state(), **self._meta}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from ``state`` (from ``get_state``, possibly after a JSON round trip)."""
        if not isinstance(state, dict) or "grain" not in state:
            raise ValueError(
                "Not a data iterator state (expected the dict from TrainIterator.get_state()): "
                "pass the saved data state unchanged."
            )
        for key, value in self._meta.items():
            if state.get(key) != value:
                raise ValueError(
                    f"The data state was saved with {key}={state.get(key)!r} but this run has "
                    f"{key}={value!r}: resume with the same data config, seed and batch size, or "
                    "start a new workdir."
                )
        self._iter.set_state(state["grain"])
        self._step = int(state["step"])

    def close(self) -> None:
        """Stops background readers (worker threads or processes)."""
        close = getattr(self._iter, "close", None)
        if close is not None:
            close()


class _HostBatches(grain.MapDataset):
    """Host ``p``'s batches of the infinite training stream (see the module docstring).

    Item ``k`` is host-local batch ``k``: ``{"x": uint8 images (or float32 points)
    [host_batch, ...], "cond": {"label": int32 [host_batch], ...}}`` (``{}`` for unlabelled sources),
    images flipped where the stream's coins say so.
    """

    def __init__(self, source: Any, *, host_batch: int, process_index: int, process_count: int,
                 seed: int, flip: bool):
        super().__init__()
        self._source = source
        self._num = len(source)
        self._host_batch = host_batch
        self._process_index = process_index
        self._process_count = process_count
        self._seed = seed
        self._flip = flip
        self._lock = threading.Lock()
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self) -> dict[str, Any]:  # Picklable for grain's worker processes.
        state = self.__dict__.copy()
        state["_lock"], state["_epochs"] = None, {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"_HostBatches(num={self._num}, host_batch={self._host_batch})"

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(permutation, flip coins) of one epoch, drawn from (seed, epoch); the last few cached."""
        with self._lock:
            drawn = self._epochs.get(epoch)
            if drawn is None:
                rng = np.random.default_rng(np.random.SeedSequence([self._seed, epoch]))
                drawn = self._epochs[epoch] = (rng.permutation(self._num), rng.integers(0, 2, self._num) == 1)
                # Threads may be epochs apart (a tiny dataset): an older epoch asked for late is
                # drawn again, and never dropped before it is returned.
                for old in sorted(self._epochs)[:-3]:
                    if old != epoch:
                        del self._epochs[old]
            return drawn

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        block = index * self._process_count + self._process_index
        positions = np.arange(block * self._host_batch, (block + 1) * self._host_batch, dtype=np.int64)
        epochs, within = np.divmod(positions, self._num)
        indices = np.empty_like(positions)
        flips = np.zeros(positions.shape, dtype=bool)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            perm, coins = self._epoch(int(epoch))
            indices[here] = perm[within[here]]
            flips[here] = coins[within[here]]
        batch = self._source.read(indices)  # Fresh arrays (fancy indexing / stacking copies).
        if self._flip and flips.any():
            self._source.flip_rows(batch, indices, flips)
        return batch


def create_train_iterator(
    cfg: Any, *, global_batch_size: int, seed: int, process_index: int = 0, process_count: int = 1
) -> TrainIterator:
    """Infinite, reshuffled-every-epoch, seeded iterator of host-local training batches.

    Yields ``{"x": float32 [global_batch_size // process_count, *example_shape]}``:
    images in [-1, 1] (flipped at random when ``data.random_flip``), toy2d points
    standardised; and ``"cond"``, the conditions of the same rows (int32 class labels ``"label"``
    for a labelled source). See the module docstring for how hosts split each global batch.
    """
    _check_hosts(global_batch_size, process_index, process_count, "global_batch_size")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}.")
    src = sources.load_source(cfg, cfg.train_split)
    ds = _HostBatches(
        src,
        host_batch=global_batch_size // process_count,
        process_index=process_index,
        process_count=process_count,
        seed=int(seed),
        flip=bool(cfg.random_flip) and cfg.source != "toy2d",
    ).map(_to_float_batch)
    meta = {
        "source": sources.source_fingerprint(cfg, cfg.train_split, len(src)),
        "seed": int(seed),
        "global_batch_size": int(global_batch_size),
    }
    return TrainIterator(ds, num_workers=int(cfg.num_workers), meta=meta)


class _Examples:
    """A source's examples as dicts with ``mask`` True (the eval pass's real rows)."""

    def __init__(self, source: Source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self._source.example(int(index)), "mask": np.True_}


class _Padding:
    """``count`` all-zero examples shaped like ``example`` (to fill the last eval batch), mask False."""

    def __init__(self, example: dict[str, np.ndarray], count: int):
        self.example = {**jax.tree.map(np.zeros_like, example), "mask": np.False_}
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.example


def create_eval_iterator(
    cfg: Any, split: str, *, batch_size: int, process_index: int = 0, process_count: int = 1
) -> grain.DatasetIterator:
    """Finite, deterministic, unflipped pass over ``split``: every example exactly once over all hosts.

    ``batch_size`` is the global batch; each host yields ``{"x": float32 [batch_size //
    process_count, ...], "mask": bool [batch_size // process_count], "cond": {...}}`` (a labelled
    source's int32 ``"label"``; zeros in padding rows). Global batch k is
    examples [k·batch_size, (k+1)·batch_size) in source order, host p holding the p-th block.
    The last global batch is padded with zeros (mask False), so every host yields the same
    number of batches, ceil(num_examples / batch_size).
    """
    _check_hosts(batch_size, process_index, process_count, "batch_size")
    src = sources.load_source(cfg, split)
    n = len(src)
    if n == 0:
        raise ValueError(f"Split {split!r} of data.source={cfg.source!r} is empty: choose another split.")
    ds = grain.MapDataset.source(_Examples(src))
    padding = math.ceil(n / batch_size) * batch_size - n
    if padding:
        pad = grain.MapDataset.source(_Padding(src.example(0), padding))
        ds = grain.MapDataset.concatenate([ds, pad])
    ds = ds.batch(batch_size // process_count)[process_index::process_count].map(_to_float_batch)
    return _to_iterator(ds, int(cfg.num_workers))
