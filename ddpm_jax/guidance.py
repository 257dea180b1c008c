"""Classifier-free guidance (Ho & Salimans 2022): one network, conditional and unconditional.

Training replaces a label by the null class with probability `training.label_dropout`, so the
same network learns ε_θ(x_t, c) and ε_θ(x_t, ∅). Sampling then uses the guided prediction

    ε̃(x_t, c) = (1 + w) ε_θ(x_t, c) − w ε_θ(x_t, ∅)          (Ho & Salimans 2022, eq. (6))

with guidance strength w ≥ 0: w = 0 is the plain conditional model, larger w trades diversity
for samples more typical of their class. The other common convention (GLIDE, diffusers'
`guidance_scale`, Stable Diffusion) writes ε̃ = ε∅ + s (ε_c − ε∅); the two are the same with
s = 1 + w (so diffusers' guidance_scale 1.0 is w = 0 here, 7.5 is w = 6.5).

Both branches are evaluated in ONE network call on the batch [x; x] with labels [c; ∅], so a
guided step costs one (twice as large) call, not two dispatches.

Parameterisations. Guidance is defined on ε. For a network predicting x0 or v, each branch's ε
is an affine function of its output with the same x_t: ε = a_t · out + b_t · x_t
(`diffusion.x0_and_eps`: eps a=1, b=0; x0 a=−1/√(1/ᾱ−1), b=√(1/ᾱ)/√(1/ᾱ−1); v a=√ᾱ, b=√(1−ᾱ)).
Since the weights (1 + w) and −w sum to one,
    (1 + w) ε_c − w ε_∅ = a_t [(1 + w) out_c − w out_∅] + b_t x_t,
i.e. combining the outputs in the network's own parameterisation IS guiding in ε, and the
result converts to exactly the guided ε by `diffusion.x0_and_eps`. We combine in the
native parameterisation so that no ill-conditioned round trip (1/√ᾱ_t near t = T) enters;
tests/test_guidance.py checks the equality against the explicit ε-space computation.

A learned variance (var_type learned / learned_range: 2C output channels) is not guided: the
mean part is combined as above and the variance part is the conditional branch's, as GLIDE's
guided sampler does.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ddpm_jax import diffusion


def combine(out_cond: jnp.ndarray, out_uncond: jnp.ndarray, guidance_scale) -> jnp.ndarray:
    """(1 + w) · out_cond − w · out_uncond (eq. (6)); valid for eps, x0 and v outputs (see above)."""
    w = jnp.asarray(guidance_scale, out_cond.dtype)
    return (1.0 + w) * out_cond - w * out_uncond


def null_rows(labels: jnp.ndarray, null_label) -> jnp.ndarray:
    """`null_label` (a class index, or the null caption's token row) repeated for every row of `labels`.

    A token row is cut to the labels' length: past the `<null>` token it is padding, which the
    text encoder masks, so a batch padded to its longest caption gets the same null caption."""
    null = jnp.asarray(null_label, jnp.int32)
    if null.ndim:
        null = null[:jnp.shape(labels)[-1]]
    return jnp.broadcast_to(null, jnp.shape(labels))


def drop_labels(labels: jnp.ndarray, key: jax.Array, probability: float, null_label) -> jnp.ndarray:
    """Training's label dropout: each label [B] (or caption's tokens, a row of [B, L]) independently
    becomes `null_label` (the null class, or the null caption's row) with `probability`.

    This is what teaches one network ε_θ(x, ∅) beside ε_θ(x, c) (Ho & Salimans 2022, Alg. 1,
    p_uncond). Call it in the train step only: sampling and evaluation use the labels as given.
    """
    p = float(probability)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"training.label_dropout={p:g} must lie in [0, 1] (0.1 as the paper).")
    labels = jnp.asarray(labels, jnp.int32)
    if p == 0.0:
        return labels
    drop = jax.random.uniform(key, labels.shape[:1]) < p
    return jnp.where(drop.reshape(drop.shape + (1,) * (labels.ndim - 1)), null_rows(labels, null_label), labels)


def check_guidance(*, labels, guidance_scale, null_label) -> None:
    """One-line ValueErrors for guidance without labels / without a null class, or w < 0.

    A traced w (not a Python number) counts as guidance: it needs labels and the null class."""
    static = isinstance(guidance_scale, (int, float))
    w = float(guidance_scale) if static else float("nan")
    if static and w < 0:
        raise ValueError(f"guidance_scale={w:g} must be >= 0 (0 = the plain conditional model; "
                         "diffusers' s corresponds to w = s - 1).")
    if w and labels is None:
        raise ValueError(f"guidance_scale={w:g} needs class labels (sampling.labels) and a class-conditional "
                         "model (model.num_classes > 0); set guidance_scale=0 for an unconditional model.")
    if w and null_label is None:
        raise ValueError(f"guidance_scale={w:g} needs null_label, the model's null class "
                         "(model.num_classes for the UNet) or the null caption's tokens.")


def model_fn(apply_fn: Callable, params, *, labels=None, guidance_scale=0.0,
             null_label=None, var_type: str = "fixedlarge") -> Callable:
    """The network as `fn(x_t, t) -> output`, conditioned on `labels` and guided with w = guidance_scale.

    apply_fn(params, x, t) (labels None: the unconditional network, called with x and t alone) or
    apply_fn(params, x, t, y) with y int32 [B] (classes) or [B, L] (caption tokens; `null_label`
    is then the null caption's row [L]). With w = 0 (a Python number) one plain
    conditional call is made. With w ≠ 0 (or a traced w) the batch is doubled: labels
    [labels; null_label] in one call, then `combine`. The output stays in the network's own
    parameterisation (eps | x0 | v), see the module docstring; a learned variance's channels
    (`var_type`) are the conditional branch's.
    """
    check_guidance(labels=labels, guidance_scale=guidance_scale, null_label=null_label)
    if labels is None:
        return lambda x, t: apply_fn(params, x, t)
    labels = jnp.asarray(labels, jnp.int32)
    if isinstance(guidance_scale, (int, float)) and guidance_scale == 0:
        return lambda x, t: apply_fn(params, x, t, labels)
    null = null_rows(labels, null_label)

    def guided(x, t):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x.shape[0],))
        out = apply_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                       jnp.concatenate([labels, null]))
        out_cond, out_uncond = jnp.split(out, 2, axis=0)
        mean_cond, var_cond = diffusion.split_output(out_cond, var_type)
        mean_uncond, _ = diffusion.split_output(out_uncond, var_type)
        guided_mean = combine(mean_cond, mean_uncond, guidance_scale)
        return guided_mean if var_cond is None else jnp.concatenate([guided_mean, var_cond], axis=-1)

    return guided
