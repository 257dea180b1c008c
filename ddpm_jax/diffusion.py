"""The forward process, the reverse-process parameterisations and the losses of Ho et al. (2020).

`GaussianDiffusion` is the process of a run: the Schedule tables with what the network predicts,
its reverse variance, its loss and x̂_0 clipping; its methods are the paper's equations. The
table-only equations (eq. (4), (6)–(7), the ε / x_0 / v conversions, the decoder likelihood) are
also plain functions of a `Schedule`. All are pure, jit-able, broadcasting over any
trailing shape: images NHWC [B, H, W, C] and 2-D points [B, 2] alike. Timesteps are 0-based:
`t` indexes the tables, so `t = 0` is the paper's first step (x_1 → x_0). `t` is an int array
[B] or a scalar.
"""

from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.schedules import Schedule

PREDS = ("eps", "x0", "v", "xprev", "consistency")
SIGMA_DATA = 0.5  # σ_data of the consistency parameterisation (Karras et al. 2022; Song et al. 2023)
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
LEARNED_VAR_TYPES = ("learned", "learned_range")
LOSSES = ("mse", "kl", "hybrid")
HYBRID_LAMBDA = 1e-3  # λ of L_hybrid = L_simple + λ L_vlb (Nichol & Dhariwal 2021, §3.1)
MIN_SNR_PREDS = ("eps", "x0", "v")  # the targets whose loss min-SNR-γ weighting is defined for


def output_channels(data_channels: int, var_type: str) -> int:
    """Channels the network outputs: C, or 2C (mean part, variance part) for a learned variance.

    A function of the name alone, so a model is sized from a config before any table exists.
    """
    return 2 * int(data_channels) if var_type in LEARNED_VAR_TYPES else int(data_channels)


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


def consistency_function(sched: Schedule, x_tilde, t, out):
    """f(x̃, σ̃_t) = c_skip(σ̃_t) x̃ + c_out(σ̃_t) F (Song et al. 2023, App. C) in the scale x̃ = x_t/√ᾱ_t,
    σ̃_t = √(1/ᾱ_t − 1), with σ_min = σ̃_0 (the first timestep) and σ_data = `SIGMA_DATA`:

        c_skip = σ_data² / ((σ̃_t − σ_min)² + σ_data²),   c_out = σ_data (σ̃_t − σ_min) / √(σ_data² + σ̃_t²),

    so f(x̃, σ_min) = x̃ exactly (c_skip = 1, c_out = 0: the boundary condition)."""
    sigma = extract(sched.sqrt_recipm1_alphas_cumprod, t, x_tilde.ndim)
    gap = sigma - sched.sqrt_recipm1_alphas_cumprod[0]
    c_skip = SIGMA_DATA ** 2 / (jnp.square(gap) + SIGMA_DATA ** 2)
    c_out = SIGMA_DATA * gap * jax.lax.rsqrt(SIGMA_DATA ** 2 + jnp.square(sigma))
    return c_skip * x_tilde + c_out * out


def x0_from_xprev(sched: Schedule, x_t, t, xprev):
    """x_0 = (μ̃ − c₂ x_t) / c₁: eq. (7)'s posterior mean μ̃ = c₁ x_0 + c₂ x_t solved for x_0."""
    coef1 = extract(sched.posterior_mean_coef1, t, x_t.ndim)
    coef2 = extract(sched.posterior_mean_coef2, t, x_t.ndim)
    return (xprev - coef2 * x_t) / coef1


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


# ---- The process ------------------------------------------------------------------------------

def validate(pred: str, var_type: str, loss: str, min_snr_gamma: float = 0.0) -> None:
    """The rules of a process's (pred, var_type, loss, min_snr_gamma), each a one-line ValueError naming the field."""
    if pred not in PREDS:
        raise ValueError(f"unknown pred={pred!r}; the network predicts one of {', '.join(PREDS)}.")
    if var_type not in VAR_TYPES:
        raise ValueError(f"unknown var_type={var_type!r}; choose one of {', '.join(VAR_TYPES)} "
                         "(fixedlarge: β_t, fixedsmall: β̃_t, learned: log σ² from the network, "
                         "learned_range: Nichol & Dhariwal eq. (15)).")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss={loss!r}; choose one of {', '.join(LOSSES)}.")
    if loss == "hybrid" and var_type not in LEARNED_VAR_TYPES:
        raise ValueError(f"loss='hybrid' with var_type={var_type!r} is L_simple (the mean is stopped from "
                         "L_vlb's gradient); use var_type=learned_range or loss=mse.")
    if loss == "mse" and var_type in LEARNED_VAR_TYPES:
        raise ValueError(f"loss='mse' leaves the learned variance (var_type={var_type!r}) untrained; "
                         "use loss=hybrid (or kl).")
    if not np.isfinite(min_snr_gamma) or min_snr_gamma < 0:
        raise ValueError(f"min_snr_gamma={min_snr_gamma:g} must be >= 0 (0 = unweighted; Hang et al. use 5).")
    if min_snr_gamma and (loss != "mse" or pred not in MIN_SNR_PREDS):
        raise ValueError(f"min_snr_gamma={min_snr_gamma:g} weights the mse loss of pred in {MIN_SNR_PREDS}, not "
                         f"loss={loss!r} with pred={pred!r}; use min_snr_gamma=0.")


