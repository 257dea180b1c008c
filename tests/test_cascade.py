"""Super-resolution of given low-res images and the two-stage cascade: `sampling.cond_images` as a folder
or an .npz (wrong shapes and unreadable files refused in one line), the factor and augmentation recorded
in RunMeta, MNIST's base-stage resize equal to the SR model's box downsampling, and `--mode=cascade`
end to end on tiny digits models."""

import os

import numpy as np
import pytest
from PIL import Image

from configs import digits, digits_sr, mnist
from ddpm_jax import checkpointing, checks, data, imaging, run_meta, setup, super_resolution, train
from ddpm_jax.modes import cascade as cascade_mode
from ddpm_jax.modes import sample as sample_mode

TINY = dict(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())
BASE_OVERRIDES = "data.image_size=4 model.ch=32 model.ch_mult=(1,) model.num_res_blocks=1 model.attn_resolutions=() " \
                 "diffusion.num_timesteps=10"


def _tiny(config):
    config.model.update(TINY)
    config.diffusion.num_timesteps = 10
    config.training.update(num_steps=2, batch_size=8, sample_every=0, eval_bpd_after=False, checkpoint_every=2,
                           log_every=1)
    config.sampling.update(method="ddim", steps=3, num_samples=3, batch_size=3)
    return config


def _sr_config():
    config = _tiny(digits_sr.get_config())
    config.training.low_res_max_level = 4
    config.sampling.low_res_level = 1
    return config


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """A tiny digits SR model (8x8 from 4x4) and a tiny 4x4 digits base model, two train steps each."""
    root = tmp_path_factory.mktemp("cascade")
    train.train_and_evaluate(_sr_config(), str(root / "sr"))
    base = _tiny(digits.get_config())
    base.data.image_size = 4
    train.train_and_evaluate(base, str(root / "base"))
    return root / "sr", root / "base"


def _pngs(folder, images):
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(imaging.to_uint8(images)):
        Image.fromarray(image[..., 0]).save(os.path.join(folder, f"{i:02d}.png"))
    return str(folder)


def test_folder_and_npz_inputs_are_the_images_they_hold(tmp_path):
    cfg = _sr_config().data
    low = super_resolution.low_res_images(cfg, "test", 5)
    assert low.shape == (5, 4, 4, 1)
    quantised = imaging.as_float(imaging.to_uint8(low))
    np.testing.assert_array_equal(super_resolution.low_res_images(cfg, _pngs(tmp_path / "low", low), 3), quantised[:3])
    np.savez(tmp_path / "samples.npz", samples=low, images=imaging.to_uint8(low))  # what --mode=sample writes
    np.testing.assert_array_equal(super_resolution.low_res_images(cfg, str(tmp_path / "samples.npz")), low)
    np.savez(tmp_path / "uint8.npz", images=imaging.to_uint8(low))
    np.testing.assert_array_equal(super_resolution.low_res_images(cfg, str(tmp_path / "uint8.npz"), 2), quantised[:2])


@pytest.mark.parametrize("shape", [(3, 5, 5, 1), (3, 4, 4, 3)])
def test_a_wrong_size_or_channel_count_names_both_shapes_before_any_work(tmp_path, shape):
    config = _sr_config()
    np.savez(tmp_path / "bad.npz", samples=np.zeros(shape, np.float32))
    config.sampling.cond_images = str(tmp_path / "bad.npz")
    got = str(tuple(shape[1:])).replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=rf"bad.npz' has shape {got}, but this model super-resolves \(4, 4, 1\) "
                                         r"\(data.low_res_factor=2 of \(8, 8, 1\)\); give images of \(4, 4, 1\)\.$"):
        checks.check_config(config, "sample")
    _pngs(tmp_path / "folder", np.zeros(shape[:1] + (8, 8, 1), np.float32))
    config.sampling.cond_images = str(tmp_path / "folder")
    with pytest.raises(ValueError, match=r"00.png' has shape \(8, 8, 1\), but this model super-resolves \(4, 4, 1\)"):
        checks.check_config(config, "sample")


