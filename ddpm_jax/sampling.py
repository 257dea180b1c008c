"""Reverse-process samplers: DDPM ancestral sampling (Ho et al. 2020, Alg. 2), DDIM (Song et
al. 2021, eq. (12)), as pure single steps and a `lax.scan` sampler built on them; the same scan
drives the few-step solvers of `solvers.py` (DPM-Solver++ 2M/3M, SDE-DPM-Solver++ 2M, Heun).

The steps take their noise as an argument, so they are deterministic functions that tests can
compare against reference implementations. The sampler draws image i's noise from
`fold_in(PRNGKey(seed), indices[i])` only, so a sample does not depend on the batch it was
generated in, on the batch size or on the number of devices.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, guidance, solvers
from ddpm_jax.schedules import Schedule

METHODS = ("ddpm", "ddim") + solvers.METHODS  # the few-step solvers: solvers.py
SPACINGS = ("leading", "trailing", "quadratic")


def _per_example(v: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """A scalar or [B] array shaped [B, 1, ..., 1] (or [1, ..., 1]) to broadcast against x."""
    v = jnp.asarray(v)
    lead = v.shape if v.ndim else (1,)
    return v.reshape(lead + (1,) * (ndim - len(lead)))


# ---- Single steps -------------------------------------------------------------------------------

def ddpm_step(sched: Schedule, model_output, x_t, t, noise, *, var_type: str = "fixedlarge",
              clip_denoised: bool = True, pred: str = "eps"):
    """One step of Alg. 2: x_{t−1} = μ_θ(x_t, t) + σ_t z, with z = `noise`, and z = 0 at t == 0.

    μ_θ is the posterior mean at the (optionally clipped) predicted x̂_0, σ_t² = β_t
    (fixedlarge) or β̃_t (fixedsmall). Returns (x_{t−1}, x̂_0).
    """
    out = diffusion.p_mean_variance(sched, model_output, x_t, t, pred=pred, var_type=var_type,
                                    clip_denoised=clip_denoised)
    nonzero = _per_example(jnp.asarray(t) != 0, x_t.ndim).astype(x_t.dtype)
    x_prev = out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise
    return x_prev, out["pred_x0"]


def ddim_step(sched: Schedule, model_output, x_t, t, t_prev, noise, *, eta: float = 0.0,
              clip_denoised: bool = True, pred: str = "eps", var_type: str = "fixedlarge"):
    """One step of the generalised (DDIM) reverse process, Song et al. 2021 eq. (12):

        x_{t'} = √ᾱ_{t'} x̂_0 + √(1 − ᾱ_{t'} − σ_t²) ε̂ + σ_t z,
        σ_t(η) = η √((1 − ᾱ_{t'})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t'})   (eq. (16)),

    with t' = t_prev, and ᾱ_{t'} = 1 when t_prev < 0 (the last step, to x_0; then σ = 0).
    When x̂_0 is clipped, ε̂ is recomputed from the clipped x̂_0 so that x̂_0 and ε̂ stay
    consistent with x_t (as guided-diffusion's ddim_sample; diffusers'
    `use_clipped_model_output=True`): with η = 1 and t' = t − 1 this step is then exactly
    the DDPM "fixedsmall" step of Alg. 2. Returns (x_{t'}, x̂_0).
    """
    nd = x_t.ndim
    # A learned variance's channels are dropped: DDIM defines its own σ_t(η).
    x0_hat, eps_hat = diffusion.x0_and_eps(sched, model_output, x_t, t, pred, var_type=var_type)
    if clip_denoised:
        x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
        eps_hat = diffusion.eps_from_x0(sched, x_t, t, x0_hat)
    # Every factor comes from a float64-built table: 1 − ᾱ in float32 would lose ~1e-3 of its
    # relative precision near t = 0 (ᾱ ≈ 0.9999).
    has_prev = _per_example(jnp.asarray(t_prev) >= 0, nd)
    tp = jnp.maximum(jnp.asarray(t_prev), 0)
    sqrt_abar_prev = jnp.where(has_prev, diffusion.extract(sched.sqrt_alphas_cumprod, tp, nd), 1.0)
    sqrt_1m_abar_prev = jnp.where(has_prev, diffusion.extract(sched.sqrt_one_minus_alphas_cumprod, tp, nd), 0.0)
    log_abar_prev = jnp.where(has_prev, diffusion.extract(sched.log_alphas_cumprod, tp, nd), 0.0)
    # c = (1 − ᾱ_t/ᾱ_{t'}) / (1 − ᾱ_t) ∈ [0, 1], so σ_t = η √(1 − ᾱ_{t'}) √c and
    # √(1 − ᾱ_{t'} − σ_t²) = √(1 − ᾱ_{t'}) √(1 − η² c).
    one_minus_ratio = -jnp.expm1(diffusion.extract(sched.log_alphas_cumprod, t, nd) - log_abar_prev)
    c = one_minus_ratio / jnp.square(diffusion.extract(sched.sqrt_one_minus_alphas_cumprod, t, nd))
    sigma = eta * sqrt_1m_abar_prev * jnp.sqrt(c)
    # max(·, 0): c may exceed 1 by float32 rounding when η = 1.
    direction = sqrt_1m_abar_prev * jnp.sqrt(jnp.maximum(1.0 - eta ** 2 * c, 0.0)) * eps_hat
    x_prev = sqrt_abar_prev * x0_hat + direction + sigma * noise
    return x_prev, x0_hat


# ---- Timestep plans -------------------------------------------------------------------------------

def ddim_timesteps(num_timesteps: int, num_steps: int, spacing: str = "leading") -> np.ndarray:
    """The `num_steps` timesteps (0-based, int32, descending) a strided sampler visits.

    leading:   arange(0, n) · (T // n), as diffusers (and DDIM's "uniform" skip when n divides T).
    trailing:  round(arange(T, 0, −T/n)) − 1, as diffusers: always starts at T − 1.
    quadratic: int(linspace(0, √(0.8 T), n)²), as the DDIM paper's code; for small T / n it may
               repeat a timestep (e.g. 0, 0, 1, …): that step is then the identity on x_t.
    """
    T, n = int(num_timesteps), int(num_steps)
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing={spacing!r}; choose one of {', '.join(SPACINGS)}.")
    if not 1 <= n <= T:
        raise ValueError(f"num_steps={num_steps} must lie in 1..T={T}; pass fewer steps or use method='ddpm'.")
    if spacing == "leading":
        ts = np.arange(0, n) * (T // n)
    elif spacing == "trailing":
        # diffusers' float arange; it can yield one extra element (≈ 0 → −1) for some (T, n): drop it.
        ts = (np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1)[:n][::-1]
    else:
        ts = (np.linspace(0, np.sqrt(T * 0.8), n) ** 2).astype(np.int64)
    return np.ascontiguousarray(np.sort(ts)[::-1]).astype(np.int32)


def _plan(method: str, num_timesteps: int, k: int, num_steps, spacing: str):
    """(t, t_prev) int32 arrays for the steps that take x_k to x_0, k in paper indexing."""
    if method not in METHODS:
        raise ValueError(f"unknown method={method!r}; choose one of {', '.join(METHODS)}.")
    if method == "ddpm":
        if num_steps not in (None, num_timesteps, k):
            raise ValueError(f"method='ddpm' (Alg. 2) runs all {k} steps, got num_steps={num_steps}; "
                             "for fewer steps use method='ddim' (eta=1.0 is DDPM-like).")
        ts = np.arange(k - 1, -1, -1, dtype=np.int32)
    elif k == 0:
        ts = np.zeros((0,), np.int32)
    else:
        # Partial denoising from x_k: the same spacing over the first k timesteps.
        ts = ddim_timesteps(k, min(int(num_steps or k), k), spacing)
    t_prev = np.append(ts[1:], -1).astype(np.int32) if len(ts) else ts
    return ts, t_prev


# ---- Per-image randomness -------------------------------------------------------------------------

def image_keys(seed, indices: jnp.ndarray) -> jax.Array:
    """key_i = fold_in(key(seed), indices[i]): one key per image, independent of batching."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.int32))


def image_noise(keys: jax.Array, step: jnp.ndarray, shape: tuple, dtype=jnp.float32) -> jnp.ndarray:
    """[B, *shape] standard normals; image i's from fold_in(keys[i], step) (vmap: no batch coupling)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape, dtype))(keys)


def noised_start(sched: Schedule, x0, k: int, noise):
    """x_k ~ q(x_k | x_0) in the paper's indexing: k = 0 returns x0, k ≥ 1 is q_sample at t = k − 1."""
    T = sched.num_timesteps
    if not (isinstance(k, (int, np.integer)) and 0 <= k <= T):
        raise ValueError(f"start step k={k!r} must be an int in 0..T={T} (0 returns the image itself).")
    if k == 0:
        return x0
    return diffusion.q_sample(sched, x0, k - 1, noise)


# ---- The sampler ----------------------------------------------------------------------------------

class SampleOutput(NamedTuple):
    samples: jnp.ndarray                 # [B, ...] final x_0
    trajectory: jnp.ndarray | None       # [K, B, ...] x_t kept every n steps
    trajectory_x0: jnp.ndarray | None    # [K, B, ...] predicted x0 at the same steps
    trajectory_t: np.ndarray | None      # [K] the (paper) index t of each kept x_t; 0 is x_0


def sample(apply_fn: Callable, params, sched: Schedule, *, shape: tuple, indices: jnp.ndarray,
           seed, method: str = "ddpm", num_steps: int | None = None, eta: float = 0.0,
           spacing: str | None = None, var_type: str = "fixedlarge", clip_denoised: bool = True,
           pred: str = "eps", x_start=None, start_step: int | None = None,
           trajectory_every: int = 0, labels: jnp.ndarray | None = None, guidance_scale: float = 0.0,
           null_label: int | tuple[int, ...] | None = None) -> SampleOutput:
    """Draws len(indices) samples with one `lax.scan` over the reverse steps.

    apply_fn(params, x_t, t) → model output, t an int32 [B]. `shape` is ONE example's shape,
    (H, W, C) or (2,). Image i's noise depends only on (seed, indices[i]): x_T from
    fold_in(key_i, T), the noise of the step at timestep t from fold_in(key_i, t).

    method="ddpm": Alg. 2 over every step (var_type, no noise at t = 0; num_steps must be None
    or T). method="ddim": eq. (12) over `num_steps` timesteps (None: all) with `spacing` and `eta`.
    x_start with start_step=k: x_start is x_k (paper index; see `noised_start`) and the k
    reverse steps t = k−1, …, 0 run (DDIM: its spacing over those k timesteps); k = 0 returns
    x_start. x_start without start_step is x_T.
    method in solvers.METHODS ("dpmpp_2m", "dpmpp_3m", "sde_dpmpp_2m", "heun"): `num_steps`
    integer timesteps laid out by `spacing` (time_uniform | logsnr | karras; None: logsnr,
    Heun karras) over the k timesteps left, then a step to x_0 (`solvers.py`; NFE num_steps,
    Heun 2·num_steps − 1); x̂_0 is clipped to [−1, 1] when clip_denoised. `spacing` None is
    "leading" for DDIM.
    trajectory_every=n > 0 keeps x and x̂_0 after every n-th step (an outer scan over chunks of
    n steps, so only those frames are stored).
    labels int [B] (aligned with indices) conditions a class-conditional network, called as
    apply_fn(params, x_t, t, labels), or int [B, L] a text-conditional one (caption tokens);
    guidance_scale w > 0 is classifier-free guidance (1 + w) ε(x, c) − w ε(x, ∅) with ∅ =
    null_label (the null class, or the null caption's row [L]), both in one batched call (`guidance.py`).
    Every argument but params, sched, indices, x_start, labels (and seed) must be static under jit.
    """
    T = sched.num_timesteps
    indices = jnp.asarray(indices)
    if indices.ndim != 1:
        raise ValueError(f"indices must be a 1-D int array [B], got shape {indices.shape}.")
    B, shape = indices.shape[0], tuple(int(s) for s in shape)
    if x_start is None:
        if start_step not in (None, T):
            raise ValueError(f"start_step={start_step} needs x_start (the image x_k); "
                             "build it with sampling.noised_start(sched, x0, k, noise).")
        k = T
    else:
        k = T if start_step is None else start_step
        if not (isinstance(k, (int, np.integer)) and 0 <= k <= T):
            raise ValueError(f"start_step={start_step!r} must be an int in 0..T={T}.")
        if tuple(x_start.shape) != (B,) + shape:
            raise ValueError(f"x_start has shape {tuple(x_start.shape)}, expected {(B,) + shape} "
                             "(len(indices), *shape).")
    if trajectory_every < 0:
        raise ValueError(f"trajectory_every={trajectory_every} must be >= 0 (0 keeps no trajectory).")
    diffusion.check_pred(pred)
    diffusion.check_var_type(var_type)
    solver = method in solvers.METHODS and k > 0
    if solver:  # the plan reads the (possibly traced) tables: jnp arrays
        ts = solvers.timesteps(sched, num_steps, spacing or solvers.DEFAULT_SPACING[method], k=int(k))
    elif method in solvers.METHODS:  # k = 0: nothing to solve
        ts = t_prevs = np.zeros((0,), np.int32)
    else:
        ts, t_prevs = _plan(method, T, int(k), num_steps, spacing or "leading")

    if labels is not None and (jnp.ndim(labels) not in (1, 2) or jnp.shape(labels)[0] != B):
        raise ValueError(f"labels must be an int array [len(indices)] = [{B}] (or caption tokens [{B}, L]), "
                         f"got shape {jnp.shape(labels)}.")
    # The network as model_fn(x_t, t), labels and guidance applied: every method's steps call this.
    model_fn = guidance.model_fn(apply_fn, params, labels=labels, guidance_scale=guidance_scale,
                                 null_label=null_label, var_type=var_type)
    keys = image_keys(seed, indices)
    x = image_noise(keys, T, shape) if x_start is None else jnp.asarray(x_start, jnp.float32)
    deterministic = method == "ddim" and isinstance(eta, (int, float)) and eta == 0

    def one_step(x, t, t_prev):
        out = model_fn(x, jnp.full((B,), t, jnp.int32)).astype(x.dtype)
        noise = jnp.zeros_like(x) if deterministic else image_noise(keys, t, shape, x.dtype)
        if method == "ddpm":
            return ddpm_step(sched, out, x, t, noise, var_type=var_type,
                             clip_denoised=clip_denoised, pred=pred)
        return ddim_step(sched, out, x, t, t_prev, noise, eta=eta,
                         clip_denoised=clip_denoised, pred=pred, var_type=var_type)

    if solver:
        def denoise(x, t):
            t_b = jnp.full((B,), t, jnp.int32)
            x0, _ = diffusion.x0_and_eps(sched, model_fn(x, t_b).astype(x.dtype), x, t_b, pred,
                                         var_type=var_type)
            return jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0

        st = solvers.stepper(method, denoise, sched, ts,
                             noise_fn=lambda t: image_noise(keys, t, shape, x.dtype))
    else:  # Alg. 2 / eq. (12) as a stepper with state (x, x̂_0)
        st = solvers.Stepper(init=lambda x: (x, jnp.zeros_like(x)),
                             step=lambda s, c: one_step(s[0], c["t"], c["t_prev"]),
                             output=lambda s: s, xs=dict(t=ts, t_prev=t_prevs), t_next=t_prevs,
                             nfe=len(ts))

    def run(state, xs):
        if jax.tree.leaves(xs)[0].shape[0] == 0:  # nothing to do (k = 0, or no remainder): no scan
            return state
        state, _ = jax.lax.scan(lambda s, c: (st.step(s, c), None), state, xs)
        return state

    state, n = st.init(x), int(trajectory_every)
    if n == 0:
        return SampleOutput(st.output(run(state, st.xs))[0], None, None, None)

    C = int(st.t_next.shape[0]) // n  # chunks of n steps; the remaining steps run after, unrecorded

    def chunk(state, xs):
        state = run(state, xs)
        return state, st.output(state)

    head = jax.tree.map(lambda a: a[:C * n].reshape((C, n) + a.shape[1:]), st.xs)
    state, (traj, traj_x0) = jax.lax.scan(chunk, state, head)
    state = run(state, jax.tree.map(lambda a: a[C * n:], st.xs))
    # After the step t → t_prev the state is x at noise level t_prev: the paper's x_{t_prev + 1}.
    traj_t = (st.t_next[:C * n].reshape(C, n)[:, -1] + 1).astype(np.int32) if C else np.zeros((0,), np.int32)
    return SampleOutput(st.output(state)[0], traj, traj_x0, traj_t)
