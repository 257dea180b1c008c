"""The one sampling driver: plan → stepper (from the registry) → one `lax.scan`, with trajectories,
partial denoising from x_k and per-image seeds.

The sampler draws image i's noise from `fold_in(PRNGKey(seed), indices[i])` only, so a sample
does not depend on the batch it was generated in, on the batch size or on the number of devices.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, guidance
from ddpm_jax.diffusion import GaussianDiffusion
from ddpm_jax.sampling import registry
from ddpm_jax.sampling.base import Stepper
from ddpm_jax.schedules import Schedule


# ---- Per-image randomness -------------------------------------------------------------------------

def image_keys(seed, indices: jnp.ndarray) -> jax.Array:
    """key_i = fold_in(key(seed), indices[i]): one key per image, independent of batching."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.int32))


def image_noise(keys: jax.Array, step: jnp.ndarray, shape: tuple, dtype=jnp.float32) -> jnp.ndarray:
    """[B, *shape] standard normals; image i's from fold_in(keys[i], step) (vmap: no batch coupling)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape, dtype))(keys)


def check_start_step(k, T: int) -> int:
    """The start step k (paper index) as an int in 0..T, else a one-line ValueError."""
    if isinstance(k, bool) or not (isinstance(k, (int, np.integer)) and 0 <= k <= T):
        raise ValueError(f"start_step={k!r} must be an int in 0..T={T} (0 returns the image itself).")
    return int(k)


def noised_start(sched: Schedule, x0, k: int, noise):
    """x_k ~ q(x_k | x_0) in the paper's indexing: k = 0 returns x0, k ≥ 1 is q_sample at t = k − 1."""
    if check_start_step(k, sched.num_timesteps) == 0:
        return x0
    return diffusion.q_sample(sched, x0, k - 1, noise)


# ---- The sampler ----------------------------------------------------------------------------------

class SampleOutput(NamedTuple):
    samples: jnp.ndarray                 # [B, ...] final x_0
    trajectory: jnp.ndarray | None       # [K, B, ...] x_t kept every n steps
    trajectory_x0: jnp.ndarray | None    # [K, B, ...] predicted x0 at the same steps
    trajectory_t: np.ndarray | None      # [K] the (paper) index t of each kept x_t; 0 is x_0


