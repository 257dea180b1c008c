"""The forward process, the reverse-process parameterisations and the losses of Ho et al. (2020).

Pure functions of a `Schedule` (the float32 tables) and arrays, jit-able, broadcasting over any
trailing shape: images NHWC [B, H, W, C] and 2-D points [B, 2] alike. Timesteps are 0-based:
`t` indexes the tables, so `t = 0` is the paper's first step (x_1 → x_0). `t` is an int array
[B] or a scalar.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.schedules import Schedule

PREDS = ("eps", "x0", "v", "xprev")
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
LEARNED_VAR_TYPES = ("learned", "learned_range")
LOSSES = ("mse", "kl", "hybrid")
HYBRID_LAMBDA = 1e-3  # λ of L_hybrid = L_simple + λ L_vlb (Nichol & Dhariwal 2021, §3.1)


def check_pred(pred: str) -> None:
    if pred not in PREDS:
        raise ValueError(f"unknown pred={pred!r}; the network predicts one of {', '.join(PREDS)}.")


def check_var_type(var_type: str) -> None:
    if var_type not in VAR_TYPES:
        raise ValueError(f"unknown var_type={var_type!r}; choose one of {', '.join(VAR_TYPES)} "
                         "(fixedlarge: β_t, fixedsmall: β̃_t, learned: log σ² from the network, "
                         "learned_range: Nichol & Dhariwal eq. (15)).")


def check_loss(loss: str, var_type: str) -> None:
    """`loss` in mse | kl | hybrid; hybrid needs a learned variance (its L_vlb trains only Σ_θ)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss={loss!r}; choose one of {', '.join(LOSSES)}.")
    check_var_type(var_type)
    if loss == "hybrid" and var_type not in LEARNED_VAR_TYPES:
        raise ValueError(f"loss='hybrid' with var_type={var_type!r} is L_simple (the mean is stopped from "
                         "L_vlb's gradient); use var_type=learned_range or loss=mse.")


def output_channels(data_channels: int, var_type: str) -> int:
    """Channels the network outputs: C, or 2C (mean part, variance part) for a learned variance."""
    check_var_type(var_type)
    return 2 * int(data_channels) if var_type in LEARNED_VAR_TYPES else int(data_channels)


def split_output(model_output, var_type: str = "fixedlarge"):
    """(mean part, variance part or None): a learned variance's 2C channels split on the last axis."""
    check_var_type(var_type)
    if var_type not in LEARNED_VAR_TYPES:
        return model_output, None
    if model_output.shape[-1] % 2:
        raise ValueError(f"var_type={var_type!r} needs a network output of 2C channels, got "
                         f"{model_output.shape[-1]}; build the model for this var_type (out_ch = 2C).")
    return jnp.split(model_output, 2, axis=-1)


