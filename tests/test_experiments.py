"""The experiment configs and their docs: what the docstrings and docs/*.md claim holds."""

import os
import re
import shlex

import numpy as np
import pytest

import ddpm_jax.main  # noqa: F401  (puts the repository root on sys.path for `configs`)
from configs import digits, single_image, toy2d
from ddpm_jax import main, schedules, train
from ddpm_jax.models.mlp import GatedMLP

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("docs/experiments.md", "docs/reproduce.md")


def _abar_T(config):
    d = config.diffusion
    return schedules.alpha_bar_final(schedules.get_betas(d.schedule, d.num_timesteps, beta_start=d.beta_start,
                                                         beta_end=d.beta_end))


def test_toy2d_recipes():
    ours, tutorial = toy2d.get_config(), toy2d.get_config("tutorial")
    assert _abar_T(ours) < 1e-4  # x_T is noise
    assert _abar_T(tutorial) == pytest.approx(0.605, abs=0.005)  # the tutorial's schedule is not
    recipe = (tutorial.optim.lr, tutorial.training.batch_size, tutorial.training.num_steps)
    assert recipe == (1e-3, 128, 78_200)
    assert tutorial.model.mlp_gate_init == "uniform" and ours.model.mlp_gate_init == "ones"
    assert not ours.sampling.clip_denoised and not tutorial.sampling.clip_denoised
    assert ours.sampling.trajectory_every == 10 and ours.sampling.num_samples == 10_000
    assert GatedMLP().gate_init == ours.model.mlp_gate_init  # the default network is ours
    with pytest.raises(ValueError, match="unknown toy2d recipe"):
        toy2d.get_config("fast")


def test_single_image_keeps_the_tutorials_schedule():
    config = single_image.get_config()
    d = config.diffusion
    assert (d.schedule, d.num_timesteps, d.beta_start, d.beta_end) == ("linear", 300, 1e-4, 0.04)
    assert config.sampling.init_image == "camera" and config.sampling.start_step == 180
    assert config.sampling.trajectory_every > 0
    assert _abar_T(config) < 1e-2


def test_digits_config_builds():
    config = digits.get_config()
    assert train.create_model(config).ch == config.model.ch


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
            config = main._load_config_file(os.path.join(REPO, config_arg.replace("$", "")))
            for arg in args:
                m = re.match(r"--config\.([\w.]+)=", arg)
                if m:
                    node = config
                    for key in m.group(1).split("."):
                        assert key in node, f"{path}: {arg} names no config field"
                        node = node[key]
                mode = re.match(r"--mode=(\w+)", arg)
                if mode:
                    assert mode.group(1) in main.MODES, f"{path}: unknown {arg}"


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
