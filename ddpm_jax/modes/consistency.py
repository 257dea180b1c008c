"""``--mode=consistency``: consistency distillation of a trained model (Song et al. 2023, Algorithm 2).

The student is the teacher's network read as the consistency function
f_θ(x̃, σ̃_t) = c_skip x̃ + c_out F_θ(x_t, t) (``diffusion.consistency_function``, pred=consistency;
f(x̃, σ_min) = x̃ exactly), initialised from the teacher's EMA weights. On the grid
0 = t_0 < t_1 < ... < t_M = T − 1 (t=0 and the N "trailing" timesteps of ``consistency.steps``):

    n ~ U{0..M−1}, x_{t_n+1} = q(x_{t_n+1} | x),  x̂_{t_n} = one DDIM step (η = 0) of the teacher,
    L = d(f_θ(x_{t_n+1}, t_n+1), f_θ⁻(x̂_{t_n}, t_n)),  θ⁻ ← μ θ⁻ + (1 − μ) θ (stop-gradient target).

The teacher's ODE solver is DDIM, Euler's method on the probability-flow ODE in (x̃, σ̃). The
distance d (``consistency.distance``) replaces the paper's LPIPS, which needs pretrained VGG
weights this project does not download: ``pseudo_huber`` √(‖a − b‖² + c²) − c with
c = 0.00054 √dim (Song & Dhariwal 2023, who found it close to LPIPS and better than L2: it is L2
for small errors and L1 for large ones, so outlier pixels do not dominate), or ``l2`` (the mean
square, the paper's own ablation). θ⁻ is the state's EMA params: what sample / eval read.
Sample with ``sampling.method=consistency`` (steps 1: one network call; more: Algorithm 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ddpm_jax import (checks, condition_config, conditioning, data, diffusion, loop, metrics, parallel, setup,
                      train_state)
from ddpm_jax import teacher as teacher_lib
from ddpm_jax.run_meta import RunMeta
from ddpm_jax.sampling.ddpm_ddim import ddim_step, ddim_timesteps
from ddpm_jax.train_state import TrainState

DISTANCES = ("pseudo_huber", "l2")


def grid(num_timesteps: int, steps: int) -> np.ndarray:
    """t_0 = 0 < t_1 < ... < t_M = T − 1: the boundary and the `steps` trailing timesteps, int32 ascending."""
    return np.unique(np.append(ddim_timesteps(num_timesteps, steps, "trailing"), 0)).astype(np.int32)


def distance(a: jnp.ndarray, b: jnp.ndarray, kind: str) -> jnp.ndarray:
    """d(a, b) per example [B]: pseudo-Huber with c = 0.00054 √dim, or the mean square (l2)."""
    sq = jnp.square(a - b).reshape(a.shape[0], -1)
    if kind == "l2":
        return jnp.mean(sq, axis=1)
    c = 0.00054 * np.sqrt(sq.shape[1])
    return jnp.sqrt(jnp.sum(sq, axis=1) + c ** 2) - c


def make_step(student_fn: Callable, eval_fn: Callable, student: diffusion.GaussianDiffusion,
              teacher: diffusion.GaussianDiffusion, ts: np.ndarray, tx: optax.GradientTransformation, *, seed: int,
              mu: float, kind: str, mesh, teacher_params: Any, conds: conditioning.Conditioning | None = None,
              cond_dropout: float = 0.0, nonfinite: str = "error") -> Callable:
    """`step(state, batches) -> (state, metrics)`, compiled: one Adam step of Algorithm 2 per batch.

    student_fn(params, x, t, cond, key) (training mode) and eval_fn(params, x, t, cond) are the network;
    the teacher's params travel outside the state (`loop.compile_step`'s `frozen`), θ⁻ is `ema_params`.
    """
    base_key, grid_t = jax.random.key(seed), jnp.asarray(ts)
    conds = conditioning.Conditioning(()) if conds is None else conds

    def one_step(state: TrainState, batch: dict, frozen: Any):
        step_key = jax.random.fold_in(base_key, state.step)
        dropout_key, loss_key = jax.random.split(step_key)
        cond = conds.for_step(batch, step_key, cond_dropout)
        n_key, noise_key = jax.random.split(loss_key)
        x0 = batch["x"]
        n = jax.random.randint(n_key, (x0.shape[0],), 0, len(ts) - 1)
        t_hi, t_lo = grid_t[n + 1], grid_t[n]
        z_hi = student.q_sample(x0, t_hi, jax.random.normal(noise_key, x0.shape, x0.dtype))
        z_lo = ddim_step(teacher, eval_fn(frozen, z_hi, t_hi, cond), z_hi, t_hi, t_lo, jnp.zeros_like(z_hi),
                         eta=0.0)[0]
        target = jax.lax.stop_gradient(student.x0_and_eps(eval_fn(state.ema_params, z_lo, t_lo, cond), z_lo, t_lo)[0])

        def loss_fn(params):
            f = student.x0_and_eps(student_fn(params, z_hi, t_hi, cond, dropout_key), z_hi, t_hi)[0]
            return jnp.mean(distance(f, target, kind))

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return loop.apply_gradients(state, grads, loss, tx, mu, nonfinite)  # θ⁻ ← EMA_μ(θ)

    return loop.compile_step(one_step, mesh, frozen=teacher_params)


def check_config(config: ml_collections.ConfigDict, mesh) -> teacher_lib.Teacher:
    """Every check before work (one-line ValueErrors naming the field); returns the teacher to load."""
    checks.check_config(config, "consistency")
    c = config.consistency
    checks.check_loop(c, "consistency")
    parallel.check_batch_size(int(c.batch_size), mesh, "consistency.batch_size")
    if str(config.diffusion.pred) != "consistency":
        raise ValueError(f"diffusion.pred={config.diffusion.pred!r}: the student is a consistency model; set "
                         "--config.diffusion.pred=consistency.")
    if str(c.distance) not in DISTANCES:
        raise ValueError(f"consistency.distance={c.distance!r} is unknown; use one of {', '.join(DISTANCES)}.")
    if not 0 <= float(c.ema_decay) < 1:
        raise ValueError(f"consistency.ema_decay={c.ema_decay} must be in [0, 1) (the paper: 0.95).")
    if not float(c.lr) > 0:
        raise ValueError(f"consistency.lr={c.lr} must be > 0 (the paper: 4e-4 on CIFAR-10).")
    T = int(config.diffusion.num_timesteps)
    if not 1 <= int(c.steps) < T:
        raise ValueError(f"consistency.steps={c.steps} must lie in 1..T-1={T - 1}: the grid's timesteps N "
                         "(the paper: 18).")
    return teacher_lib.read(config, str(c.teacher_workdir), "consistency.teacher_workdir")


def run(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Distils the teacher of `config.consistency` into a consistency model in `workdir` (resuming)."""
    parallel.initialize(config.get("distributed"))
    mesh = parallel.make_mesh()
    teacher = check_config(config, mesh)
    c = config.consistency
    student = setup.create_run(config, mesh)
    teacher = teacher_lib.load(teacher, student)
    record = dict(method="consistency", steps=int(c.steps), teacher_workdir=teacher.workdir,
                  teacher_step=teacher.step, teacher_pred=teacher.meta.pred, distance=str(c.distance),
                  ema_decay=float(c.ema_decay))
    meta = dataclasses.replace(setup.run_meta(config), source=dict(consistency=record))
    teacher_process = diffusion.GaussianDiffusion(student.sched, pred=teacher.meta.pred,
                                                  var_type=str(config.diffusion.var_type), clip_x0=setup.clips_x0(config))
    tx = train_state.adam(config.optim, float(c.lr))  # constant, as the paper
    rep = parallel.replicated(mesh)
    create = jax.jit(lambda p: TrainState.create(p, tx), out_shardings=rep)  # fresh buffers: the teacher's stay
    step = make_step(lambda p, x, t, cond, key: student.model.apply({"params": p}, x, t, cond, train=True,
                                                                     rngs={"dropout": key}),
                     setup.model_apply_fn(student.model), student.process, teacher_process,
                     grid(int(config.diffusion.num_timesteps), int(c.steps)), tx, seed=int(config.seed),
                     mu=float(c.ema_decay), kind=str(c.distance), mesh=mesh, teacher_params=teacher.params,
                     conds=condition_config.create_conditioning(config),
                     cond_dropout=float(config.training.get("label_dropout", 0.0)), nonfinite=str(c.nonfinite))

    def check_meta(stored: dict | None) -> None:
        if stored is not None:
            meta.check_matches(RunMeta.from_dict(stored, workdir), workdir)

    trainer = loop.Trainer(
        name="consistency", settings=loop.Settings.from_config(config, "consistency"), step=step,
        template=jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
                              jax.eval_shape(lambda p: TrainState.create(p, tx), teacher.params)),
        init=lambda: create(teacher.params), meta=meta.to_dict(), check_meta=check_meta, mesh=mesh,
        started=lambda: metrics.write_config(config, workdir), lr_field="consistency.lr")
    it = data.create_train_iterator(config.data, global_batch_size=int(c.batch_size), seed=int(config.seed),
                                    process_index=jax.process_index(), process_count=jax.process_count())
    return loop.train(trainer, workdir, it)

