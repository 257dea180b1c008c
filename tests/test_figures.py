"""--mode=figures: each of the paper's Figs. 5-8 shows its data (recomputed here: x̂_0 of the chain,
the shared x_t, the test images and their pixel mix, the rate and distortion of the bound's terms);
the rate-distortion curve is monotone."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import ddpm_jax.main  # noqa: F401  (puts the repository root on sys.path for `configs`)
from configs import digits
from ddpm_jax import checks, data, imaging, sampling, schedules, setup, train
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


def _cells(path, rows, ncol):
    """The [rows, ncol, 8, 8] uint8 images of a figure's grid (1-pixel pad, all enlarged 4x)."""
    picture = np.asarray(Image.open(path))[::4, ::4]
    return np.stack([[picture[1 + 9 * r:9 + 9 * r, 1 + 9 * c:9 + 9 * c] for c in range(ncol)]
                     for r in range(rows)])


def _chain(workdir, config, indices, x_start=None, start_step=None):
    """The run's Alg. 2 chain (learned variance, sampling.seed), x_t kept after every step; with the
    x̂_0 = clip((x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t) of each step computed here in float64 (eq. (15))."""
    loaded = setup.load_run(config, workdir)
    seed, T = int(config.sampling.seed), loaded.sched.num_timesteps
    out = sampling.sample(loaded.apply_fn, loaded.params, loaded.process, shape=loaded.shape, indices=indices,
                          seed=seed, trajectory_every=1, x_start=x_start,
                          start_step=start_step)
    if x_start is None:
        x_start = sampling.image_noise(sampling.image_keys(seed, indices), T, loaded.shape)
    xs = np.concatenate([np.asarray(x_start)[None], np.asarray(out.trajectory)])  # inputs of each step
    abar = np.asarray(loaded.sched.alphas_cumprod, np.float64)
    x0 = []
    for x, t in zip(xs[:-1], range((start_step or T) - 1, -1, -1)):
        eps = np.asarray(loaded.apply_fn(loaded.params, jnp.asarray(x), jnp.full((len(x),), t, jnp.int32)))[..., :1]
        x0.append(np.clip((x - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t]), -1, 1))
    return xs, np.stack(x0)


def _same_image(a, b):
    """uint8 images equal to one level (float32 vs float64 rounding at the .5 boundaries)."""
    assert np.max(np.abs(a.astype(int) - imaging.to_uint8(b).reshape(a.shape).astype(int))) <= 1


def _progressive_shows_x0_of_the_chain(workdir, config, cells):
    xs, x0 = _chain(workdir, config, jnp.arange(3))
    # T = 8, 4 columns: x̂_0 after reverse steps 2, 4, 6, 8 (of the step from x_8, x_6, x_4, x_2).
    for c, step in enumerate((1, 3, 5, 7)):
        for i in range(3):
            _same_image(cells[i, c], x0[step, i])
    return xs


def _shared_rows_continue_the_chains_x_t(workdir, config, cells):
    xs, _ = _chain(workdir, config, jnp.arange(1))
    for row, t in enumerate((6, 4, 2)):  # 3T/4, T/2, T/4: x_t is the input of the step at index t - 1
        x_t = xs[8 - t, 0]
        _same_image(cells[row, 0], np.clip(x_t, -1, 1))
        starts = jnp.broadcast_to(jnp.asarray(x_t), (3, 8, 8, 1))
        ends, _ = _chain(workdir, config, jnp.arange(1, 4), x_start=starts, start_step=t)
        for i in range(3):
            _same_image(cells[row, 1 + i], ends[-1, i])
        assert len({cells[row, 1 + i].tobytes() for i in range(3)}) == 3  # each with its own noise


def _interpolation_ends_at_the_test_images(workdir, config, cells):
    pair = data.load_arrays(config.data, str(config.data.eval_split), limit=2)["x"]
    a, b = (imaging.from_uint8(x).astype(np.float64) for x in pair)
    for row in range(4):
        np.testing.assert_array_equal(cells[row, 0], pair[0, ..., 0])
        np.testing.assert_array_equal(cells[row, 12], pair[1, ..., 0])
    for c, lam in enumerate(np.linspace(0, 1, 11)):  # the last row mixes the pixels
        _same_image(cells[3, 1 + c], ((1 - lam) * a + lam * b)[..., 0])


@pytest.mark.parametrize("kind,rows,ncol,check", [
    ("progressive", 3, 4, _progressive_shows_x0_of_the_chain),
    ("shared_latents", 3, 4, _shared_rows_continue_the_chains_x_t),
    ("interpolation", 4, 13, _interpolation_ends_at_the_test_images)])
def test_image_figures_show_their_data(workdir, kind, rows, ncol, check):
    config = _config()
    config.figures.kind = kind
    checks.check_config(config, "figures")
    paths = figures.run(config, workdir)
    assert paths["png"] == os.path.join(workdir, "figures", f"{kind}_step2.png")
    picture = np.asarray(Image.open(paths["png"]))
    cell = 8 * 4 + 4  # 8x8 digits enlarged 4x, 1-pixel pad enlarged too
    assert picture.shape[:2] == (rows * cell + 4, ncol * cell + 4)
    check(workdir, config, _cells(paths["png"], rows, ncol))


def test_rate_distortion_writes_plot_and_curves(workdir):
    config = _config()
    config.figures.kind = "rate_distortion"
    paths = figures.run(config, workdir)
    assert Image.open(paths["png"]).size[0] > 500
    with open(paths["json"]) as f:
        curves = json.load(f)
    assert len(curves["rate_bpd"]) == 8 and curves["num_examples"] == 4
    assert curves["rate_bpd"][0] == pytest.approx(curves["total_bpd"], rel=1e-6)  # all terms sent: the bound
    # The plotted numbers from the bound's terms: rate_t = L_T + Σ_{s ≥ t} L_s, RMSE = 127.5 √mse.
    loaded = setup.load_run(config, workdir)
    terms = bpd.evaluate_bpd(config, loaded.params, loaded.model, loaded.sched, loaded.mesh, num_examples=4,
                             progress=False)
    kl = np.asarray(terms["terms_bpd"], np.float64)
    rate = terms["prior_bpd"] + np.array([kl[t:].sum() for t in range(8)])
    np.testing.assert_allclose(curves["rate_bpd"], rate, rtol=1e-6)
    np.testing.assert_allclose(curves["distortion_rmse"], 127.5 * np.sqrt(np.asarray(terms["mse"], np.float64)),
                               rtol=1e-6)


def test_rate_distortion_is_monotone_in_both_axes():
    """With ε̂ = 0, x̂_0 = x_t / √ᾱ_t: the distortion grows with t, the rate (terms ≥ 0) falls with t."""
    T = 20
    sched = Schedule.from_betas(schedules.get_betas("linear", T, beta_start=1e-3, beta_end=0.2))
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(np.round(rng.uniform(-1, 1, (64, 8, 8, 1)) * 127.5) / 127.5, jnp.float32)
    result = bpd.bpd_terms(lambda p, x, t, cond: jnp.zeros_like(x), None, GaussianDiffusion(sched, clip_x0=False), x0,
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
