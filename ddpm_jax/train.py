"""`--mode=train`: the DDPM train step and its trainer on the loop, `train_and_evaluate(config, workdir)`.

One data-parallel step, `jax.jit` over the ('data',) mesh: params replicated, the
global batch sharded on its batch axis, the train state donated. Optimiser: Adam
with linear warmup, global-norm clipping and an EMA of the params (Ho et al. 2020,
App. B). The loss is the process's (`GaussianDiffusion.losses`, `config.diffusion.loss`): L_simple
(eq. (14)), the bound (kl) or L_hybrid, with t uniform or loss-aware (`timestep_sampler.sample`,
`config.diffusion.t_sampler`, its history in the state). The step's key is
`fold_in(base_key, step)`, so a resumed run draws exactly what an uninterrupted one
would; together with the checkpointed data-iterator state it sees the same batches.

The loop (`loop.py`: restore or init, exact resume, checkpoints, metrics, preemption, the
non-finite policy) runs this step with `config.training`'s cadence; the trainer adds the
EMA sample grids (`training.sample_every`) and the closing report. Bad input stops before
any work, with one line naming the fix.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ddpm_jax import (checks, condition_config, data, imaging, loop, metrics, parallel, sampler, schedules, setup,
                      timestep_sampler)
from ddpm_jax.data import captions
from ddpm_jax.evaluation import bpd
from ddpm_jax.run_meta import RunMeta
from ddpm_jax.train_state import TrainState, create_optimizer, learning_rate_schedule

DISPATCH_LOOPS = ("auto", "scan", "unroll")


# ---- the step -----------------------------------------------------------------------------------


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module, sched: schedules.Schedule,
                    tx: optax.GradientTransformation, mesh) -> Callable:
    """`step(state, batches) -> (state, metrics)`, compiled; batches: {"x": [n, B, ...], "cond": {...}}.

    n = steps_per_dispatch steps run in one call; metrics are [n] arrays. The n steps are
    a `lax.scan` on accelerators and unrolled on the CPU (`training.dispatch_loop`: auto),
    or either one everywhere (scan | unroll). The state argument is donated.
    """
    base_key = jax.random.key(int(config.seed))
    decay = float(config.optim.ema_decay)
    process = setup.create_diffusion(config, sched)
    nonfinite = str(config.training.nonfinite)
    lr_fn = learning_rate_schedule(config)
    dispatch_loop = str(config.training.get("dispatch_loop", "auto"))
    if dispatch_loop not in DISPATCH_LOOPS:
        raise ValueError(f"training.dispatch_loop={dispatch_loop!r} is unknown; use one of {DISPATCH_LOOPS}.")
    # The run's condition entries of each batch, some replaced by their null ∅ (classifier-free guidance).
    conds = condition_config.create_conditioning(config)
    cond_dropout = float(config.training.get("label_dropout", 0.0))

    def one_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        step_key = jax.random.fold_in(base_key, state.step)
        dropout_key, loss_key = jax.random.split(step_key)
        cond = conds.for_step(batch, step_key, cond_dropout)
        # t (uniform, or importance-sampled with weights) and ε: loss_simple's draws from loss_key.
        t_key, noise_key = jax.random.split(loss_key)
        x0 = batch["x"]
        t, weights = timestep_sampler.sample(t_key, x0.shape[0], sched.num_timesteps, state.t_history)
        noise = jax.random.normal(noise_key, x0.shape, x0.dtype)

        def loss_fn(params):
            def model_fn(x_t, t):
                return model.apply({"params": params}, x_t, t, cond, train=True, rngs={"dropout": dropout_key})

            losses = process.losses(model_fn, x0, t, noise)
            return jnp.mean(weights * losses), losses

        (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        # The global batch's losses: every device computes the same new history.
        t_history = None if state.t_history is None else timestep_sampler.update(state.t_history, t, losses)
        new_state, step_metrics = loop.apply_gradients(state, grads, loss, tx, decay, nonfinite, t_history=t_history)
        return new_state, dict(step_metrics, lr=jnp.asarray(lr_fn(state.step), jnp.float32))

    return loop.compile_step(one_step, mesh, use_scan=None if dispatch_loop == "auto" else dispatch_loop == "scan")


# ---- the trainer on the loop -----------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (resuming from `workdir` if it holds a checkpoint); returns the final state.

    Returns early (after a checkpoint) when preempted: see `preemption.py`.
    """
    parallel.initialize(config.get("distributed"))
    mesh = parallel.make_mesh()
    checks.check_config(config, "train", mesh)
    if str(config.diffusion.pred) == "consistency":  # f has no regression target (diffusion.training_target)
        raise ValueError("diffusion.pred='consistency' is trained by --mode=consistency (consistency distillation "
                         "of a trained teacher); --mode=train takes eps, x0, v or xprev.")
    if condition_config.text_conditioned(config):  # a workdir of another caption vocabulary: refused before any write
        captions.check_saved_tokenizer(workdir, captions.tokenizer_for(config.data))
    run = setup.create_run(config, mesh)  # warns if abar_T > 1e-2
    template = setup.abstract_train_state(config, run.model, run.shape, mesh)
    tx = create_optimizer(config)

    def started() -> None:
        metrics.write_config(config, workdir)
        if condition_config.text_conditioned(config):  # sampling encodes captions with this vocabulary
            captions.check_saved_tokenizer(workdir, captions.tokenizer_for(config.data),
                                           save=jax.process_index() == 0)

    grids = _SampleGrids(config, run, workdir) if int(config.training.sample_every) else None
    trainer = loop.Trainer(
        name="train", settings=loop.Settings.from_config(config, "training"),
        step=make_train_step(config, run.model, run.sched, tx, mesh), template=template,
        init=lambda: setup.create_train_state(config, run.model, run.shape, mesh)[0],
        meta=run.meta.to_dict(),
        check_meta=lambda stored: None if stored is None else run.meta.check_matches(RunMeta.from_dict(stored, workdir),
                                                                                     workdir),
        mesh=mesh, started=started,
        hooks=() if grids is None else (loop.Periodic(int(config.training.sample_every), grids.write),),
        report=functools.partial(_report, config, run, workdir, sampled=grids is not None))
    # An unprepared dataset stops here, before the workdir is touched or anything compiles.
    it = data.create_train_iterator(config.data, global_batch_size=int(config.training.batch_size),
                                    seed=int(config.seed), process_index=jax.process_index(),
                                    process_count=jax.process_count())
    return loop.train(trainer, workdir, it)