def test_an_unreadable_file_in_the_folder_is_one_line_naming_it(tmp_path):
    config = _sr_config()
    folder = _pngs(tmp_path / "low", np.zeros((2, 4, 4, 1), np.float32))
    with open(os.path.join(folder, "broken.png"), "wb") as f:
        f.write(b"not a png")
    config.sampling.cond_images = folder
    with pytest.raises(ValueError) as err:
        checks.check_config(config, "sample")
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"Unreadable image {os.path.join(folder, 'broken.png')!r} in "
                                                f"sampling.cond_images={folder!r}")
    assert line.endswith("point sampling.cond_images at a folder of readable images.")


def test_cond_images_needs_a_super_resolution_model():
    config = _tiny(digits.get_config())
    config.sampling.cond_images = "test"
    with pytest.raises(ValueError, match=r"sampling.cond_images='test' needs a super-resolution model"):
        checks.check_config(config, "sample")


@pytest.mark.parametrize("field, value", [("data.low_res_factor", 4), ("training.low_res_max_level", 3)])
def test_run_meta_records_the_factor_and_the_augmentation(workdirs, field, value):
    sr, _ = workdirs
    stored = run_meta.RunMeta.from_dict(checkpointing.read_meta(str(sr)))
    assert stored.condition == {"low_res_factor": 2, "low_res_max_level": 4}
    other = _sr_config()
    section, name = field.split(".")
    other[section][name] = value
    trained = {"data.low_res_factor": 2, "training.low_res_max_level": 4}[field]
    with pytest.raises(run_meta.CheckpointMismatchError) as err:
        setup.load_run(other, str(sr))
    assert str(err.value) == (f"{sr} holds a checkpoint with condition.{name}={trained}, but the config gives "
                              f"condition.{name}={value}; use a fresh --workdir or the config it was trained with.")
    converted = run_meta.RunMeta(stored.model_name, stored.model_kwargs, stored.data_shape, stored.schedule,
                                 stored.pred)
    setup.create_run(_sr_config()).meta.check_matches(converted, "converted")  # records nothing: not compared


def test_mnist_at_14_is_the_box_downsampled_view_of_the_sr_model():
    """The cascade's base model sees what its SR stage is conditioned on, within the uint8 rounding
    of the source (half a uint8 level: 1/255 in [-1, 1])."""
    sr = mnist.get_config()
    sr.data.low_res_factor = 2
    low = super_resolution.low_res_images(sr.data, "test", 64)
    base = mnist.get_config()
    base.data.image_size = 14
    x = data.load_arrays(base.data, "test", 64)["x"]
    assert x.shape == (64, 14, 14, 1) and x.dtype == np.uint8
    np.testing.assert_allclose(imaging.as_float(x), low, rtol=0, atol=1 / 255 + 1e-6)
    full = data.load_arrays(sr.data, "test", 64)["x"].astype(np.float64)
    np.testing.assert_array_equal(x, np.rint(imaging.box_downsample(full, 2)))


@pytest.mark.parametrize("method", ["ddpm", "dpmpp_2m"])
def test_every_sampler_super_resolves_an_npz(workdirs, tmp_path, method):
    sr, _ = workdirs
    config = _sr_config()
    low = super_resolution.low_res_images(config.data, "test", 3)
    np.savez(tmp_path / "low.npz", samples=low)
    config.sampling.update(method=method, steps=0 if method == "ddpm" else 3, cond_images=str(tmp_path / "low.npz"))
    paths = sample_mode.run(config, str(sr))
    assert f"sample_{method}" in paths["npz"] and "_srf" in paths["npz"]
    with np.load(paths["npz"]) as out:
        np.testing.assert_array_equal(out["low_res"], low)
        assert out["samples"].shape == (3, 8, 8, 1) and np.isfinite(out["samples"]).all()
    config.sampling.cond_images = "test"  # the same images from the split: the same samples
    with np.load(sample_mode.run(config, str(sr))["npz"]) as split, np.load(paths["npz"]) as files:
        np.testing.assert_array_equal(split["samples"], files["samples"])


def test_partial_denoising_super_resolves_a_folder(workdirs, tmp_path):
    sr, _ = workdirs
    config = _sr_config()
    config.sampling.update(cond_images=_pngs(tmp_path / "low", super_resolution.low_res_images(config.data, "test", 3)),
                           init_image="camera", start_step=5, method="ddpm", steps=0)
    paths = sample_mode.run(config, str(sr))
    with np.load(paths["npz"]) as out:
        assert out["denoised"].shape == (3, 8, 8, 1) and np.isfinite(out["denoised"]).all()


