"""The training loop (ddpm_jax/loop.py) with a trainer that is neither the DDPM nor the autoencoder.

A toy trainer with more state than `TrainState` (a running sum beside params and EMA, as post-hoc
EMA profiles would be) and a frozen constant outside the state (as a distillation teacher): the
loop trains, checkpoints, logs, runs its hook and resumes it bitwise without knowing any of it.
"""

import json
import os
import shutil
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import loop

TEACHER = jnp.float32(0.5)  # outside the state, like a distillation teacher's params


@flax.struct.dataclass
class _State:
    step: jnp.ndarray
    params: Any
    ema_params: Any
    total: Any  # extra state the trainer keeps


class _Counter:
    """A data iterator: batch i (1-based) is {"x": [[i], [i]]}; its state is i."""

    def __init__(self):
        self.i = 0

    def __next__(self) -> dict:
        self.i += 1
        return {"x": np.full((2, 1), self.i, np.float32)}

    def get_state(self) -> dict:
        return {"i": self.i}

    def set_state(self, state: dict) -> None:
        self.i = int(state["i"])

    def close(self) -> None:
        pass


def _one_step(state: _State, batch: dict):
    loss = jnp.mean(batch["x"]) * TEACHER - state.params
    params = state.params + 0.25 * loss
    new = state.replace(step=state.step + 1, params=params, ema_params=0.9 * state.ema_params + 0.1 * params,
                        total=state.total + jnp.sum(batch["x"]))
    return new, dict(loss=loss, finite=jnp.isfinite(loss))


def _train(workdir: str, num_steps: int = 6, spd: int = 2):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def init() -> _State:
        zero = jnp.zeros((), jnp.float32)
        return _State(step=jnp.zeros((), jnp.int32), params=zero, ema_params=zero + 0, total=zero + 0)

    hooked = []
    settings = loop.Settings(section="toy", num_steps=num_steps, batch_size=2, log_every=2, checkpoint_every=3,
                             keep_checkpoints=5, keep_every=0, steps_per_dispatch=spd, nonfinite="error",
                             prefetch=2)
    trainer = loop.Trainer(
        name="toy", settings=settings, step=loop.compile_step(_one_step, mesh), template=jax.eval_shape(init),
        init=jax.jit(init, out_shardings=rep), meta={"model": "toy"}, mesh=mesh,
        hooks=(loop.Periodic(4, lambda state, step, writer: hooked.append((step, float(state.ema_params)))),))
    state = loop.train(trainer, workdir, _Counter())
    return jax.device_get(state), hooked


def test_a_new_trainer_trains_checkpoints_logs_and_resumes_bitwise(tmp_path):
    straight, hooked = _train(str(tmp_path / "straight"))
    assert int(straight.step) == 6 and float(straight.total) == 2 * sum(range(1, 7))
    assert [s for s, _ in hooked] == [4, 6]  # every 4 steps, and after the last one
    # Dispatches of 2 from step 0: checkpoint 3 is due after the dispatch that reaches 4.
    assert sorted(os.listdir(tmp_path / "straight" / "checkpoints")) == ["4", "6"]
    lines = [json.loads(ln) for ln in open(tmp_path / "straight" / "metrics.jsonl")]
    assert [ln["step"] for ln in lines] == [2, 4, 6] and all(np.isfinite(ln["loss"]) for ln in lines)

    resumed = str(tmp_path / "resumed")
    shutil.copytree(tmp_path / "straight", resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
    again, hooked = _train(resumed)  # from step 4: its data state, unlogged metrics and extra state
    assert [s for s, _ in hooked] == [6]
    jax.tree.map(np.testing.assert_array_equal, again, straight)
    relogged = [json.loads(ln) for ln in open(os.path.join(resumed, "metrics.jsonl"))]
    assert [(ln["step"], ln["loss"]) for ln in relogged] == [(ln["step"], ln["loss"]) for ln in lines]

    done, hooked = _train(resumed)  # at num_steps: nothing to train, nothing run
    assert hooked == [] and int(done.step) == 6
