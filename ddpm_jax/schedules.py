"""Noise schedules β_1..β_T and the float32 tables derived from them.

Timesteps are 0-based in code: ``betas[t]`` is the paper's β_{t+1}, so
``alphas_cumprod[t]`` is ᾱ_{t+1} and ``alphas_cumprod[T - 1]`` is ᾱ_T.
Every table is computed in NumPy float64 first and cast to float32 once, as
the official code of Ho et al. (2020) does (``diffusion_utils_2.py``), so the
tables carry no accumulated float32 error from the cumulative product.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.struct
import jax.numpy as jnp
import numpy as np
from absl import logging

SCHEDULES = ("linear", "quadratic", "cosine", "sigmoid", "const", "jsd", "warmup10", "warmup50")


def _check_range(name: str, **values: float) -> None:
    for key, value in values.items():
        if not (0.0 < value <= 1.0) or not math.isfinite(value):
            raise ValueError(
                f"schedule {name!r}: {key}={value} must lie in (0, 1]; pass e.g. "
                f"beta_start=1e-4, beta_end=0.02 (the paper's values)."
            )


def _warmup_beta(beta_start: float, beta_end: float, num_timesteps: int, frac: float) -> np.ndarray:
    """β = beta_end everywhere, with a linear warmup from beta_start over the first `frac` of steps."""
    betas = beta_end * np.ones(num_timesteps, dtype=np.float64)
    warmup_time = int(num_timesteps * frac)
    betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
    return betas


def _betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[float], float],
                         max_beta: float) -> np.ndarray:
    """β_t = min(1 − ᾱ(t/T) / ᾱ((t−1)/T), max_beta) (Nichol & Dhariwal 2021, eq. (17))."""
    betas = [min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
             for i in range(num_timesteps)]
    return np.asarray(betas, dtype=np.float64)


def get_betas(name: str, num_timesteps: int, *, beta_start: float = 1e-4,
              beta_end: float = 0.02, cosine_s: float = 0.008,
              max_beta: float = 0.999) -> np.ndarray:
    """Returns the float64 [T] array of β for schedule `name`.

    linear:    linspace(beta_start, beta_end) (Ho et al. 2020, §4; CIFAR-10: 1e-4 → 0.02).
    quadratic: linspace(√beta_start, √beta_end)².
    cosine:    ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), β capped at max_beta (Nichol & Dhariwal 2021).
    sigmoid:   sigmoid(linspace(−6, 6)) · (beta_end − beta_start) + beta_start.
    const:     beta_end everywhere.
    jsd:       1/T, 1/(T−1), …, 1 (Jensen–Shannon / Sohl-Dickstein et al. 2015).
    warmup10 / warmup50: beta_end with a linear warmup from beta_start over the first 10% / 50%.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; choose one of {', '.join(SCHEDULES)}.")
    if isinstance(num_timesteps, bool) or int(num_timesteps) != num_timesteps or num_timesteps < 1:
        raise ValueError(f"num_timesteps={num_timesteps!r} must be a positive integer (the paper uses 1000).")
    T = int(num_timesteps)
    if name in ("linear", "quadratic", "sigmoid", "warmup10", "warmup50"):
        _check_range(name, beta_start=beta_start, beta_end=beta_end)
    if name == "const":
        _check_range(name, beta_end=beta_end)

    if name == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif name == "quadratic":
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    elif name == "cosine":
        if not (cosine_s >= 0.0 and math.isfinite(cosine_s)):
            raise ValueError(f"schedule 'cosine': cosine_s={cosine_s} must be >= 0 (the paper uses 0.008).")
        if not (0.0 < max_beta <= 1.0):
            raise ValueError(f"schedule 'cosine': max_beta={max_beta} must lie in (0, 1] "
                             "(the paper uses 0.999).")

        def alpha_bar(u: float) -> float:
            return math.cos((u + cosine_s) / (1.0 + cosine_s) * math.pi / 2) ** 2

        betas = _betas_for_alpha_bar(T, alpha_bar, max_beta)
    elif name == "sigmoid":
        z = np.linspace(-6.0, 6.0, T, dtype=np.float64)
        betas = 1.0 / (1.0 + np.exp(-z)) * (beta_end - beta_start) + beta_start
    elif name == "const":
        betas = beta_end * np.ones(T, dtype=np.float64)
    elif name == "jsd":
        betas = 1.0 / np.linspace(T, 1, T, dtype=np.float64)
    else:  # warmup10 | warmup50
        betas = _warmup_beta(beta_start, beta_end, T, {"warmup10": 0.1, "warmup50": 0.5}[name])
    assert betas.shape == (T,) and betas.dtype == np.float64
    return betas


def _validate_betas(betas) -> np.ndarray:
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 1:
        raise ValueError(f"betas must be a 1-D array of length T >= 1, got shape {betas.shape}; "
                         "build one with schedules.get_betas(...).")
    if not np.all(np.isfinite(betas)) or not np.all((betas > 0) & (betas <= 1)):
        raise ValueError("every beta must lie in (0, 1]; got min "
                         f"{np.nanmin(betas):.3g}, max {np.nanmax(betas):.3g}. "
                         "Build the schedule with schedules.get_betas(...).")
    return betas