def test_the_cascade_samples_the_base_model_and_super_resolves_its_samples(workdirs, capsys):
    sr, base = workdirs
    config = _sr_config()
    config.cascade.update(base_config="configs/digits.py", base_workdir=str(base), base_overrides=BASE_OVERRIDES)
    paths = cascade_mode.run(config, str(sr))
    assert paths["base_npz"].startswith(str(base)) and paths["npz"].startswith(str(sr))
    assert os.path.isfile(paths["base_grid"]) and os.path.isfile(paths["grid"])
    with np.load(paths["base_npz"]) as first, np.load(paths["npz"]) as second:
        assert first["samples"].shape == (3, 4, 4, 1) and second["samples"].shape == (3, 8, 8, 1)
        np.testing.assert_array_equal(second["low_res"], first["samples"])
    assert capsys.readouterr().out.count("wrote:") == 2
    config.cascade.base_overrides = BASE_OVERRIDES.replace("image_size=4", "image_size=8")
    with pytest.raises(ValueError, match=r"cascade.base_config='configs/digits.py' makes images \(8, 8, 1\), but this "
                                         r"model super-resolves \(4, 4, 1\); give a base model of the low resolution"):
        cascade_mode.run(config, str(sr))


def test_the_bench_scores_fidelity_and_writes_one_table_row_per_record():
    from bench import super_resolution

    real = np.random.default_rng(5).uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
    low = imaging.box_downsample(real, 2)
    exact = super_resolution.fidelity(real, real, low, 2)
    assert exact["psnr"] == float("inf") and exact["consistency"] < 1e-6
    shifted = super_resolution.fidelity(np.clip(real + 0.1, -1, 1), real, low, 2)
    assert 0 < shifted["consistency"] <= 0.1 + 1e-6 and 15 < shifted["psnr"] < 30
    scores = {"metrics": dict(fd=2.0, precision=0.5, recall=0.6, confident=0.7),
              "floor": dict(fd=1.0, precision=0.9, recall=0.9, confident=0.9), "ratio": dict(fd=2.0)}
    rows = [dict(row="bicubic", **shifted, **scores), dict(row="direct", sample_seconds=3, **scores)]
    text = super_resolution.table(rows)
    lines = text.splitlines()
    assert len(lines) == 4 and "fd (floor 1)" in lines[0] and lines[3].startswith("| direct |  |  | 2 | 0.5 |")


def test_the_steering_rows_are_the_consistency_of_x0_given_the_true_and_the_null_low_res(workdirs):
    from bench import super_resolution

    config = _sr_config()
    rows = super_resolution.steering_rows(config, str(workdirs[0]), 4, [2, 9])
    loaded = setup.load_run(config, str(workdirs[0]))
    real = imaging.as_float(data.load_arrays(config.data, str(config.data.eval_split), 4)["x"]).astype(np.float64)
    low = imaging.box_downsample(real, 2)
    noise = np.random.default_rng(int(config.sampling.seed)).standard_normal(real.shape).astype(np.float32)
    abar = float(np.asarray(loaded.sched.alphas_cumprod)[9])
    x_t = (np.sqrt(abar) * real + np.sqrt(1 - abar) * noise).astype(np.float32)
    for row, image in (("consistency_true", low), ("consistency_null", np.zeros_like(low))):
        cond = {"low_res": image.astype(np.float32), "low_res_level": np.zeros(4, np.int32)}
        eps = np.asarray(loaded.apply_fn(loaded.params, x_t, np.full(4, 9, np.int32), cond), np.float64)
        x0 = (x_t - np.sqrt(1 - abar) * eps) / np.sqrt(abar)  # the ε-model's x̂_0, eq. (4) solved for x_0
        expected = np.sqrt(np.mean((imaging.box_downsample(x0, 2) - low) ** 2))
        assert rows[1][row] == pytest.approx(expected, rel=1e-4)
    assert [r["t"] for r in rows] == [2, 9] and rows[1]["consistency_true"] != rows[1]["consistency_null"]
