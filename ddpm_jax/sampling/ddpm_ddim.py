"""Ancestral sampling (Ho et al. 2020, Alg. 2) and its generalisation DDIM (Song et al. 2021),
their strided timestep plans and their registry entries."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax.diffusion import GaussianDiffusion
from ddpm_jax.sampling.base import Method, ModelFn, NoiseFn, Stepper
from ddpm_jax.schedules import Schedule

DDIM_SPACINGS = ("leading", "trailing", "quadratic")
DDIM_DEFAULT_STEPS = 50  # `sampling.steps = 0` with DDIM


def _per_example(v: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """A scalar or [B] array shaped [B, 1, ..., 1] (or [1, ..., 1]) to broadcast against x."""
    v = jnp.asarray(v)
    lead = v.shape if v.ndim else (1,)
    return v.reshape(lead + (1,) * (ndim - len(lead)))


# ---- Single steps -------------------------------------------------------------------------------

def ddpm_step(process: GaussianDiffusion, model_output, x_t, t, noise):
    """One step of Alg. 2: x_{t−1} = μ_θ(x_t, t) + σ_t z, with z = `noise`, and z = 0 at t == 0.

    μ_θ is the posterior mean at the predicted x̂_0 (clipped as the process says), σ_t² its
    reverse variance (`GaussianDiffusion.p_mean_variance`). Returns (x_{t−1}, x̂_0).
    """
    out = process.p_mean_variance(model_output, x_t, t)
    nonzero = _per_example(jnp.asarray(t) != 0, x_t.ndim).astype(x_t.dtype)
    x_prev = out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise
    return x_prev, out["pred_x0"]


def ddim_step(process: GaussianDiffusion, model_output, x_t, t, t_prev, noise, *, eta: float = 0.0):
    """One step of the generalised (DDIM) reverse process, Song et al. 2021 eq. (12):

        x_{t'} = √ᾱ_{t'} x̂_0 + √(1 − ᾱ_{t'} − σ_t²) ε̂ + σ_t z,
        σ_t(η) = η √((1 − ᾱ_{t'})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t'})   (eq. (16)),

    with t' = t_prev, and ᾱ_{t'} = 1 when t_prev < 0 (the last step, to x_0; then σ = 0).
    When x̂_0 is clipped, ε̂ is recomputed from the clipped x̂_0 so that x̂_0 and ε̂ stay
    consistent with x_t (as guided-diffusion's ddim_sample; diffusers'
    `use_clipped_model_output=True`): with η = 1 and t' = t − 1 this step is then exactly
    the DDPM "fixedsmall" step of Alg. 2. A learned variance's channels are dropped: DDIM
    defines its own σ_t(η). Returns (x_{t'}, x̂_0).
    """
    sched, nd = process.sched, x_t.ndim
    x0_hat, eps_hat = process.x0_and_eps(model_output, x_t, t)
    if process.clip_x0:
        x0_hat = process.clip(x0_hat)
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
    if spacing not in DDIM_SPACINGS:
        raise ValueError(f"unknown spacing={spacing!r}; choose one of {', '.join(DDIM_SPACINGS)}.")
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


def ddpm_plan(sched: Schedule, k: int, num_steps: int, spacing: str) -> np.ndarray:
    """Every timestep k−1, …, 0: Alg. 2 runs all of them (num_steps 0, T or k)."""
    if num_steps not in (0, sched.num_timesteps, k):
        raise ValueError(f"method='ddpm' (Alg. 2) runs all {k} steps, got num_steps={num_steps}; "
                         "for fewer steps use method='ddim' (eta=1.0 is DDPM-like).")
    return np.arange(k - 1, -1, -1, dtype=np.int32)


def ddim_plan(sched: Schedule, k: int, num_steps: int, spacing: str) -> np.ndarray:
    """Partial denoising from x_k: the spacing over the first k timesteps, at most k steps."""
    return ddim_timesteps(k, min(int(num_steps), k), spacing)


# ---- Steppers -------------------------------------------------------------------------------------

def _stepper(step_fn, ts) -> Stepper:
    """Alg. 2 / eq. (12) as a stepper with state (x, x̂_0); step_fn(x, t, t_prev) -> (x', x̂_0)."""
    ts = np.asarray(ts)
    t_prevs = np.append(ts[1:], -1).astype(np.int32)
    return Stepper(init=lambda x: (x, jnp.zeros_like(x)), step=lambda s, c: step_fn(s[0], c["t"], c["t_prev"]),
                   output=lambda s: s, xs=dict(t=ts, t_prev=t_prevs), t_next=t_prevs, nfe=len(ts))


def ddpm_stepper(process: GaussianDiffusion, model_fn: ModelFn, ts, noise_fn: NoiseFn, eta) -> Stepper:
    return _stepper(lambda x, t, t_prev: ddpm_step(process, model_fn(x, t), x, t, noise_fn(t).astype(x.dtype)), ts)


def ddim_stepper(process: GaussianDiffusion, model_fn: ModelFn, ts, noise_fn: NoiseFn, eta) -> Stepper:
    deterministic = isinstance(eta, (int, float)) and eta == 0  # no noise to draw

    def step(x, t, t_prev):
        noise = jnp.zeros_like(x) if deterministic else noise_fn(t).astype(x.dtype)
        return ddim_step(process, model_fn(x, t), x, t, t_prev, noise, eta=eta)

    return _stepper(step, ts)


DDPM = Method("ddpm", 1, (), "", 0, None, lambda n: int(n), ddpm_plan, ddpm_stepper)
DDIM = Method("ddim", 1, DDIM_SPACINGS, "leading", DDIM_DEFAULT_STEPS, 0.0, lambda n: int(n), ddim_plan,
              ddim_stepper, tag_spacing=False)
