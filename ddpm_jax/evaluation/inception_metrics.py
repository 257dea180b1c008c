"""FID and Inception Score of generated samples and of a data split, in the FID Inception's features.

What the files must be (weights, reference statistics) is checked before any work by
``checks.check_eval_inputs``; here:

* ``inception_runner`` (the network on this process's devices, kept per weights file),
  ``sample_features`` (pool_3 statistics and IS sums of the uint8 sample chunks of
  ``chunked_generation``, over all processes) and ``merge_across_processes``.

The modes that use them are ``modes/evaluate.py`` (``--mode=eval`` and ``--mode=fid_stats``).
Multi-host: the Inception runs on each process's own devices, each on its own share of the
chunks / examples; the statistics are then merged through small files in the workdir,
which must be on a filesystem all processes see.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Iterable, Iterator

import jax
import ml_collections
import numpy as np

from ddpm_jax import files, imaging
from ddpm_jax.evaluation import chunked_generation, fid, inception

IS_SPLITS = 10
IS_LOGITS = "logits"   # the graph's softmax/logits (with the fc bias), as TF-GAN, which the DDPM code used


# ---- Inception over images -----------------------------------------------------------------------

_RUNNERS: dict[tuple, Callable] = {}


def inception_runner(weights_path: str, mesh) -> Callable[[np.ndarray], dict]:
    """``run(images in [-1, 1]) -> dict(pool, logits, ...)`` on ``mesh`` (this process's devices).

    Kept per (weights file, devices): a second evaluation in the same process (e.g. from
    the training loop) reuses the loaded weights and the compiled network.
    """
    st = os.stat(weights_path) if os.path.isfile(weights_path) else None
    key = (os.path.realpath(weights_path), st and (st.st_mtime_ns, st.st_size),
           tuple(d.id for d in mesh.devices.flat))
    if key not in _RUNNERS:
        apply_fn, variables = inception.load_inception(weights_path)
        _RUNNERS.clear()   # one network at a time (~100 MB of weights)
        _RUNNERS[key] = fid.make_inception_fn(apply_fn, variables, mesh=mesh)
    return _RUNNERS[key]


def host_inception_batch(ev: ml_collections.ConfigDict, mesh) -> int:
    """This process's share of ``eval.inception_batch_size``, a multiple of its devices."""
    n = max(1, -(-int(ev.get("inception_batch_size", 200)) // jax.process_count()))
    d = mesh.local_mesh.size
    return -(-n // d) * d


def fixed_batches(pieces: Iterable[tuple[np.ndarray, np.ndarray]], size: int
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Re-cuts (indices, images) pieces into batches of exactly ``size`` rows (one compiled
    shape); the last one is padded with copies of its last row. Yields (indices, images, n valid)."""
    idx_buf: list[np.ndarray] = []
    img_buf: list[np.ndarray] = []
    count = 0
    for idx, img in pieces:
        idx_buf.append(np.asarray(idx))
        img_buf.append(np.asarray(img))
        count += len(idx)
        while count >= size:
            idx_all, img_all = np.concatenate(idx_buf), np.concatenate(img_buf)
            yield idx_all[:size], img_all[:size], size
            idx_buf, img_buf, count = [idx_all[size:]], [img_all[size:]], count - size
    if count:
        idx_all, img_all = np.concatenate(idx_buf), np.concatenate(img_buf)
        pad = size - count
        yield (np.concatenate([idx_all, np.repeat(idx_all[-1:], pad)]),
               np.concatenate([img_all, np.repeat(img_all[-1:], pad, axis=0)]), count)


def merge_across_processes(arrays: dict[str, np.ndarray], directory: str, tag: str
                           ) -> list[dict[str, np.ndarray]]:
    """Every process's ``arrays`` (in process order), exchanged through files in ``directory``."""
    if jax.process_count() == 1:
        return [arrays]
    os.makedirs(directory, exist_ok=True)
    path = lambda p: os.path.join(directory, f".merge_{tag}_{p}.npz")  # noqa: E731
    files.write_npz(path(jax.process_index()), **arrays)
    chunked_generation.sync(f"ddpm_jax_merge_{tag}_written")
    out = []
    for p in range(jax.process_count()):
        with np.load(path(p), allow_pickle=False) as f:
            out.append({k: f[k] for k in f.files})
    chunked_generation.sync(f"ddpm_jax_merge_{tag}_read")
    if jax.process_index() == 0:
        for p in range(jax.process_count()):
            os.remove(path(p))
    return out


def sample_features(out_dir: str, run_fn: Callable, *, num_samples: int, chunk_size: int,
                    batch: int, merge_dir: str, with_is: bool = True,
                    progress: bool = True) -> tuple[fid.ActivationStats, fid.InceptionScoreAccumulator | None]:
    """Pool_3 statistics and IS sums of the uint8 samples in ``out_dir``, over all processes."""
    p, n_proc = jax.process_index(), jax.process_count()
    chunks = list(range(chunked_generation.num_chunks(num_samples, chunk_size)))[p::n_proc]
    stats = fid.ActivationStats()
    is_acc = fid.InceptionScoreAccumulator(num_samples, IS_SPLITS) if with_is else None
    pieces = chunked_generation.read_chunks(out_dir, chunks, num_samples=num_samples, chunk_size=chunk_size)
    bounds = (chunked_generation.chunk_bounds(c, num_samples, chunk_size) for c in chunks)
    with files.progress_bar(sum(hi - lo for lo, hi in bounds), "Inception", enabled=progress) as bar:
        for idx, images, n in fixed_batches(pieces, batch):
            out = run_fn(imaging.from_uint8(images))
            stats.update(out["pool"][:n])
            if is_acc is not None:
                is_acc.update(out[IS_LOGITS][:n], idx[:n])
            bar.update(n)
    parts = merge_across_processes(
        {**{f"stats_{k}": v for k, v in stats.to_arrays().items()},
         **({f"is_{k}": v for k, v in is_acc.to_arrays().items()} if is_acc is not None else {})},
        merge_dir, "sample_features")
    merged_stats, merged_is = fid.ActivationStats(), None
    for part in parts:
        merged_stats.merge(fid.ActivationStats.from_arrays({k[6:]: v for k, v in part.items()
                                                            if k.startswith("stats_")}))
        if is_acc is not None:
            acc = fid.InceptionScoreAccumulator.from_arrays({k[3:]: v for k, v in part.items()
                                                             if k.startswith("is_")})
            merged_is = acc if merged_is is None else merged_is.merge(acc)
    return merged_stats, merged_is


def dataset_name(data_cfg: ml_collections.ConfigDict) -> str:
    """A file-name-safe name of the configured dataset (``cifar10``, ``lsun_church_outdoor``, ``digits``)."""
    source = str(data_cfg.source)
    if source == "tfds":
        name = str(data_cfg.tfds_name)
    elif source in ("image", "folder"):
        name = f"{source}_{os.path.splitext(os.path.basename(str(data_cfg.path).rstrip('/')))[0]}"
    else:
        name = source
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or source