def extract(table: jnp.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """table[t] shaped [B, 1, ..., 1] (ndim axes) to broadcast against x [B, ...]; scalar t → [1, ..., 1]."""
    t = jnp.asarray(t)
    vals = jnp.take(table, t.astype(jnp.int32), axis=0)
    lead = vals.shape if t.ndim else (1,)
    return vals.reshape(lead + (1,) * (ndim - len(lead)))


def meanflat(x: jnp.ndarray) -> jnp.ndarray:
    """Mean over every axis but the first: per-example [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ---- Forward process ------------------------------------------------------------------------

def q_sample(sched: Schedule, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
    """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, a draw of q(x_t | x_0) (eq. (4))."""
    return (extract(sched.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def q_mean_variance(sched: Schedule, x0: jnp.ndarray, t: jnp.ndarray):
    """Mean, variance and log-variance of q(x_t | x_0) (eq. (4))."""
    mean = extract(sched.sqrt_alphas_cumprod, t, x0.ndim) * x0
    var = extract(1.0 - sched.alphas_cumprod, t, x0.ndim)
    log_var = extract(sched.log_one_minus_alphas_cumprod, t, x0.ndim)
    return mean, var, log_var


def q_posterior(sched: Schedule, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray):
    """q(x_{t−1} | x_t, x_0) = N(μ̃_t(x_t, x_0), β̃_t I) (eq. (6)–(7)).

    Returns (mean, variance, log_variance_clipped); the log uses β̃_1 (posterior_variance[1])
    at t = 0, where β̃_0 = 0.
    """
    nd = x_t.ndim
    mean = extract(sched.posterior_mean_coef1, t, nd) * x0 + extract(sched.posterior_mean_coef2, t, nd) * x_t
    var = extract(sched.posterior_variance, t, nd)
    log_var = extract(sched.posterior_log_variance_clipped, t, nd)
    return mean, var, log_var


# ---- ε, x0 and v: the three network parameterisations --------------------------------------

def _sqrt_abar(sched: Schedule, t, x):
    """(√ᾱ_t, √(1 − ᾱ_t)) shaped to broadcast against x."""
    return (extract(sched.sqrt_alphas_cumprod, t, x.ndim),
            extract(sched.sqrt_one_minus_alphas_cumprod, t, x.ndim))


def x0_from_eps(sched: Schedule, x_t, t, eps):
    """x_0 = x_t / √ᾱ_t − √(1/ᾱ_t − 1) ε (eq. (4) solved for x_0; the official form)."""
    recip = extract(sched.sqrt_recip_alphas_cumprod, t, x_t.ndim)
    recipm1 = extract(sched.sqrt_recipm1_alphas_cumprod, t, x_t.ndim)
    return recip * x_t - recipm1 * eps


def eps_from_x0(sched: Schedule, x_t, t, x0):
    """ε = (x_t / √ᾱ_t − x_0) / √(1/ᾱ_t − 1), the inverse of `x0_from_eps`."""
    recip = extract(sched.sqrt_recip_alphas_cumprod, t, x_t.ndim)
    recipm1 = extract(sched.sqrt_recipm1_alphas_cumprod, t, x_t.ndim)
    return (recip * x_t - x0) / recipm1


def v_target(sched: Schedule, x0, t, noise):
    """v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022, §4)."""
    a, s = _sqrt_abar(sched, t, x0)
    return a * noise - s * x0


def x0_from_v(sched: Schedule, x_t, t, v):
    """x_0 = √ᾱ_t x_t − √(1 − ᾱ_t) v."""
    a, s = _sqrt_abar(sched, t, x_t)
    return a * x_t - s * v


def eps_from_v(sched: Schedule, x_t, t, v):
    """ε = √ᾱ_t v + √(1 − ᾱ_t) x_t."""
    a, s = _sqrt_abar(sched, t, x_t)
    return a * v + s * x_t


def x0_from_xprev(sched: Schedule, x_t, t, xprev):
    """x_0 = (μ̃ − c₂ x_t) / c₁: eq. (7)'s posterior mean μ̃ = c₁ x_0 + c₂ x_t solved for x_0."""
    coef1 = extract(sched.posterior_mean_coef1, t, x_t.ndim)
    coef2 = extract(sched.posterior_mean_coef2, t, x_t.ndim)
    return (xprev - coef2 * x_t) / coef1


def x0_and_eps(sched: Schedule, model_output, x_t, t, pred: str = "eps", *, var_type: str = "fixedlarge"):
    """(x̂_0, ε̂) implied by the network output for `pred` in eps | x0 | v | xprev (no clipping).

    With a learned `var_type` the output has 2C channels; the variance half is dropped here.
    """
    check_pred(pred)
    model_output, _ = split_output(model_output, var_type)
    if pred == "eps":
        return x0_from_eps(sched, x_t, t, model_output), model_output
    if pred == "x0":
        return model_output, eps_from_x0(sched, x_t, t, model_output)
    if pred == "xprev":
        x0 = x0_from_xprev(sched, x_t, t, model_output)
        return x0, eps_from_x0(sched, x_t, t, x0)
    return x0_from_v(sched, x_t, t, model_output), eps_from_v(sched, x_t, t, model_output)


# ---- Reverse process p(x_{t−1} | x_t) --------------------------------------------------------

