"""Beta schedules and the Schedule tables, against formulas written out independently here."""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import schedules
from ddpm_jax.schedules import Schedule

FIELDS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
          "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
          "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
          "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
          "fixedlarge_log_variance", "log_alphas_cumprod")


# ---- get_betas: every schedule at a few points -------------------------------------------------

@pytest.mark.parametrize("T", [1000, 37])
def test_linear_matches_paper_formula(T):
    b = schedules.get_betas("linear", T, beta_start=1e-4, beta_end=0.02)
    assert b.dtype == np.float64 and b.shape == (T,)
    for t in (0, 1, T // 2, T - 1):
        assert b[t] == pytest.approx(1e-4 + (0.02 - 1e-4) * t / (T - 1), rel=1e-13)


def test_quadratic():
    T, s, e = 200, 1e-4, 0.02
    b = schedules.get_betas("quadratic", T, beta_start=s, beta_end=e)
    for t in (0, 3, 100, T - 1):
        root = math.sqrt(s) + (math.sqrt(e) - math.sqrt(s)) * t / (T - 1)
        assert b[t] == pytest.approx(root * root, rel=1e-12)
    assert np.all(np.diff(b) > 0)


def test_cosine_follows_alpha_bar_and_is_capped():
    T, s = 1000, 0.008
    b = schedules.get_betas("cosine", T)
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 1, 500, 900):
        assert b[t] == pytest.approx(1 - f(t + 1) / f(t), rel=1e-10)
    # Uncapped region: ᾱ_t = f(t + 1) / f(0) (Nichol & Dhariwal eq. (17)).
    abar = np.cumprod(1 - b)
    assert abar[899] == pytest.approx(f(900) / f(0), rel=1e-9)
    # f(T) = cos²(π/2) = 0 would give β = 1 at the end: capped at max_beta = 0.999.
    assert b[-1] == 0.999 and b.max() <= 0.999
    assert schedules.get_betas("cosine", T, max_beta=0.5).max() == 0.5


def test_sigmoid():
    T, s, e = 101, 1e-4, 0.02
    b = schedules.get_betas("sigmoid", T, beta_start=s, beta_end=e)
    for t in (0, 10, 50, 100):
        z = -6 + 12 * t / (T - 1)
        assert b[t] == pytest.approx(s + (e - s) / (1 + math.exp(-z)), rel=1e-12)
    assert b[50] == pytest.approx((s + e) / 2, rel=1e-12)  # sigmoid(0) = 1/2
    assert b[0] + b[-1] == pytest.approx(s + e, rel=1e-12)  # σ(−z) + σ(z) = 1


def test_const_and_jsd():
    np.testing.assert_array_equal(schedules.get_betas("const", 7, beta_end=0.3), np.full(7, 0.3))
    jsd = schedules.get_betas("jsd", 10)
    np.testing.assert_allclose(jsd, [1 / (10 - t) for t in range(10)], rtol=1e-14)
    assert jsd[0] == pytest.approx(0.1) and jsd[-1] == 1.0


