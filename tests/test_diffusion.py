"""Forward process, parameterisations, p(x_{t-1}|x_t), L_simple and the bits/dim pieces."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ddpm_jax import diffusion, schedules
from ddpm_jax.schedules import Schedule

GD = diffusion.GaussianDiffusion

T = 1000


@pytest.fixture(scope="module")
def sched():
    return Schedule.from_betas(schedules.get_betas("linear", T))


@pytest.fixture(scope="module")
def tables():
    b = schedules.get_betas("linear", T)
    abar = np.cumprod(1 - b)
    return dict(b=b, abar=abar, abar_prev=np.r_[1.0, abar[:-1]])


def _batch(shape, seed=0):
    """(x0, ε, t) as float32 / int32 jax arrays; drawn with NumPy (no per-op compiles)."""
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1, 1, shape).astype(np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    t = rng.integers(0, T, shape[0]).astype(np.int32)
    return jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)


def test_extract_shapes(sched):
    t = jnp.array([0, 5, 999])
    assert diffusion.extract(sched.betas, t, 4).shape == (3, 1, 1, 1)
    assert diffusion.extract(sched.betas, t, 2).shape == (3, 1)
    assert diffusion.extract(sched.betas, 7, 4).shape == (1, 1, 1, 1)
    np.testing.assert_array_equal(diffusion.extract(sched.betas, t, 2)[:, 0], sched.betas[t])


# ---- q(x_t | x_0) ------------------------------------------------------------------------------

def test_q_sample_is_eq4(sched, tables):
    x0, noise, t = _batch((6, 4, 4, 3))
    got = diffusion.q_sample(sched, x0, t, noise)
    a = tables["abar"][np.asarray(t)].reshape(-1, 1, 1, 1)
    want = np.sqrt(a) * np.asarray(x0, np.float64) + np.sqrt(1 - a) * np.asarray(noise, np.float64)
    np.testing.assert_allclose(got, want, atol=2e-6)


@pytest.mark.parametrize("t", [0, 50, 400, 999])
def test_q_sample_moments(sched, tables, t):
    n = 100_000
    x0 = jnp.array([-0.9, 0.0, 0.35, 1.0])
    noise = jnp.asarray(np.random.default_rng(t).standard_normal((n, 4)), jnp.float32)
    xt = np.asarray(diffusion.q_sample(sched, jnp.broadcast_to(x0, (n, 4)), jnp.full((n,), t), noise), np.float64)
    a = tables["abar"][t]
    mean_want, var_want = np.sqrt(a) * np.asarray(x0), 1 - a
    # 5 standard errors of the sample mean / variance of a Gaussian.
    np.testing.assert_array_less(np.abs(xt.mean(0) - mean_want), 5 * np.sqrt(var_want / n))
    np.testing.assert_array_less(np.abs(xt.var(0) - var_want), 5 * var_want * np.sqrt(2 / n))


def test_q_sample_marginal_matches_the_forward_chain(sched):
    """Running q(x_t | x_{t−1}) = N(√(1−β_t) x_{t−1}, β_t I) (eq. (2)) step by step gives eq. (4)."""
    n, steps = 50_000, 300
    betas = schedules.get_betas("linear", T)
    rng = np.random.default_rng(0)
    x0 = 0.6
    x = np.full((n,), x0)
    for s in range(steps):
        x = np.sqrt(1 - betas[s]) * x + np.sqrt(betas[s]) * rng.standard_normal(n)
    xt = np.asarray(diffusion.q_sample(sched, jnp.full((n,), x0), jnp.full((n,), steps - 1),
                                       jnp.asarray(rng.standard_normal(n), jnp.float32)))
    a = float(sched.alphas_cumprod[steps - 1])
    for sample in (x, xt):
        assert abs(sample.mean() - math.sqrt(a) * x0) < 5 * math.sqrt((1 - a) / n)
        assert abs(sample.var() - (1 - a)) < 5 * (1 - a) * math.sqrt(2 / n)


def test_q_posterior_matches_eq7(sched, tables):
    x0, noise, t = _batch((5, 3, 3, 2), seed=3)
    xt = diffusion.q_sample(sched, x0, t, noise)
    mean, var, log_var = diffusion.q_posterior(sched, x0, xt, t)
    b, ab, abp = (tables[k][np.asarray(t)].reshape(-1, 1, 1, 1) for k in ("b", "abar", "abar_prev"))
    want = (np.sqrt(abp) * b / (1 - ab)) * np.asarray(x0) + (np.sqrt(1 - b) * (1 - abp) / (1 - ab)) * np.asarray(xt)
    np.testing.assert_allclose(mean, want, atol=3e-6)
    np.testing.assert_allclose(var, b * (1 - abp) / (1 - ab), rtol=1e-6)
    assert var.shape == log_var.shape == (5, 1, 1, 1)


# ---- ε, x0, v ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(8, 4, 4, 3), (8, 2)])
def test_eps_x0_v_round_trips(sched, tables, shape):
    x0, noise, _ = _batch(shape, seed=4)
    t = jnp.array([0, 1, 10, 100, 300, 600, 900, T - 1])
    xt = diffusion.q_sample(sched, x0, t, noise)
    v = diffusion.v_target(sched, x0, t, noise)
    a = tables["abar"][np.asarray(t)].reshape((-1,) + (1,) * (len(shape) - 1))
    np.testing.assert_allclose(v, np.sqrt(a) * np.asarray(noise) - np.sqrt(1 - a) * np.asarray(x0), atol=2e-6)
    np.testing.assert_allclose(diffusion.x0_from_v(sched, xt, t, v), x0, atol=1e-5)
    np.testing.assert_allclose(diffusion.eps_from_v(sched, xt, t, v), noise, atol=1e-5)
    # Float32 round-off is amplified by the conversion: x0 from ε by 1/√ᾱ_t (≈ 160 at t = T−1),
    # ε from x0 by 1/√(1−ᾱ_t) (≈ 100 at t = 0). Bound each error by 1e-6 times that factor.
    tol_x0, tol_eps = 1e-6 * (1 + 1 / np.sqrt(a)), 1e-6 * (1 + 4 / np.sqrt(1 - a))
    assert np.all(np.abs(diffusion.x0_from_eps(sched, xt, t, noise) - x0) < tol_x0)
    assert np.all(np.abs(diffusion.eps_from_x0(sched, xt, t, x0) - noise) < tol_eps)
    for pred, out in (("eps", noise), ("x0", x0), ("v", v)):
        x0_hat, eps_hat = GD(sched, pred=pred).x0_and_eps(out, xt, t)
        assert np.all(np.abs(x0_hat - x0) < tol_x0), pred
        assert np.all(np.abs(eps_hat - noise) < tol_eps), pred
    with pytest.raises(ValueError, match="eps, x0, v"):
        GD(sched, pred="score")


# ---- p(x_{t−1} | x_t) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("pred", ["eps", "x0", "v"])
@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
def test_p_mean_variance(sched, tables, pred, var_type):
    x0, noise, t = _batch((6, 4, 4, 3), seed=5)
    t = t.at[0].set(0).at[1].set(1).at[2].set(T - 1)
    xt = diffusion.q_sample(sched, x0, t, noise)
    process = GD(sched, pred=pred, var_type=var_type, clip_x0=False)
    target = process.training_target(x0, t, noise)
    out = process.p_mean_variance(target, xt, t)
    b, ab, abp = (tables[k][np.asarray(t)].reshape(-1, 1, 1, 1) for k in ("b", "abar", "abar_prev"))
    # With the true target the mean is eq. (11): (x_t − β_t/√(1−ᾱ_t) ε) / √α_t.
    want_mean = (np.asarray(xt, np.float64) - b / np.sqrt(1 - ab) * np.asarray(noise)) / np.sqrt(1 - b)
    np.testing.assert_allclose(out["mean"], want_mean, atol=2e-5)
    np.testing.assert_allclose(out["pred_x0"][1:], x0[1:], atol=2e-3)
    post = b * (1 - abp) / (1 - ab)
    post1 = tables["b"][1] * (1 - tables["abar"][0]) / (1 - tables["abar"][1])
    var_want = b if var_type == "fixedlarge" else post
    np.testing.assert_allclose(out["variance"], var_want, rtol=1e-6)
    # Log-variance: β_t or β̃_t, but log β̃_1 at t = 0 in both cases (as the official code).
    log_want = np.log(np.where(np.asarray(t).reshape(-1, 1, 1, 1) == 0, post1, var_want))
    np.testing.assert_allclose(out["log_variance"], log_want, rtol=1e-6)


def test_p_mean_variance_clips_x0(sched):
    xt = jnp.full((2, 3), 0.5)
    t = jnp.array([10, 500])
    out = GD(sched, pred="x0", clip_x0=True).p_mean_variance(jnp.array([[3.0, -2.0, 0.2]] * 2), xt, t)
    np.testing.assert_array_equal(out["pred_x0"], np.float32([[1.0, -1.0, 0.2]] * 2))
    mean, _, _ = diffusion.q_posterior(sched, out["pred_x0"], xt, t)
    np.testing.assert_array_equal(out["mean"], mean)
    with pytest.raises(ValueError, match="fixedlarge, fixedsmall"):
        GD(sched, var_type="learnt")
    with pytest.raises(ValueError, match="2C channels"):  # 3 channels cannot hold mean and variance
        GD(sched, var_type="learned", loss="hybrid").p_mean_variance(xt, xt, t)


def test_jit_and_points(sched):
    f = jax.jit(lambda p, out, x, t: p.p_mean_variance(out, x, t)["mean"])
    x = jnp.ones((5, 2))
    assert f(GD(sched, pred="v"), x, x, jnp.arange(5)).shape == (5, 2)
    assert f(GD(sched, pred="v"), x, x, jnp.int32(3)).shape == (5, 2)


# ---- L_simple ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred", ["eps", "x0", "v"])
def test_loss_simple_is_zero_for_the_true_target(sched, pred):
    x0, _, _ = _batch((16, 4, 4, 3))

    def oracle(x_t, t):  # knows x0, so it can output the exact target for any (x_t, t)
        eps = diffusion.eps_from_x0(sched, x_t, t, x0)
        return GD(sched, pred=pred).training_target(x0, t, eps)

    loss = jax.jit(lambda p, x, k: p.loss_simple(oracle, x, k))(GD(sched, pred=pred), x0, jax.random.key(1))
    assert loss.shape == (16,)
    assert float(loss.max()) < 1e-6


def test_loss_simple_values_and_timestep_distribution(sched):
    x0, _, _ = _batch((4000, 3))
    seen = {}

    def zero_model(x_t, t):
        seen["t"] = np.asarray(t)
        return jnp.zeros_like(x_t)

    # Against a zero output the x0 loss is the per-example mean of x0²: exact, whatever t is.
    loss_x0 = GD(sched, pred="x0").loss_simple(zero_model, x0, jax.random.key(2))
    np.testing.assert_allclose(loss_x0, np.mean(np.asarray(x0) ** 2, axis=1), rtol=1e-6)
    # The ε loss is the mean of ε² ~ χ²_3 / 3: mean 1.
    loss_eps = GD(sched, pred="eps").loss_simple(zero_model, x0, jax.random.key(2))
    assert abs(float(loss_eps.mean()) - 1.0) < 5 * math.sqrt(2 / 3 / 4000)
    t = seen["t"]
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= T - 1
    # t ~ U{0..T−1}: mean (T−1)/2, and both ends are reached in 10 buckets of 100.
    assert abs(t.mean() - (T - 1) / 2) < 5 * T / math.sqrt(12 * 4000)
    counts = np.bincount(t // 100, minlength=10)
    assert stats.chisquare(counts).pvalue > 1e-4


# ---- Bits/dim pieces ------------------------------------------------------------------------------------

def test_normal_kl_closed_form():
    m1, m2 = np.array([0.0, 0.3, -1.0]), np.array([0.0, -0.2, 2.0])
    lv1, lv2 = np.array([0.0, -1.0, 2.0]), np.array([0.0, 0.5, -3.0])
    s1, s2 = np.exp(lv1 / 2), np.exp(lv2 / 2)
    want = np.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5
    np.testing.assert_allclose(diffusion.normal_kl(m1, lv1, m2, lv2), want, rtol=1e-5)
    assert float(diffusion.normal_kl(m1, lv1, m1, lv1).max()) == 0.0


@pytest.mark.parametrize("mean, log_scale", [(0.0, np.log(0.01)), (0.37, np.log(0.2)), (-0.99, np.log(0.003)),
                                             (1.0, np.log(2.0))])
def test_discretized_log_likelihood_is_a_distribution_over_256_bins(mean, log_scale):
    bins = np.linspace(-1, 1, 256).astype(np.float32)  # the pixel grid (2k/255 − 1)
    ll = diffusion.discretized_gaussian_log_likelihood(
        jnp.asarray(bins), means=jnp.float32(mean), log_scales=jnp.float32(log_scale))
    p = np.exp(np.asarray(ll, np.float64))
    assert abs(p.sum() - 1.0) < 1e-5  # bins tile the line: [−∞, −1+1/255], …, [1−1/255, ∞]
    # Against the exact normal CDF: the tanh approximation is good to ~1e-3 per bin.
    s = np.exp(log_scale)
    cdf = lambda z: stats.norm.cdf((z - mean) / s)  # noqa: E731
    exact = np.r_[cdf(bins[0] + 1 / 255), cdf(bins[1:-1] + 1 / 255) - cdf(bins[1:-1] - 1 / 255),
                  1 - cdf(bins[-1] - 1 / 255)]
    assert np.abs(p - exact).max() < 2e-3


def test_prior_bpd(sched):
    x0, _, _ = _batch((4, 8, 8, 3))
    bpd = diffusion.prior_bpd(sched, x0)
    assert bpd.shape == (4,)
    assert float(bpd.max()) < 1e-4  # ᾱ_T ≈ 4e-5: q(x_T|x_0) ≈ N(0, I)
    a = float(np.prod(1 - schedules.get_betas("linear", 100)))  # ᾱ_T ≈ 0.36: far from noise
    short = Schedule.from_betas(schedules.get_betas("linear", 100))
    want = np.mean(0.5 * (-1 - np.log(1 - a) + (1 - a) + a * np.asarray(x0) ** 2), axis=(1, 2, 3)) / np.log(2)
    np.testing.assert_allclose(diffusion.prior_bpd(short, x0), want, rtol=1e-4)


def _tanh_cdf(z):
    """Φ(z) as the official code approximates it (diffusion_utils_2.approx_standard_normal_cdf)."""
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z ** 3)))


def _vlb_bpd_reference(x0, x_t, eps_hat, t, var_type, cdf=_tanh_cdf):
    """L_t of eq. (5) per example in bits/dim, in float64 from the β's alone (no package code).

    0-based t (as in ddpm_jax/schedules.py): betas[t] is the paper's β_{t+1}, ᾱ_{−1} = 1. For t > 0:
    KL(q(x_{t−1}|x_t, x_0) ‖ p_θ(x_{t−1}|x_t)), both Gaussian, p's mean the posterior mean at
    x̂_0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t, p's variance β_t (fixedlarge) or β̃_t (fixedsmall). For
    t = 0: −log p_θ(x_0|x_1) of eq. (13), each pixel's bin [x − 1/255, x + 1/255] (open at ±1)
    under N(μ_θ, β̃_1) (both var_types: the official log-variance tables put β̃_1 at t = 0).
    Also returns the per-example mean (x̂_0 − x_0)².
    """
    betas = np.linspace(1e-4, 0.02, T)  # the paper's linear schedule
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)  # β̃; 0 at t = 0
    kl_bpd, mse = [], []
    for x0_i, xt_i, e_i, s in zip(x0, x_t, eps_hat, t):
        x0_hat = (xt_i - np.sqrt(1.0 - abar[s]) * e_i) / np.sqrt(abar[s])
        c1 = betas[s] * np.sqrt(abar_prev[s]) / (1.0 - abar[s])
        c2 = np.sqrt(alphas[s]) * (1.0 - abar_prev[s]) / (1.0 - abar[s])
        mean_q, mean_p = c1 * x0_i + c2 * xt_i, c1 * x0_hat + c2 * xt_i
        if s == 0:
            sd = np.sqrt(post_var[1])
            upper = np.where(x0_i > 0.999, 1.0, cdf((x0_i + 1 / 255 - mean_p) / sd))
            lower = np.where(x0_i < -0.999, 0.0, cdf((x0_i - 1 / 255 - mean_p) / sd))
            nats = -np.log(np.maximum(upper - lower, 1e-12))
        else:
            var_q = post_var[s]
            var_p = betas[s] if var_type == "fixedlarge" else post_var[s]
            nats = 0.5 * (np.log(var_p / var_q) + var_q / var_p + (mean_q - mean_p) ** 2 / var_p - 1.0)
        kl_bpd.append(nats.mean() / np.log(2.0))
        mse.append(np.mean((x0_hat - x0_i) ** 2))
    return np.array(kl_bpd), np.array(mse)


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
def test_vlb_terms_bpd(sched, var_type):
    rng = np.random.default_rng(7)
    shape = (8, 4, 4, 3)
    x0 = rng.integers(0, 256, shape) / 127.5 - 1.0  # the 256-level pixel grid, edges included
    x0[:, 0, 0, 0], x0[:, 0, 0, 1] = -1.0, 1.0
    x0 = x0.astype(np.float32).astype(np.float64)
    noise = rng.standard_normal(shape)
    t = np.array([0, 0, 1, 2, 10, 500, 998, 999])
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))[t].reshape(-1, 1, 1, 1)
    x_t = (np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise).astype(np.float32).astype(np.float64)
    # A perfect ε-model (only the variances differ) and an imperfect one (the means differ too).
    for eps_hat in (noise, noise + 0.3 * rng.standard_normal(shape)):
        eps_hat = eps_hat.astype(np.float32).astype(np.float64)
        out = GD(sched, var_type=var_type, clip_x0=False).vlb_terms_bpd(
            jnp.asarray(eps_hat, jnp.float32), jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32),
            jnp.asarray(t, jnp.int32))
        want_bpd, want_mse = _vlb_bpd_reference(x0, x_t, eps_hat, t, var_type)
        # atol: float32 log-variances resolve ~2e-7 (at large t, β_t and β̃_t agree to ~1e-6).
        np.testing.assert_allclose(out["kl_bpd"], want_bpd, rtol=3e-4, atol=5e-7)
        np.testing.assert_allclose(out["mse"], want_mse, rtol=1e-4, atol=1e-8)
        # t = 0 against eq. (13) with the exact normal CDF: the tanh approximation costs ~3e-4 here.
        exact, _ = _vlb_bpd_reference(x0[:2], x_t[:2], eps_hat[:2], t[:2], var_type, cdf=stats.norm.cdf)
        np.testing.assert_allclose(out["kl_bpd"][:2], exact, rtol=2e-3)


@pytest.mark.parametrize("pred", ["eps", "x0", "v"])
def test_min_snr_weighting_is_the_x0_error_clipped_at_gamma(sched, pred):
    """Min-SNR-γ: the weighted loss is min(SNR_t, γ) ‖x_0 − x̂_0‖² for every target (float64 reference)."""
    gamma = 5.0
    weighted = diffusion.GaussianDiffusion(sched, pred=pred, min_snr_gamma=gamma)
    plain = diffusion.GaussianDiffusion(sched, pred=pred)
    rng = np.random.default_rng(0)
    x0, noise, out = (jnp.asarray(rng.standard_normal((6, 4, 4, 1)), jnp.float32) for _ in range(3))
    t = jnp.array([0, 5, 50, 200, 600, 999], jnp.int32)
    x_t = weighted.q_sample(x0, t, noise)
    x0_hat = np.asarray(weighted.x0_and_eps(out, x_t, t)[0], np.float64)
    abar = np.asarray(sched.alphas_cumprod, np.float64)[np.asarray(t)]
    snr = abar / (1 - abar)
    expected = np.minimum(snr, gamma) * np.mean((np.asarray(x0, np.float64) - x0_hat) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(weighted.training_losses(out, x0, x_t, t, noise), expected, rtol=2e-3)
    ratio = weighted.training_losses(out, x0, x_t, t, noise) / plain.training_losses(out, x0, x_t, t, noise)
    np.testing.assert_allclose(ratio, weighted.min_snr_weight(t), rtol=1e-5)


def test_min_snr_weight_of_eps_is_one_at_zero_snr_and_bad_gamma_is_refused():
    sched = Schedule.from_betas(schedules.get_betas("jsd", 50))  # β_T = 1: ᾱ_T = 0
    w = diffusion.GaussianDiffusion(sched, min_snr_gamma=5.0).min_snr_weight(jnp.array([49], jnp.int32))
    assert float(w[0]) == 1.0
    with pytest.raises(ValueError, match="min_snr_gamma=-1 must be >= 0"):
        diffusion.GaussianDiffusion(sched, min_snr_gamma=-1.0)
    with pytest.raises(ValueError, match="min_snr_gamma=5 weights the mse loss"):
        diffusion.GaussianDiffusion(sched, pred="xprev", min_snr_gamma=5.0)
