"""Few-step samplers for the discrete-time DDPM: DPM-Solver++ (Lu et al. 2022), its SDE variant,
and Heun's method on the probability-flow ODE (Karras et al. 2022, Alg. 1), with their plans.

Notation (Lu et al. 2022, §2; 0-based code timesteps t): α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t),
λ_t = log(α_t/σ_t) (half the log-SNR), and Karras' noise level σ̃(t) = σ_t/α_t =
√((1 − ᾱ_t)/ᾱ_t) = e^{−λ_t} of the rescaled x̃ = x/α_t = x_0 + σ̃ ε. Both solvers integrate the
probability-flow ODE (Song et al. 2021b, eq. (13)), written in these variables as

    dx̃/dσ̃ = (x̃ − D(x̃; σ̃))/σ̃ = ε̂        (Karras eq. (3), with D = x̂_0)
    x_t = (σ_t/σ_s) x_s + σ_t ∫_{λ_s}^{λ_t} e^{λ} x̂_0(x_λ, λ) dλ   (Lu et al. 2022, eq. (8)).

**How the discrete network is queried.** The network was trained at the integer timesteps
0..T−1 only, so every plan here visits integer timesteps: a spacing is laid out in t, in λ
or in σ̃ (Karras' ρ = 7), mapped back to t through the log-σ̃ table (piecewise-linear
interpolation of t against log σ̃(t), which is monotone), rounded, and nudged apart so that
`num_steps` distinct timesteps remain (`timesteps`). The solver then uses the exact
α_t, σ_t of those timesteps, so the network is always evaluated at a (t, noise level) pair
it was trained on; the step sizes h = λ_t − λ_s are whatever the plan gives. After the
last planned timestep every solver takes one first-order step to σ = 0 (λ = +∞), i.e.
returns x̂_0 of the last evaluation (diffusers' `final_sigmas_type="zero"`).

Network calls (NFE): DPM-Solver++ and its SDE variant, one per timestep (N); Heun, two per
step but one on the last, which is an Euler step to σ̃ = 0 (2N − 1; Karras §3).

Everything here is pure (the model is passed in as `denoise(x, t) -> x̂_0`, with x in the
VP scale and t a scalar int32), works in the dtype of the tables and of x (float64 in the
tests), and runs step by step through a `Stepper`, which the driver (`driver.sample`) scans
with its trajectory chunks. `ENTRIES` are these methods' registry entries (`registry.py`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.diffusion import GaussianDiffusion
from ddpm_jax.sampling.base import (Method, ModelFn, NoiseFn, Stepper, log_sigma_table, t_from_log_sigma,
                                    t_next_of, vp_grid)
from ddpm_jax.schedules import Schedule

SPACINGS = ("time_uniform", "logsnr", "karras")  # the plans of `timesteps`
MAX_ORDER = 3
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. (5)
# Plans start no noisier than λ = −5.1 (diffusers' `lambda_min_clipped`): a schedule whose last β
# is capped (cosine: β_T = 0.999) ends with one huge jump in λ (T = 100: −4.2 → −7.6) that would
# otherwise draw a λ- or σ-uniform plan's first steps into the last few timesteps.
LAMBDA_MIN_CLIPPED = -5.1

Denoise = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


# ---- Timestep plans ---------------------------------------------------------------------------

def _distinct(t: jnp.ndarray, k: int) -> jnp.ndarray:
    """Rounded descending timesteps made strictly descending within [0, k−1], moving each the least.

    In ascending order u_j: u_j ← max(u_j, u_{j−1} + 1) (a cumulative max of u_j − j), then
    u_j ← min(u_j, k − n + j). Both are strictly increasing, so their minimum is too.
    """
    n = t.shape[0]
    j = jnp.arange(n, dtype=jnp.int32)
    u = jnp.clip(t[::-1], 0, k - 1).astype(jnp.int32)
    u = jax.lax.cummax(u - j) + j
    return jnp.minimum(u, k - n + j)[::-1]


def timesteps(sched: Schedule, num_steps: int, spacing: str, *, k: int | None = None,
              rho: float = KARRAS_RHO, lambda_min: float | None = LAMBDA_MIN_CLIPPED) -> jnp.ndarray:
    """The `num_steps` integer timesteps (int32, strictly descending) a solver evaluates from x_k.

    k (paper index, default T) limits the plan to timesteps 0..k−1 (partial denoising).
    logsnr and karras start at λ = max(λ(k−1), lambda_min) (None: λ(k−1)): the start x_k, pure
    noise there, is then taken as x at that timestep, as diffusers' `lambda_min_clipped`.
    time_uniform: round(linspace(0, k−1, N+1))[::-1][:-1] (diffusers' "linspace"; ends above 0).
    logsnr:       λ uniform from λ(k−1) to λ(0) (Lu et al. 2022, §4 / App. D; diffusers'
                  `use_lu_lambdas`).
    karras:       σ̃_i = (σ̃_max^{1/ρ} + i/(N−1) (σ̃_min^{1/ρ} − σ̃_max^{1/ρ}))^ρ (Karras eq. (5)),
                  σ̃_max = σ̃(k−1), σ̃_min = σ̃(0).
    logsnr and karras are mapped to t through the log-σ̃ table and rounded (module docstring).
    """
    T = sched.num_timesteps
    k = T if k is None else int(k)
    n = check_steps(num_steps, k, spacing)
    if spacing == "time_uniform":
        ts = np.round(np.linspace(0, k - 1, n + 1))[::-1][:-1].copy()
        return _distinct(jnp.asarray(ts, jnp.int32), k)
    log_sigmas = log_sigma_table(sched)[:k]
    lo, hi = log_sigmas[0], log_sigmas[k - 1]
    if lambda_min is not None:  # log σ̃ = −λ
        hi = jnp.minimum(hi, -lambda_min)
    ramp = jnp.linspace(0.0, 1.0, n, dtype=log_sigmas.dtype)
    if spacing == "logsnr":
        target = hi + ramp * (lo - hi)
    else:
        inv = 1.0 / rho
        target = rho * jnp.log(jnp.exp(hi * inv) + ramp * (jnp.exp(lo * inv) - jnp.exp(hi * inv)))
    return _distinct(jnp.round(t_from_log_sigma(log_sigmas, target)).astype(jnp.int32), k)


def check_steps(num_steps, k: int, spacing: str) -> int:
    """num_steps as an int in 1..k and a known spacing, else a one-line ValueError."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown solver spacing={spacing!r}; choose one of {', '.join(SPACINGS)}.")
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= k:
        raise ValueError(f"num_steps={num_steps!r} must be an int in 1..{k} (the timesteps left) for a "
                         "few-step solver; e.g. num_steps=20 (NFE 20; Heun: 2N − 1).")
    return int(num_steps)