def sample(apply_fn: Callable, params, process: GaussianDiffusion, *, shape: tuple, indices: jnp.ndarray,
           seed, method: str = "ddpm", num_steps: int | None = None, eta: float | None = None,
           spacing: str | None = None, x_start=None, start_step: int | None = None,
           trajectory_every: int = 0, cond: dict | None = None, guidance_scale: float = 0.0,
           null_cond: dict | None = None) -> SampleOutput:
    """Draws len(indices) samples with one `lax.scan` over the reverse steps of `method`.

    apply_fn(params, x_t, t, cond) → model output, t an int32 [B]. `shape` is ONE example's shape,
    (H, W, C) or (2,). Image i's noise depends only on (seed, indices[i]): x_T from
    fold_in(key_i, T), the noise of the step at timestep t from fold_in(key_i, t).
    method: a `registry.METHODS` entry, with `num_steps`, `spacing` and `eta` (None: the
    method's defaults, `registry.resolve`); x̂_0 is clipped as `process` says.
    x_start with start_step=k: x_start is x_k (paper index; see `noised_start`) and the method's
    plan over the k timesteps left runs; k = 0 returns x_start. x_start without start_step is x_T.
    trajectory_every=n > 0 keeps x and x̂_0 after every n-th step (an outer scan over chunks of
    n steps, so only those frames are stored).
    cond (a pytree of rows aligned with indices, `conditioning.py`; None: unconditional) conditions
    the network, called as apply_fn(params, x_t, t, cond); guidance_scale w > 0 is classifier-free
    guidance (1 + w) ε(x, c) − w ε(x, ∅) with ∅ = null_cond (aligned with cond), both in one
    batched call (`guidance.py`).
    Every argument but params, process, indices, x_start, cond, null_cond (and seed) must be static
    under jit.
    """
    T = process.num_timesteps
    entry, num_steps, spacing, eta = registry.resolve(method, T, num_steps, spacing, eta)
    indices = jnp.asarray(indices)
    if indices.ndim != 1:
        raise ValueError(f"indices must be a 1-D int array [B], got shape {indices.shape}.")
    B, shape = indices.shape[0], tuple(int(s) for s in shape)
    k = _start(x_start, start_step, T, (B,) + shape)
    if trajectory_every < 0:
        raise ValueError(f"trajectory_every={trajectory_every} must be >= 0 (0 keeps no trajectory).")
    for name, tree in (("cond", cond), ("null_cond", null_cond)):
        bad = [jnp.shape(rows) for rows in jax.tree.leaves(tree) if jnp.shape(rows)[:1] != (B,)]
        if bad:
            raise ValueError(f"{name} must hold rows aligned with indices, [{B}, ...] each, got shape {bad[0]}.")
    # The network as model_fn(x_t, t), condition and guidance applied: every method's steps call this.
    guided = guidance.model_fn(apply_fn, params, cond=cond, guidance_scale=guidance_scale,
                               null_cond=null_cond, process=process)
    keys = image_keys(seed, indices)
    x = image_noise(keys, T, shape) if x_start is None else jnp.asarray(x_start, jnp.float32)
    if k == 0:  # nothing to denoise: x_start is returned
        none = np.zeros((0,), np.int32)
        return _drive(Stepper(lambda x: (x, jnp.zeros_like(x)), None, lambda s: s, dict(t=none), none, 0),
                      x, int(trajectory_every))
    st = entry.stepper(process, lambda x, t: guided(x, jnp.full((B,), t, jnp.int32)).astype(x.dtype),
                       entry.plan(process.sched, k, num_steps, spacing),
                       lambda t: image_noise(keys, t, shape, x.dtype), eta)
    return _drive(st, x, int(trajectory_every))


def _start(x_start, start_step, T: int, full_shape: tuple) -> int:
    """The paper index k the chain starts from: T, or start_step with x_start = x_k."""
    if x_start is None:
        if start_step not in (None, T):
            raise ValueError(f"start_step={start_step} needs x_start (the image x_k); "
                             "build it with sampling.noised_start(sched, x0, k, noise).")
        return T
    if tuple(x_start.shape) != full_shape:
        raise ValueError(f"x_start has shape {tuple(x_start.shape)}, expected {full_shape} "
                         "(len(indices), *shape).")
    return T if start_step is None else check_start_step(start_step, T)


def _drive(st: Stepper, x, n: int) -> SampleOutput:
    """Runs the stepper from x as one `lax.scan`; with n > 0 an outer scan over chunks of n steps
    keeps (x, x̂_0) after each chunk (the remaining steps run after, unrecorded)."""

    def run(state, xs):
        if jax.tree.leaves(xs)[0].shape[0] == 0:  # nothing to do (k = 0, or no remainder): no scan
            return state
        state, _ = jax.lax.scan(lambda s, c: (st.step(s, c), None), state, xs)
        return state

    state = st.init(x)
    if n == 0:
        return SampleOutput(st.output(run(state, st.xs))[0], None, None, None)

    C = int(st.t_next.shape[0]) // n

    def chunk(state, xs):
        state = run(state, xs)
        return state, st.output(state)

    head = jax.tree.map(lambda a: a[:C * n].reshape((C, n) + a.shape[1:]), st.xs)
    state, (traj, traj_x0) = jax.lax.scan(chunk, state, head)
    state = run(state, jax.tree.map(lambda a: a[C * n:], st.xs))
    # After the step t → t_prev the state is x at noise level t_prev: the paper's x_{t_prev + 1}.
    traj_t = (st.t_next[:C * n].reshape(C, n)[:, -1] + 1).astype(np.int32) if C else np.zeros((0,), np.int32)
    return SampleOutput(st.output(state)[0], traj, traj_x0, traj_t)
