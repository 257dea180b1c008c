"""The experiment configs and their docs: what the docstrings and docs/*.md claim holds."""

import os
import re
import shlex

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import config_loading, data, main, parallel, schedules, setup, train, train_state
from ddpm_jax.models.mlp import GatedMLP

config_loading.ensure_configs_importable()  # `configs` lives at the repository root
from configs import digits, single_image  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("docs/experiments.md", "docs/reproduce.md")


def _abar_T(config):
    d = config.diffusion
    return schedules.alpha_bar_final(schedules.get_betas(d.schedule, d.num_timesteps, beta_start=d.beta_start,
                                                         beta_end=d.beta_end))


def test_single_image_keeps_the_tutorials_schedule():
    config = single_image.get_config()
    d = config.diffusion
    assert (d.schedule, d.num_timesteps, d.beta_start, d.beta_end) == ("linear", 300, 1e-4, 0.04)
    assert config.sampling.init_image == "camera" and config.sampling.start_step == 180
    assert config.sampling.trajectory_every > 0
    assert _abar_T(config) < 1e-2


def _two_train_steps(config):
    """Two real train steps of `config` on all devices: its model, schedule, optimiser and data.

    Returns (run, the two host batches, the states before / after each step on the host,
    the steps' metrics as [2] arrays).
    """
    run = setup.create_run(config)
    state, tx = setup.create_train_state(config, run.model, run.shape, run.mesh)
    step = train.make_train_step(config, run.model, run.sched, tx, run.mesh)
    it = data.create_train_iterator(config.data, global_batch_size=int(config.training.batch_size),
                                    seed=int(config.seed))
    batches, states, metrics = [], [jax.device_get(state)], []
    for _ in range(2):
        batches.append(next(it))
        state, m = step(state, parallel.host_to_global({"x": batches[-1]["x"][None]}, run.mesh, batch_axis=1))
        states.append(jax.device_get(state))  # on the host before the next step donates it
        metrics.append(jax.device_get(m))
    return run, batches, states, {k: np.concatenate([m[k] for m in metrics]) for k in metrics[0]}


def _check_ema(states, decay):
    """ema_{k+1} = decay · ema_k + (1 − decay) · params_{k+1} after every step."""
    for before, after in zip(states, states[1:]):
        for e0, e1, p1 in zip(*(jax.tree.leaves(s) for s in (before.ema_params, after.ema_params, after.params))):
            np.testing.assert_allclose(e1, decay * e0 + (1 - decay) * p1, rtol=1e-5, atol=1e-7)


def _gates(params):
    return np.stack([np.asarray(params[f"gate_{i}"]["embedding"]) for i in range(3)])


def test_toy2d_recipes_train_as_their_docstring_says():
    """configs/toy2d.py and its :tutorial recipe, loaded as the command line loads them, each
    trained two steps: where the docstring says they differ, the built objects differ so."""
    ours = config_loading.load_config("configs/toy2d.py")
    tutorial = config_loading.load_config("configs/toy2d.py:tutorial")
    run, batches, states, m = _two_train_steps(ours)
    t_run, t_batches, t_states, t_m = _two_train_steps(tutorial)
    for b, mm in ((batches, m), (t_batches, t_m)):  # batch 128 of standardised 2-D points
        assert b[0]["x"].shape == (128, 2) and b[0]["x"].dtype == np.float32
        assert np.isfinite(mm["loss"]).all() and (mm["loss"] > 0).all() and mm["finite"].all()
    # Ours: linear β 1e-4 → 0.2 over T = 100, ᾱ_T = 2e-5 (x_T is noise); the tutorial's sigmoid
    # β 1e-5 → 1e-2: ᾱ_T = 0.60, x_T keeps √0.60 = 78% of the signal.
    np.testing.assert_allclose(run.sched.betas, np.linspace(1e-4, 0.2, 100), rtol=1e-6)
    sigmoid = 1e-5 + (1e-2 - 1e-5) / (1 + np.exp(-np.linspace(-6, 6, 100)))
    np.testing.assert_allclose(t_run.sched.betas, sigmoid, rtol=1e-6)
    assert float(run.sched.alphas_cumprod[-1]) == pytest.approx(2e-5, rel=0.1)
    assert float(t_run.sched.alphas_cumprod[-1]) == pytest.approx(0.60, abs=0.01)
    assert np.sqrt(float(t_run.sched.alphas_cumprod[-1])) == pytest.approx(0.78, abs=0.005)
    # Gates start at 1 (ours) or U[0, 1) (the tutorial's); the default GatedMLP is ours.
    assert (_gates(states[0].params) == 1.0).all()
    g = _gates(t_states[0].params)
    assert g.min() >= 0.0 and g.max() < 1.0 and g.std() == pytest.approx(np.sqrt(1 / 12), rel=0.05)
    assert run.model == GatedMLP() and t_run.model != GatedMLP()
    # Adam lr 3e-3 after a 100-step warmup from 0 (update k uses lr·k/100) vs 1e-3 from the start.
    np.testing.assert_allclose(m["lr"], [0.0, 3e-5], rtol=1e-5)
    np.testing.assert_allclose(t_m["lr"], [1e-3, 1e-3], rtol=1e-5)
    # EMA 0.995 vs the tutorial's 0.9.
    _check_ema(states, 0.995)
    _check_ema(t_states, 0.9)
    # Both: σ_t² = β_t, and the predicted x0 is not clipped (the points are not in [−1, 1]).
    for config in (ours, tutorial):
        process = setup.create_diffusion(config)
        assert process.var_type == "fixedlarge" and process.clip_x0 is False
    with pytest.raises(config_loading.ConfigError, match="unknown toy2d recipe"):
        config_loading.load_config("configs/toy2d.py:fast")