def dpmpp_orders(num_steps: int, order: int) -> np.ndarray:
    """The order of each multistep step: min(order, i + 1), lower-order final steps.

    As diffusers' `lower_order_final`: the last step (to σ = 0, λ = ∞) is first order, and for
    fewer than 15 steps the one before it at most second order (Lu et al. 2022, App. D).
    """
    if isinstance(order, bool) or order not in range(1, MAX_ORDER + 1):
        raise ValueError(f"solver order={order!r} must be 1, 2 or {MAX_ORDER} (DPM-Solver++ multistep).")
    n = int(num_steps)
    orders = np.minimum(order, np.arange(1, n + 1))
    orders[-1] = 1
    if 2 <= n < 15:
        orders[-2] = min(orders[-2], 2)
    return orders.astype(np.int32)


# ---- Single steps ---------------------------------------------------------------------------

def dpmpp_step(x, d0, d1, d2, *, alpha_t, sigma_s, sigma_t, lam_s, lam_t, lam_1, lam_2, order,
               noise=None, d2_weight: float = 2.0):
    """One DPM-Solver++ multistep update of x from λ_s to λ_t (Lu et al. 2022, Alg. 2 and App. B).

    d0, d1, d2 = x̂_0 at λ_s, λ_1, λ_2 (the current and the two previous points); h = λ_t − λ_s,
    r0 = (λ_s − λ_1)/h, r1 = (λ_1 − λ_2)/h, and, as the 3rd-order multistep solver of Lu et
    al. (App. B; diffusers' `multistep_dpm_solver_third_order_update`),
        D1_0 = (d0 − d1)/r0,  D1_1 = (d1 − d2)/r1,
        D1 = D1_0 + r0/(r0 + r1) (D1_0 − D1_1),  D2 = (D1_0 − D1_1)/(r0 + r1)
    (order 2: D1 = D1_0, D2 = 0; order 1: both 0 — DDIM).
    ODE (noise None), order 3, with φ_2 = (e^{−h} − 1 + h)/h² − ½:
        x_t = (σ_t/σ_s) x − α_t(e^{−h} − 1) d0 + α_t((e^{−h} − 1)/h + 1) D1 − 2 α_t φ_2 D2.
    Why 2: the Taylor term of eq. (8) is σ_t ∫ e^λ (λ − λ_s)²/2 x̂_0'' dλ = −α_t φ_2 h² x̂_0'', and
    D2 ≈ h² x̂_0''/2 for any step ratios. `d2_weight=1.0` is the update of diffusers'
    `multistep_dpm_solver_third_order_update` (and dpm-solver's code): it matches them to
    rounding, but its local error is O(h³), so the solve is then 2nd order
    (tests/test_solvers.py measures both).
    order 2 (DPM-Solver++(2M), Alg. 2): x_t = (σ_t/σ_s) x − α_t(e^{−h} − 1)(d0 + D1_0/2).
    SDE (SDE-DPM-Solver++(2M), Lu et al. 2022 App. B, order ≤ 2):
        x_t = (σ_t/σ_s) e^{−h} x + α_t(1 − e^{−2h})(d0 + D1/2) + σ_t √(1 − e^{−2h}) z.
    λ_t = +∞ (σ_t = 0) is allowed at order 1: then x_t = α_t d0.
    `order` may be traced (an int array): every order is computed and one selected.
    """
    h = lam_t - lam_s
    finite = jnp.isfinite(h)
    h_ = jnp.where(finite, h, 1.0)  # higher orders never run at λ_t = ∞ (`dpmpp_orders`)
    r0 = (lam_s - lam_1) / h_
    r1 = (lam_1 - lam_2) / h_
    D1_0 = (d0 - d1) / r0
    D1_1 = (d1 - d2) / r1
    third = order >= 3
    D1 = jnp.where(third, D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1), D1_0)
    D2 = jnp.where(third, (D1_0 - D1_1) / (r0 + r1), 0.0)
    D1 = jnp.where(order >= 2, D1, 0.0)
    em1 = jnp.expm1(-h)  # e^{−h} − 1, −1 at h = ∞
    ratio = sigma_t / sigma_s
    if noise is None:
        # D1's weight: −½(e^{−h} − 1) at order 2 (Alg. 2), (e^{−h} − 1)/h + 1 at order 3 (App. B).
        phi1 = jnp.where(third, jnp.where(finite, jnp.expm1(-h_) / h_ + 1.0, 1.0), -0.5 * em1)
        phi2 = jnp.where(finite, (jnp.expm1(-h_) + h_) / h_ ** 2 - 0.5, 0.0)
        return ratio * x - alpha_t * em1 * d0 + alpha_t * phi1 * D1 - d2_weight * alpha_t * phi2 * D2
    one_m_e2h = -jnp.expm1(-2.0 * h)  # 1 − e^{−2h}
    return (ratio * jnp.exp(-h) * x + alpha_t * one_m_e2h * (d0 + 0.5 * D1)
            + sigma_t * jnp.sqrt(one_m_e2h) * noise)


