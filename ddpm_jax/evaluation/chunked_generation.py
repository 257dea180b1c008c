"""Large-scale, resumable sample generation for FID / IS (50,000 samples for CIFAR-10).

Layout of ``out_dir`` (``workdir/eval/step_<k>/samples``)::

    meta.json          what made these samples: step, sampling seed, sampler options, shape,
                       chunk size (a rerun with other settings is refused, not mixed in)
    chunk_00000.npz    images [0, S): "images" uint8 [n, H, W, C], "indices" int64 [n]
    chunk_00001.npz    images [S, 2S) ...

Chunk c holds images [c·S, min((c+1)·S, N)), quantised to uint8 as a PNG would hold
them (``imaging.to_uint8``). Image i depends only on (sampling seed, i)
(``sampler.Sampler``), so which process or batch makes it does not matter.

Resuming. A chunk is written to a temporary file and renamed, so a chunk file is
complete or absent; a restart lists the complete chunks (their ``indices`` must be
exactly the chunk's range) and generates only the others.

Hosts. Every process lists the pending chunks, then they synchronise (so all see the
same list before anyone writes), and process p generates ``pending[p::P]`` on its own
devices: ``sampler`` is built on a mesh of ``jax.local_devices()``, so sampling needs
no collective and every process writes only its own chunks, with no duplicates and no
gaps. ``out_dir`` must be on a filesystem every process sees (as the checkpoints are).
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from absl import logging

from ddpm_jax import files, imaging, parallel
from ddpm_jax.sampler import padded_batch_size

META_FILE = "meta.json"


def num_chunks(num_samples: int, chunk_size: int) -> int:
    return -(-int(num_samples) // int(chunk_size))


def chunk_bounds(c: int, num_samples: int, chunk_size: int) -> tuple[int, int]:
    """[lo, hi) of the images in chunk c."""
    return c * chunk_size, min((c + 1) * chunk_size, num_samples)


def chunk_path(out_dir: str, c: int) -> str:
    return os.path.join(out_dir, f"chunk_{c:05d}.npz")


def _npy_header(zf: zipfile.ZipFile, name: str) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of an array in an .npz without reading its data."""
    with zf.open(name + ".npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return tuple(shape), np.dtype(dtype)


def chunk_is_complete(path: str, lo: int, hi: int, shape: Sequence[int]) -> bool:
    """True if ``path`` holds exactly images [lo, hi) of ``shape`` (uint8)."""
    if not os.path.isfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            images_shape, images_dtype = _npy_header(zf, "images")
        with np.load(path, allow_pickle=False) as f:
            indices = f["indices"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        logging.warning("ignoring unreadable sample chunk %s (%s); it will be regenerated", path, err)
        return False
    return (images_shape == (hi - lo, *shape) and images_dtype == np.uint8
            and np.array_equal(indices, np.arange(lo, hi)))


def pending_chunks(out_dir: str, *, num_samples: int, chunk_size: int, shape: Sequence[int]) -> list[int]:
    """The chunks of [0, num_samples) that ``out_dir`` does not hold complete."""
    return [c for c in range(num_chunks(num_samples, chunk_size))
            if not chunk_is_complete(chunk_path(out_dir, c), *chunk_bounds(c, num_samples, chunk_size), shape)]


def check_samples_meta(out_dir: str, meta: dict) -> None:
    """Refuses samples made with other settings (``meta.json``); process 0 writes it if absent."""
    meta = json.loads(json.dumps(meta))
    path = os.path.join(out_dir, META_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            stored = json.load(f)
        for key in sorted(set(stored) | set(meta)):
            if stored.get(key) != meta.get(key):
                raise ValueError(
                    f"the samples in {out_dir} were generated with {key}={stored.get(key)!r}, this run "
                    f"has {key}={meta.get(key)!r}; rerun with the same settings or delete {out_dir}")
        return
    if jax.process_index() == 0:
        files.write_json(path, meta, sort_keys=True)


def _write_chunk(path: str, indices: np.ndarray, images: np.ndarray) -> None:
    files.write_npz(path, indices=np.asarray(indices, np.int64), images=np.asarray(images, np.uint8))


def sync(name: str) -> None:
    """A barrier over all processes (nothing to do with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(name)


def generate_samples(sampler: Any, params: Any, out_dir: str, *, num_samples: int, chunk_size: int,
                     batch_size: int, shape: Sequence[int], pending: Sequence[int] | None = None,
                     process_index: int | None = None, process_count: int | None = None,
                     progress: bool = True) -> dict:
    """Generates the missing chunks of ``num_samples`` images into ``out_dir`` (see above).

    ``sampler(params, indices) -> SampleOutput`` is a ``sampler.Sampler`` on this process's
    devices (``sampler.mesh``); ``params`` are placed replicated on that mesh. ``batch_size``
    is the global batch (each process draws ``batch_size / P`` per call, rounded up to a
    multiple of its devices; a batch may span chunks). ``pending`` (default: listed here,
    then all processes synchronise) are the chunks still to make; this process makes
    ``pending[p::P]``. Returns counts and timings (``images_per_sec`` over all processes).
    """
    num_samples, chunk_size = int(num_samples), int(chunk_size)
    if num_samples < 1 or chunk_size < 1 or int(batch_size) < 1:
        raise ValueError(f"eval.num_samples={num_samples}, eval.chunk_size={chunk_size} and "
                         f"eval.batch_size={batch_size} must all be >= 1")
    p = jax.process_index() if process_index is None else int(process_index)
    n_proc = jax.process_count() if process_count is None else int(process_count)
    shape = tuple(int(s) for s in shape)
    if pending is None:
        pending = pending_chunks(out_dir, num_samples=num_samples, chunk_size=chunk_size, shape=shape)
        sync("ddpm_jax_eval_listed_chunks")   # nobody writes before every process has listed
    pending = list(pending)
    mine = pending[p::n_proc]
    todo = [(c, *chunk_bounds(c, num_samples, chunk_size)) for c in mine]
    indices = np.concatenate([np.arange(lo, hi) for _, lo, hi in todo]) if todo else np.zeros(0, np.int64)
    total_pending = sum(hi - lo for lo, hi in (chunk_bounds(c, num_samples, chunk_size) for c in pending))
    start = time.time()
    os.makedirs(out_dir, exist_ok=True)
    if len(indices):
        b = padded_batch_size(min(-(-int(batch_size) // n_proc), len(indices)), sampler.mesh)
        params = jax.device_put(params, parallel.replicated(sampler.mesh))
        desc = "eval samples" if n_proc == 1 else f"eval samples (process 0's {len(indices)} of {total_pending})"
        buffer: list[np.ndarray] = []   # uint8 images of the chunk being filled, in index order
        c_next = 0                      # position in `todo` of that chunk
        with files.progress_bar(len(indices), desc, enabled=progress and p == 0) as bar:
            for lo in range(0, len(indices), b):
                batch = indices[lo:lo + b]
                n = len(batch)
                if n < b:   # the last batch: pad with copies of its last index, dropped below
                    batch = np.concatenate([batch, np.full(b - n, batch[-1])])
                out = parallel.to_host(sampler(params, batch.astype(np.int32)))
                buffer.append(imaging.to_uint8(np.asarray(out.samples)[:n]))
                filled = sum(len(x) for x in buffer)
                while c_next < len(todo) and filled >= todo[c_next][2] - todo[c_next][1]:
                    c, c_lo, c_hi = todo[c_next]
                    images = np.concatenate(buffer)
                    _write_chunk(chunk_path(out_dir, c), np.arange(c_lo, c_hi), images[:c_hi - c_lo])
                    buffer = [images[c_hi - c_lo:]]
                    filled -= c_hi - c_lo
                    c_next += 1
                bar.update(n)
    sync("ddpm_jax_eval_generated")
    seconds = time.time() - start
    return dict(num_samples=num_samples, num_chunks=num_chunks(num_samples, chunk_size),
                chunks_skipped=num_chunks(num_samples, chunk_size) - len(pending),
                chunks_generated=len(pending), images_generated=int(total_pending),
                seconds=seconds, images_per_sec=total_pending / seconds if total_pending else 0.0)


def read_chunks(out_dir: str, chunks: Sequence[int], *, num_samples: int, chunk_size: int
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(indices int64 [n], images uint8 [n, H, W, C]) of each chunk, checked against its range."""
    for c in chunks:
        lo, hi = chunk_bounds(c, num_samples, chunk_size)
        path = chunk_path(out_dir, c)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"sample chunk {path} is missing; rerun --mode=eval to generate it")
        with np.load(path, allow_pickle=False) as f:
            indices, images = f["indices"], f["images"]
        if not np.array_equal(indices, np.arange(lo, hi)):
            raise ValueError(f"{path} holds images {indices[:1]}..{indices[-1:]}, expected [{lo}, {hi}); "
                             f"delete it and rerun --mode=eval")
        yield indices, images