def test_toy2d_overrides_of_the_docstring_change_the_data_and_schedule():
    config = config_loading.load_config("configs/toy2d.py", [
        "data.toy_name=moons", "diffusion.schedule=sigmoid", "diffusion.beta_start=1e-5"])
    # The training points, mapped back to data coordinates, lie on scikit-learn's two moons:
    # the unit circle about (0, 0) and the one about (1, 0.5), with the tutorial's N(0, 0.1²) noise.
    x = np.asarray(data.load_arrays(config.data, "train")["x"], np.float64)
    assert x.shape == (10_000, 2)
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-6)  # standardised
    np.testing.assert_allclose(x.std(axis=0), 1.0, atol=1e-6)
    stats = data.toy2d_statistics(config.data)
    p = x * stats["std"] + stats["mean"]
    off_arc = np.minimum(np.abs(np.linalg.norm(p, axis=1) - 1), np.abs(np.linalg.norm(p - [1.0, 0.5], axis=1) - 1))
    assert np.quantile(off_arc, 0.99) < 0.3 and off_arc.mean() < 0.1  # |N(0, 0.1²)|: 0.26, 0.08
    # The sigmoid schedule from 1e-5 to beta_end = 0.2, by hand.
    want = 1e-5 + (0.2 - 1e-5) / (1 + np.exp(-np.linspace(-6, 6, 100)))
    np.testing.assert_allclose(setup.create_schedule(config).betas, want, rtol=1e-6)


