"""Bits/dim (the bound of Ho et al. 2020 eq. (5)) against an independent float64 NumPy
implementation; independence of the device count, the batch size and the padding rows."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from ddpm_jax import data, parallel, schedules
from ddpm_jax.diffusion import GaussianDiffusion
from ddpm_jax.evaluation import bpd
from ddpm_jax.models.unet import UNet

T = 6


def _config(num_timesteps=T, schedule="linear", var_type="fixedlarge", clip=True, num_examples=20,
            batch_size=8):
    config = digits.get_config()
    config.diffusion.update(num_timesteps=num_timesteps, schedule=schedule, var_type=var_type,
                            beta_start=0.02, beta_end=0.3)
    config.eval.update(bpd_num_examples=num_examples, bpd_batch_size=batch_size, bpd_clip_denoised=clip)
    return config


def _sched(config):
    d = config.diffusion
    betas = schedules.get_betas(d.schedule, d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end)
    return betas, schedules.Schedule.from_betas(betas)


# A deterministic "network" simple enough to write again in NumPy: ε̂ = tanh(w x_t + v t / T).
def _apply(params, x, t, cond=None):
    return jnp.tanh(params["w"] * x + params["v"] * (t.astype(jnp.float32) / T)[:, None, None, None])


def _apply_np(params, x, t):
    return np.tanh(float(params["w"]) * x + float(params["v"]) * (t / T))


PARAMS = {"w": jnp.float32(0.7), "v": jnp.float32(-0.4)}


# ---- the independent reference (float64 NumPy; formulas written out from the paper) --------

def _normal_kl(m1, lv1, m2, lv2):
    return 0.5 * (-1.0 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))


def _cdf(x):  # the tanh approximation of Φ used by the official code
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _decoder_nll(x, mean, log_var):
    inv_std = np.exp(-0.5 * log_var)
    plus, minus = _cdf(inv_std * (x - mean + 1 / 255)), _cdf(inv_std * (x - mean - 1 / 255))
    log_p = np.where(x < -0.999, np.log(np.maximum(plus, 1e-12)),
                     np.where(x > 0.999, np.log(np.maximum(1 - minus, 1e-12)),
                              np.log(np.maximum(plus - minus, 1e-12))))
    return -log_p


def _reference(betas, x0, noise, var_type, clip):
    """Per-example total, prior, terms [B, T], mse [B, T] in bits/dim (noise: [T, B, ...])."""
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    coef1, coef2 = betas * np.sqrt(abar_prev) / (1 - abar), (1 - abar_prev) * np.sqrt(alphas) / (1 - abar)
    model_logvar = np.log(np.append(post_var[1], betas[1:])) if var_type == "fixedlarge" else post_logvar
    mean_dims = tuple(range(1, x0.ndim))
    B = x0.shape[0]
    terms, mse = np.zeros((B, len(betas))), np.zeros((B, len(betas)))
    for t in range(len(betas)):
        x_t = np.sqrt(abar[t]) * x0 + np.sqrt(1 - abar[t]) * noise[t]
        eps = _apply_np(PARAMS, x_t, t)
        x0_hat = np.sqrt(1 / abar[t]) * x_t - np.sqrt(1 / abar[t] - 1) * eps
        if clip:
            x0_hat = np.clip(x0_hat, -1, 1)
        model_mean = coef1[t] * x0_hat + coef2[t] * x_t
        true_mean = coef1[t] * x0 + coef2[t] * x_t
        if t == 0:
            term = _decoder_nll(x0, model_mean, model_logvar[0])
        else:
            term = _normal_kl(true_mean, post_logvar[t], model_mean, model_logvar[t])
        terms[:, t] = term.mean(mean_dims) / np.log(2)
        mse[:, t] = ((x0_hat - x0) ** 2).mean(mean_dims)
    prior = _normal_kl(np.sqrt(abar[-1]) * x0, np.log(1 - abar[-1]), 0.0, 0.0).mean(mean_dims) / np.log(2)
    return terms.sum(1) + prior, prior, terms, mse


def _digits_test(config, n):
    return np.stack([np.asarray(data.load_source(config.data, "test")[i]) for i in range(n)]
                    ).astype(np.float64) / 127.5 - 1.0


@pytest.mark.parametrize("schedule, var_type, clip", [("linear", "fixedlarge", True),
                                                       ("linear", "fixedsmall", False),
                                                       ("cosine", "fixedlarge", False)])
def test_bits_per_dim_equals_float64_numpy_reference(schedule, var_type, clip):
    config = _config(schedule=schedule, var_type=var_type, clip=clip)
    betas, sched = _sched(config)
    mesh = parallel.make_mesh(jax.devices()[:1])
    got = bpd.evaluate_bpd(config, PARAMS, None, sched, mesh, apply_fn=_apply, progress=False)

    n = 20
    x0 = _digits_test(config, n)
    noise = np.stack([np.asarray(bpd.example_noise(config.seed, np.arange(n), t, x0.shape[1:]),
                                 np.float64) for t in range(T)])
    total, prior, terms, mse = _reference(betas, x0, noise, var_type, clip)
    assert got["num_examples"] == n and got["split"] == "test"
    # float32 tables and arithmetic against float64: measured relative errors <= 5e-7.
    rtol = 5e-6
    np.testing.assert_allclose(got["terms_bpd"], terms.mean(0), rtol=rtol)
    np.testing.assert_allclose(got["mse"], mse.mean(0), rtol=rtol)
    # The cosine schedule's ᾱ_T ~ 1e-7 makes the prior term tiny: compare it absolutely too.
    np.testing.assert_allclose(got["prior_bpd"], prior.mean(), rtol=rtol, atol=1e-8)
    np.testing.assert_allclose(got["decoder_bpd"], terms[:, 0].mean(), rtol=rtol)
    np.testing.assert_allclose(got["kl_bpd"], terms[:, 1:].sum(1).mean(), rtol=rtol)
    np.testing.assert_allclose(got["total_bpd"], total.mean(), rtol=rtol)
    assert got["total_bpd"] == pytest.approx(got["prior_bpd"] + got["decoder_bpd"] + got["kl_bpd"], rel=1e-12)
    np.testing.assert_allclose(got["total_bpd_stderr"], total.std(ddof=1) / np.sqrt(n), rtol=1e-3)


def test_terms_are_per_example_and_noise_is_fresh_per_timestep():
    config = _config()
    betas, sched = _sched(config)
    x0 = jnp.asarray(_digits_test(config, 4), jnp.float32)
    keys = bpd.example_keys(0, jnp.arange(4))
    out = jax.jit(lambda x, k: bpd.bpd_terms(_apply, PARAMS, GaussianDiffusion(sched), x, k))(x0, keys)
    assert out["terms"].shape == out["mse"].shape == (4, T) and out["total"].shape == (4,)
    # Example 2 alone (same key) gives the same terms as inside the batch.
    alone = bpd.bpd_terms(_apply, PARAMS, GaussianDiffusion(sched), x0[2:3], keys[2:3])
    np.testing.assert_allclose(alone["terms"][0], out["terms"][2], rtol=1e-6)
    # A different noise draw at each timestep (the official loop draws x_t afresh per t).
    n0, n1 = (bpd.example_noise(0, [0], t, (8, 8, 1)) for t in (0, 1))
    assert not np.allclose(n0, n1)


def _random_unet_params(model, seed=0):
    """Random params drawn in NumPy (no init compilation); the zero-initialised output
    convolution of a fresh U-Net would make ε̂ ≡ 0."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)),
                            jnp.zeros((1,), jnp.int32))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-1].key)
        if name == "kernel":
            return rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        return (1.0 if name == "scale" else 0.0) + 0.1 * rng.normal(size=leaf.shape)

    return jax.tree_util.tree_map_with_path(lambda p, x: jnp.asarray(draw(p, x), jnp.float32), shapes)


