"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
§3 and App. C): power-function EMA profiles tracked in training, and their least-squares combination.

A power-function EMA of exponent γ averages the iterates θ_τ with weight ∝ τ^γ up to the current
step t, the profile (App. C.1)

    p_{t,γ}(τ) = (γ + 1) τ^γ / t^(γ+1),   0 ≤ τ ≤ t,                                       (C.1)

whose width relative to t is

    σ_rel² = (γ + 1) / ((γ + 2)² (γ + 3))                                                   (eq. 3)

so γ is the largest real root of σ² γ³ + 7σ² γ² + (16σ² − 1) γ + (12σ² − 1) = 0. Tracked step by step
(t counts the updates applied, from 1) it is an EMA with a decay that grows with t (eq. 4):

    θ̂_t = β_t θ̂_{t−1} + (1 − β_t) θ_t,   β_t = (1 − 1/t)^(γ+1)                               (eq. 4)

(1 − β_t is computed as −expm1((γ+1) log1p(−1/t)): exact in float32 long after 1 − 1/t rounds.)

Reconstruction (App. C.3): snapshots θ̂_i of profiles (t_i, γ_i) are combined with the weights x that
bring Σ_i x_i p_{t_i,γ_i} closest in L2 to a target profile p_{t,γ}: the normal equations A x = b with
the profiles' inner products

    ⟨p_{t_a,γ_a}, p_{t_b,γ_b}⟩ = (γ_a+1)(γ_b+1) / ((γ_a+γ_b+1) t_b) (t_a/t_b)^γ_b,   t_a ≤ t_b      (C.3)

solved by least squares in float64. The fit's relative L2 residual says whether the stored profiles
can represent the target at all.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

# A target whose best fit leaves more than this relative L2 residual is not represented by the snapshots.
MAX_RESIDUAL = 0.05
_SIGMA_REL_GRID = np.geomspace(1e-3, 0.5, 400)  # where the representable range of σ_rel is looked for


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """γ of a relative width σ_rel (eq. 3): the largest real root of its cubic; ValueError if none > −1."""
    s2 = float(sigma_rel) ** 2
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1]) if s2 > 0 else np.array([])
    real = [float(r.real) for r in roots if abs(r.imag) < 1e-9 and r.real > -1]
    if not real:
        raise ValueError(f"ema.sigma_rel={sigma_rel}: no power-function EMA has this relative width; "
                         "use a value in (0, 0.28].")
    return max(real)


def sigma_rel_from_gamma(gamma: float) -> float:
    """σ_rel of a profile exponent γ (eq. 3)."""
    g = float(gamma)
    return float(np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))))


def sigma_rel_of_decay(decay: float, num_steps: int) -> float:
    """The σ_rel of a fixed-decay EMA after `num_steps` steps: its geometric weights' std √β/(1 − β), over t."""
    return float(np.sqrt(decay) / (1.0 - decay) / num_steps)


def parse_sigma_rels(value: Any, field: str) -> tuple[float, ...]:
    """σ_rel values of a config field (a float, a comma list or a sequence), each checked by eq. 3."""
    items = value.split(",") if isinstance(value, str) else (value if isinstance(value, (tuple, list)) else [value])
    try:
        out = tuple(float(v) for v in items if str(v).strip())
    except ValueError as err:
        raise ValueError(f"{field}={value!r} is not a list of numbers; write e.g. 0.05,0.1.") from err
    for s in out:
        if not 0 < s:
            raise ValueError(f"{field}={value!r}: σ_rel must be > 0 (e.g. 0.05,0.1).")
        gamma_from_sigma_rel(s)
    return out


# ---- tracking (eq. 4) ------------------------------------------------------------------------------


@flax.struct.dataclass
class Profiles:
    """The tracked power-function EMAs: exponents γ [k] and one params tree per profile."""

    gammas: jnp.ndarray  # float32 [k]
    ema_params: tuple  # k params trees


@flax.struct.dataclass
class Snapshot:
    """What a snapshot stores: the step t and the profiles θ̂ at t (saved like a train state)."""

    step: jnp.ndarray
    gammas: jnp.ndarray
    ema_params: tuple


def create(params: Any, sigma_rels: Sequence[float]) -> Profiles:
    """Profiles at step 0 (β_1 = 0: the first update replaces them by θ_1)."""
    gammas = jnp.asarray([gamma_from_sigma_rel(s) for s in sigma_rels], jnp.float32)
    return Profiles(gammas=gammas, ema_params=tuple(jax.tree.map(jnp.array, params) for _ in sigma_rels))