def heun_step(denoise: Denoise, x_tilde, sigma, sigma_next, t_next, alpha_next, d):
    """One step of Karras et al. 2022, Alg. 1 (η = 0) from σ̃ to σ̃_next > 0, given d = dx̃/dσ̃ at σ̃.

    Euler predictor x̃' = x̃ + (σ̃_next − σ̃) d (line 5), then the trapezoidal corrector with
    d' = (x̃' − D(x̃'; σ̃_next))/σ̃_next (lines 7–8); D is queried at x = α_next x̃', t_next.
    """
    dsig = sigma_next - sigma
    x_pred = x_tilde + dsig * d
    d_next = (x_pred - denoise(alpha_next * x_pred, t_next)) / sigma_next
    return x_tilde + dsig * 0.5 * (d + d_next)


# ---- Steppers and registry entries ------------------------------------------------------------

def dpmpp_stepper(denoise: Denoise, sched: Schedule, ts: jnp.ndarray, *, order: int,
                  noise_fn: NoiseFn | None = None, d2_weight: float = 2.0) -> Stepper:
    """DPM-Solver++(order M) over the timesteps `ts` (from `timesteps`), then to x_0.

    denoise(x, t) → x̂_0 (clipped or not: the caller decides), x in the VP scale at timestep t.
    noise_fn(t) → the standard normal z of the step at timestep t: given, the SDE variant
    (SDE-DPM-Solver++(2M)); None, the ODE solver.
    d2_weight: the 3rd-order term's weight (`dpmpp_step`; 1.0 reproduces diffusers' 3M).
    """
    n = int(ts.shape[0])
    alpha, sigma = vp_grid(sched, ts)
    lam = jnp.log(alpha) - jnp.log(sigma)  # +∞ at the terminal point (σ = 0)
    orders = jnp.asarray(dpmpp_orders(n, order))
    lam_pad = jnp.concatenate([lam[:1] + 2.0, lam[:1] + 1.0, lam[:-1]])  # λ_{i−2}, λ_{i−1} (unused at i < 2)
    xs = dict(t=ts, order=orders, alpha_t=alpha[1:], sigma_s=sigma[:-1], sigma_t=sigma[1:],
              lam_s=lam[:-1], lam_t=lam[1:], lam_1=lam_pad[1:-1], lam_2=lam_pad[:-2])

    def init(x):
        z = jnp.zeros_like(x)
        return (x, z, z, z)

    def step(state, c):
        x, _, d1, d2 = state
        d0 = denoise(x, c["t"])
        noise = None if noise_fn is None else noise_fn(c["t"]).astype(x.dtype)
        x = dpmpp_step(x, d0, d1, d2, alpha_t=c["alpha_t"], sigma_s=c["sigma_s"], sigma_t=c["sigma_t"],
                       lam_s=c["lam_s"], lam_t=c["lam_t"], lam_1=c["lam_1"], lam_2=c["lam_2"],
                       order=c["order"], noise=noise, d2_weight=d2_weight)
        return (x, d0, d0, d1)

    return Stepper(init, step, lambda s: (s[0], s[1]), xs, t_next_of(ts), n)