def _run(config, devices, params, model=None, apply_fn=None):
    _, sched = _sched(config)
    mesh = parallel.make_mesh(jax.devices()[:devices])
    return bpd.evaluate_bpd(config, params, model, sched, mesh, apply_fn=apply_fn, progress=False)


def _assert_same(a, b):
    for key in ("total_bpd", "prior_bpd", "decoder_bpd", "kl_bpd"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key
    np.testing.assert_allclose(a["terms_bpd"], b["terms_bpd"], rtol=1e-5)
    np.testing.assert_allclose(a["mse"], b["mse"], rtol=1e-5)


def test_bits_per_dim_on_8_devices_equals_1_device():
    """A tiny U-Net with random params: 8 devices, batches of 40 (stopping after example 33)
    against 1 device, batches of 11."""
    model = UNet(ch=32, out_ch=1, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    params = _random_unet_params(model)
    r8 = _run(_config(num_timesteps=4, num_examples=33, batch_size=40), 8, params, model)
    r1 = _run(_config(num_timesteps=4, num_examples=33, batch_size=11), 1, params, model)
    assert r8["num_examples"] == r1["num_examples"] == 33
    _assert_same(r8, r1)


def test_padding_rows_of_the_last_batch_do_not_change_the_result():
    """All 297 test digits: 8 devices with batches of 16 pad the last batch with 7 zero images;
    1 device with batches of 27 has no padding."""
    padded = _run(_config(num_examples=0, batch_size=16), 8, PARAMS, apply_fn=_apply)
    exact = _run(_config(num_examples=0, batch_size=27), 1, PARAMS, apply_fn=_apply)
    assert padded["num_examples"] == exact["num_examples"] == 297
    _assert_same(padded, exact)
    first = _run(_config(num_examples=33, batch_size=16), 8, PARAMS, apply_fn=_apply)
    assert abs(first["total_bpd"] - exact["total_bpd"]) > 1e-4   # different examples do differ


def test_padding_rows_are_excluded_from_every_average():
    config = _config()
    _, sched = _sched(config)
    mesh = parallel.make_mesh(jax.devices()[:8])
    fn = bpd.make_bpd_fn(_apply, GaussianDiffusion(sched), mesh, seed=0)
    x = _digits_test(config, 12).astype(np.float32)
    kept = bpd.bpd_over_batches(fn, PARAMS, [dict(x=x[:8], mask=np.ones(8, bool))], mesh,
                                num_timesteps=T, global_batch=8, limit=8)
    garbage = np.concatenate([x[:5], np.full((3, 8, 8, 1), 0.9, np.float32)])
    batches = [dict(x=garbage, mask=np.arange(8) < 5), dict(x=x[:8], mask=np.ones(8, bool))]
    # Rows 5..7 of batch 0 are padding (any content); batch 1 holds indices 8..15, cut at limit 11.
    mixed = bpd.bpd_over_batches(fn, PARAMS, batches, mesh, num_timesteps=T, global_batch=8, limit=11)
    assert mixed["num_examples"] == 5 + 3
    direct = fn(PARAMS, parallel.host_to_global(np.concatenate([x[:5], x[:3]]), mesh),
                parallel.host_to_global(np.array([0, 1, 2, 3, 4, 8, 9, 10], np.int32), mesh))
    assert mixed["total_bpd"] == pytest.approx(float(np.mean(np.asarray(direct["total"], np.float64))),
                                               rel=1e-6)
    assert kept["num_examples"] == 8


def test_report_writes_json_plot_and_tensorboard(tmp_path):
    result = dict(num_examples=3, total_bpd=3.5, prior_bpd=0.01, decoder_bpd=1.2, kl_bpd=2.29,
                  total_bpd_stderr=0.1, terms_bpd=[1.2, 1.0, 0.8, 0.49], mse=[0.01, 0.05, 0.2, 0.5],
                  split="test")
    paths = bpd.write_report(str(tmp_path), 7, result)
    with open(paths["json"]) as f:
        written = json.load(f)
    assert written["step"] == 7 and written["total_bpd"] == 3.5 and len(written["terms_bpd"]) == 4
    assert paths["json"].endswith(os.path.join("eval", "bpd_7.json"))
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))
    line = bpd.summary_line(result)
    assert "3.5000" in line and "prior" in line and "decoder" in line and "KL" in line


def test_bad_inputs_are_one_line_errors():
    config = _config(num_examples=-1)
    _, sched = _sched(config)
    mesh = parallel.make_mesh(jax.devices()[:1])
    with pytest.raises(ValueError, match="bpd_num_examples=-1"):
        bpd.evaluate_bpd(config, PARAMS, None, sched, mesh, apply_fn=_apply)
    config = _config()
    config.data.source = "toy2d"
    with pytest.raises(ValueError, match="needs image data"):
        bpd.evaluate_bpd(config, PARAMS, None, sched, mesh, apply_fn=_apply)
