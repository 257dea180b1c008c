"""Progressive distillation (ddpm_jax/modes/distill.py): the round's target by hand, a round on Gaussian
data against its closed-form optimum, a round's bitwise resume, the student's sampler, and the refusals."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ddpm_jax.main  # noqa: F401  (puts the repository root on sys.path for `configs`)
from configs import digits_distill
from ddpm_jax import checkpointing, diffusion, parallel, sampling, schedules, setup
from ddpm_jax.modes import distill
from ddpm_jax.run_meta import RunMeta, schedule_betas
from ddpm_jax.train_state import TrainState

MESH = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))


def _process(betas, pred):
    return diffusion.GaussianDiffusion(schedules.Schedule.from_betas(betas), pred=pred, clip_x0=False)


def test_the_grid_nests_the_students_steps_in_the_teachers():
    betas = schedules.get_betas("cosine", 100)
    grid = distill.round_grid(betas, 16, "truncated_snr")
    teacher = sampling.ddim_timesteps(100, 32, "trailing")
    np.testing.assert_array_equal(grid.t, sampling.ddim_timesteps(100, 16, "trailing"))
    np.testing.assert_array_equal(grid.t, teacher[0::2])
    np.testing.assert_array_equal(grid.t_mid, teacher[1::2])
    np.testing.assert_array_equal(grid.t_next, np.append(teacher[2::2], -1))
    # The student samples through the registry's DDIM entry: its plan is the student's grid.
    sched = schedules.Schedule.from_betas(betas)
    np.testing.assert_array_equal(sampling.METHODS["ddim"].plan(sched, 100, 16, "trailing"), grid.t)
    full = distill.round_grid(schedules.get_betas("linear", 8, beta_start=1e-3, beta_end=0.2), 4, "truncated_snr")
    assert full.t.tolist() == [7, 5, 3, 1] and full.t_mid.tolist() == [6, 4, 2, 0]


def test_the_target_of_a_round_is_two_ddim_steps_of_the_teacher_by_hand():
    betas = schedules.get_betas("linear", 16, beta_start=1e-3, beta_end=0.2)
    abar = np.cumprod(1.0 - betas)
    grid = distill.round_grid(betas, 2, "truncated_snr")  # teacher 4 steps: 15, 11, 7, 3; student 15, 7
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4, 3, 3, 1))
    i = np.array([0, 1, 1, 0])

    def eps_teacher(x, t):  # any deterministic stand-in network, in float64 and in the code alike
        return 0.7 * x + 0.05 * np.reshape(t, (-1, 1, 1, 1)) * np.tanh(x)

    code = distill.target(lambda x, t: eps_teacher(x, t), _process(betas, "eps"), grid, jnp.asarray(z, jnp.float32),
                          jnp.asarray(i))

    def ddim(x, t, s):  # eq. (12), η = 0, in float64
        a_t = np.sqrt(abar[t]).reshape(-1, 1, 1, 1)
        s_t = np.sqrt(1 - abar[t]).reshape(-1, 1, 1, 1)
        a_s = np.where(s >= 0, np.sqrt(abar[np.maximum(s, 0)]), 1.0).reshape(-1, 1, 1, 1)
        s_s = np.where(s >= 0, np.sqrt(1 - abar[np.maximum(s, 0)]), 0.0).reshape(-1, 1, 1, 1)
        eps = eps_teacher(x, t)
        return a_s * (x - s_t * eps) / a_t + s_s * eps

    t, t1, t2 = np.array([15, 7])[i], np.array([11, 3])[i], np.array([7, -1])[i]
    z2 = ddim(ddim(z, t, t1), t1, t2)
    a_t = np.sqrt(abar[t]).reshape(-1, 1, 1, 1)
    s_t = np.sqrt(1 - abar[t]).reshape(-1, 1, 1, 1)
    a2 = np.where(t2 >= 0, np.sqrt(abar[np.maximum(t2, 0)]), 1.0).reshape(-1, 1, 1, 1)
    s2 = np.where(t2 >= 0, np.sqrt(1 - abar[np.maximum(t2, 0)]), 0.0).reshape(-1, 1, 1, 1)
    by_hand = (z2 - s2 / s_t * z) / (a2 - s2 / s_t * a_t)
    np.testing.assert_allclose(np.asarray(code), by_hand, rtol=2e-5, atol=2e-5)
    # One student DDIM step with x̂_0 = x̃ lands where the teacher's two steps did.
    np.testing.assert_allclose(a2 * by_hand + s2 * (z - a_t * by_hand) / s_t, z2, atol=1e-10)
    snr = abar[[15, 7]] / (1 - abar[[15, 7]])
    np.testing.assert_allclose(grid.weight, np.maximum(snr, 1.0), rtol=1e-6)


def test_a_round_on_gaussian_data_learns_the_closed_form_one_step_student():
    """x ~ N(μ, s²) per pixel; the teacher is the exact denoiser E[x|z_t]; its two DDIM steps are then
    affine in z_t, so the optimal 1-step student is x̂(z) = A z + C in closed form; a student with one
    affine map per timestep (v-prediction) trained by the round's step reaches it."""
    mu, s, T = 0.3, 0.5, 10
    betas = schedules.get_betas("linear", T, beta_start=0.01, beta_end=0.5)
    abar = np.cumprod(1.0 - betas)
    grid = distill.round_grid(betas, 1, "truncated_snr")  # teacher: 9 -> 4 -> x_0; student: 9 -> x_0
    assert (grid.t.tolist(), grid.t_mid.tolist(), grid.t_next.tolist()) == ([9], [4], [-1])

    def denoiser(x, t):  # E[x_0 | z_t] of Gaussian data: the optimal x0-model
        a = jnp.sqrt(jnp.asarray(abar, jnp.float32))[t].reshape(-1, 1)
        return mu + a * s ** 2 / (a ** 2 * s ** 2 + 1 - a ** 2) * (x - a * mu)

    def student_fn(p, x, t, cond, key):  # v̂ = p_a[t] z + p_c[t]
        return p["a"][t].reshape(-1, 1) * x + p["c"][t].reshape(-1, 1)

    tx = optax.adam(0.05)
    params = {"a": jnp.zeros((T,)), "c": jnp.zeros((T,))}
    state = TrainState.create(params, tx)
    step = distill.make_step(student_fn, lambda p, x, t, c: denoiser(x, t), _process(betas, "v"),
                             _process(betas, "x0"), grid, tx, seed=0, ema_decay=0.0, mesh=MESH, teacher_params={})
    x = np.random.default_rng(0).normal(mu, s, size=(400, 256, 1)).astype(np.float32)
    for k in range(0, 400, 20):
        state, m = step(state, parallel.host_to_global({"x": x[k:k + 20]}, MESH, batch_axis=1))

    def closed(z):  # the teacher's two DDIM steps 9 -> 4 -> x_0, composed in float64
        a9, a4 = np.sqrt(abar[9]), np.sqrt(abar[4])
        g = lambda a: a * s ** 2 / (a ** 2 * s ** 2 + 1 - a ** 2)  # noqa: E731
        x9 = mu + g(a9) * (z - a9 * mu)
        z4 = a4 * x9 + np.sqrt(1 - abar[4]) * (z - a9 * x9) / np.sqrt(1 - abar[9])
        return mu + g(a4) * (z4 - a4 * mu)

    z = np.linspace(-2, 2, 9)
    a9, s9 = np.sqrt(abar[9]), np.sqrt(1 - abar[9])
    learned = a9 * z - s9 * (float(state.params["a"][9]) * z + float(state.params["c"][9]))
    np.testing.assert_allclose(learned, closed(z), atol=0.02)
    assert float(m["loss"][-1]) < 1e-3


