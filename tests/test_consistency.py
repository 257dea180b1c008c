"""Consistency distillation (ddpm_jax/modes/consistency.py): the boundary condition f(x, σ_min) = x,
multistep consistency sampling (Algorithm 1) by hand through the registry, a round end to end, refusals."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax.main  # noqa: F401  (puts the repository root on sys.path for `configs`)
from configs import digits
from ddpm_jax import checkpointing, diffusion, sampling, schedules, setup, train
from ddpm_jax.modes import consistency
from ddpm_jax.run_meta import RunMeta
from tests.test_distill import save_step0_teacher


def test_the_consistency_function_is_the_identity_at_sigma_min_exactly():
    sched = schedules.Schedule.from_betas(schedules.get_betas("cosine", 100))
    rng = np.random.default_rng(0)
    x, out = jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32), jnp.asarray(rng.normal(size=(4, 8, 8, 1)) * 1e3,
                                                                                 jnp.float32)
    np.testing.assert_array_equal(diffusion.consistency_function(sched, x, jnp.zeros((4,), jnp.int32), out), x)
    later = diffusion.consistency_function(sched, x, jnp.full((4,), 50, jnp.int32), out)
    assert float(jnp.max(jnp.abs(later - x))) > 1.0  # away from the boundary F counts
    # The process reads a consistency network's output as x̂_0 = f(x_t/√ᾱ_t, σ̃_t).
    process = diffusion.GaussianDiffusion(sched, pred="consistency", clip_x0=False)
    z = x * sched.sqrt_alphas_cumprod[50]
    x0 = process.x0_and_eps(out, z, jnp.full((4,), 50, jnp.int32))[0]
    np.testing.assert_allclose(x0, diffusion.consistency_function(sched, z / sched.sqrt_alphas_cumprod[50],
                                                                  jnp.full((4,), 50, jnp.int32), out), rtol=1e-5)


def test_multistep_consistency_sampling_is_algorithm_1_by_hand():
    betas = schedules.get_betas("linear", 10, beta_start=0.01, beta_end=0.5)
    sched = schedules.Schedule.from_betas(betas)
    process = diffusion.GaussianDiffusion(sched, pred="x0", clip_x0=False)
    apply_fn = lambda p, x, t, cond=None: 0.5 * x  # noqa: E731  (an x̂_0 stand-in)
    indices = jnp.arange(3)
    keys = sampling.image_keys(7, indices)
    x_T = sampling.image_noise(keys, 10, (2,))
    one = sampling.sample(apply_fn, None, process, shape=(2,), indices=indices, seed=7, method="consistency")
    np.testing.assert_allclose(one.samples, 0.5 * x_T, rtol=1e-6)  # the default: one step, one call
    two = sampling.sample(apply_fn, None, process, shape=(2,), indices=indices, seed=7, method="consistency",
                          num_steps=2)
    abar = np.cumprod(1 - betas)
    sig = lambda t: np.sqrt((1 - abar[t]) / abar[t])  # noqa: E731
    x4 = np.sqrt(abar[4]) * (0.5 * np.asarray(x_T) + np.sqrt(sig(4) ** 2 - sig(0) ** 2)
                             * np.asarray(sampling.image_noise(keys, 4, (2,))))
    np.testing.assert_allclose(two.samples, 0.5 * x4, rtol=1e-5)
    assert sampling.METHODS["consistency"].nfe(2) == 2


def _config(**changes):
    config = digits.get_config()
    config.model.ch_mult, config.model.num_res_blocks, config.model.attn_resolutions = (1,), 1, ()
    config.diffusion.num_timesteps = 8
    config.diffusion.pred = "consistency"
    config.sampling.method, config.sampling.steps = "consistency", 2
    config.consistency.update(dict(batch_size=8, num_steps=2, log_every=1, checkpoint_every=2, steps=4))
    config.consistency.update(changes)
    return config


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A step-0 ε-model of the tiny config's network."""
    return save_step0_teacher(_config(), str(tmp_path_factory.mktemp("teacher")))


def test_a_consistency_round_trains_and_its_student_samples_through_the_registry(tmp_path, teacher):
    assert consistency.grid(8, 4).tolist() == [0, 1, 3, 5, 7]
    config = _config(teacher_workdir=teacher)
    state = jax.device_get(consistency.run(config, str(tmp_path / "cd")))
    assert int(state.step) == 2
    meta = RunMeta.from_dict(checkpointing.read_meta(str(tmp_path / "cd")))
    assert meta.pred == "consistency" and meta.source["consistency"]["teacher_pred"] == "eps"
    loaded = setup.load_run(config, str(tmp_path / "cd"))
    out = setup.make_sampler(loaded, config)(loaded.params, np.arange(8))
    assert out.samples.shape == (8, 8, 8, 1) and np.all(np.isfinite(np.asarray(out.samples)))


@pytest.mark.parametrize("change, match", [
    (dict(teacher_workdir="/nonexistent/teacher"), "consistency.teacher_workdir='/nonexistent/teacher' holds no"),
    (dict(distance="lpips"), "consistency.distance='lpips' is unknown"),
    (dict(steps=8), "consistency.steps=8 must lie in 1..T-1=7"),
])
def test_bad_consistency_runs_are_refused_before_any_work(tmp_path, teacher, change, match):
    with pytest.raises(ValueError, match=match):
        consistency.run(_config(**{"teacher_workdir": teacher, **change}), str(tmp_path / "cd"))
    config = _config(teacher_workdir=teacher)
    config.diffusion.pred = "v"
    with pytest.raises(ValueError, match="the student is a consistency model"):
        consistency.run(config, str(tmp_path / "cd"))
    assert not os.path.exists(tmp_path / "cd")


def test_train_mode_refuses_a_consistency_model_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="diffusion.pred='consistency' is trained by --mode=consistency"):
        train.train_and_evaluate(_config(), str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")
