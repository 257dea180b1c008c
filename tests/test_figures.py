"""--mode=figures: each of the paper's Figs. 5-8 writes its file; the rate-distortion curve is monotone."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import ddpm_jax.main  # noqa: F401  (puts the repository root on sys.path for `configs`)
from configs import digits
from ddpm_jax import checks, schedules, train
from ddpm_jax.evaluation import bpd
from ddpm_jax.modes import figures
from ddpm_jax.diffusion import GaussianDiffusion
from ddpm_jax.schedules import Schedule


def _config():
    config = digits.get_config()
    config.model.ch_mult, config.model.num_res_blocks, config.model.attn_resolutions = (1,), 1, ()
    config.diffusion.num_timesteps = 8
    config.diffusion.update(var_type="learned_range", loss="hybrid")  # figures use the learned variance
    config.training.update(num_steps=2, batch_size=16, sample_every=0, checkpoint_every=2, log_every=1)
    config.figures.update(num_images=3, num_columns=4, num_examples=4)
    config.eval.bpd_batch_size = 4
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("figures"))
    train.train_and_evaluate(_config(), path)
    return path


@pytest.mark.parametrize("kind,rows", [("progressive", 3), ("shared_latents", 3), ("interpolation", 4)])
def test_image_figures_write_their_grid(workdir, kind, rows):
    config = _config()
    config.figures.kind = kind
    checks.check_config(config, "figures")
    paths = figures.run(config, workdir)
    assert paths["png"] == os.path.join(workdir, "figures", f"{kind}_step2.png")
    picture = np.asarray(Image.open(paths["png"]))
    cell = 8 * 4 + 4  # 8x8 digits enlarged 4x, 1-pixel pad enlarged too
    assert picture.shape[0] == rows * cell + 4


def test_rate_distortion_writes_plot_and_curves(workdir):
    config = _config()
    config.figures.kind = "rate_distortion"
    paths = figures.run(config, workdir)
    assert Image.open(paths["png"]).size[0] > 500
    with open(paths["json"]) as f:
        curves = json.load(f)
    assert len(curves["rate_bpd"]) == 8 and curves["num_examples"] == 4
    assert curves["rate_bpd"][0] == pytest.approx(curves["total_bpd"], rel=1e-6)  # all terms sent: the bound


def test_rate_distortion_is_monotone_in_both_axes():
    """With ε̂ = 0, x̂_0 = x_t / √ᾱ_t: the distortion grows with t, the rate (terms ≥ 0) falls with t."""
    T = 20
    sched = Schedule.from_betas(schedules.get_betas("linear", T, beta_start=1e-3, beta_end=0.2))
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(np.round(rng.uniform(-1, 1, (64, 8, 8, 1)) * 127.5) / 127.5, jnp.float32)
    result = bpd.bpd_terms(lambda p, x, t: jnp.zeros_like(x), None, GaussianDiffusion(sched, clip_x0=False), x0,
                           bpd.example_keys(0, jnp.arange(64)))
    curves = figures.rate_distortion(dict(terms_bpd=np.mean(result["terms"], 0), prior_bpd=np.mean(result["prior"]),
                                          mse=np.mean(result["mse"], 0)))
    rate, dist = np.asarray(curves["rate_bpd"]), np.asarray(curves["distortion_rmse"])
    assert np.all(np.diff(rate) < 0) and np.all(np.diff(dist) > 0)
    # RMSE = 127.5 √((1 − ᾱ_t)/ᾱ_t) E[ε²]^½ (to the sampling error of 4096 pixels).
    abar = np.asarray(sched.alphas_cumprod, np.float64)
    np.testing.assert_allclose(dist, 127.5 * np.sqrt((1 - abar) / abar), rtol=0.05)


def test_unknown_kind_is_refused(workdir):
    config = _config()
    config.figures.kind = "fig9"
    with pytest.raises(ValueError, match="figures.kind='fig9' is unknown"):
        figures.run(config, workdir)