def test_digits_config_builds_its_data_model_and_train_step():
    """The default experiment (`make demo`) as configured: its data, and its whole train step
    traced (init, Adam, L_simple, gradients, EMA) on the 8-device mesh. A real step of this
    U-Net costs ~45 s of CPU to compile; tests/test_train.py runs the same step for real with
    a smaller U-Net, and the toy2d test above runs real steps of a config."""
    config = digits.get_config()
    # scikit-learn's 1,797 digits: 1,500 to train on, the 297 test digits of the bits/dim.
    assert data.num_examples(config.data, "train") == 1500 and data.num_examples(config.data, "test") == 297
    it = data.create_train_iterator(config.data, global_batch_size=int(config.training.batch_size),
                                    seed=int(config.seed))
    x = next(it)["x"]
    assert x.shape == (32, 8, 8, 1) and x.dtype == np.float32  # batch 32 of 8x8 grey images
    assert x.min() == -1.0 and 0.9 < x.max() <= 1.0  # in [-1, 1], background at -1
    run = setup.create_run(config)
    state = setup.abstract_train_state(config, run.model, run.shape, run.mesh)
    tx = train_state.create_optimizer(config)
    step = train.make_train_step(config, run.model, run.sched, tx, run.mesh)
    batch = {"x": jax.ShapeDtypeStruct((1, *x.shape), jnp.float32,
                                       sharding=parallel.data_sharded(run.mesh, batch_axis=1))}
    new_state, metrics = jax.eval_shape(step, state, batch)
    assert [(a.shape, a.dtype) for a in jax.tree.leaves(new_state)] == \
        [(a.shape, a.dtype) for a in jax.tree.leaves(state)]
    assert {k: v.shape for k, v in metrics.items()} == {k: (1,) for k in ("loss", "grad_norm", "lr", "finite")}
    eps_hat = jax.eval_shape(run.apply_fn, state.params, x, jnp.zeros((32,), jnp.int32))
    assert eps_hat.shape == x.shape and eps_hat.dtype == jnp.float32  # ε-prediction, image-shaped
    # Two levels: 32 channels at 8x8, 64 with self-attention at 4x4 (and in the middle block).
    levels = [state.params[k] for k in sorted(state.params) if k.startswith("down_blocks_")]
    assert [level["resnets_0"]["conv2"]["kernel"].shape[-1] for level in levels] == [32, 64]
    assert ["attentions_0" in level for level in levels] == [False, True]
    assert state.params["mid_block"]["attentions_0"]["to_q"]["kernel"].shape == (64, 64)
    # The cosine schedule over T = 100 (ᾱ(t) = f(t/T) / f(0), f(u) = cos²((u + 0.008)/1.008 · π/2),
    # the last β capped at 0.999), ending in noise; fixedsmall reverse variance.
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    abar = np.asarray(run.sched.alphas_cumprod, np.float64)
    assert abar.shape == (100,) and abar[-1] < 1e-4
    np.testing.assert_allclose(abar[:-1], f(np.arange(1, 100) / 100) / f(0), rtol=1e-4)
    assert run.process.var_type == "fixedsmall"
    # lr 2e-3 after a short linear warmup from 0 (100 steps of the 2,000).
    lr = train_state.learning_rate_schedule(config)
    np.testing.assert_allclose([float(lr(k)) for k in (0, 1, 50, 100, 1999)], [0, 2e-5, 1e-3, 2e-3, 2e-3],
                               rtol=1e-5)


def _doc_commands(path):
    """Every `python -m ddpm_jax.main ...` command of a doc (continuation lines joined)."""
    with open(os.path.join(REPO, path)) as f:
        text = f.read().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if "python -m ddpm_jax.main" in line]


@pytest.mark.parametrize("path", DOCS)
def test_doc_commands_name_real_configs_and_keys(path):
    commands = _doc_commands(path)
    assert commands, f"{path} shows no command"
    for command in commands:
        for part in command.split("&&"):
            if "ddpm_jax.main" not in part:
                continue
            args = shlex.split(part.split("ddpm_jax.main", 1)[1], comments=True)
            config_arg = next(a.split("=", 1)[1] for a in args if a.startswith("--config="))
            config = config_loading.load_config_file(os.path.join(REPO, config_arg.replace("$", "")))
            for arg in args:
                m = re.match(r"--config\.([\w.]+)=", arg)
                if m:
                    node = config
                    for key in m.group(1).split("."):
                        assert key in node, f"{path}: {arg} names no config field"
                        node = node[key]
                mode = re.match(r"--mode=(\w+)", arg)
                if mode:
                    assert mode.group(1) in config_loading.MODES, f"{path}: unknown {arg}"


def test_doc_figures_exist_and_are_small():
    with open(os.path.join(REPO, "docs/experiments.md")) as f:
        figures = re.findall(r"\]\((figures/[^)]+)\)", f.read())
    assert figures
    for figure in figures:
        path = os.path.join(REPO, "docs", figure)
        assert os.path.isfile(path), figure
        assert os.path.getsize(path) < 1_000_000, figure


def test_doc_code_snippet_runs():
    """The "Algorithms 1 and 2" snippet of docs/experiments.md runs as shown."""
    with open(os.path.join(REPO, "docs/experiments.md")) as f:
        text = f.read()
    snippet = re.search(r"<!-- snippet -->\s*```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(snippet, "experiments.md", "exec"), scope)  # noqa: S102 - our own doc
    assert np.isfinite(scope["loss"])