@flax.struct.dataclass
class GaussianDiffusion:
    """The diffusion process of one run: the Schedule tables and what the network's output means.

    A pytree (the tables are its leaves; `pred`, `var_type`, `loss` and `clip_x0` are static), so
    it is an argument of jitted functions like the tables themselves. Validated at construction.
      pred:     what the network predicts: eps | x0 | v | xprev (the posterior mean μ̃_t).
      var_type: Σ_θ of p(x_{t−1} | x_t): fixedlarge (β_t) | fixedsmall (β̃_t) | learned |
                learned_range (2C output channels, the last C the variance's).
      loss:     the training loss: mse (L_simple) | kl (L_vlb) | hybrid (Nichol & Dhariwal §3.1).
      clip_x0:  whether x̂_0 is clipped to [−1, 1] where the reverse process uses it (pixels).
      min_snr_gamma: γ of the min-SNR-γ loss weighting (Hang et al. 2023; 0 = the unweighted mse).
    """

    sched: Schedule
    pred: str = flax.struct.field(pytree_node=False, default="eps")
    var_type: str = flax.struct.field(pytree_node=False, default="fixedlarge")
    loss: str = flax.struct.field(pytree_node=False, default="mse")
    clip_x0: bool = flax.struct.field(pytree_node=False, default=True)
    min_snr_gamma: float = flax.struct.field(pytree_node=False, default=0.0)

    def __post_init__(self):
        validate(self.pred, self.var_type, self.loss, self.min_snr_gamma)

    @property
    def num_timesteps(self) -> int:
        return self.sched.num_timesteps

    @property
    def learned_variance(self) -> bool:
        """Whether the network outputs Σ_θ (2C channels)."""
        return self.var_type in LEARNED_VAR_TYPES

    # ---- the forward process and the network's output

    def q_sample(self, x0, t, noise):
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (eq. (4))."""
        return q_sample(self.sched, x0, t, noise)

    def q_posterior(self, x0, x_t, t):
        """(mean, variance, log_variance_clipped) of q(x_{t−1} | x_t, x_0) (eq. (6)–(7))."""
        return q_posterior(self.sched, x0, x_t, t)

    def split_output(self, model_output):
        """(mean part, variance part or None): a learned variance's 2C channels split on the last axis."""
        if not self.learned_variance:
            return model_output, None
        if model_output.shape[-1] % 2:
            raise ValueError(f"var_type={self.var_type!r} needs a network output of 2C channels, got "
                             f"{model_output.shape[-1]}; build the model for this var_type (out_ch = 2C).")
        return jnp.split(model_output, 2, axis=-1)

    def clip(self, x0_hat):
        """x̂_0 clipped to [−1, 1] when `clip_x0` (Alg. 2 as released), else x̂_0."""
        return jnp.clip(x0_hat, -1.0, 1.0) if self.clip_x0 else x0_hat

    def x0_and_eps(self, model_output, x_t, t):
        """(x̂_0, ε̂) implied by the network output (no clipping); a learned variance's half is dropped.

        eps: x̂_0 = x_t/√ᾱ_t − √(1/ᾱ_t − 1) ε̂ (eq. (4) solved for x_0); x0: ε̂ from x̂_0 the same way;
        v: x̂_0 = √ᾱ_t x_t − √(1 − ᾱ_t) v̂ (Salimans & Ho 2022); xprev: eq. (7) solved for x_0;
        consistency: x̂_0 = f(x_t/√ᾱ_t, σ̃_t) (`consistency_function`).
        """
        out, _ = self.split_output(model_output)
        if self.pred == "eps":
            return x0_from_eps(self.sched, x_t, t, out), out
        if self.pred == "x0":
            return out, eps_from_x0(self.sched, x_t, t, out)
        if self.pred in ("xprev", "consistency"):
            x0 = (x0_from_xprev(self.sched, x_t, t, out) if self.pred == "xprev" else consistency_function(
                self.sched, extract(self.sched.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t, t, out))
            return x0, eps_from_x0(self.sched, x_t, t, x0)
        return x0_from_v(self.sched, x_t, t, out), eps_from_v(self.sched, x_t, t, out)

    def denoise(self, model_output, x_t, t):
        """x̂_0 of the network output, clipped when `clip_x0`: what every sampler steps with."""
        return self.clip(self.x0_and_eps(model_output, x_t, t)[0])

    # ---- the reverse process p(x_{t−1} | x_t)

    def reverse_variance(self, t, ndim: int, var_output=None):
        """(variance, log_variance) of p(x_{t−1} | x_t): fixed (Ho et al. §3.2) or learned.

        fixedlarge: variance β_t; its log uses β̃_1 = posterior_variance[1] at t = 0, as the
        official code's log(append(posterior_variance[1], betas[1:])) (a better decoder likelihood).
        fixedsmall: β̃_t, with the clipped log (β̃_1 at t = 0, where β̃_0 = 0).
        learned: log σ_t² = `var_output` (the official `learned`).
        learned_range: log σ_t² = v log β_t + (1 − v) log β̃_t with v = (`var_output` + 1)/2
        (Nichol & Dhariwal eq. (15); the output ∈ [−1, 1] spans β̃_t … β_t; log β̃_t clipped at t = 0).
        """
        sched = self.sched
        if self.var_type == "fixedlarge":
            return extract(sched.betas, t, ndim), extract(sched.fixedlarge_log_variance, t, ndim)
        if self.var_type == "fixedsmall":
            return (extract(sched.posterior_variance, t, ndim),
                    extract(sched.posterior_log_variance_clipped, t, ndim))
        if var_output is None:
            raise ValueError(f"var_type={self.var_type!r} needs the network's variance channels (var_output).")
        if self.var_type == "learned":
            log_variance = var_output
        else:
            min_log = extract(sched.posterior_log_variance_clipped, t, ndim)
            max_log = jnp.log(extract(sched.betas, t, ndim))
            frac = (var_output + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
        return jnp.exp(log_variance), log_variance

    def p_mean_variance(self, model_output, x_t, t) -> dict:
        """Mean and variance of p_θ(x_{t−1} | x_t) (eq. (1), §3.2).

        The mean is the posterior mean μ̃_t(x_t, x̂_0) of eq. (7) at the predicted x̂_0 (for
        pred="eps" this equals eq. (11) when no clipping happens), x̂_0 clipped when `clip_x0`;
        for pred="xprev" the network's output is the mean itself (x̂_0 from it is clipped, the mean
        is not: the official code). A learned variance comes from the last C channels.
        Returns dict(mean, variance, log_variance, pred_x0).
        """
        mean_output, var_output = self.split_output(model_output)
        x0_hat = self.denoise(model_output, x_t, t)
        mean = mean_output if self.pred == "xprev" else self.q_posterior(x0_hat, x_t, t)[0]
        variance, log_variance = self.reverse_variance(t, x_t.ndim, var_output)
        return dict(mean=mean, variance=variance, log_variance=log_variance, pred_x0=x0_hat)

    # ---- training (§3.4) and the bound (eq. (5), §3.3)

    def training_target(self, x0, t, noise):
        """What the network regresses onto: ε (eq. (14)), x_0, v, or the posterior mean μ̃_t(x_t, x_0)
        of eq. (7) (xprev, at x_t = q_sample(x_0, t, ε))."""
        if self.pred == "eps":
            return noise
        if self.pred == "x0":
            return x0
        if self.pred == "xprev":
            return self.q_posterior(x0, self.q_sample(x0, t, noise), t)[0]
        if self.pred == "consistency":
            raise ValueError("pred='consistency' has no regression target: it is trained by consistency "
                             "distillation (--mode=consistency), not --mode=train.")
        return v_target(self.sched, x0, t, noise)

    def training_losses(self, model_output, x0, x_t, t, noise, *,
                        hybrid_lambda: float = HYBRID_LAMBDA) -> jnp.ndarray:
        """The per-example training loss [B] of `model_output` at x_t = q_sample(x_0, t, ε).

        mse:    mean over pixels of (target − output)²: L_simple (eq. (14)) for pred=eps, and
                ‖μ̃ − μ_θ‖² (Table 2) for pred=xprev; needs a fixed variance (nothing would train Σ_θ).
        kl:     the bound's term L_t of eq. (5) in bits/dim (`vlb_terms_bpd`, x̂_0 unclipped): the
                KL to q(x_{t−1} | x_t, x_0) for t > 0, the decoder NLL at t = 0 (the official `kl`).
        hybrid: L_simple + λ L_vlb (Nichol & Dhariwal §3.1) with L_vlb's one-sample estimate T·L_t
                computed on the mean channels under stop_gradient, so L_vlb trains only Σ_θ.
        """
        model_output = model_output.astype(jnp.float32)
        unclipped = self.replace(clip_x0=False)
        if self.loss == "kl":
            return unclipped.vlb_terms_bpd(model_output, x0, x_t, t)["kl_bpd"]
        mean_output, var_output = self.split_output(model_output)
        mse = meanflat(jnp.square(self.training_target(x0, t, noise) - mean_output))
        if self.loss == "mse":
            return mse if not self.min_snr_gamma else self.min_snr_weight(t) * mse
        frozen = jnp.concatenate([jax.lax.stop_gradient(mean_output), var_output], axis=-1)
        return mse + hybrid_lambda * self.num_timesteps * unclipped.vlb_terms_bpd(frozen, x0, x_t, t)["kl_bpd"]

    def min_snr_weight(self, t) -> jnp.ndarray:
        """Min-SNR-γ (Hang et al. 2023, eq. (10)): the x_0-error weight min(SNR_t, γ) expressed for the
        target: / SNR_t for ε (‖ε − ε̂‖² = SNR_t ‖x_0 − x̂_0‖²), / (SNR_t + 1) for v, as is for x_0."""
        abar = self.sched.alphas_cumprod[t]
        snr = abar / (1.0 - abar)
        clipped = jnp.minimum(snr, self.min_snr_gamma)
        # ε: min(1, γ / SNR_t), which is 1 where ᾱ_T = 0 (SNR 0) instead of 0 / 0.
        return {"eps": jnp.minimum(1.0, self.min_snr_gamma / snr), "x0": clipped, "v": clipped / (snr + 1.0)}[self.pred]

    def losses(self, model_fn: Callable, x0, t, noise) -> jnp.ndarray:
        """`training_losses` of model_fn(x_t, t) at x_t = q_sample(x_0, t, ε): the train step's loss."""
        x_t = self.q_sample(x0, t, noise)
        return self.training_losses(model_fn(x_t, t), x0, x_t, t, noise)

    def loss_simple(self, model_fn: Callable, x0, key: jax.Array) -> jnp.ndarray:
        """`losses` (L_simple, eq. (14), for loss=mse) with t ~ Uniform{0, …, T−1}, ε ~ N(0, I) from `key`.

        model_fn(x_t, t) returns the network output for t an int32 [B].
        """
        key_t, key_noise = jax.random.split(key)
        t = jax.random.randint(key_t, (x0.shape[0],), 0, self.num_timesteps, dtype=jnp.int32)
        return self.losses(model_fn, x0, t, jax.random.normal(key_noise, x0.shape, x0.dtype))

    def vlb_terms_bpd(self, model_output, x0, x_t, t) -> dict:
        """One term of the bound (eq. (5)) in bits/dim per example, for t [B].

        kl_bpd: L_{t} = KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)) for t > 0, and the decoder
        NLL L_0 = −log p_θ(x_0 | x_1) (eq. (13)) for t == 0; mse: per-example mean (x̂_0 − x_0)²;
        pred_x0: x̂_0 (clipped when `clip_x0`).
        """
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = meanflat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / np.log(2.0)
        decoder_nll = -meanflat(discretized_gaussian_log_likelihood(
            x0, means=out["mean"], log_scales=0.5 * out["log_variance"])) / np.log(2.0)
        t = jnp.broadcast_to(jnp.asarray(t), kl.shape)
        return dict(kl_bpd=jnp.where(t == 0, decoder_nll, kl),
                    mse=meanflat(jnp.square(out["pred_x0"] - x0)),
                    pred_x0=out["pred_x0"])

    def prior_bpd(self, x0) -> jnp.ndarray:
        """L_T = KL(q(x_T | x_0) ‖ N(0, I)) in bits/dim, per example [B]."""
        return prior_bpd(self.sched, x0)