def abstract(params_template: Any, count: int) -> Profiles:
    """The restore target of `create` from the params' shapes, dtypes and shardings."""
    sharding = getattr(jax.tree.leaves(params_template)[0], "sharding", None)
    return Profiles(gammas=jax.ShapeDtypeStruct((count,), jnp.float32, sharding=sharding),
                    ema_params=tuple(params_template for _ in range(count)))


def one_minus_beta(t: jnp.ndarray, gamma: jnp.ndarray) -> jnp.ndarray:
    """1 − β_t of eq. 4 for t ≥ 1 updates applied, in float32."""
    t = jnp.asarray(t, jnp.float32)
    return -jnp.expm1((gamma + 1.0) * jnp.log1p(-1.0 / t))


def update(profiles: Profiles, params: Any, t: jnp.ndarray) -> Profiles:
    """θ̂ ← θ̂ + (1 − β_t)(θ − θ̂) for every profile (eq. 4); `t` counts the updates applied, this one included."""
    rates = one_minus_beta(t, profiles.gammas)
    new = tuple(jax.tree.map(lambda e, p, r=rates[i]: e + r.astype(e.dtype) * (p - e), ema, params)
                for i, ema in enumerate(profiles.ema_params))
    return profiles.replace(ema_params=new)


# ---- reconstruction (App. C.3) ----------------------------------------------------------------------


def profile_dot(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """⟨p_{t_a,γ_a}, p_{t_b,γ_b}⟩ of eq. C.3, broadcast, float64."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    lo, hi = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    gamma_hi = np.where(t_a <= t_b, gamma_b, gamma_a)  # the exponent of the longer profile
    return (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * hi) * (lo / hi) ** gamma_hi


def solve_weights(snap_t: Sequence[float], snap_gamma: Sequence[float], out_t: float, out_gammas: Sequence[float]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Weights x [n, m] of the n stored profiles for m targets at `out_t`, and each fit's relative L2 residual."""
    t, g = np.asarray(snap_t, np.float64), np.asarray(snap_gamma, np.float64)
    out_g = np.asarray(out_gammas, np.float64)
    gram = profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    rhs = profile_dot(t[:, None], g[:, None], np.float64(out_t), out_g[None, :])
    x = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    norm2 = profile_dot(out_t, out_g, out_t, out_g)
    err2 = norm2 - 2 * np.sum(x * rhs, axis=0) + np.einsum("im,ij,jm->m", x, gram, x)
    return x, np.sqrt(np.maximum(err2, 0.0) / norm2)


def representable_range(snap_t: Sequence[float], snap_gamma: Sequence[float], out_t: float
                        ) -> tuple[float, float] | None:
    """The smallest and largest σ_rel on a grid whose fit residual is at most MAX_RESIDUAL (None if none)."""
    gammas, sigmas = [], []
    for s in _SIGMA_REL_GRID:
        try:
            gammas.append(gamma_from_sigma_rel(s))
            sigmas.append(s)
        except ValueError:
            continue
    _, residual = solve_weights(snap_t, snap_gamma, out_t, gammas)
    ok = np.asarray(sigmas)[residual <= MAX_RESIDUAL]
    return (float(ok.min()), float(ok.max())) if ok.size else None


def check_representable(sigma_rels: Sequence[float], snap_t: Sequence[float], snap_gamma: Sequence[float],
                        out_t: float, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The weights [n, m] of `sigma_rels` and their fits' residuals [m] (`solve_weights`); a one-line
    ValueError for a σ_rel the snapshots cannot represent, naming the range they can."""
    x, residual = solve_weights(snap_t, snap_gamma, out_t, [gamma_from_sigma_rel(s) for s in sigma_rels])
    bad = [(s, r) for s, r in zip(sigma_rels, residual) if not r <= MAX_RESIDUAL]
    if bad:
        found = representable_range(snap_t, snap_gamma, out_t)
        span = "none" if found is None else f"[{found[0]:.3g}, {found[1]:.3g}]"
        tracked = sorted({round(sigma_rel_from_gamma(v), 4) for v in snap_gamma})
        raise ValueError(
            f"ema.sigma_rel={bad[0][0]:g}: the snapshots in {where} (profiles σ_rel {tracked}, steps "
            f"{int(min(snap_t))}..{int(max(snap_t))}) fit it only to {bad[0][1]:.1%} relative error; they represent "
            f"σ_rel in {span}: choose one there, or train with ema.sigma_rels around it and a smaller "
            "ema.snapshot_every.")
    return x, residual
