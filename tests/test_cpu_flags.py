"""The XLA:CPU flags the package sets: appended to the user's, off with DDPM_JAX_CPU_FLAGS=0, used by
XLA, and results unchanged beyond float tolerance."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

from ddpm_jax import cpu_flags

REPO = pathlib.Path(__file__).resolve().parents[1]

# Child processes (XLA reads XLA_FLAGS once per process), each with one mode's flags and the digits
# U-Net: `sample` samples random weights with the package's sampler (DDIM, 10 steps) and saves the
# samples; `train` runs 50 steps of the package's train step and saves the loss curve. Each prints
# the library fusions XLA made in its program.
_SAMPLE_CHILD = """
import json, sys
from ddpm_jax import cpu_flags
cpu_flags.apply("sample")
import jax, numpy as np
from bench import common, sample_speed
from ddpm_jax import data, parallel, sampler, setup
config = common.load_config("configs/digits.py", ["sampling.method=ddim", "sampling.steps=10"])
mesh = parallel.make_mesh(jax.devices()[:1])
shape = data.example_shape(config.data)
model, sched = setup.create_model(config), setup.create_schedule(config)
params = sample_speed.random_params(model, shape, mesh)
fn = sampler.Sampler(setup.model_apply_fn(model), setup.create_diffusion(config, sched), mesh, shape=shape,
                     seed=0, **setup.sampler_options(config))
indices = np.arange(16, dtype=np.int32)
np.save(sys.argv[1], np.asarray(fn(params, indices).samples))
hlo = jax.jit(setup.model_apply_fn(model)).lower(params, np.zeros((16, *shape), np.float32),
                                                 np.zeros((16,), np.int32)).compile().as_text()
print(json.dumps({"ynn_fusions": hlo.count('"kind":"__ynn_fusion"')}))
"""
_TRAIN_CHILD = """
import json, sys
from ddpm_jax import cpu_flags
cpu_flags.apply("train")
import jax, numpy as np
from bench import common
from ddpm_jax import data, loop, parallel, setup, train
config = common.load_config("configs/digits.py", ["training.batch_size=16"])
run = setup.create_run(config, parallel.make_mesh(jax.devices()[:1]))
state, tx = setup.create_train_state(config, run.model, run.shape, run.mesh)
step = train.make_train_step(config, run.model, run.sched, tx, run.mesh)
batches = data.create_train_iterator(config.data, global_batch_size=16, seed=0)
losses = []
for _ in range(50):
    batch = loop.next_dispatch(batches, 1, run.mesh)[0]
    state, metrics = step(state, batch)
    losses.extend(np.asarray(metrics["loss"]).ravel().tolist())
np.save(sys.argv[1], np.asarray(losses))
hlo = step.lower(state, batch).compile().as_text()
print(json.dumps({"ynn_fusions": hlo.count('"kind":"__ynn_fusion"')}))
"""


def test_merge_appends_and_keeps_the_users_value():
    flags = {"xla_cpu_a": "1", "xla_cpu_b": "x"}
    assert cpu_flags.merge("", flags) == "--xla_cpu_a=1 --xla_cpu_b=x"
    assert cpu_flags.merge("--xla_cpu_b=y --xla_dump_to=/tmp/d", flags) == (
        "--xla_cpu_b=y --xla_dump_to=/tmp/d --xla_cpu_a=1")


def test_apply_by_mode_and_switch():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert cpu_flags.apply("figures", env) == "--xla_force_host_platform_device_count=8"
    assert cpu_flags.apply("sample", dict(env, DDPM_JAX_CPU_FLAGS="0")) == env["XLA_FLAGS"]
    applied = cpu_flags.apply("sample", env)
    assert applied == env["XLA_FLAGS"] and applied.startswith("--xla_force_host_platform_device_count=8 --xla_cpu_")
    assert cpu_flags.apply("sample", env) == applied  # a second call adds nothing
    assert "individual_convolution" in cpu_flags.apply("train", dict(env))


def test_flags_only_on_a_jaxlib_that_knows_them():
    assert cpu_flags.jaxlib_supported()  # the pinned jaxlib
    assert cpu_flags.jaxlib_supported("0.11.0.dev20261201")
    assert not cpu_flags.jaxlib_supported("0.10.1") and not cpu_flags.jaxlib_supported("unknown")


def _child(tmp_path, program: str, switch: str) -> tuple[np.ndarray, dict]:
    out = tmp_path / f"out_{switch}.npy"
    env = dict(os.environ, DDPM_JAX_CPU_FLAGS=switch, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", program, str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return np.load(out), json.loads(proc.stdout.strip().splitlines()[-1])


def test_sampling_flags_are_used_and_keep_the_samples(tmp_path):
    with_flags, used = _child(tmp_path, _SAMPLE_CHILD, "1")
    without, plain = _child(tmp_path, _SAMPLE_CHILD, "0")
    assert used["ynn_fusions"] != plain["ynn_fusions"]  # XLA really fused differently
    assert np.isfinite(with_flags).all() and with_flags.std() > 0
    np.testing.assert_allclose(with_flags, without, rtol=1e-4, atol=1e-4 * np.abs(without).max())


def test_training_flags_are_used_and_keep_the_loss_curve(tmp_path):
    with_flags, used = _child(tmp_path, _TRAIN_CHILD, "1")
    without, plain = _child(tmp_path, _TRAIN_CHILD, "0")
    assert used["ynn_fusions"] < plain["ynn_fusions"]  # the convolutions left YNNPACK
    assert with_flags.shape == (50,) and np.isfinite(with_flags).all()
    assert with_flags[-10:].mean() < with_flags[:5].mean()  # the model learns
    np.testing.assert_allclose(with_flags, without, rtol=1e-4)
