"""Mesh, shardings, host->global batches, and data-parallel equivalence of the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax.main  # noqa: F401  (puts the repository root on sys.path for `configs`)
from configs import digits, toy2d
from ddpm_jax import parallel, setup, train


def test_make_mesh_all_and_one_device():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",)
    assert mesh.devices.size == jax.device_count() == 8
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
    one = parallel.make_mesh(jax.devices()[:1])
    assert one.devices.size == 1 and one.axis_types == (jax.sharding.AxisType.Auto,)


def test_host_to_global_shards_the_batch_axis():
    mesh = parallel.make_mesh()
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    g = parallel.host_to_global({"x": x}, mesh)["x"]
    assert g.shape == (16, 3)
    assert g.sharding.spec == jax.sharding.PartitionSpec("data")
    assert {s.data.shape for s in g.addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(g), x)
    stacked = parallel.host_to_global(np.stack([x, x + 1]), mesh, batch_axis=1)
    assert stacked.shape == (2, 16, 3) and {s.data.shape for s in stacked.addressable_shards} == {(2, 2, 3)}
    np.testing.assert_array_equal(parallel.to_host(stacked)[1], x + 1)


def test_batch_size_not_divisible_by_devices_is_a_clear_error():
    with pytest.raises(ValueError, match=r"training.batch_size=12 is not divisible by the 8 devices"):
        parallel.check_batch_size(12, parallel.make_mesh())
    parallel.check_batch_size(12, parallel.make_mesh(jax.devices()[:4]))


def test_a_process_id_outside_the_processes_is_refused_before_joining():
    """Refused before `jax.distributed.initialize` (which would wait for a coordinator). Joining
    one is run for real by tests/test_multihost.py (two processes on 127.0.0.1)."""
    bad = {"coordinator_address": "127.0.0.1:1", "num_processes": 2, "process_id": 2}
    with pytest.raises(ValueError) as err:
        parallel.initialize(bad)
    message = str(err.value)
    assert "distributed.process_id=2" in message and "num_processes=2" in message
    assert "distinct id below num_processes" in message and "\n" not in message


def _tiny_config():
    config = digits.get_config()
    config.model.ch_mult = (1,)
    config.model.num_res_blocks = 1
    config.model.dropout = 0.1  # dropout active: its masks must not depend on the sharding
    config.model.attn_resolutions = ()
    config.optim.warmup_steps = 0  # a real update in the very first step
    config.training.batch_size = 16
    return config


def test_one_step_on_8_devices_equals_one_device():
    config = _tiny_config()
    model, sched = setup.create_model(config), setup.create_schedule(config)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 16, 8, 8, 1)).astype(np.float32)
    mesh8 = parallel.make_mesh()
    state, tx = setup.create_train_state(config, model, (8, 8, 1), mesh8)
    initial = jax.device_get(state)  # on the host: the step donates (deletes) its input
    results = []
    for mesh in (mesh8, parallel.make_mesh(jax.devices()[:1])):
        state = parallel.replicate(initial, mesh)  # the same initial state on each mesh
        step = train.make_train_step(config, model, sched, tx, mesh)
        state, metrics = step(state, parallel.host_to_global({"x": x}, mesh, batch_axis=1))
        results.append((jax.device_get(state), jax.device_get(metrics)))
    (s8, m8), (s1, m1) = results
    assert int(s8.step) == int(s1.step) == 1
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5, atol=1e-5)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), s8.params, initial.params)
    assert max(jax.tree.leaves(moved)) > 1e-4  # the step really changed the params
    for a, b in zip(jax.tree.leaves((s8.params, s8.ema_params, s8.opt_state)),
                    jax.tree.leaves((s1.params, s1.ema_params, s1.opt_state))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def _toy_config():
    config = toy2d.get_config()
    config.optim.warmup_steps = 0
    config.training.batch_size = 32
    return config


def test_two_steps_per_dispatch_equal_two_single_steps():
    config = _toy_config()
    model, sched = setup.create_model(config), setup.create_schedule(config)
    mesh = parallel.make_mesh()
    x = np.random.default_rng(1).normal(size=(2, 32, 2)).astype(np.float32)
    state, tx = setup.create_train_state(config, model, (2,), mesh)
    step = train.make_train_step(config, model, sched, tx, mesh)
    fused, m2 = step(state, parallel.host_to_global({"x": x}, mesh, batch_axis=1))
    state, _ = setup.create_train_state(config, model, (2,), mesh)
    losses = []
    for i in range(2):
        state, m = step(state, parallel.host_to_global({"x": x[i : i + 1]}, mesh, batch_axis=1))
        losses.append(float(m["loss"][0]))
    assert int(fused.step) == int(state.step) == 2
    np.testing.assert_allclose(np.asarray(m2["loss"]), losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(fused.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_nonfinite_skip_leaves_the_state_untouched():
    config = _toy_config()
    config.training.nonfinite = "skip"
    model, sched = setup.create_model(config), setup.create_schedule(config)
    mesh = parallel.make_mesh()
    state, tx = setup.create_train_state(config, model, (2,), mesh)
    before = jax.device_get(state)
    step = train.make_train_step(config, model, sched, tx, mesh)
    x = np.full((1, 32, 2), np.nan, np.float32)
    state, metrics = step(state, parallel.host_to_global({"x": x}, mesh, batch_axis=1))
    assert not bool(metrics["finite"][0]) and int(state.step) == 1
    for a, b in zip(jax.tree.leaves((before.params, before.ema_params, before.opt_state)),
                    jax.tree.leaves(jax.device_get((state.params, state.ema_params, state.opt_state)))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    finite_x = np.random.default_rng(2).normal(size=(1, 32, 2)).astype(np.float32)
    state, metrics = step(state, parallel.host_to_global({"x": finite_x}, mesh, batch_axis=1))
    assert bool(metrics["finite"][0]) and int(state.step) == 2
    assert jnp.isfinite(jax.tree.leaves(state.params)[0]).all()