def reverse_variance(sched: Schedule, t, ndim: int, var_type: str = "fixedlarge", var_output=None):
    """(variance, log_variance) of p(x_{t−1} | x_t): fixed (Ho et al. §3.2) or learned.

    fixedlarge: variance β_t; its log uses β̃_1 = posterior_variance[1] at t = 0, as the
    official code's log(append(posterior_variance[1], betas[1:])) (a better decoder likelihood).
    fixedsmall: β̃_t, with the clipped log (β̃_1 at t = 0, where β̃_0 = 0).
    learned: log σ_t² = `var_output` (the official `learned`).
    learned_range: log σ_t² = v log β_t + (1 − v) log β̃_t with v = (`var_output` + 1)/2
    (Nichol & Dhariwal eq. (15); the output ∈ [−1, 1] spans β̃_t … β_t; log β̃_t clipped at t = 0).
    """
    check_var_type(var_type)
    if var_type == "fixedlarge":
        return extract(sched.betas, t, ndim), extract(sched.fixedlarge_log_variance, t, ndim)
    if var_type == "fixedsmall":
        return extract(sched.posterior_variance, t, ndim), extract(sched.posterior_log_variance_clipped, t, ndim)
    if var_output is None:
        raise ValueError(f"var_type={var_type!r} needs the network's variance channels (var_output).")
    if var_type == "learned":
        log_variance = var_output
    else:
        min_log = extract(sched.posterior_log_variance_clipped, t, ndim)
        max_log = jnp.log(extract(sched.betas, t, ndim))
        frac = (var_output + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
    return jnp.exp(log_variance), log_variance


def p_mean_variance(sched: Schedule, model_output, x_t, t, *, pred: str = "eps",
                    var_type: str = "fixedlarge", clip_denoised: bool = True) -> dict:
    """Mean and variance of p_θ(x_{t−1} | x_t) (eq. (1), §3.2).

    The mean is the posterior mean μ̃_t(x_t, x̂_0) of eq. (7) at the predicted x̂_0 (for
    pred="eps" this equals eq. (11) when no clipping happens), with x̂_0 clipped to [−1, 1] when
    `clip_denoised` (Alg. 2 as released); for pred="xprev" the network's output is the mean
    itself (x̂_0 from it is clipped, the mean is not: the official code). With a learned
    `var_type` the output's last C channels give the variance (`reverse_variance`).
    Returns dict(mean, variance, log_variance, pred_x0).
    """
    mean_output, var_output = split_output(model_output, var_type)
    x0_hat, _ = x0_and_eps(sched, mean_output, x_t, t, pred)
    if clip_denoised:
        x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
    if pred == "xprev":
        mean = mean_output
    else:
        mean, _, _ = q_posterior(sched, x0_hat, x_t, t)
    variance, log_variance = reverse_variance(sched, t, x_t.ndim, var_type, var_output)
    return dict(mean=mean, variance=variance, log_variance=log_variance, pred_x0=x0_hat)


# ---- Training loss (§3.4) ---------------------------------------------------------------------

def training_target(sched: Schedule, x0, t, noise, pred: str = "eps"):
    """What the network regresses onto: ε (eq. (14)), x_0, v, or the posterior mean μ̃_t(x_t, x_0)
    of eq. (7) (xprev, at x_t = q_sample(x_0, t, ε))."""
    check_pred(pred)
    if pred == "eps":
        return noise
    if pred == "x0":
        return x0
    if pred == "xprev":
        return q_posterior(sched, x0, q_sample(sched, x0, t, noise), t)[0]
    return v_target(sched, x0, t, noise)


def training_losses(sched: Schedule, model_output, x0, x_t, t, noise, *, pred: str = "eps",
                    var_type: str = "fixedlarge", loss: str = "mse",
                    hybrid_lambda: float = HYBRID_LAMBDA) -> jnp.ndarray:
    """The per-example training loss [B] of `model_output` at x_t = q_sample(x_0, t, ε).

    mse:    mean over pixels of (target − output)²: L_simple (eq. (14)) for pred=eps, and
            ‖μ̃ − μ_θ‖² (Table 2) for pred=xprev; needs a fixed variance (nothing would train Σ_θ).
    kl:     the bound's term L_t of eq. (5) in bits/dim (`vlb_terms_bpd`, x̂_0 unclipped): the
            KL to q(x_{t−1} | x_t, x_0) for t > 0, the decoder NLL at t = 0 (the official `kl`).
    hybrid: L_simple + λ L_vlb (Nichol & Dhariwal §3.1) with L_vlb's one-sample estimate T·L_t
            computed on the mean channels under stop_gradient, so L_vlb trains only Σ_θ.
    """
    check_loss(loss, var_type)
    if loss == "mse" and var_type in LEARNED_VAR_TYPES:
        raise ValueError(f"loss='mse' leaves the learned variance (var_type={var_type!r}) untrained; "
                         "use loss=hybrid (or kl).")
    model_output = model_output.astype(jnp.float32)
    if loss == "kl":
        return vlb_terms_bpd(sched, model_output, x0, x_t, t, pred=pred, var_type=var_type)["kl_bpd"]
    mean_output, var_output = split_output(model_output, var_type)
    mse = meanflat(jnp.square(training_target(sched, x0, t, noise, pred) - mean_output))
    if loss == "mse":
        return mse
    frozen = jnp.concatenate([jax.lax.stop_gradient(mean_output), var_output], axis=-1)
    vb = vlb_terms_bpd(sched, frozen, x0, x_t, t, pred=pred, var_type=var_type)["kl_bpd"]
    return mse + hybrid_lambda * sched.num_timesteps * vb


def loss_simple(sched: Schedule, model_fn: Callable, x0, key: jax.Array, *, pred: str = "eps") -> jnp.ndarray:
    """L_simple (eq. (14)), per example [B]: mean over pixels of (target − model(x_t, t))².

    t ~ Uniform{0, …, T−1} and ε ~ N(0, I) are drawn from `key`; model_fn(x_t, t) returns the
    network output for t an int32 [B].
    """
    check_pred(pred)
    key_t, key_noise = jax.random.split(key)
    t = jax.random.randint(key_t, (x0.shape[0],), 0, sched.num_timesteps, dtype=jnp.int32)
    noise = jax.random.normal(key_noise, x0.shape, x0.dtype)
    x_t = q_sample(sched, x0, t, noise)
    return training_losses(sched, model_fn(x_t, t), x0, x_t, t, noise, pred=pred)


# ---- Variational bound in bits/dim (eq. (5), §3.3) ---------------------------------------------

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Φ(x) ≈ ½(1 + tanh(√(2/π)(x + 0.044715 x³))), as the official code."""
    return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * jnp.power(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """log p(x) of the discrete decoder (eq. (13)) for x on the 256-level grid in [−1, 1].

    Each pixel's bin is [x − 1/255, x + 1/255]; the edge bins are open (−∞ at x = −1, +∞ at
    x = 1). The numerically stable form of the official code, with the log of each CDF
    difference floored at 1e-12.
    """
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def prior_bpd(sched: Schedule, x0) -> jnp.ndarray:
    """L_T = KL(q(x_T | x_0) ‖ N(0, I)) in bits/dim, per example [B]."""
    t = jnp.full((x0.shape[0],), sched.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_var = q_mean_variance(sched, x0, t)
    return meanflat(normal_kl(mean, log_var, 0.0, 0.0)) / np.log(2.0)


def vlb_terms_bpd(sched: Schedule, model_output, x0, x_t, t, *, pred: str = "eps",
                  var_type: str = "fixedlarge", clip_denoised: bool = False) -> dict:
    """One term of the bound (eq. (5)) in bits/dim per example, for t [B].

    kl_bpd: L_{t} = KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)) for t > 0, and the decoder
    NLL L_0 = −log p_θ(x_0 | x_1) (eq. (13)) for t == 0; mse: per-example mean (x̂_0 − x_0)²;
    pred_x0: x̂_0.
    """
    true_mean, _, true_log_var = q_posterior(sched, x0, x_t, t)
    out = p_mean_variance(sched, model_output, x_t, t, pred=pred, var_type=var_type,
                          clip_denoised=clip_denoised)
    kl = meanflat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / np.log(2.0)
    decoder_nll = -meanflat(discretized_gaussian_log_likelihood(
        x0, means=out["mean"], log_scales=0.5 * out["log_variance"])) / np.log(2.0)
    t = jnp.broadcast_to(jnp.asarray(t), kl.shape)
    return dict(kl_bpd=jnp.where(t == 0, decoder_nll, kl),
                mse=meanflat(jnp.square(out["pred_x0"] - x0)),
                pred_x0=out["pred_x0"])
