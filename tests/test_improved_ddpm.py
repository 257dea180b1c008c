"""Learned variances, xprev, the kl / hybrid losses and the loss-aware timestep sampler.

The references are independent float64 NumPy implementations of the formulas (Ho et al. 2020
eq. (5), (7), (13); Nichol & Dhariwal 2021 eq. (15), L_hybrid, §3.3).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax.main  # noqa: F401  (puts the repository root on sys.path for `configs`)
from configs import toy2d
from ddpm_jax import checkpointing, diffusion, sampling, schedules, timestep_sampler, train
from ddpm_jax.evaluation import bpd
from ddpm_jax.schedules import Schedule

GD = diffusion.GaussianDiffusion

T = 50


@pytest.fixture(scope="module")
def sched():
    return Schedule.from_betas(schedules.get_betas("linear", T, beta_start=1e-4, beta_end=0.2))


@pytest.fixture(scope="module")
def np_tables():
    b = schedules.get_betas("linear", T, beta_start=1e-4, beta_end=0.2)
    abar = np.cumprod(1 - b)
    abar_prev = np.r_[1.0, abar[:-1]]
    post_var = b * (1 - abar_prev) / (1 - abar)
    return dict(b=b, abar=abar, abar_prev=abar_prev, post_var=post_var,
                post_logvar=np.log(np.r_[post_var[1], post_var[1:]]),
                c1=b * np.sqrt(abar_prev) / (1 - abar), c2=(1 - abar_prev) * np.sqrt(1 - b) / (1 - abar))


def _draw(shape, seed=0, channels_out=None):
    rng = np.random.default_rng(seed)
    x0 = np.round(rng.uniform(-1, 1, shape) * 127.5) / 127.5  # on the 256-level grid
    noise = rng.standard_normal(shape)
    out_shape = shape[:-1] + (channels_out or shape[-1],)
    out = rng.uniform(-1, 1, out_shape)
    return x0, noise, out


def _np_reference(tab, out, x0, x_t, t, var_type):
    """(mean, log_var, kl_bpd per example) of p_θ with pred=eps and no clipping, in float64."""
    C = x0.shape[-1]
    eps, v = out[..., :C], out[..., C:]
    sh = (-1,) + (1,) * (x0.ndim - 1)
    abar = tab["abar"][t].reshape(sh)
    x0_hat = x_t / np.sqrt(abar) - np.sqrt(1 / abar - 1) * eps
    mean = tab["c1"][t].reshape(sh) * x0_hat + tab["c2"][t].reshape(sh) * x_t
    if var_type == "learned":
        log_var = v
    else:
        frac = (v + 1) / 2
        log_var = frac * np.log(tab["b"][t]).reshape(sh) + (1 - frac) * tab["post_logvar"][t].reshape(sh)
    true_mean = tab["c1"][t].reshape(sh) * x0 + tab["c2"][t].reshape(sh) * x_t
    true_lv = tab["post_logvar"][t].reshape(sh)
    kl = 0.5 * (-1 + log_var - true_lv + np.exp(true_lv - log_var) + (true_mean - mean) ** 2 * np.exp(-log_var))
    # The discretised decoder of eq. (13) with the official tanh approximation of Φ.
    cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))  # noqa: E731
    inv = np.exp(-0.5 * log_var)
    plus, minus = cdf(inv * (x0 - mean + 1 / 255)), cdf(inv * (x0 - mean - 1 / 255))
    logp = np.where(x0 < -0.999, np.log(np.maximum(plus, 1e-12)),
                    np.where(x0 > 0.999, np.log(np.maximum(1 - minus, 1e-12)),
                             np.log(np.maximum(plus - minus, 1e-12))))
    axes = tuple(range(1, x0.ndim))
    term = np.where(t == 0, -logp.mean(axis=axes), kl.mean(axis=axes)) / np.log(2)
    return mean, log_var, term


@pytest.mark.parametrize("var_type", ["learned", "learned_range"])
def test_learned_variances_and_bound_terms_match_numpy(sched, np_tables, var_type):
    shape = (6, 4, 4, 3)
    x0, noise, out = _draw(shape, channels_out=6)
    t = np.array([0, 0, 1, 7, 30, T - 1])
    abar = np_tables["abar"][t].reshape(-1, 1, 1, 1)
    x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    process = GD(sched, var_type=var_type, loss="hybrid", clip_x0=False)
    got = process.p_mean_variance(f32(out), f32(x_t), jnp.asarray(t))
    mean, log_var, term = _np_reference(np_tables, out, x0, x_t, t, var_type)
    np.testing.assert_allclose(got["mean"], mean, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(got["log_variance"], log_var, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(got["variance"], np.exp(log_var), rtol=2e-5)
    terms = process.vlb_terms_bpd(f32(out), f32(x0), f32(x_t), jnp.asarray(t))
    np.testing.assert_allclose(terms["kl_bpd"], term, rtol=2e-3, atol=1e-4)
    if var_type == "learned_range":  # v = ±1 are the two fixed variances
        ones = np.ones(shape)
        for v, table in ((1.0, np.log(np_tables["b"])), (-1.0, np_tables["post_logvar"])):
            lv = process.replace(clip_x0=True).p_mean_variance(
                f32(np.concatenate([out[..., :3], v * ones], -1)), f32(x_t), jnp.asarray(t))["log_variance"]
            np.testing.assert_allclose(lv[:, 0, 0, 0], table[t], rtol=1e-5)


def test_xprev_round_trips_through_p_mean_variance(sched, np_tables):
    x0, noise, _ = _draw((5, 3, 3, 2), seed=1)
    t = np.array([0, 1, 10, 25, T - 1])
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    x_t = diffusion.q_sample(sched, f32(x0), jnp.asarray(t), f32(noise))
    process = GD(sched, pred="xprev", clip_x0=False)
    mu = process.training_target(f32(x0), jnp.asarray(t), f32(noise))
    sh = (-1, 1, 1, 1)
    want_mu = np_tables["c1"][t].reshape(sh) * x0 + np_tables["c2"][t].reshape(sh) * np.asarray(x_t, np.float64)
    np.testing.assert_allclose(mu, want_mu, atol=1e-5)
    out = process.p_mean_variance(mu, x_t, jnp.asarray(t))
    np.testing.assert_allclose(out["mean"], mu)  # the network's output is the mean itself
    np.testing.assert_allclose(out["pred_x0"], x0, atol=2e-3)
    _, eps_hat = process.x0_and_eps(mu, x_t, jnp.asarray(t))
    np.testing.assert_allclose(eps_hat[2:], noise[2:], atol=5e-3)  # t ≥ 10: ε well determined
    # The mse loss of xprev is ‖μ̃ − μ_θ‖²: zero at the target.
    loss = process.training_losses(mu, f32(x0), x_t, jnp.asarray(t), f32(noise))
    np.testing.assert_allclose(loss, 0.0, atol=1e-12)


def test_kl_loss_is_the_bits_per_dim_loops_term(sched):
    B, shape = 3, (4, 4, 1)
    rng = np.random.default_rng(2)
    x0 = jnp.asarray(np.round(rng.uniform(-1, 1, (B,) + shape) * 127.5) / 127.5, jnp.float32)
    w = jnp.asarray(rng.normal(size=(2,)), jnp.float32)

    def apply_fn(params, x, t, cond=None):  # a fixed "network" with 2C outputs: ε̂ and a learned_range v
        s = jnp.sin(t.astype(jnp.float32) / 7.0)[:, None, None, None]
        return jnp.concatenate([params[0] * x * s, jnp.tanh(params[1] * x + s)], axis=-1)

    keys = bpd.example_keys(0, jnp.arange(B))
    process = GD(sched, var_type="learned_range", loss="kl", clip_x0=False)
    res = bpd.bpd_terms(apply_fn, w, process, x0, keys)
    for t in (0, 1, 17, T - 1):
        tb = jnp.full((B,), t, jnp.int32)
        noise = sampling.image_noise(keys, t, shape)
        x_t = diffusion.q_sample(sched, x0, tb, noise)
        loss = process.training_losses(apply_fn(w, x_t, tb), x0, x_t, tb, noise)
        np.testing.assert_allclose(loss, res["terms"][:, t], rtol=1e-5, atol=1e-7)


def test_hybrid_gradient_on_the_mean_is_l_simple(sched):
    x0, noise, out = _draw((4, 3, 3, 2), seed=3, channels_out=4)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    t = jnp.asarray([0, 3, 20, 49])
    x_t = diffusion.q_sample(sched, f32(x0), t, f32(noise))

    def total(o, loss, var_type):
        return jnp.sum(GD(sched, var_type=var_type, loss=loss).training_losses(o, f32(x0), x_t, t, f32(noise)))

    g_hybrid = jax.grad(total)(f32(out), "hybrid", "learned_range")
    g_simple = jax.grad(total)(f32(out[..., :2]), "mse", "fixedlarge")
    np.testing.assert_allclose(g_hybrid[..., :2], g_simple, rtol=1e-6, atol=1e-9)
    assert float(jnp.max(jnp.abs(g_hybrid[..., 2:]))) > 0  # L_vlb trains the variance
    # The value is L_simple + λ·T·L_t.
    hybrid = GD(sched, var_type="learned_range", loss="hybrid", clip_x0=False)
    vb = hybrid.vlb_terms_bpd(f32(out), f32(x0), x_t, t)["kl_bpd"]
    simple = GD(sched).training_losses(f32(out[..., :2]), f32(x0), x_t, t, f32(noise))
    got = hybrid.training_losses(f32(out), f32(x0), x_t, t, f32(noise))
    np.testing.assert_allclose(got, simple + 1e-3 * T * vb, rtol=1e-6)


def test_losses_refuse_what_trains_nothing():
    sched = Schedule.from_betas(schedules.get_betas("linear", 5))
    with pytest.raises(ValueError, match="use var_type=learned_range or loss=mse"):
        GD(sched, loss="hybrid", var_type="fixedlarge")
    with pytest.raises(ValueError, match="unknown loss='l1'"):
        GD(sched, loss="l1")
    with pytest.raises(ValueError, match="use loss=hybrid"):
        GD(sched, loss="mse", var_type="learned")


def test_ddim_and_ddpm_steps_take_the_2c_output(sched):
    x0, noise, out = _draw((3, 2, 2, 2), seed=4, channels_out=4)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    x_t, t = f32(x0), jnp.asarray([5, 20, 40])
    a = sampling.ddim_step(GD(sched, var_type="learned_range", loss="hybrid"), f32(out), x_t, t, t - 5, f32(noise))
    b = sampling.ddim_step(GD(sched), f32(out[..., :2]), x_t, t, t - 5, f32(noise))
    np.testing.assert_array_equal(a[0], b[0])  # DDIM ignores a learned variance
    learned = GD(sched, var_type="learned", loss="hybrid")
    x_prev, _ = sampling.ddpm_step(learned, f32(out), x_t, t, f32(noise))
    mean = learned.p_mean_variance(f32(out), x_t, t)["mean"]
    np.testing.assert_allclose(x_prev, mean + np.exp(0.5 * out[..., 2:]) * noise, rtol=1e-5, atol=1e-6)


# ---- the loss-aware timestep sampler ------------------------------------------------------------

def _filled(table):
    """A History whose every row holds `table` [T, 10]."""
    return timestep_sampler.History(losses=jnp.asarray(table, jnp.float32),
                                    counts=jnp.full((table.shape[0],), table.shape[1], jnp.int32))


def test_sampler_probabilities_uniform_until_full_then_second_moment():
    n = 6
    h = timestep_sampler.History.create(n)
    np.testing.assert_allclose(timestep_sampler.probabilities(h), np.full(n, 1 / n))
    rng = np.random.default_rng(0)
    table = rng.uniform(0.1, 5.0, (n, 10)) * np.arange(1, n + 1)[:, None]
    h = timestep_sampler.update(h, jnp.repeat(jnp.arange(n), 10)[:-1], jnp.asarray(table.reshape(-1)[:-1]))
    assert int(h.counts[-1]) == 9
    np.testing.assert_allclose(timestep_sampler.probabilities(h), np.full(n, 1 / n))  # one row short
    h = timestep_sampler.update(h, jnp.asarray([n - 1]), jnp.asarray([table[-1, -1]]))
    w = np.sqrt(np.mean(table ** 2, axis=1))
    want = w / w.sum() * (1 - 1e-3) + 1e-3 / n
    np.testing.assert_allclose(timestep_sampler.probabilities(h), want, rtol=1e-5)
    np.testing.assert_allclose(h.losses, table, rtol=1e-6)
    # A full row drops its oldest loss.
    h2 = timestep_sampler.update(h, jnp.asarray([2, 2]), jnp.asarray([100.0, 200.0]))
    np.testing.assert_allclose(h2.losses[2], np.r_[table[2, 2:], 100.0, 200.0], rtol=1e-6)
    np.testing.assert_array_equal(h2.counts, np.full(n, 10))


def test_sampler_reweighting_is_unbiased_on_a_fixed_loss_table():
    n = 8
    rng = np.random.default_rng(1)
    loss_of_t = np.geomspace(50.0, 0.01, n)  # the bound's terms: the first few dominate
    h = _filled(loss_of_t[:, None] * rng.uniform(0.8, 1.2, (n, 10)))
    p = np.asarray(timestep_sampler.probabilities(h), np.float64)
    # Exactly: E_{t~p}[w_t L_t] = Σ_t p_t L_t / (n p_t) = mean_t L_t.
    np.testing.assert_allclose(np.sum(p * loss_of_t / (n * p)), loss_of_t.mean(), rtol=1e-12)
    t, w = timestep_sampler.sample(jax.random.key(0), 200_000, n, h)
    t, w = np.asarray(t), np.asarray(w, np.float64)
    np.testing.assert_allclose(w, 1.0 / (n * p[t]), rtol=1e-5)
    np.testing.assert_allclose(np.bincount(t, minlength=n) / t.size, p, atol=4e-3)
    estimate = np.mean(w * loss_of_t[t])
    assert abs(estimate - loss_of_t.mean()) < 0.01 * loss_of_t.mean()
    # ... with a smaller variance than the uniform estimate.
    assert np.var(w * loss_of_t[t]) < 0.5 * np.var(loss_of_t)
    t_u, w_u = timestep_sampler.sample(jax.random.key(0), 16, n)
    np.testing.assert_array_equal(w_u, 1.0)
    np.testing.assert_array_equal(t_u, jax.random.randint(jax.random.key(0), (16,), 0, n))


def _toy_config(num_steps, **diffusion_fields):
    config = toy2d.get_config()
    config.diffusion.num_timesteps = 4
    config.diffusion.update(diffusion_fields)
    config.training.update(batch_size=32, num_steps=num_steps, log_every=1, sample_every=0,
                           checkpoint_every=3, steps_per_dispatch=1)
    return config


def test_loss_aware_hybrid_learned_range_training_resumes_exactly(tmp_path):
    fields = dict(t_sampler="loss_aware", loss="hybrid", var_type="learned_range")
    straight = train.train_and_evaluate(_toy_config(6, **fields), str(tmp_path / "straight"))
    assert np.all(np.asarray(straight.t_history.counts) == 10)  # warmed up: importance sampling ran
    resumed_dir = str(tmp_path / "resumed")
    half = train.train_and_evaluate(_toy_config(3, **fields), resumed_dir)
    with checkpointing.Checkpointer(resumed_dir) as ckpt:  # the history is in the checkpoint
        restored, _ = ckpt.restore(half)
    for a, b in zip(jax.tree.leaves(jax.device_get(half.t_history)),
                    jax.tree.leaves(jax.device_get(restored.t_history))):
        np.testing.assert_array_equal(a, b)
    resumed = train.train_and_evaluate(_toy_config(6, **fields), resumed_dir)
    for a, b in zip(jax.tree.leaves(jax.device_get((straight.params, straight.t_history))),
                    jax.tree.leaves(jax.device_get((resumed.params, resumed.t_history)))):
        np.testing.assert_array_equal(a, b)
    assert straight.params["linear_out"]["kernel"].shape[-1] == 4  # 2C outputs for a learned variance


def test_table2_rows_are_valid_configs_with_2c_outputs_when_learned():
    from configs import table2
    from ddpm_jax import checks, config_loading, run_meta

    for base in ("", ",cifar10"):
        for row, (pred, loss, var_type, t_sampler) in table2.ROWS.items():
            if row == "eps_hybrid_cosine" and not base:
                with pytest.raises(config_loading.ConfigError, match="digits uses the cosine schedule"):
                    config_loading.load_config(f"configs/table2.py:{row}{base}")
                continue
            config = config_loading.load_config(f"configs/table2.py:{row}{base}")
            checks.check_objective(config.diffusion)
            assert (config.diffusion.pred, config.diffusion.loss, config.diffusion.t_sampler) == (pred, loss, t_sampler)
            channels = int(config.data.num_channels)
            want = 2 * channels if var_type in ("learned", "learned_range") else channels
            assert run_meta.model_spec(config)[1]["out_ch"] == want
    with pytest.raises(ValueError, match="use --config.diffusion.loss=hybrid"):
        config = config_loading.load_config("configs/table2.py:eps_simple")
        config.diffusion.var_type = "learned"
        checks.check_objective(config.diffusion)