def _report(config, run: setup.Run, workdir: str, state: TrainState, step: int, values: dict, seconds: float, *,
            sampled: bool) -> None:
    """The closing lines; with `training.eval_bpd_after`, the test bits/dim of the EMA params."""
    if jax.process_index() == 0:
        print_outputs(workdir, step, values.get("loss"), seconds, sampled=sampled)
    if bool(config.training.eval_bpd_after):
        result = dict(bpd.evaluate_bpd(config, state.ema_params, run.model, run.sched, run.mesh), step=step)
        paths = bpd.write_report(workdir, step, result)
        if jax.process_index() == 0:
            print(f"step {step}: {bpd.summary_line(result)}; wrote {paths['json']}", flush=True)


class _SampleGrids:
    """The periodic EMA sample grid: `workdir/samples/step_<k>.png` and TensorBoard."""

    def __init__(self, config, run: setup.Run, workdir: str):
        self.config = config
        self.sampler = setup.make_sampler(run, config)
        self.num, self.batch = int(config.training.num_grid_samples), int(config.sampling.batch_size)
        self.workdir = workdir
        self.reference = None
        if not imaging.is_image_shape(run.shape):  # toy2d: plot the samples over training points
            ref_it = data.create_train_iterator(config.data, global_batch_size=int(config.training.batch_size),
                                                seed=int(config.seed) + 1)
            self.reference = next(ref_it)["x"]
            ref_it.close()

    def write(self, state: TrainState, step: int, writer: metrics.MetricWriter) -> None:
        out = sampler.generate(self.sampler, state.ema_params, num_samples=self.num, batch_size=self.batch)
        labels = condition_config.asked_classes(self.config, np.arange(self.num))  # conditional: one row per class
        picture = (imaging.grid_image(out.samples, self.reference, title=f"EMA samples, step {step}")
                   if labels is None else imaging.class_grid(out.samples, labels))
        if jax.process_index() == 0:
            imaging.save_png(os.path.join(self.workdir, "samples", f"step_{step}.png"), picture)
            writer.image(step, "samples/ema", picture)


def print_outputs(workdir: str, step: int, loss: float | None, seconds: float, sampled: bool) -> None:
    """The closing lines of a run: where its samples, metrics and checkpoints are."""
    loss_text = "" if loss is None else f", final loss {loss:.4f}"
    lines = [f"trained to step {step} in {seconds:.0f} s (compilation included){loss_text}"]
    if sampled:
        lines.append(f"  samples:     {os.path.join(workdir, 'samples', f'step_{step}.png')}")
    lines += [f"  metrics:     {os.path.join(workdir, 'metrics.jsonl')} "
              f"({metrics.tensorboard_hint(os.path.join(workdir, 'tb'))})",
              f"  checkpoints: {os.path.join(workdir, 'checkpoints')} (rerun the command to resume; "
              "--mode=sample to sample)"]
    print("\n".join(lines), flush=True)
