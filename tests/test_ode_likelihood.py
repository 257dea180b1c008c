"""The probability-flow ODE likelihood (evaluation/ode_likelihood.py): Gaussian data with the optimal
model against the closed form (eps, x0 and v models), the Hutchinson–Skilling estimator against
the exact trace, dequantisation, config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, schedules
from ddpm_jax.sampling.base import log_sigma_table
from ddpm_jax.evaluation import ode_likelihood as ol
from ddpm_jax.schedules import Schedule

T, MU, S = 1000, 0.3, 0.5  # data N(μ, s² I)


def _sched64(betas) -> Schedule:
    abar = np.cumprod(1.0 - betas)
    return Schedule.from_betas(betas).replace(log_alphas_cumprod=jnp.asarray(np.log(abar)),
                                              log_one_minus_alphas_cumprod=jnp.asarray(np.log1p(-abar)))


def _optimal_model(sched, pred):
    """The optimal network of N(μ, s²) data at a fractional t: σ̃(t) from the log-σ̃ table."""
    log_sig = log_sigma_table(sched)

    def apply_fn(params, x, t):
        sig = jnp.exp(jnp.interp(t[0], jnp.arange(T, dtype=x.dtype), log_sig))
        alpha = 1.0 / jnp.sqrt(1.0 + sig ** 2)
        x_tilde = x / alpha
        eps = sig * (x_tilde - MU) / (S ** 2 + sig ** 2)
        x0 = MU + S ** 2 / (S ** 2 + sig ** 2) * (x_tilde - MU)
        return {"eps": eps, "x0": x0, "v": alpha * eps - sig * alpha * x0}[pred]

    return apply_fn


@pytest.mark.parametrize("pred", ["eps", "x0", "v"])
def test_gaussian_log_likelihood_matches_closed_form(pred):
    betas = schedules.get_betas("linear", T)
    x = MU + S * np.random.default_rng(0).standard_normal((3, 4))
    with jax.enable_x64(True):
        sched = _sched64(betas)
        probe = jax.random.rademacher(jax.random.key(0), x.shape, jnp.float64)
        process = diffusion.GaussianDiffusion(sched, pred=pred)
        out = ol.ode_log_likelihood(_optimal_model(sched, pred), None, process, jnp.asarray(x), probe, steps=200)
        log_sig = np.asarray(log_sigma_table(sched))
    s_min, s_max = np.exp(log_sig[0]), np.exp(log_sig[-1])
    # The flow keeps (x̃ − μ)/√(s² + σ̃²) fixed: x̃_T = μ + r (x − μ), log|det| = D log r.
    r = np.sqrt((S ** 2 + s_max ** 2) / (S ** 2 + s_min ** 2))
    x_T = MU + r * (x - MU)
    var = 1.0 + s_max ** 2
    want = -0.5 * (np.sum(x_T ** 2, axis=1) / var + 4 * np.log(2 * np.pi * var)) + 4 * np.log(r)
    np.testing.assert_allclose(np.asarray(out["x_T"]), x_T, rtol=2e-6)  # RK4, 200 steps: ~2e-7
    np.testing.assert_allclose(np.asarray(out["log_p"]), want, rtol=2e-6)
    # ... which is, as the schedule ends in noise, the data's own density at σ̃_min.
    near = -0.5 * np.sum((x - MU) ** 2, axis=1) / (S ** 2 + s_min ** 2) - 2 * np.log(2 * np.pi * (S ** 2 + s_min ** 2))
    np.testing.assert_allclose(np.asarray(out["log_p"]), near, atol=1e-2)  # up to the prior's O(1/σ̃_max²)


def test_hutchinson_estimates_the_trace():
    a = np.random.default_rng(1).standard_normal((6, 6))
    f = lambda x: x @ jnp.asarray(a.T, jnp.float32)  # noqa: E731  (per example: J = a)
    x = jnp.ones((4000, 6), jnp.float32)
    v = jax.random.rademacher(jax.random.key(2), x.shape, jnp.float32)
    _, est = ol.drift_and_divergence(f, x, v, "hutchinson")
    _, exact = ol.drift_and_divergence(f, x[:2], None, "exact")
    np.testing.assert_allclose(np.asarray(exact), np.trace(a), rtol=1e-5)
    est = np.asarray(est)
    assert abs(est.mean() - np.trace(a)) < 4 * est.std() / np.sqrt(len(est))
    assert est.std() > 0.1  # off-diagonal terms make single probes noisy ...
    diag = lambda x: x * jnp.arange(1.0, 7.0)  # noqa: E731
    _, d = ol.drift_and_divergence(diag, x[:5], v[:5], "hutchinson")
    np.testing.assert_allclose(np.asarray(d), 21.0, rtol=1e-6)  # ... a diagonal Jacobian none (v_i² = 1)
    with pytest.raises(ValueError, match="trace='gauss'"):
        ol.drift_and_divergence(f, x, v, "gauss")


def test_dequantize_stays_in_its_bin():
    k = np.random.default_rng(3).integers(0, 256, (5, 2, 2, 1)).astype(np.uint8)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(5))
    y, probe = ol.dequantize(jnp.asarray(k), keys)
    y = np.asarray(y)
    assert np.all(y >= -1) and np.all(y < 1)
    np.testing.assert_array_equal(np.floor((y + 1) * 128).astype(np.uint8), k)
    assert set(np.unique(np.asarray(probe))) == {-1.0, 1.0}
    assert ol.bits_per_dim(0.0, 10) == 7.0


def test_bad_input_one_line_errors():
    from configs import digits
    from ddpm_jax import checks

    sched = Schedule.from_betas(schedules.get_betas("linear", 10, beta_end=0.3))
    with pytest.raises(ValueError, match="steps=0"):
        ol.ode_log_likelihood(lambda p, x, t: x, None, diffusion.GaussianDiffusion(sched), jnp.zeros((1, 2)),
                              jnp.ones((1, 2)), steps=0)
    for field, value, needle in [("bpd_method", "elbo", "eval.bpd_method='elbo'"),
                                 ("ode_steps", 0, "eval.ode_steps=0"), ("ode_trace", "gauss", "eval.ode_trace")]:
        config = digits.get_config()
        config.eval.bpd_method = "ode"
        config.eval[field] = value
        with pytest.raises(ValueError) as err:
            checks.check_ode_bpd(config.eval)
        assert needle in str(err.value) and "\n" not in str(err.value)
