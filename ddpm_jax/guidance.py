"""Classifier-free guidance (Ho & Salimans 2022): one network, conditional and unconditional.

Training replaces a condition by its null ∅ with probability `training.label_dropout`, so the
same network learns ε_θ(x_t, c) and ε_θ(x_t, ∅). Sampling then uses the guided prediction

    ε̃(x_t, c) = (1 + w) ε_θ(x_t, c) − w ε_θ(x_t, ∅)          (Ho & Salimans 2022, eq. (6))

with guidance strength w ≥ 0: w = 0 is the plain conditional model, larger w trades diversity
for samples more typical of their class. The other common convention (GLIDE, diffusers'
`guidance_scale`, Stable Diffusion) writes ε̃ = ε∅ + s (ε_c − ε∅); the two are the same with
s = 1 + w (so diffusers' guidance_scale 1.0 is w = 0 here, 7.5 is w = 6.5).

Both branches are evaluated in ONE network call on the batch [x; x] with the condition [c; ∅]
(any condition pytree, each entry doubled), so a guided step costs one (twice as large) call,
not two dispatches. Training's dropout of c to ∅ is `conditioning.dropout`.

Parameterisations. Guidance is defined on ε. For a network predicting x0 or v, each branch's ε
is an affine function of its output with the same x_t: ε = a_t · out + b_t · x_t
(`GaussianDiffusion.x0_and_eps`: eps a=1, b=0; x0 a=−1/√(1/ᾱ−1), b=√(1/ᾱ)/√(1/ᾱ−1); v a=√ᾱ, b=√(1−ᾱ)).
Since the weights (1 + w) and −w sum to one,
    (1 + w) ε_c − w ε_∅ = a_t [(1 + w) out_c − w out_∅] + b_t x_t,
i.e. combining the outputs in the network's own parameterisation IS guiding in ε, and the
result converts to exactly the guided ε by `GaussianDiffusion.x0_and_eps`. We combine in the
native parameterisation so that no ill-conditioned round trip (1/√ᾱ_t near t = T) enters;
tests/test_guidance.py checks the equality against the explicit ε-space computation.

A learned variance (`GaussianDiffusion.var_type` learned / learned_range: 2C output channels) is not
guided: the mean part is combined as above and the variance part is the conditional branch's, as
GLIDE's guided sampler does.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from ddpm_jax import diffusion


def combine(out_cond: jnp.ndarray, out_uncond: jnp.ndarray, guidance_scale) -> jnp.ndarray:
    """(1 + w) · out_cond − w · out_uncond (eq. (6)); valid for eps, x0 and v outputs (see above)."""
    w = jnp.asarray(guidance_scale, out_cond.dtype)
    return (1.0 + w) * out_cond - w * out_uncond


def check_scale(w: float, field: str = "guidance_scale") -> None:
    """One-line ValueError unless the guidance weight w is a finite number >= 0 (named `field`)."""
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"{field}={w:g} must be a finite number >= 0 (0 = no guidance, the plain conditional "
                         "model; diffusers' scale s is w = s - 1).")


def check_guidance(*, cond, guidance_scale, null_cond) -> None:
    """One-line ValueErrors for guidance without a condition / without its null, or w < 0.

    A traced w (not a Python number) counts as guidance: it needs the condition and its null."""
    static = isinstance(guidance_scale, (int, float))
    w = float(guidance_scale) if static else float("nan")
    if static:
        check_scale(w)
    if w and not jax.tree.leaves(cond):
        raise ValueError(f"guidance_scale={w:g} needs a condition to guide towards (cond is empty) and a "
                         "conditional model; give the condition, or set guidance_scale=0.")
    if w and null_cond is None:
        raise ValueError(f"guidance_scale={w:g} needs null_cond, the null condition aligned with cond "
                         "(conditioning.Conditioning.null_like).")


def model_fn(apply_fn: Callable, params, *, cond=None, null_cond=None, guidance_scale=0.0,
             process: diffusion.GaussianDiffusion | None = None) -> Callable:
    """The network as `fn(x_t, t) -> output`, conditioned on `cond` and guided with w = guidance_scale.

    apply_fn(params, x, t, cond): `cond` any pytree of rows aligned with the batch ({} or None:
    unconditional), `null_cond` ∅ with the same structure and shapes. With w = 0 (a Python
    number) one plain conditional call is made. With w ≠ 0 (or a traced w) the batch is
    doubled: x and t repeated, every condition entry [cond; null_cond], in one call, then
    `combine`. The output stays in the network's own parameterisation (eps | x0 | v), see the
    module docstring; a learned variance's channels (`process.var_type`; None: a fixed
    variance) are the conditional branch's.
    """
    cond = {} if cond is None else cond
    check_guidance(cond=cond, guidance_scale=guidance_scale, null_cond=null_cond)
    if not jax.tree.leaves(cond) or (isinstance(guidance_scale, (int, float)) and guidance_scale == 0):
        return lambda x, t: apply_fn(params, x, t, cond)
    both = jax.tree.map(lambda c, n: jnp.concatenate([c, n]), cond, null_cond)
    split = (lambda out: (out, None)) if process is None else process.split_output

    def guided(x, t):
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        out = apply_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
        out_cond, out_uncond = jnp.split(out, 2, axis=0)
        mean_cond, var_cond = split(out_cond)
        mean_uncond, _ = split(out_uncond)
        guided_mean = combine(mean_cond, mean_uncond, guidance_scale)
        return guided_mean if var_cond is None else jnp.concatenate([guided_mean, var_cond], axis=-1)

    return guided
