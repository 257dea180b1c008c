"""`--mode=sample` outputs of the experiments: the toy2d chain figure and scores, partial
denoising with PSNR and GIFs; imaging helpers they use."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import ddpm_jax.main  # noqa: F401  (puts the repository root on sys.path for `configs`)
from configs import digits, toy2d
from ddpm_jax import data, imaging, sampler, sampling, setup, train
from ddpm_jax.modes import sample


def _toy_config():
    config = toy2d.get_config()
    config.diffusion.num_timesteps = 10
    config.training.update(batch_size=32, num_steps=4, log_every=2, sample_every=0, checkpoint_every=4)
    config.sampling.update(num_samples=120, batch_size=64, trajectory_every=5)
    return config


@pytest.fixture(scope="module")
def toy_workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("toy") / "run")
    train.train_and_evaluate(_toy_config(), workdir)
    return workdir


def test_toy2d_sample_mode_writes_chain_figure_and_scores(toy_workdir):
    config = _toy_config()
    paths = sample.run(config, toy_workdir)
    assert {"grid", "npz", "gif", "chain", "scores"} <= set(paths)
    chain = np.asarray(Image.open(paths["chain"]))
    # x_10, x_5, x_0: three 150-px panels in one row.
    assert chain.shape[1] == 3 * 150 and chain.shape[0] == 150
    with open(paths["scores"]) as f:
        report = json.load(f)
    samples = np.load(paths["npz"])["samples"]
    assert samples.shape == (120, 2)
    for key in ("energy_distance", "sliced_w2"):
        assert report["ratio"][key] == pytest.approx(report["samples"][key] / report["noise_floor"][key])
        # Four training steps cannot match the data: the samples sit far above the floor.
        assert report["samples"][key] > 2 * report["noise_floor"][key] > 0
    assert report["num_points"] == 120 and report["toy_name"] == "swiss_roll"
    assert report["alpha_bar_T"] < 0.5 and report["schedule"]["num_timesteps"] == 10


def test_sample_files_are_readable_per_the_umask(toy_workdir):
    old = os.umask(0o027)
    try:
        paths = sample.run(_toy_config(), toy_workdir)
    finally:
        os.umask(old)
    modes = {os.path.basename(p): os.stat(p).st_mode & 0o777 for p in paths.values() if isinstance(p, str)}
    assert modes and set(modes.values()) == {0o640}, modes


def test_toy_chain_starts_from_the_samplers_x_T(toy_workdir):
    # The chain figure recomputes x_T; starting the sampler from it must give the same samples.
    config = _toy_config()
    loaded = setup.load_run(config, toy_workdir)
    sampler_fn = setup.make_sampler(loaded, config, seed=3, trajectory_every=0)
    n = 16
    x_T = np.asarray(sampling.image_noise(sampling.image_keys(3, np.arange(n)), 10, (2,)))
    from_noise = sampler.generate(sampler_fn, loaded.params, num_samples=n, batch_size=n).samples
    from_x_T = sampler.generate(sampler_fn, loaded.params, num_samples=n, batch_size=n, x_start=x_T).samples
    np.testing.assert_allclose(from_noise, from_x_T, atol=1e-6)


PARTIAL_STEPS = 200  # enough training for the reverse steps to remove noise from a digit


@pytest.fixture(scope="module")
def digits_workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("digits") / "run")
    train.train_and_evaluate(_digits_config(), workdir)
    return workdir


def _digits_config():
    config = digits.get_config()
    config.model.ch_mult, config.model.num_res_blocks, config.model.attn_resolutions = (1,), 1, ()
    config.diffusion.num_timesteps = 12
    config.training.update(batch_size=16, num_steps=PARTIAL_STEPS, log_every=PARTIAL_STEPS, sample_every=0,
                           checkpoint_every=PARTIAL_STEPS, eval_bpd_after=False)
    return config


def _psnr(x, reference):
    """PSNR (dB) of [-1, 1] floats shown as uint8 against uint8 `reference`, in float64."""
    shown = np.clip(np.round((np.asarray(x, np.float64) + 1.0) * 127.5), 0, 255)
    return 10.0 * np.log10(255.0**2 / np.mean((shown - np.asarray(reference, np.float64)) ** 2))


def test_partial_denoising_raises_the_psnr_and_animates_both_chains(digits_workdir, tmp_path):
    config = _digits_config()
    digit = data.load_arrays(config.data, "test", limit=1)["x"][0]  # a digit the model never saw
    Image.fromarray(digit[..., 0]).save(tmp_path / "digit.png")
    config.sampling.update(num_samples=3, batch_size=8, init_image=str(tmp_path / "digit.png"), start_step=6,
                           trajectory_every=4)
    paths = sample.run(config, digits_workdir)
    with open(paths["psnr"]) as f:
        report = json.load(f)
    arrays = np.load(paths["npz"])
    np.testing.assert_array_equal(imaging.to_uint8(arrays["original"]), digit)
    noised = [_psnr(x, digit) for x in arrays["noised"]]
    denoised = [_psnr(x, digit) for x in arrays["denoised"]]
    assert report["psnr_noised_per_image"] == pytest.approx(noised)
    assert report["psnr_denoised_per_image"] == pytest.approx(denoised)
    assert report["psnr_noised"] == pytest.approx(np.mean(noised))
    assert report["psnr_denoised"] == pytest.approx(np.mean(denoised))
    rise = np.subtract(denoised, noised)  # each image closer to the digit than its noised start
    assert min(rise) > 0 and np.mean(rise) > 0.5, (noised, denoised)
    sched = setup.create_schedule(config)
    assert report["alpha_bar_k"] == pytest.approx(float(sched.alphas_cumprod[5]))
    # The chain from x_6: the start frame, then after steps 6->2 (kept), and x_0.
    assert Image.open(paths["partial_gif"]).n_frames == 1 + 1 + 1
    # The chain from pure noise is animated too: 12 steps kept every 4.
    assert Image.open(paths["gif"]).n_frames == 3
    assert np.load(paths["samples_npz"])["samples"].shape == (3, 8, 8, 1)
    assert os.path.basename(paths["samples_grid"]) == f"sample_ddpm_step{PARTIAL_STEPS}_seed0_n3.png"


def test_psnr_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    assert imaging.psnr(b, a) == pytest.approx(metrics.peak_signal_noise_ratio(a, b, data_range=255))
    assert imaging.psnr(a, a) == float("inf")
    # Floats in [-1, 1] are compared as the uint8 images they are shown as.
    assert imaging.psnr(imaging.from_uint8(b), a) == pytest.approx(imaging.psnr(b, a))
    with pytest.raises(ValueError, match="one shape"):
        imaging.psnr(a, a[:8])


def test_scatter_row_layout_and_errors():
    traj = jax.random.normal(jax.random.key(0), (4, 50, 2))
    image = imaging.scatter_row([np.asarray(traj), np.asarray(traj) * 0.5], ["a", "b", "c", "d"],
                                row_labels=["x_t", "x0"], reference=np.zeros((10, 2)), panel_px=100)
    assert image.shape == (200, 400, 3) and image.dtype == np.uint8
    assert image.min() < 128  # something was drawn
    with pytest.raises(ValueError, match="titles"):
        imaging.scatter_row([np.asarray(traj)], ["a"])
    with pytest.raises(ValueError, match=r"\[K, N, 2\]"):
        imaging.scatter_row([jnp.zeros((4, 5, 3))], ["a"] * 4)
