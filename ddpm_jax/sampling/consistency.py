"""Multistep consistency sampling (Song et al. 2023, Algorithm 1) and its registry entry.

At each timestep τ_n of the plan the network gives x̂_0 = f(x_τn, τ_n) (for a consistency model,
pred=consistency, the consistency function; for any other model its x̂_0); the chain then
renoises x̂_0 to the next timestep, x̃ = x̂_0 + √(σ̃_next² − σ_min²) z with σ_min = σ̃_0, as
x_next = √ᾱ_next x̃ (the VP scale the network reads). One step (`steps` = 1, the default) is
one-step generation x̂_0 = f(x_T, T); every step costs one network call. The plan is the solvers'
(`solvers.timesteps`); its default, time_uniform, starts at T − 1 as consistency distillation's
grid does.
"""

from __future__ import annotations

import jax.numpy as jnp

from ddpm_jax.diffusion import GaussianDiffusion
from ddpm_jax.sampling import solvers
from ddpm_jax.sampling.base import Method, ModelFn, NoiseFn, Stepper, t_next_of


def consistency_stepper(process: GaussianDiffusion, model_fn: ModelFn, ts, noise_fn: NoiseFn, eta) -> Stepper:
    """Algorithm 1 over the plan `ts`: state (x, x̂_0); the noise of the renoising to τ from `noise_fn(τ)`."""
    sched, ts = process.sched, jnp.asarray(ts, jnp.int32)
    t_next = t_next_of(ts)
    sigma_min_sq = jnp.square(sched.sqrt_recipm1_alphas_cumprod[0])

    def step(state, c):
        x, t, t_prev = state[0], c["t"], c["t_prev"]
        x0 = process.denoise(model_fn(x, t), x, t)
        tp = jnp.maximum(t_prev, 0)
        spread = jnp.sqrt(jnp.maximum(jnp.square(sched.sqrt_recipm1_alphas_cumprod[tp]) - sigma_min_sq, 0.0))
        renoised = sched.sqrt_alphas_cumprod[tp] * (x0 + spread * noise_fn(tp).astype(x.dtype))
        return jnp.where(t_prev >= 0, renoised, x0), x0

    return Stepper(init=lambda x: (x, jnp.zeros_like(x)), step=step, output=lambda s: s,
                   xs=dict(t=ts, t_prev=t_next), t_next=t_next, nfe=int(ts.shape[0]))


ENTRY = Method("consistency", 1, solvers.SPACINGS, "time_uniform", 1, None, lambda n: int(n), solvers.plan,
               consistency_stepper)