def heun_stepper(denoise: Denoise, sched: Schedule, ts: jnp.ndarray) -> Stepper:
    """Karras Alg. 1 on σ̃ = σ/α over `ts`, then an Euler step to σ̃ = 0 (NFE 2N − 1); the state
    stays in the VP scale x = α x̃ (x_0 at σ̃ = 0)."""
    alpha, sigma = vp_grid(sched, ts)
    t_next = t_next_of(ts)
    sig_tilde = sigma / alpha
    xs = dict(t=ts, t_next=jnp.maximum(t_next, 0), last=t_next < 0, alpha_s=alpha[:-1],
              alpha_t=alpha[1:], sig_s=sig_tilde[:-1], sig_t=sig_tilde[1:])

    def step(state, c):
        x, _ = state
        x_tilde = x / c["alpha_s"]
        x0 = denoise(x, c["t"])
        d = (x_tilde - x0) / c["sig_s"]
        x_tilde = jax.lax.cond(
            c["last"],
            lambda: x0,  # Euler to σ̃ = 0: x̃ + (0 − σ̃) d = x̂_0 (line 5, no correction: line 6)
            lambda: heun_step(denoise, x_tilde, c["sig_s"], c["sig_t"], c["t_next"], c["alpha_t"], d))
        return (c["alpha_t"] * x_tilde, x0)

    return Stepper(lambda x: (x, jnp.zeros_like(x)), step, lambda s: s, xs, t_next, 2 * int(ts.shape[0]) - 1)


def plan(sched: Schedule, k: int, num_steps: int, spacing: str) -> jnp.ndarray:
    """The registry's plan of every method laid out by `timesteps` (the first k timesteps)."""
    return timesteps(sched, num_steps, spacing, k=k)


def denoiser(process: GaussianDiffusion, model_fn: ModelFn) -> Denoise:
    """denoise(x, t) = x̂_0 of the network at (x, t), clipped as the process says."""
    return lambda x, t: process.denoise(model_fn(x, t), x, t)


DEFAULT_STEPS = 20  # `sampling.steps = 0`: 20 timesteps (NFE 20; Heun 39)


def _dpmpp_entry(name: str, order: int, sde: bool) -> Method:
    def stepper(process, model_fn, ts, noise_fn, eta):
        return dpmpp_stepper(denoiser(process, model_fn), process.sched, ts, order=order,
                             noise_fn=noise_fn if sde else None)

    return Method(name, order, SPACINGS, "logsnr", DEFAULT_STEPS, None, lambda n: int(n), plan, stepper)


ENTRIES = (
    _dpmpp_entry("dpmpp_2m", 2, sde=False),
    _dpmpp_entry("dpmpp_3m", 3, sde=False),
    _dpmpp_entry("sde_dpmpp_2m", 2, sde=True),
    Method("heun", 2, SPACINGS, "karras", DEFAULT_STEPS, None, lambda n: 2 * int(n) - 1, plan,
           lambda process, model_fn, ts, noise_fn, eta: heun_stepper(denoiser(process, model_fn),
                                                                     process.sched, ts)),
)
