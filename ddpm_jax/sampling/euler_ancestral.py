"""Euler ancestral sampling (k-diffusion's `sample_euler_ancestral`; Karras et al. 2022, σ̃ form).

In Karras' variables x̃ = x/α_t = x_0 + σ̃ ε, σ̃(t) = √((1 − ᾱ_t)/ᾱ_t), one step from σ̃ to σ̃'
splits the DDPM posterior's move into a deterministic part down to σ_down and fresh noise σ_up
(k-diffusion's `get_ancestral_step`):

    σ_up   = min(σ̃', η √(σ̃'² (σ̃² − σ̃'²) / σ̃²)),   σ_down = √(σ̃'² − σ_up²),
    d      = (x̃ − D(x̃; σ̃)) / σ̃                      (Karras eq. (3), D = x̂_0),
    x̃'     = x̃ + (σ_down − σ̃) d + σ_up z.

η = 1 is k-diffusion's default (and diffusers' `EulerAncestralDiscreteScheduler`); η = 0 is the
Euler method on the probability-flow ODE. The last step goes to σ̃' = 0 (σ_up = 0: x̃' = x̂_0).
The plan is one of the solvers' integer-timestep plans (default karras); the state stays in the
VP scale x = α x̃, where the network is queried. NFE: one per timestep.
"""

from __future__ import annotations

import jax.numpy as jnp

from ddpm_jax.diffusion import GaussianDiffusion
from ddpm_jax.sampling import solvers
from ddpm_jax.sampling.base import Method, ModelFn, NoiseFn, Stepper, t_next_of, vp_grid


def ancestral_sigmas(sigma, sigma_next, eta):
    """(σ_down, σ_up) of a step from σ̃ to σ̃' (k-diffusion's `get_ancestral_step`)."""
    sigma_up = jnp.minimum(sigma_next, eta * jnp.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
    return jnp.sqrt(sigma_next ** 2 - sigma_up ** 2), sigma_up


def euler_ancestral_stepper(process: GaussianDiffusion, model_fn: ModelFn, ts, noise_fn: NoiseFn,
                            eta: float = 1.0) -> Stepper:
    """Euler ancestral over the timesteps `ts`, then to σ̃ = 0; the noise of the step at timestep t
    is noise_fn(t)."""
    alpha, sigma = vp_grid(process.sched, ts)
    sig_tilde = sigma / alpha
    sigma_down, sigma_up = ancestral_sigmas(sig_tilde[:-1], sig_tilde[1:], eta)
    xs = dict(t=ts, alpha_s=alpha[:-1], alpha_t=alpha[1:], sig_s=sig_tilde[:-1], down=sigma_down, up=sigma_up)

    def step(state, c):
        x, _ = state
        x0 = process.denoise(model_fn(x, c["t"]), x, c["t"])
        x_tilde = x / c["alpha_s"]
        d = (x_tilde - x0) / c["sig_s"]
        x_tilde = x_tilde + (c["down"] - c["sig_s"]) * d + c["up"] * noise_fn(c["t"]).astype(x.dtype)
        return (c["alpha_t"] * x_tilde, x0)

    return Stepper(lambda x: (x, jnp.zeros_like(x)), step, lambda s: s, xs, t_next_of(ts), int(ts.shape[0]))


ENTRY = Method("euler_ancestral", 1, solvers.SPACINGS, "karras", solvers.DEFAULT_STEPS, 1.0, lambda n: int(n),
               solvers.plan, euler_ancestral_stepper)
