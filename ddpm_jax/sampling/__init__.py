"""Sampling the reverse process: one registry of methods and one `lax.scan` driver.

    registry.py        METHODS: name -> Method entry (plan, stepper, order, NFE, defaults); resolve
    ddpm_ddim.py       Alg. 2 (ddpm) and DDIM eq. (12) (ddim): single steps, strided plans, entries
    solvers.py         DPM-Solver++ 2M / 3M, SDE-DPM-Solver++ 2M, Heun (Karras Alg. 1), their plans
    euler_ancestral.py Euler ancestral (k-diffusion's default sampler)
    driver.py          sample(): any entry with trajectories, partial denoising, per-image seeds
    base.py            the Method and Stepper types, the σ̃ tables

The steps take their noise as an argument, so they are deterministic functions that tests can
compare against reference implementations.
"""

from ddpm_jax.sampling.base import Method, Stepper
from ddpm_jax.sampling.ddpm_ddim import DDIM_SPACINGS, ddim_step, ddim_timesteps, ddpm_step
from ddpm_jax.sampling.driver import SampleOutput, image_keys, image_noise, noised_start, sample
from ddpm_jax.sampling.registry import METHODS, resolve

__all__ = ["METHODS", "DDIM_SPACINGS", "Method", "SampleOutput", "Stepper", "ddim_step", "ddim_timesteps",
           "ddpm_step", "image_keys", "image_noise", "noised_start", "resolve", "sample"]
