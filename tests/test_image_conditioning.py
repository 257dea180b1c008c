"""The image condition kind (super-resolution, SR3) through the conditioning mechanism: the kind
(super_resolution.LowResImage, AugmentationLevel), the pipeline's box-downsampled view, the U-Net's
concatenated input, noise-conditioning augmentation in the train step, and guided sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits_sr
from ddpm_jax import (condition_config, conditioning, data, imaging, parallel, sampler, sampling, setup, super_resolution,
                      train)
from ddpm_jax.models.unet import UNet

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, out_ch=1)
KIND = super_resolution.LowResImage((4, 4, 1), 2, abar=(0.9, 0.5, 0.1))
SR = conditioning.Conditioning((conditioning.ClassLabel(10), KIND, super_resolution.AugmentationLevel()))


def _box_reference(x, f):
    """The mean of each f×f block, by loops (independent of the reshape in box_downsample)."""
    n, h, w, c = x.shape
    out = np.zeros((n, h // f, w // f, c), np.float64)
    for i in range(h // f):
        for j in range(w // f):
            out[:, i, j, :] = x[:, i * f:(i + 1) * f, j * f:(j + 1) * f, :].mean(axis=(1, 2))
    return out


def _randomize(params):
    """Params moved off their init (conv_out starts at zero), deterministically."""
    return jax.tree.map(lambda p: p + 0.05 * jnp.sign(jnp.sin(jnp.arange(p.size).reshape(p.shape))), params)


def _tiny_config():
    config = digits_sr.get_config()
    config.model.update(ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=())
    config.diffusion.num_timesteps = 20
    config.training.batch_size, config.training.low_res_max_level = 8, 5
    config.sampling.update(method="ddpm", num_samples=4, batch_size=4, guidance_scale=1.5, low_res_level=2)
    return config


def test_the_kind_null_check_and_record():
    rows = jnp.ones((3, 4, 4, 1))
    assert KIND.null.shape == (4, 4, 1) and not KIND.null.any()
    null = SR.null_like({"label": jnp.array([1, 2, 3]), "low_res": rows, "low_res_level": jnp.array([1, 0, 2])})
    assert not np.asarray(null["low_res"]).any() and null["low_res"].shape == rows.shape
    np.testing.assert_array_equal(null["low_res_level"], [0, 0, 0])
    assert SR.record() == {"num_classes": 10, "low_res_factor": 2, "low_res_max_level": 3}
    KIND.check(rows, 3)
    with pytest.raises(ValueError, match=r"cond\['low_res'\] must be floats of shape \(3, 4, 4, 1\), got int32"):
        KIND.check(np.zeros((3, 4, 4, 1), np.int32), 3)
    with pytest.raises(ValueError, match=r"got float32 \(3, 8, 8, 1\); pass images box-downsampled by 2"):
        KIND.check(np.zeros((3, 8, 8, 1), np.float32), 3)
    with pytest.raises(ValueError, match=r"cond\['low_res_level'\] must be integers"):
        SR.check({"label": np.zeros(3, np.int32), "low_res": rows, "low_res_level": np.zeros(3, np.float32)}, 3)


def test_box_downsampling_is_the_mean_of_each_block():
    x = np.random.default_rng(0).uniform(-1, 1, (2, 28, 28, 3))
    for f in (2, 4, 7):
        np.testing.assert_allclose(imaging.box_downsample(x, f), _box_reference(x, f), rtol=0, atol=1e-12)
    up = np.repeat(np.repeat(imaging.box_downsample(x, 2), 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(imaging.box_downsample(up, 2), imaging.box_downsample(x, 2), atol=1e-12)
    with pytest.raises(ValueError, match="data.low_res_factor=3 must be >= 1 and divide the image size 28x28"):
        imaging.box_downsample(x, 3, super_resolution.FACTOR_FIELD)


def test_the_condition_of_a_batch_is_its_box_downsampled_image_at_level_0():
    config = _tiny_config()
    conds = condition_config.create_conditioning(config)
    it = data.create_train_iterator(config.data, global_batch_size=8, seed=0)
    batch = next(it)
    it.close()
    assert set(batch["cond"]) == {"label"}  # no source carries the view: the kind derives it
    cond = conds.of_batch(batch)
    assert set(cond) == {"low_res", "low_res_level"}
    assert cond["low_res"].shape == (8, 4, 4, 1) and cond["low_res"].dtype == np.float32
    np.testing.assert_allclose(cond["low_res"], _box_reference(batch["x"], 2), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(cond["low_res_level"], np.zeros(8, np.int32))
    traced = jax.jit(conds.of_batch)({"x": jnp.asarray(batch["x"])})  # inside the train step too
    np.testing.assert_allclose(traced["low_res"], cond["low_res"], rtol=0, atol=1e-6)
    evals = next(iter(data.create_eval_iterator(config.data, "test", batch_size=8)))
    np.testing.assert_allclose(super_resolution.low_res_images(config.data, "test", 8),
                               conds.of_batch(evals)["low_res"], atol=1e-6)


def test_augmentation_draws_levels_from_its_key_and_leaves_other_kinds_alone():
    y = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (256, 4, 4, 1)), jnp.float32)
    cond = {"label": jnp.arange(256) % 10, "low_res": y}
    out = SR.augment(cond, jax.random.key(3))
    assert set(out) == {"label", "low_res", "low_res_level"} and out["label"] is cond["label"]
    s = np.asarray(out["low_res_level"])
    assert set(s.tolist()) == {0, 1, 2, 3}
    np.testing.assert_array_equal(np.asarray(out["low_res"])[s == 0], np.asarray(y)[s == 0])  # s = 0: clean
    assert np.abs(np.asarray(out["low_res"])[s == 3] - np.asarray(y)[s == 3]).mean() > 0.3
    again = SR.augment(cond, jax.random.key(3))
    np.testing.assert_array_equal(again["low_res"], out["low_res"])  # a function of the key alone
    assert conditioning.Conditioning((conditioning.ClassLabel(10),)).augment(cond, jax.random.key(3)) is cond
    off = super_resolution.LowResImage((4, 4, 1), 2).augment(cond, jax.random.key(3))
    assert not np.asarray(off["low_res_level"]).any() and off["low_res"] is not None
    np.testing.assert_array_equal(off["low_res"], y)


def test_the_low_res_image_reaches_the_network_and_zeros_are_the_null():
    plain, model = UNet(**TINY), UNet(**TINY, low_res_channels=1)
    x, t = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 1)), jnp.float32), jnp.array([3, 7])
    params = _randomize(model.init(jax.random.key(0), x, t)["params"])
    plain_params = plain.init(jax.random.key(0), x, t)["params"]
    assert params["conv_in"]["kernel"].shape == (3, 3, 2, 32)
    assert plain_params["conv_in"]["kernel"].shape == (3, 3, 1, 32)
    assert "low_res_level_embedding" in params and "low_res_level_embedding" not in plain_params
    y = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (2, 4, 4, 1)), jnp.float32)
    grad = jax.grad(lambda y: model.apply({"params": params}, x, t, {"low_res": y}).sum())(y)
    assert np.abs(np.asarray(grad)).min() > 0
    null = {"low_res": jnp.zeros_like(y), "low_res_level": jnp.zeros(2, jnp.int32)}
    np.testing.assert_array_equal(model.apply({"params": params}, x, t, null), model.apply({"params": params}, x, t))
    with pytest.raises(ValueError, match=r"cond\['low_res'\] has shape \(2, 3, 3, 1\), x_t \(2, 8, 8, 1\)"):
        model.apply({"params": params}, x, t, {"low_res": jnp.zeros((2, 3, 3, 1))})
    with pytest.raises(ValueError, match=r"has shape \(2, 4, 4, 3\), x_t \(2, 8, 8, 1\): it must be \[2, h, w, 1\]"):
        model.apply({"params": params}, x, t, {"low_res": jnp.zeros((2, 4, 4, 3))})
    with pytest.raises(ValueError, match="UNet without image conditioning"):
        plain.apply({"params": plain_params}, x, t, {"low_res": y})


def test_train_steps_run_with_a_finite_loss():
    config = _tiny_config()
    mesh = parallel.make_mesh()
    run = setup.create_run(config, mesh)
    state, tx = setup.create_train_state(config, run.model, run.shape, mesh)
    step = train.make_train_step(config, run.model, run.sched, tx, mesh)
    it = data.create_train_iterator(config.data, global_batch_size=8, seed=0)
    for _ in range(3):
        batch = jax.tree.map(lambda a: a[None], next(it))
        state, metrics = step(state, parallel.host_to_global(batch, mesh, batch_axis=1))
        assert np.isfinite(np.asarray(metrics["loss"])).all()
    it.close()
    assert int(state.step) == 3


@pytest.mark.parametrize("method", ["ddpm", "dpmpp_2m"])
def test_guided_super_resolution_depends_on_the_low_res_input(method):
    config = _tiny_config()
    config.sampling.method, config.sampling.cond_images = method, "test"
    run = setup.create_run(config, parallel.make_mesh(jax.devices()[:1]))
    params = _randomize(setup.init_params(run.model, run.shape, 0, run.mesh))
    out = sampler.generate(setup.make_sampler(run, config), params, num_samples=4, batch_size=4)
    assert out.samples.shape == (4, 8, 8, 1) and np.isfinite(out.samples).all()
    tag = setup.sampler_tag(config)
    assert tag.startswith(method) and tag.endswith("_srtest_s2_w1.5")
    opts = setup.sampler_options(config)
    table = condition_config.sampler_conditions(config)
    kind = condition_config.create_conditioning(config).kinds[0]
    rows = kind.at_level(super_resolution.low_res_images(config.data, "test", 4), 2, config.sampling.seed)
    np.testing.assert_array_equal(table["low_res"], rows["low_res"])
    cond = jax.tree.map(jnp.asarray, rows)
    null = {k: jnp.broadcast_to(jnp.asarray(v, cond[k].dtype), cond[k].shape) for k, v in opts.pop("null_cond").items()}
    common = dict(shape=run.shape, indices=jnp.arange(4), seed=0, cond=cond, null_cond=null, **opts)
    ref = sampling.sample(run.apply_fn, params, run.process, **common)
    np.testing.assert_allclose(out.samples, np.asarray(ref.samples), rtol=0, atol=1e-5)
    flipped = dict(common, cond={**cond, "low_res": -cond["low_res"]})
    other = sampling.sample(run.apply_fn, params, run.process, **flipped)
    assert np.abs(np.asarray(other.samples) - np.asarray(ref.samples)).max() > 1e-3


def test_the_sample_picture_puts_input_output_and_bicubic_side_by_side():
    config = _tiny_config()
    samples = np.random.default_rng(4).uniform(-1, 1, (5, 8, 8, 1)).astype(np.float32)
    views = super_resolution.sample_views(config, samples)
    low = super_resolution.low_res_images(config.data, "test", 5)
    np.testing.assert_array_equal(views["low_res"], low)
    assert views["bicubic"].shape == samples.shape and np.abs(views["bicubic"]).max() <= 1.0
    np.testing.assert_allclose(imaging.box_downsample(views["bicubic"], 2), low, atol=0.35)
    grid = imaging.make_grid(np.stack([np.repeat(np.repeat(low, 2, 1), 2, 2), samples, views["bicubic"]], 1)
                             .reshape(-1, 8, 8, 1), ncol=15)
    picture = views["picture"]
    scale = picture.shape[0] // grid.shape[0]
    np.testing.assert_array_equal(picture[::scale, ::scale], grid)