# ---- the mode: a teacher workdir, the refusals, a round's resume -----------------------------------


def _config(**distill):
    config = digits_distill.get_config()
    config.model.ch_mult, config.model.num_res_blocks, config.model.attn_resolutions = (1,), 1, ()
    config.diffusion.num_timesteps = 8
    config.distill.update(dict(batch_size=8, num_steps=4, log_every=1, checkpoint_every=2, keep_checkpoints=5,
                               ema_decay=0.9, teacher_steps=4, steps=2))
    config.distill.update(distill)
    return config


def save_step0_teacher(config, workdir: str) -> str:
    """`workdir` holding a step-0 ε-model of `config`'s network: a distillation teacher."""
    config = config.copy_and_resolve_references()
    config.diffusion.pred = "eps"
    run = setup.create_run(config)
    checkpointing.save_pretrained(workdir, setup.init_params(run.model, run.shape, 0, run.mesh), run.meta.to_dict())
    return workdir


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The round's teacher workdir: a step-0 ε-model of the tiny config's network."""
    return save_step0_teacher(_config(), str(tmp_path_factory.mktemp("teacher")))


@pytest.mark.parametrize("change, match", [
    (dict(teacher_workdir="/nonexistent/teacher"), "distill.teacher_workdir='/nonexistent/teacher' holds no checkpoint"),
    (dict(teacher_workdir=""), "distill.teacher_workdir is empty"),
    (dict(steps=1), "distill.steps=1 is not half the teacher's 4 steps; set --config.distill.steps=2"),
    (dict(teacher_steps=3, steps=1), "halves an even step count"),
    (dict(teacher_steps=16), "halves an even step count in 2..T"),
    (dict(weighting="snr"), "distill.weighting='snr' is unknown"),
])
def test_bad_rounds_are_refused_in_one_line_before_any_work(tmp_path, teacher, change, match):
    config = _config(**{"teacher_workdir": teacher, **change})
    with pytest.raises(ValueError, match=match) as err:
        distill.run(config, str(tmp_path / "student"))
    assert "\n" not in str(err.value) and not os.path.exists(tmp_path / "student")


def test_a_teacher_of_another_shape_or_an_eps_student_is_refused(tmp_path, teacher):
    config = _config(teacher_workdir=teacher)
    config.model.ch = 64
    with pytest.raises(ValueError, match="model.kwargs.ch=32, but the config gives model.kwargs.ch=64"):
        distill.run(config, str(tmp_path / "student"))
    config = _config(teacher_workdir=teacher)
    config.diffusion.pred = "eps"
    with pytest.raises(ValueError, match="diffusion.pred='eps': the student predicts v or x0"):
        distill.run(config, str(tmp_path / "student"))
    assert not os.path.exists(tmp_path / "student")


def test_a_round_resumes_bitwise_and_its_student_samples_with_ddim(tmp_path, teacher, capsys):
    config = _config(teacher_workdir=teacher)
    straight = jax.device_get(distill.run(config, str(tmp_path / "straight")))
    assert int(straight.step) == 4
    resumed = str(tmp_path / "resumed")
    shutil.copytree(tmp_path / "straight", resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
    again = jax.device_get(distill.run(config, resumed))  # from step 2
    jax.tree.map(np.testing.assert_array_equal, again, straight)
    meta = RunMeta.from_dict(checkpointing.read_meta(resumed))
    assert meta.pred == "v" and meta.source["distill"]["steps"] == 2
    assert meta.source["distill"]["sampler"] == dict(method="ddim", steps=2, spacing="trailing", eta=0.0)

    loaded = setup.load_run(config, resumed)  # the student is an ordinary workdir
    out = setup.make_sampler(loaded, config)(loaded.params, np.arange(8))
    assert out.samples.shape == (8, 8, 8, 1) and np.all(np.isfinite(np.asarray(out.samples)))
    assert "warning" not in capsys.readouterr().out
    config.sampling.spacing = "leading"  # not the grid it was distilled on: one line says so
    setup.load_run(config, resumed)
    assert "is a student distilled for 2 DDIM steps" in capsys.readouterr().out
    with pytest.raises(ValueError, match="holds a student of 2 steps, but distill.steps=1"):
        distill.run(_config(teacher_workdir=resumed, teacher_steps=0, steps=1), resumed)
    next_round, steps = distill.read_teacher(_config(teacher_workdir=resumed, teacher_steps=0, steps=1))
    assert steps == 2 and next_round.meta.pred == "v"
    assert schedule_betas(config).shape == (8,)


def test_a_class_conditional_teacher_makes_a_class_conditional_student(tmp_path):
    config = _config()
    config.model.num_classes, config.training.label_dropout, config.sampling.labels = 10, 0.1, "all"
    config.distill.teacher_workdir = save_step0_teacher(config, str(tmp_path / "teacher"))
    distill.run(config, str(tmp_path / "student"))
    meta = RunMeta.from_dict(checkpointing.read_meta(str(tmp_path / "student")))
    assert meta.condition == {"num_classes": 10} and meta.model_kwargs["num_classes"] == 10
    loaded = setup.load_run(config, str(tmp_path / "student"))  # sample / eval read it with its labels
    out = setup.make_sampler(loaded, config)(loaded.params, np.arange(8))
    assert out.samples.shape == (8, 8, 8, 1) and np.all(np.isfinite(np.asarray(out.samples)))