@flax.struct.dataclass
class Schedule:
    """Float32 tables of the forward process, indexed by the 0-based timestep t.

    Names follow the official code. Below, subscripts are the code's 0-based t (the paper's
    t + 1) and ᾱ_{−1} = 1; eq. (4), (6), (7):
      alphas_cumprod[t] = ᾱ_t = Π_{s≤t} (1 − β_s),   alphas_cumprod_prev[t] = ᾱ_{t−1},
      posterior_variance[t] = β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)   (0 at t = 0),
      posterior_log_variance_clipped = log of (β̃_1, β̃_1, β̃_2, …): β̃_1 replaces the 0 at t = 0,
      posterior_mean_coef1 = β_t √ᾱ_{t−1} / (1 − ᾱ_t),  posterior_mean_coef2 = √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t),
      fixedlarge_log_variance = log of (β̃_1, β_1, β_2, …): the "fixedlarge" reverse log-variance,
        β_t except at t = 0, where the official code uses β̃_1 "to get a better decoder log
        likelihood" (it only matters for the bits/dim of eq. (13); sampling adds no noise at t = 0),
      log_alphas_cumprod = log ᾱ_t = Σ_{s≤t} log(1 − β_s): lets strided samplers form
        1 − ᾱ_t/ᾱ_s = −expm1(log ᾱ_t − log ᾱ_s) without float32 cancellation.
    """

    betas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    log_one_minus_alphas_cumprod: jnp.ndarray
    sqrt_recip_alphas_cumprod: jnp.ndarray
    sqrt_recipm1_alphas_cumprod: jnp.ndarray
    posterior_variance: jnp.ndarray
    posterior_log_variance_clipped: jnp.ndarray
    posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2: jnp.ndarray
    fixedlarge_log_variance: jnp.ndarray
    log_alphas_cumprod: jnp.ndarray

    @classmethod
    def from_betas(cls, betas: np.ndarray) -> "Schedule":
        """Builds every table in float64 from `betas` (float [T]), then casts to float32."""
        betas = _validate_betas(betas)
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        with np.errstate(divide="ignore"):  # jsd's β_T = 1 gives ᾱ_T = 0: 1/ᾱ_T = inf, as the official code.
            log_abar = np.cumsum(np.log1p(-betas))
            sqrt_recip = np.sqrt(1.0 / abar)
            sqrt_recipm1 = np.sqrt(1.0 / abar - 1.0)
            log_one_minus = np.log(1.0 - abar)
        # Eq. (7): the posterior q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I).
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        # β̃ is 0 at t = 0; its log is clipped by using β̃_1 there (T = 1 has no β̃_1: use β_0).
        first = post_var[1] if betas.shape[0] > 1 else betas[0]
        post_log_var = np.log(np.append(first, post_var[1:]))
        fixedlarge_log_var = np.log(np.append(first, betas[1:]))
        coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
        coef2 = (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)
        f32 = lambda a: jnp.asarray(np.asarray(a, np.float64).astype(np.float32))  # noqa: E731
        return cls(
            betas=f32(betas),
            alphas_cumprod=f32(abar),
            alphas_cumprod_prev=f32(abar_prev),
            sqrt_alphas_cumprod=f32(np.sqrt(abar)),
            sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - abar)),
            log_one_minus_alphas_cumprod=f32(log_one_minus),
            sqrt_recip_alphas_cumprod=f32(sqrt_recip),
            sqrt_recipm1_alphas_cumprod=f32(sqrt_recipm1),
            posterior_variance=f32(post_var),
            posterior_log_variance_clipped=f32(post_log_var),
            posterior_mean_coef1=f32(coef1),
            posterior_mean_coef2=f32(coef2),
            fixedlarge_log_variance=f32(fixedlarge_log_var),
            log_alphas_cumprod=f32(log_abar),
        )

    @property
    def num_timesteps(self) -> int:
        """T, static even when the tables are traced (it is their shape)."""
        return int(self.betas.shape[0])


def alpha_bar_final(betas: np.ndarray) -> float:
    """ᾱ_T = Π_t (1 − β_t), in float64: how much signal is left at the last step."""
    return float(np.prod(1.0 - _validate_betas(betas)))


def warn_if_not_noise(betas: np.ndarray, threshold: float = 1e-2) -> bool:
    """Logs a warning and returns True when ᾱ_T > threshold, i.e. x_T is not close to N(0, I).

    Sampling starts from pure noise, so a schedule that leaves signal at T (e.g. T = 100 with β
    from 1e-4 to 0.02: ᾱ_T ≈ 0.36) samples from the wrong distribution. The paper's CIFAR-10
    schedule has ᾱ_T ≈ 4e-5.
    """
    abar_T = alpha_bar_final(betas)
    if abar_T > threshold:
        logging.warning(
            "the noise schedule does not reach noise: alpha_bar_T = %.4g > %.3g (sqrt = %.3g of the "
            "signal survives at t = T=%d); use a longer num_timesteps or a larger beta_end.",
            abar_T, threshold, math.sqrt(abar_T), len(np.asarray(betas)))
        return True
    return False