@pytest.mark.parametrize("name, frac", [("warmup10", 0.1), ("warmup50", 0.5)])
def test_warmup(name, frac):
    T, s, e = 1000, 1e-4, 0.02
    b = schedules.get_betas(name, T, beta_start=s, beta_end=e)
    w = int(T * frac)
    assert b[0] == s and b[w - 1] == pytest.approx(e, rel=1e-12)
    assert b[w // 2] == pytest.approx(s + (e - s) * (w // 2) / (w - 1), rel=1e-12)
    np.testing.assert_array_equal(b[w:], e)


def test_bad_names_and_parameters_raise_naming_the_fix():
    with pytest.raises(ValueError, match="unknown beta schedule 'lin'.*linear.*cosine.*warmup50"):
        schedules.get_betas("lin", 10)
    with pytest.raises(ValueError, match="num_timesteps"):
        schedules.get_betas("linear", 0)
    with pytest.raises(ValueError, match="num_timesteps"):
        schedules.get_betas("linear", 10.5)
    with pytest.raises(ValueError, match=r"beta_end=1.5 must lie in \(0, 1\]"):
        schedules.get_betas("linear", 10, beta_end=1.5)
    with pytest.raises(ValueError, match="beta_start=0"):
        schedules.get_betas("quadratic", 10, beta_start=0.0)
    with pytest.raises(ValueError, match="max_beta"):
        schedules.get_betas("cosine", 10, max_beta=0.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        Schedule.from_betas(np.array([0.1, 1.2]))
    with pytest.raises(ValueError, match="1-D"):
        Schedule.from_betas(np.ones((2, 2)) * 0.1)


# ---- Schedule tables ---------------------------------------------------------------------------

def _reference_tables(b):
    """Every table in float64, written from the paper's definitions (eq. (4), (6), (7))."""
    T = len(b)
    a = 1 - b
    abar = np.array([np.prod(a[: t + 1]) for t in range(T)])
    abar_prev = np.array([1.0] + list(abar[:-1]))
    # β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)  (eq. (7))
    post_var = b * (1 - abar_prev) / (1 - abar)
    return dict(
        betas=b, alphas_cumprod=abar, alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=abar ** 0.5, sqrt_one_minus_alphas_cumprod=(1 - abar) ** 0.5,
        log_one_minus_alphas_cumprod=np.log(1 - abar), sqrt_recip_alphas_cumprod=abar ** -0.5,
        sqrt_recipm1_alphas_cumprod=(1 / abar - 1) ** 0.5, posterior_variance=post_var,
        posterior_log_variance_clipped=np.log(np.r_[post_var[1], post_var[1:]]),
        posterior_mean_coef1=b * abar_prev ** 0.5 / (1 - abar),
        posterior_mean_coef2=(1 - abar_prev) * a ** 0.5 / (1 - abar),
        fixedlarge_log_variance=np.log(np.r_[post_var[1], b[1:]]), log_alphas_cumprod=np.log(abar))


@pytest.mark.parametrize("name", ["linear", "cosine", "quadratic", "warmup10"])
def test_tables_are_float64_math_cast_once_to_float32(name):
    b = schedules.get_betas(name, 1000)
    sched = Schedule.from_betas(b)
    ref = _reference_tables(b)
    assert sched.num_timesteps == 1000
    for f in FIELDS:
        table = getattr(sched, f)
        assert table.dtype == jnp.float32 and table.shape == (1000,), f
        # Each float32 entry is the correctly rounded float64 value (within one float32 ulp of
        # our independent product-based reference).
        np.testing.assert_allclose(np.asarray(table, np.float64), ref[f], rtol=2.5e-7, atol=0, err_msg=f)
    # A float32 cumulative product drifts away from it; the table does not.
    f32_cumprod = np.cumprod((1 - b).astype(np.float32), dtype=np.float32)
    err_table = np.max(np.abs(np.asarray(sched.alphas_cumprod, np.float64) / ref["alphas_cumprod"] - 1))
    err_f32 = np.max(np.abs(f32_cumprod / ref["alphas_cumprod"] - 1))
    assert err_table < 1e-7 < err_f32


def test_posterior_is_bayes_rule_of_forward_steps():
    """μ̃_t and β̃_t (eq. (7)) equal the product of q(x_t|x_{t−1}) and q(x_{t−1}|x_0), normalised."""
    b = schedules.get_betas("linear", 1000)
    sched = Schedule.from_betas(b)
    a, abar = 1 - b, np.cumprod(1 - b)
    x0, xt = 0.7, -0.3
    for t in (1, 10, 500, 999):
        # Precision-weighted combination of N(x_t; √α_t x, β_t) and N(x; √ᾱ_{t−1} x0, 1 − ᾱ_{t−1}).
        prec = a[t] / b[t] + 1 / (1 - abar[t - 1])
        mean = (np.sqrt(a[t]) * xt / b[t] + np.sqrt(abar[t - 1]) * x0 / (1 - abar[t - 1])) / prec
        assert float(sched.posterior_variance[t]) == pytest.approx(1 / prec, rel=1e-6)
        got = float(sched.posterior_mean_coef1[t]) * x0 + float(sched.posterior_mean_coef2[t]) * xt
        assert got == pytest.approx(mean, rel=1e-6, abs=1e-7)
    # t = 0: the posterior is a point mass at x0 (β̃ = 0, μ̃ = x0); its log is clipped to log β̃_1.
    assert float(sched.posterior_variance[0]) == 0.0
    assert float(sched.posterior_mean_coef1[0]) == pytest.approx(1.0)
    assert float(sched.posterior_mean_coef2[0]) == 0.0
    log_post1 = np.log(float(sched.posterior_variance[1]))
    assert float(sched.posterior_log_variance_clipped[0]) == pytest.approx(log_post1, rel=1e-6)
    assert float(sched.fixedlarge_log_variance[0]) == float(sched.posterior_log_variance_clipped[0])
    np.testing.assert_allclose(np.asarray(sched.fixedlarge_log_variance[1:]), np.log(b[1:]), rtol=1e-6)


def test_schedule_is_a_pytree_usable_under_jit():
    sched = Schedule.from_betas(schedules.get_betas("linear", 50))
    assert len(jax.tree.leaves(sched)) == len(FIELDS)

    @jax.jit
    def f(s):
        return s.alphas_cumprod[s.num_timesteps - 1] * 2.0

    assert float(f(sched)) == pytest.approx(2 * float(sched.alphas_cumprod[-1]))
    doubled = jax.tree.map(lambda x: x * 2, sched)
    assert isinstance(doubled, Schedule) and doubled.num_timesteps == 50


def test_jsd_reaches_exact_noise():
    sched = Schedule.from_betas(schedules.get_betas("jsd", 20))
    assert float(sched.alphas_cumprod[-1]) == 0.0  # β_T = 1
    want = [(19 - t) / 20 for t in range(19)]  # Π_{s≤t} (1 − 1/(20 − s)) telescopes
    np.testing.assert_allclose(np.asarray(sched.alphas_cumprod[:-1]), want, rtol=1e-6)


def test_tiny_T():
    sched = Schedule.from_betas(np.array([0.5]))
    assert sched.num_timesteps == 1 and np.isfinite(float(sched.posterior_log_variance_clipped[0]))


# ---- Does the schedule reach noise? -------------------------------------------------------------

def test_alpha_bar_final():
    b = schedules.get_betas("linear", 1000)
    assert schedules.alpha_bar_final(b) == pytest.approx(np.exp(np.sum(np.log1p(-b))), rel=1e-12)
    assert schedules.alpha_bar_final(b) == pytest.approx(4.04e-5, rel=0.01)


def test_warn_if_not_noise(caplog):
    short = schedules.get_betas("linear", 100, beta_start=1e-4, beta_end=0.02)
    abar_T = schedules.alpha_bar_final(short)
    assert 0.35 < abar_T < 0.37
    with caplog.at_level(logging.WARNING):
        assert schedules.warn_if_not_noise(short) is True
    msg = caplog.text
    assert f"{abar_T:.4g}" in msg and "num_timesteps" in msg and "beta_end" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert schedules.warn_if_not_noise(schedules.get_betas("linear", 1000)) is False
        assert schedules.warn_if_not_noise(schedules.get_betas("cosine", 1000)) is False
    assert caplog.text == ""
    # The threshold is a parameter: ᾱ_T ≈ 4e-5 is "not noise" at 1e-5.
    assert schedules.warn_if_not_noise(schedules.get_betas("linear", 1000), threshold=1e-5) is True
