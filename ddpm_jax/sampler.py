"""The sharded sampler: many images from one jit-compiled `sampling.sample` over the ('data',) mesh.

The image indices are sharded over the devices and the params replicated, so every
device runs the whole reverse chain on its slice of the batch. Image i's noise
depends only on (seed, i) (`sampling.image_keys`), so the samples do not depend on
the batch size or on the number of devices. Used by the training loop's sample
grids, by `--mode=sample` (`modes/sample.py`) and by evaluation's resumable chunked
generation (`evaluation/chunked_generation.py`). The math of each step is `sampling/`.

A latent run's sampler decodes at its output (`decode`): the one place where latents become images.

A conditional model's condition (any pytree of rows, `conditioning.py`) is a function of the
image index too: row `i % K` of a table of K rows (`cond_for`), computed on the host and sharded
like the indices, so image i depends only on (seed, i, its condition) whatever the batch.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from ddpm_jax import conditioning, parallel, sampling
from ddpm_jax.diffusion import GaussianDiffusion


def padded_batch_size(batch_size: int, mesh: Mesh) -> int:
    """`batch_size` rounded up to a multiple of the device count (every device gets images)."""
    n = parallel.num_devices(mesh)
    return max(n, -(-int(batch_size) // n) * n)


class Sampler:
    """A compiled sampler: `sampler(params, indices, x_start=None) -> SampleOutput` (global arrays).

    `apply_fn(params, x_t, t, cond)` is the network (eval mode), `process` the run's diffusion
    process (its tables travel as a jit argument). Every option of
    `sampling.sample` except the arrays is fixed here (static under jit). `cond` (a
    conditional model): a pytree of tables with K rows each (e.g. classes [K] or caption
    tokens [K, L]), cycled over the image indices, see `cond_for`; None: unconditional samples.
    `null_cond`: one example's null condition (the same structure without the K axis), the
    unconditional branch of guidance.
    `decode` = (decode_fn, decode_params) (a latent run): `decode_fn(decode_params, z)` maps
    the chain's outputs (samples, trajectories; any leading axes) to images inside the compiled
    call, so every caller (grids, --mode=sample, eval's chunks) sees decoded images;
    `x_start` stays in the chain's (latent) space.
    """

    def __init__(
        self,
        apply_fn: Callable,
        process: GaussianDiffusion,
        mesh: Mesh,
        *,
        shape: tuple,
        seed: int,
        trajectory_every: int = 0,
        start_step: int | None = None,
        cond: dict | None = None,
        null_cond: dict | None = None,
        decode: tuple[Callable, Any] | None = None,
        **options: Any,
    ):
        self.mesh, self.process, self.shape = mesh, process, tuple(int(s) for s in shape)
        self.cond = None if cond is None else jax.tree.map(np.asarray, cond)
        if self.cond is not None and not all(len(rows) for rows in jax.tree.leaves(self.cond)):
            raise ValueError("cond has an empty table: no condition to cycle; pass None (unconditional) "
                             "or at least one row.")
        # ∅ in the dtypes of the table it stands in for (a JSON-read null holds plain ints).
        self.null_cond = None if null_cond is None or self.cond is None else jax.tree.map(
            lambda rows, n: np.asarray(n, rows.dtype), self.cond, null_cond)
        self._replicated = parallel.replicated(mesh)
        self._sharded = parallel.data_sharded(mesh)
        traj_sharding = parallel.data_sharded(mesh, batch_axis=1) if trajectory_every else None
        out_shardings = sampling.SampleOutput(
            samples=self._sharded,
            trajectory=traj_sharding,
            trajectory_x0=traj_sharding,
            trajectory_t=self._replicated if trajectory_every else None,
        )

        decode_fn, decode_params = decode if decode is not None else (None, None)
        self._decode_params = None if decode is None else jax.device_put(decode_params, self._replicated)

        def run(params, process, indices, x_start, cond, null_cond, decode_params):
            out = sampling.sample(
                apply_fn, params, process, shape=self.shape, indices=indices, seed=int(seed),
                x_start=x_start, start_step=start_step, trajectory_every=int(trajectory_every),
                cond=cond, null_cond=null_cond, **options,
            )
            if decode_fn is None:
                return out
            dec = lambda z: None if z is None else decode_fn(decode_params, z)  # noqa: E731
            return out._replace(samples=dec(out.samples), trajectory=dec(out.trajectory),
                                trajectory_x0=dec(out.trajectory_x0))

        self._run = jax.jit(run, out_shardings=out_shardings)

    def __call__(self, params: Any, indices: np.ndarray, x_start: np.ndarray | None = None):
        """Samples the images `indices` (host numpy, the same on every process)."""
        indices = np.asarray(indices, np.int32)
        put = functools.partial(_put_global, sharding=self._sharded)
        x = None if x_start is None else put(np.asarray(x_start, np.float32))
        cond = jax.tree.map(put, self.cond_for(indices))
        null = jax.tree.map(put, conditioning.repeat(self.null_cond, len(indices)))
        return self._run(params, self.process, put(indices), x, cond, null, self._decode_params)

    def cond_for(self, indices: np.ndarray) -> dict | None:
        """Image i's condition, row `i % K` of every table (host numpy), or None."""
        return conditioning.cycle(self.cond, indices)


def _put_global(x: np.ndarray, sharding) -> jax.Array:
    """A host array (identical on every process) as a global array with `sharding`."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def iterate(
    sampler: Sampler,
    params: Any,
    *,
    num_samples: int,
    batch_size: int,
    first_index: int = 0,
    x_start: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, sampling.SampleOutput]]:
    """Yields (indices, host numpy SampleOutput) for images first_index .. first_index + num_samples - 1.

    Each call has the same batch, min(batch_size, num_samples) rounded up to a multiple
    of the device count (one compilation); the padding images of the last batch are
    dropped. `x_start` ([num_samples, ...]) is the per-image start of partial denoising.
    """
    params = jax.device_put(params, parallel.replicated(sampler.mesh))
    b = padded_batch_size(min(int(batch_size), int(num_samples)), sampler.mesh)
    for lo in range(0, int(num_samples), b):
        n = min(b, int(num_samples) - lo)
        indices = np.arange(first_index + lo, first_index + lo + b, dtype=np.int32)
        xs = None
        if x_start is not None:
            xs = np.asarray(x_start[lo : lo + n], np.float32)
            if n < b:  # pad with copies: their results are dropped
                xs = np.concatenate([xs, np.repeat(xs[-1:], b - n, axis=0)])
        out = parallel.to_host(sampler(params, indices, xs))
        yield indices[:n], sampling.SampleOutput(
            samples=out.samples[:n],
            trajectory=None if out.trajectory is None else out.trajectory[:, :n],
            trajectory_x0=None if out.trajectory_x0 is None else out.trajectory_x0[:, :n],
            trajectory_t=out.trajectory_t,
        )


def generate(
    sampler: Sampler,
    params: Any,
    *,
    num_samples: int,
    batch_size: int,
    first_index: int = 0,
    x_start: np.ndarray | None = None,
) -> sampling.SampleOutput:
    """All `num_samples` images as one host numpy SampleOutput (trajectories concatenated on axis 1)."""
    parts = list(
        iterate(sampler, params, num_samples=num_samples, batch_size=batch_size,
                first_index=first_index, x_start=x_start)
    )
    if not parts:
        raise ValueError(f"num_samples={num_samples} must be >= 1.")
    outs = [p[1] for p in parts]
    cat = lambda name, axis: (  # noqa: E731
        None if getattr(outs[0], name) is None
        else np.concatenate([getattr(o, name) for o in outs], axis=axis)
    )
    return sampling.SampleOutput(
        samples=cat("samples", 0),
        trajectory=cat("trajectory", 1),
        trajectory_x0=cat("trajectory_x0", 1),
        trajectory_t=outs[0].trajectory_t,
    )
