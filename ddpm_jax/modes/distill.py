"""``--mode=distill``: one round of progressive distillation (Salimans & Ho 2022, Algorithm 2).

A teacher that samples with 2N deterministic DDIM steps (Song et al. 2021, eq. (12), η = 0) is
distilled into a student that takes N: the student starts as a copy of the teacher's EMA params
and learns to reach, in one DDIM step, where the teacher's two steps go. Each round is a normal
resumable run of the shared training loop (``loop.py``: Orbax checkpoints, exact resume,
preemption) in its own workdir, with ``config.distill``'s cadence; the next round's teacher is
this round's student workdir.

**The discrete grid.** The project's process has T integer timesteps, so the round's times
are the "trailing" DDIM timesteps (``sampling.ddpm_ddim.ddim_timesteps``): the teacher's 2N
steps visit τ_k = round(T − kT/(2N)) − 1, k = 0..2N−1, then x_0 (written τ_2N = −1, ᾱ = 1);
the student's N steps visit every other one, s_i = τ_2i. Student step i goes s_i → s_{i+1};
the teacher's two steps go t = τ_2i → t' = τ_2i+1 → t'' = τ_2i+2, the discrete t' = t − 0.5/N,
t'' = t − 1/N of Algorithm 2. N need not divide T (rounding nests the grids: checked here),
and the student samples with exactly ``method=ddim, steps=N, spacing=trailing, eta=0``.

**The round** (Algorithm 2, per example): i ~ U{0..N−1}, t = s_i, ε ~ N(0, I),
z_t = α_t x + σ_t ε (α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t));
z_t' = DDIM(teacher, z_t, t → t'), z_t'' = DDIM(teacher, z_t', t' → t'') (x̂_0 clipped as the
teacher's sampler clips it, ``sampling.clip_denoised``);
x̃ = (z_t'' − (σ_t''/σ_t) z_t) / (α_t'' − (σ_t''/σ_t) α_t) — the x̂_0 with which one DDIM step
from z_t lands on z_t''; L = w(t) ‖x̃ − x̂_η(z_t)‖² (mean over pixels and the batch) with
``distill.weighting``: ``truncated_snr`` w = max(SNR_t, 1) (the paper's "truncated SNR"
weighting) or ``snr_plus_one`` w = SNR_t + 1 (= ‖v − v̂‖² of a v-model).

**The student** predicts v (x̂ = α_t z_t − σ_t v̂) or x_0 (``diffusion.pred``: v or x0, §4 of
the paper: ε-prediction is unusable at the 1-step end, where α_t → 0). It is initialised from the
teacher's weights even when the teacher predicts ε: the output head then relearns what it means
(the paper's teachers are v-models already). Its workdir is an ordinary DDPM workdir with its
own ``RunMeta`` (pred = the student's) whose ``source["distill"]`` records the round: the
teacher, its steps 2N, the student's N and the sampler it takes (ddim, trailing, η = 0);
``--mode=sample`` / ``eval`` read it with the same config. A class-conditional teacher's
condition reaches teacher and student alike, dropped to ∅ at ``training.label_dropout`` as in
training; guidance is not folded into the student (Meng et al. 2023): guided sampling of a
student mixes its own conditional and null predictions.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ddpm_jax import (checkpointing, checks, condition_config, conditioning, data, diffusion, loop, metrics, parallel,
                      setup, train_state)
from ddpm_jax import teacher as teacher_lib
from ddpm_jax.run_meta import CheckpointMismatchError, RunMeta, schedule_betas
from ddpm_jax.sampling.ddpm_ddim import ddim_step, ddim_timesteps
from ddpm_jax.train_state import TrainState

STUDENT_PREDS = ("v", "x0")
WEIGHTINGS = ("truncated_snr", "snr_plus_one")
SPACING = "trailing"  # the student's sampler: ddim, steps N, this spacing, η = 0


# ---- the round's grid -----------------------------------------------------------------------------


class Grid(NamedTuple):
    """Student step i's timesteps and coefficients, [N] each (float32 from float64 tables).

    t, t_mid, t_next: s_i, τ_2i+1, s_{i+1} (−1: x_0); the target x̃ = a z_t'' − b z_t;
    weight: w(t) of the loss.
    """

    t: np.ndarray
    t_mid: np.ndarray
    t_next: np.ndarray
    a: np.ndarray
    b: np.ndarray
    weight: np.ndarray


def round_grid(betas: np.ndarray, steps: int, weighting: str) -> Grid:
    """The grid of a round from 2·`steps` teacher steps to `steps` student steps on β_1..β_T (float64)."""
    T, n = len(betas), int(steps)
    teacher, student = ddim_timesteps(T, 2 * n, SPACING), ddim_timesteps(T, n, SPACING)
    if not np.array_equal(teacher[0::2], student):
        raise ValueError(f"distill.steps={n}: the student's {SPACING} timesteps {student.tolist()} are not every "
                         f"other one of the teacher's {teacher.tolist()} on T={T}; choose a power of two N.")
    t_next = np.append(student[1:], -1).astype(np.int32)
    abar = np.cumprod(1.0 - np.asarray(betas, np.float64))
    abar_t, abar_next = abar[student], np.where(t_next >= 0, abar[np.maximum(t_next, 0)], 1.0)
    ratio = np.sqrt(1.0 - abar_next) / np.sqrt(1.0 - abar_t)  # σ_t'' / σ_t
    a = 1.0 / (np.sqrt(abar_next) - ratio * np.sqrt(abar_t))
    snr = abar_t / (1.0 - abar_t)
    weight = np.maximum(snr, 1.0) if weighting == "truncated_snr" else snr + 1.0
    f32 = lambda v: np.asarray(v, np.float32)  # noqa: E731
    return Grid(student, teacher[1::2].astype(np.int32), t_next, f32(a), f32(a * ratio), f32(weight))


def target(teacher_fn: Callable, process: diffusion.GaussianDiffusion, grid: Grid, z_t: jnp.ndarray,
           i: jnp.ndarray) -> jnp.ndarray:
    """x̃ of Algorithm 2: the x̂_0 with which one DDIM step s_i → s_{i+1} from z_t reaches the teacher's
    two steps (teacher_fn(x, t [B]) -> its network output; `process`: the teacher's pred and clipping)."""
    t, t_mid, t_next = (jnp.asarray(v)[i] for v in (grid.t, grid.t_mid, grid.t_next))
    zero = jnp.zeros_like(z_t)
    z_mid = ddim_step(process, teacher_fn(z_t, t), z_t, t, t_mid, zero, eta=0.0)[0]
    z_next = ddim_step(process, teacher_fn(z_mid, t_mid), z_mid, t_mid, t_next, zero, eta=0.0)[0]
    shape = (-1,) + (1,) * (z_t.ndim - 1)
    return jnp.asarray(grid.a)[i].reshape(shape) * z_next - jnp.asarray(grid.b)[i].reshape(shape) * z_t


# ---- the step ---------------------------------------------------------------------------------------


def make_step(student_fn: Callable, teacher_fn: Callable, student: diffusion.GaussianDiffusion,
              teacher: diffusion.GaussianDiffusion, grid: Grid, tx: optax.GradientTransformation, *, seed: int,
              ema_decay: float, mesh, teacher_params: Any, conds: conditioning.Conditioning | None = None,
              cond_dropout: float = 0.0, nonfinite: str = "error") -> Callable:
    """`step(state, batches) -> (state, metrics)`, compiled: one Adam step on Algorithm 2's loss per batch.

    student_fn(params, x, t, cond, key) and teacher_fn(params, x, t, cond) -> network outputs;
    the teacher's params travel outside the state (`loop.compile_step`'s `frozen`). The step's key
    is fold_in(key(seed), step), split as the DDPM step splits it (dropout; then i and ε).
    """
    base_key = jax.random.key(seed)
    conds = conditioning.Conditioning(()) if conds is None else conds

    def one_step(state: TrainState, batch: dict, frozen: Any):
        step_key = jax.random.fold_in(base_key, state.step)
        dropout_key, loss_key = jax.random.split(step_key)
        cond = conds.for_step(batch, step_key, cond_dropout)
        i_key, noise_key = jax.random.split(loss_key)
        x0 = batch["x"]
        i = jax.random.randint(i_key, (x0.shape[0],), 0, len(grid.t))
        t = jnp.asarray(grid.t)[i]
        z_t = student.q_sample(x0, t, jax.random.normal(noise_key, x0.shape, x0.dtype))
        x_tilde = jax.lax.stop_gradient(target(lambda x, s: teacher_fn(frozen, x, s, cond), teacher, grid, z_t, i))
        weight = jnp.asarray(grid.weight)[i]

        def loss_fn(params):
            x_hat = student.x0_and_eps(student_fn(params, z_t, t, cond, dropout_key), z_t, t)[0]
            return jnp.mean(weight * diffusion.meanflat(jnp.square(x_hat - x_tilde)))

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return loop.apply_gradients(state, grads, loss, tx, ema_decay, nonfinite)

    return loop.compile_step(one_step, mesh, frozen=teacher_params)


def optimizer(section: ml_collections.ConfigDict, optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam at `distill.lr`, linearly annealed to 0 over the round (the paper's) when `distill.lr_decay`,
    with `optim`'s β1, β2, ε and clipping."""
    decay = "linear" if bool(section.lr_decay) else "constant"
    return train_state.adam(optim, train_state.lr_schedule(float(section.lr), 0, decay, int(section.num_steps)))


# ---- the teacher's steps ------------------------------------------------------------------------------


def read_teacher(config: ml_collections.ConfigDict) -> tuple[teacher_lib.Teacher, int]:
    """The teacher (`teacher.read`) and the steps it samples with, checked against `distill.steps`."""
    d = config.distill
    n, T = int(d.steps), int(config.diffusion.num_timesteps)
    teacher = teacher_lib.read(config, str(d.teacher_workdir), "distill.teacher_workdir")
    own = int(teacher.meta.source.get("distill", {}).get("steps", 0))  # a previous round's student
    asked = int(d.teacher_steps)
    if own and asked not in (0, own):
        raise ValueError(f"distill.teacher_steps={asked}, but {teacher.workdir} is a student of {own} steps; "
                         f"set --config.distill.teacher_steps=0 (or {own}).")
    steps = own or asked or T
    if not 2 <= steps <= T or steps % 2:
        raise ValueError(f"the teacher samples with {steps} steps (distill.teacher_steps={asked}, T={T}): a round "
                         f"halves an even step count in 2..T; set --config.distill.teacher_steps to a power of two <= T.")
    if n * 2 != steps:
        raise ValueError(f"distill.steps={n} is not half the teacher's {steps} steps; set "
                         f"--config.distill.steps={steps // 2} (one round halves the steps).")
    return teacher, steps


# ---- the run ----------------------------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict, mesh) -> tuple[teacher_lib.Teacher, int]:
    """Every check before work (one-line ValueErrors naming the field); returns the teacher to load and its steps."""
    checks.check_config(config, "distill")
    d = config.distill
    checks.check_loop(d, "distill")
    parallel.check_batch_size(int(d.batch_size), mesh, "distill.batch_size")
    if str(config.diffusion.pred) not in STUDENT_PREDS:
        raise ValueError(f"diffusion.pred={config.diffusion.pred!r}: the student predicts v or x0 (Salimans & Ho "
                         "2022, Sec. 4; eps is unusable at one step); set --config.diffusion.pred=v.")
    if str(d.weighting) not in WEIGHTINGS:
        raise ValueError(f"distill.weighting={d.weighting!r} is unknown; use one of {', '.join(WEIGHTINGS)}.")
    if not float(d.lr) > 0:
        raise ValueError(f"distill.lr={d.lr} must be > 0 (the paper: 1e-4 to 2e-4).")
    if not 0 <= float(d.ema_decay) < 1:
        raise ValueError(f"distill.ema_decay={d.ema_decay} must be in [0, 1) (0 = no EMA).")
    if int(d.steps) < 1:
        raise ValueError(f"distill.steps={d.steps} must be >= 1: the student's DDIM steps N of this round.")
    found = read_teacher(config)
    round_grid(schedule_betas(config), int(d.steps), str(d.weighting))  # the grids must nest
    return found


def student_meta(config: ml_collections.ConfigDict, teacher: teacher_lib.Teacher, teacher_steps: int) -> RunMeta:
    """The student's RunMeta: the config's (its pred), with the round in source["distill"]."""
    n = int(config.distill.steps)
    record = dict(method="progressive", steps=n, teacher_steps=teacher_steps, teacher_workdir=teacher.workdir,
                  teacher_step=teacher.step, teacher_pred=teacher.meta.pred, weighting=str(config.distill.weighting),
                  sampler=dict(method="ddim", steps=n, spacing=SPACING, eta=0.0))
    return dataclasses.replace(setup.run_meta(config), source=dict(distill=record))


def _check_student(meta: RunMeta, workdir: str) -> Callable[[dict | None], None]:
    """Refuses a checkpoint of another model, or of another round (its student steps)."""

    def check(stored: dict | None) -> None:
        if stored is None:
            return
        other = RunMeta.from_dict(stored, workdir)
        meta.check_matches(other, workdir)
        theirs, ours = other.source.get("distill", {}).get("steps"), meta.source["distill"]["steps"]
        if theirs != ours:
            raise CheckpointMismatchError(
                f"{workdir} holds {'a student of ' + str(theirs) + ' steps' if theirs else 'no distillation round'}, "
                f"but distill.steps={ours}; give each round its own --workdir.")

    return check


def run(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Distils the teacher of `config.distill` into a student of `distill.steps` DDIM steps in `workdir`
    (resuming from its newest valid checkpoint); returns the final state."""
    parallel.initialize(config.get("distributed"))
    mesh = parallel.make_mesh()
    teacher, teacher_steps = check_config(config, mesh)
    d, n = config.distill, int(config.distill.steps)
    student = setup.create_run(config, mesh)
    teacher = teacher_lib.load(teacher, student)
    meta = student_meta(config, teacher, teacher_steps)
    teacher_process = diffusion.GaussianDiffusion(student.sched, pred=teacher.meta.pred,
                                                  var_type=str(config.diffusion.var_type), clip_x0=setup.clips_x0(config))
    tx, rep = optimizer(d, config.optim), parallel.replicated(mesh)
    create = jax.jit(lambda p: TrainState.create(p, tx), out_shardings=rep)  # fresh buffers: the teacher's stay
    step = make_step(lambda p, x, t, c, key: student.model.apply({"params": p}, x, t, c, train=True,
                                                                  rngs={"dropout": key}),
                     setup.model_apply_fn(student.model), student.process, teacher_process,
                     round_grid(schedule_betas(config), n, str(d.weighting)), tx, seed=int(config.seed),
                     ema_decay=float(d.ema_decay), mesh=mesh, teacher_params=teacher.params,
                     conds=condition_config.create_conditioning(config),
                     cond_dropout=float(config.training.get("label_dropout", 0.0)), nonfinite=str(d.nonfinite))
    trainer = loop.Trainer(
        name="distill", settings=loop.Settings.from_config(config, "distill"), step=step,
        template=jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
                              jax.eval_shape(lambda p: TrainState.create(p, tx), teacher.params)),
        init=lambda: create(teacher.params), meta=meta.to_dict(), check_meta=_check_student(meta, workdir),
        mesh=mesh, started=lambda: metrics.write_config(config, workdir), lr_field="distill.lr",
        report=lambda state, at, values, seconds: _report(workdir, n, teacher.workdir, teacher_steps, at, values,
                                                          seconds))
    it = data.create_train_iterator(config.data, global_batch_size=int(d.batch_size), seed=int(config.seed),
                                    process_index=jax.process_index(), process_count=jax.process_count())
    return loop.train(trainer, workdir, it)


def _report(workdir: str, n: int, teacher: str, teacher_steps: int, step: int, values: dict, seconds: float) -> None:
    """The closing lines: what the round made and how to sample it."""
    if jax.process_index() != 0:
        return
    loss = values.get("loss")
    print(f"distilled {teacher} ({teacher_steps} steps) into a student of {n} steps: step {step} in "
          f"{seconds:.0f} s{'' if loss is None else f', final loss {loss:.4f}'}\n"
          f"  checkpoints: {os.path.join(workdir, checkpointing.CHECKPOINT_DIR)} (rerun the command to resume)\n"
          f"  sample it:   --mode=sample --workdir={workdir} --config.sampling.method=ddim "
          f"--config.sampling.steps={n} --config.sampling.spacing={SPACING}", flush=True)
