"""Orbax checkpoints: round trip, other device counts, retention, EMA-only and pretrained reads, meta."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddpm_jax import checkpointing, parallel, run_meta
from ddpm_jax.train_state import TrainState


def _state(mesh, scale=1.0, step=0):
    params = {"conv": {"kernel": jnp.arange(24.0).reshape(2, 3, 4) * scale}, "bias": jnp.ones(5) * scale}
    tx = optax.adam(1e-3)
    state = TrainState.create(params, tx)
    state = state.replace(step=jnp.asarray(step, jnp.int32),
                          ema_params=jax.tree.map(lambda p: p * 0.5, params),
                          opt_state=tx.update(params, tx.init(params), params)[1])
    return parallel.replicate(state, mesh)


def _assert_tree_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


META = {"model": {"name": "unet", "kwargs": {"ch": 32}}, "data_shape": [8, 8, 1], "pred": "eps",
        "schedule": {"name": "linear", "num_timesteps": 10, "beta_start": 1e-4, "beta_end": 0.02}}


def test_round_trip_onto_fewer_devices(tmp_path):
    saved = _state(parallel.make_mesh(), scale=3.0, step=7)
    data_state = {"step": 7, "grain": {"next_index": 112}}
    with checkpointing.Checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.save(7, saved, data_state, META)
    one = parallel.make_mesh(jax.devices()[:1])
    template = _state(one)
    with checkpointing.Checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.latest_step() == 7
        state, restored_data = ckpt.restore(template)
    assert restored_data == data_state
    assert int(state.step) == 7
    _assert_tree_equal(state, jax.device_get(saved))
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding.mesh.devices.size == 1  # placed on the target mesh, not the saved one


def test_round_trip_onto_more_devices(tmp_path):
    one = parallel.make_mesh(jax.devices()[:1])
    saved = _state(one, scale=-2.0, step=3)
    with checkpointing.Checkpointer(str(tmp_path), async_save=False) as ckpt:
        ckpt.save(3, saved, None, META)
    with checkpointing.Checkpointer(str(tmp_path)) as ckpt:
        state, data_state = ckpt.restore(_state(parallel.make_mesh()))
        ema = ckpt.restore_ema_params(_state(parallel.make_mesh()).params)
    assert data_state is None
    _assert_tree_equal(state, jax.device_get(saved))
    _assert_tree_equal(ema, jax.device_get(saved.ema_params))
    assert ema["bias"].sharding.mesh.devices.size == 8


def test_keeps_latest_n_and_every_kth(tmp_path):
    mesh = parallel.make_mesh(jax.devices()[:1])
    with checkpointing.Checkpointer(str(tmp_path), keep=2, keep_every=4, async_save=True) as ckpt:
        for step in range(1, 10):
            ckpt.save(step, _state(mesh, scale=step, step=step), {"step": step}, META)
        ckpt.wait()
        assert ckpt.all_steps() == [4, 8, 9]
        state, data_state = ckpt.restore(_state(mesh), step=4)
    assert int(state.step) == 4 and data_state == {"step": 4}
    np.testing.assert_array_equal(np.asarray(state.params["bias"]), np.full(5, 4.0))


def test_save_pretrained_is_readable_by_restore_ema_params(tmp_path):
    mesh = parallel.make_mesh()
    params = jax.device_get(_state(mesh, scale=5.0).params)
    checkpointing.save_pretrained(str(tmp_path), params, META)
    assert checkpointing.read_meta(str(tmp_path)) == META
    with checkpointing.Checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.latest_step() == 0
        restored = ckpt.restore_ema_params(_state(mesh).params)
        _assert_tree_equal(restored, params)
        with pytest.raises(FileNotFoundError, match="only EMA params"):
            ckpt.restore(_state(mesh))
    with pytest.raises(FileExistsError, match="empty directory"):
        checkpointing.save_pretrained(str(tmp_path), params, META)


def test_missing_checkpoint_and_meta(tmp_path):
    assert checkpointing.read_meta(str(tmp_path)) is None
    with checkpointing.Checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError, match="no checkpoint under"):
            ckpt.restore_ema_params({"a": jnp.zeros(2)})


def test_run_meta_names_the_first_structural_difference():
    stored = run_meta.RunMeta.from_dict(META)
    stored.check_matches(run_meta.RunMeta.from_dict(json.loads(json.dumps(META))), "w")
    other = json.loads(json.dumps(META))
    other["model"]["kwargs"].update(ch=64, dropout=0.3, dtype="bfloat16")  # dropout, dtype: not structural
    expected = r"w holds a checkpoint with model.kwargs.ch=32, but the config gives model.kwargs.ch=64"
    with pytest.raises(run_meta.CheckpointMismatchError, match=expected):
        run_meta.RunMeta.from_dict(other).check_matches(stored, "w")
    other["model"]["kwargs"]["ch"] = 32
    run_meta.RunMeta.from_dict(other).check_matches(stored, "w")
    with pytest.raises(run_meta.CheckpointMismatchError, match="lacks 'schedule'"):
        run_meta.RunMeta.from_dict({"model": {"name": "unet", "kwargs": {}}, "data_shape": [8, 8, 1]})
