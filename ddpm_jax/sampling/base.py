"""What a sampler is: a registry entry (`Method`) and the stepper it builds (`Stepper`).

A method's stepper runs the reverse process over a plan of integer timesteps, one `step` per
element of `xs`, so the driver (`driver.sample`) scans any method the same way. It queries the
network through `model_fn(x, t) -> model output` (x [B, ...] in the VP scale, t a scalar int32
timestep; guidance already applied) and draws the noise of the step at timestep t with
`noise_fn(t)` (image i's from its own key: `driver.image_noise`).

Karras et al. (2022) write the process as x̃ = x/α_t = x_0 + σ̃ ε with σ̃(t) = √((1 − ᾱ_t)/ᾱ_t);
`log_sigma_table` and `t_from_log_sigma` map between timesteps and σ̃ for the plans laid out in σ̃.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax.numpy as jnp

from ddpm_jax.schedules import Schedule

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
NoiseFn = Callable[[jnp.ndarray], jnp.ndarray]


class Stepper(NamedTuple):
    """`state = init(x)`; `state = step(state, xs_i)` for i over the leading axis of `xs`;
    `output(state) -> (x, x̂_0)`; `t_next[i]`: the timestep reached by step i (−1 = x_0)."""

    init: Callable[[jnp.ndarray], Any]
    step: Callable[[Any, Any], Any]
    output: Callable[[Any], tuple]
    xs: Any
    t_next: jnp.ndarray
    nfe: int


@dataclasses.dataclass(frozen=True)
class Method:
    """One sampler of the registry.

    name:            `sampling.method`.
    order:           its order of accuracy in the step size (1: Euler-like; 2: DPM-Solver++(2M), Heun).
    spacings:        the `sampling.spacing` names it accepts; default_spacing is used for "".
    default_steps:   its steps for `sampling.steps = 0` (0: every timestep left, Alg. 2).
    eta:             its default η, or None when it takes no η.
    nfe:             nfe(steps) -> network calls of a sample.
    plan:            plan(sched, k, steps, spacing) -> the descending int32 timesteps (jnp or numpy)
                     that take x_k (paper index, k ≥ 1) to x_0; steps and spacing already resolved.
    stepper:         stepper(process, model_fn, ts, noise_fn, eta) -> Stepper over the plan `ts`.
    tag_spacing:     file names (`setup.sampler_tag`) always name the spacing; False: only a
                     non-default one, after η (ddim50eta0.5-trailing).
    """

    name: str
    order: int
    spacings: tuple[str, ...]
    default_spacing: str
    default_steps: int
    eta: float | None
    nfe: Callable[[int], int]
    plan: Callable[[Schedule, int, int, str], Any]
    stepper: Callable[..., Stepper]
    tag_spacing: bool = True


def t_next_of(ts) -> jnp.ndarray:
    """The timestep each step of the plan reaches: ts[1:], then −1 (x_0)."""
    return jnp.concatenate([jnp.asarray(ts)[1:], jnp.full((1,), -1, jnp.asarray(ts).dtype)])


def log_sigma_table(sched: Schedule) -> jnp.ndarray:
    """log σ̃(t) = ½(log(1 − ᾱ_t) − log ᾱ_t) = −λ_t for t = 0..T−1, increasing in t."""
    return 0.5 * (sched.log_one_minus_alphas_cumprod - sched.log_alphas_cumprod)


def t_from_log_sigma(log_sigmas: jnp.ndarray, log_sigma) -> jnp.ndarray:
    """The (fractional) timestep of noise level log σ̃: linear interpolation in the log-σ̃ table."""
    return jnp.interp(log_sigma, log_sigmas, jnp.arange(log_sigmas.shape[0], dtype=log_sigmas.dtype))


def vp_grid(sched: Schedule, ts: jnp.ndarray):
    """α = √ᾱ, σ = √(1 − ᾱ) at the plan's timesteps, with the terminal point (α, σ) = (1, 0) appended."""
    alpha = jnp.take(sched.sqrt_alphas_cumprod, ts)
    sigma = jnp.take(sched.sqrt_one_minus_alphas_cumprod, ts)
    one = jnp.ones((1,), alpha.dtype)
    return jnp.concatenate([alpha, one]), jnp.concatenate([sigma, 0.0 * one])
