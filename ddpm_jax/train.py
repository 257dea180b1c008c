"""`--mode=train`: the train step and the loop, `train_and_evaluate(config, workdir)`.

One data-parallel step, `jax.jit` over the ('data',) mesh: params replicated, the
global batch sharded on its batch axis, the train state donated. Optimiser: Adam
with linear warmup, global-norm clipping and an EMA of the params (Ho et al. 2020,
App. B). The loss is `diffusion.loss`: L_simple (eq. (14)), the bound (kl) or L_hybrid, with t
uniform or loss-aware (`diffusion.t_sampler`, its history in the state). The step's key is
`fold_in(base_key, step)`, so a resumed run draws exactly what an uninterrupted one
would; together with the checkpointed data-iterator state it sees the same batches.

Exact resume: a run killed at any moment and restarted with the same command ends
with bitwise the same params, EMA and optimiser state as an uninterrupted one. Besides
the keys and the data state, this needs the same compiled programs: dispatches of
`training.steps_per_dispatch` steps start at multiples of it, whatever step the run
resumed from. Bad input stops before any work, with one line naming the fix; a
SIGTERM checkpoints at the next step boundary and returns, a Ctrl-C does the same and raises
`preemption.Interrupted` (`preemption.py`). A workdir trains one run at a time
(`workdir_lock.py`); the other modes only read its checkpoints and may run beside it.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from ddpm_jax import (checkpointing, checks, data, files, guidance, imaging, metrics, parallel,
                      preemption, sampler, schedules, setup, timestep_sampler, workdir_lock)
from ddpm_jax.data import captions
from ddpm_jax.evaluation import bpd
from ddpm_jax.run_meta import RunMeta
from ddpm_jax.train_state import TrainState, create_optimizer, ema_update, learning_rate_schedule

DISPATCH_LOOPS = ("auto", "scan", "unroll")
_LABEL_STREAM = 0x1ABE  # label dropout's key: fold_in(step key, this), the step's other keys unchanged


# ---- the step -----------------------------------------------------------------------------------


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module, sched: schedules.Schedule,
                    tx: optax.GradientTransformation, mesh) -> Callable:
    """`step(state, batches) -> (state, metrics)`, compiled; batches: {"x": [n, B, ...]}.

    n = steps_per_dispatch steps run in one call; metrics are [n] arrays. The n steps are
    a `lax.scan` on accelerators and unrolled on the CPU (`training.dispatch_loop`: auto),
    or either one everywhere (scan | unroll). The state argument is donated.
    """
    base_key = jax.random.key(int(config.seed))
    decay = float(config.optim.ema_decay)
    process = setup.create_diffusion(config, sched)
    skip = str(config.training.nonfinite) == "skip"
    lr_fn = learning_rate_schedule(config.optim)
    loop = str(config.training.get("dispatch_loop", "auto"))
    if loop not in DISPATCH_LOOPS:
        raise ValueError(f"training.dispatch_loop={loop!r} is unknown; use one of {DISPATCH_LOOPS}.")
    # XLA:CPU runs convolution gradients inside a while loop (scan) ~25x slower than outside it.
    use_scan = loop == "scan" or (loop == "auto" and jax.default_backend() != "cpu")
    # The conditioning (class labels "y" or caption tokens), some replaced by the null one in training.
    cond_key = "tokens" if setup.text_conditioned(config) else "y"
    null = setup.null_condition(config)
    label_dropout = float(config.training.get("label_dropout", 0.0))

    def one_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        step_key = jax.random.fold_in(base_key, state.step)
        dropout_key, loss_key = jax.random.split(step_key)
        cond = {}
        if null is not None:  # conditional: the batch's labels / captions, some replaced by the null one
            cond[cond_key] = guidance.drop_labels(batch[cond_key], jax.random.fold_in(step_key, _LABEL_STREAM),
                                                  label_dropout, null_label=null)
        # t (uniform, or importance-sampled with weights) and ε: loss_simple's draws from loss_key.
        t_key, noise_key = jax.random.split(loss_key)
        x0 = batch["x"]
        t, weights = timestep_sampler.sample(t_key, x0.shape[0], sched.num_timesteps, state.t_history)
        noise = jax.random.normal(noise_key, x0.shape, x0.dtype)

        def loss_fn(params):
            def model_fn(x_t, t):
                return model.apply({"params": params}, x_t, t, **cond, train=True, rngs={"dropout": dropout_key})

            losses = process.losses(model_fn, x0, t, noise)
            return jnp.mean(weights * losses), losses

        (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        # The global batch's losses: every device computes the same new history.
        t_history = None if state.t_history is None else timestep_sampler.update(state.t_history, t, losses)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, decay)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip:  # a non-finite step leaves params, EMA and optimiser state untouched
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
            params, ema = keep(params, state.params), keep(ema, state.ema_params)
            opt_state, t_history = keep(opt_state, state.opt_state), keep(t_history, state.t_history)
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                                  t_history=t_history)
        step_metrics = dict(loss=loss, grad_norm=grad_norm, lr=jnp.asarray(lr_fn(state.step), jnp.float32),
                            finite=finite)
        return new_state, step_metrics

    def multi_step(state, batches):
        n = jax.tree.leaves(batches)[0].shape[0]
        if n > 1 and use_scan:
            return jax.lax.scan(one_step, state, batches)
        step_metrics = []
        for i in range(n):
            state, m = one_step(state, jax.tree.map(lambda b: b[i], batches))
            step_metrics.append(m)
        return state, jax.tree.map(lambda *ms: jnp.stack(ms), *step_metrics)

    rep = parallel.replicated(mesh)
    return jax.jit(multi_step, in_shardings=(rep, parallel.data_sharded(mesh, batch_axis=1)),
                   out_shardings=(rep, rep), donate_argnums=(0,))


# ---- the loop -----------------------------------------------------------------------------------


def next_dispatch(it: data.TrainIterator, n: int, mesh) -> tuple[dict, dict]:
    """n host batches stacked to global [n, B, ...] arrays, and the iterator state after them."""
    host = [next(it) for _ in range(n)]
    stacked = {k: np.stack([b[k] for b in host]) for k in host[0]}
    return parallel.host_to_global(stacked, mesh, batch_axis=1), it.get_state()


def _crossed(prev: int, step: int, every: int) -> bool:
    """True if a multiple of `every` lies in (prev, step]: a periodic action is due."""
    return every > 0 and step // every > prev // every


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (resuming from `workdir` if it holds a checkpoint); returns the final state.

    Returns early (after a checkpoint) when preempted: see `preemption.py`.
    """
    parallel.initialize(config.get("distributed"))
    mesh = parallel.make_mesh()
    checks.validate_config(config, mesh)
    if setup.text_conditioned(config):  # a workdir of another caption vocabulary: refused before any write
        captions.check_saved_tokenizer(workdir, captions.tokenizer_for(config.data))
    run = setup.create_run(config, mesh)  # warns if abar_T > 1e-2
    template = setup.abstract_train_state(config, run.model, run.shape, mesh)
    # An unprepared dataset stops here, before the workdir is touched or anything compiles.
    it = data.create_train_iterator(config.data, global_batch_size=int(config.training.batch_size),
                                    seed=int(config.seed), process_index=jax.process_index(),
                                    process_count=jax.process_count())
    checks.prepare_workdir(workdir)
    lock = workdir_lock.WorkdirLock(workdir, "train", is_primary=jax.process_index() == 0,
                                    agree=parallel.primary_decides)
    try:
        with lock:  # a second training run into this workdir stops here, naming this one
            return _TrainingLoop(config, workdir, run, template, it).run()
    finally:
        it.close()


class _TrainingLoop:
    """One training run: restore or initialise, then dispatch steps and do the periodic actions."""

    def __init__(self, config, workdir: str, run: setup.Run, template: TrainState, it: data.TrainIterator):
        self.config, self.workdir, self.run_, self.it = config, workdir, run, it
        self.t = config.training
        self.num_steps = int(self.t.num_steps)
        self.started = time.time()
        self.closing = False  # set once the final checkpoint is being waited for
        self.ckpt = checkpointing.Checkpointer(workdir, keep=int(self.t.keep_checkpoints),
                                               keep_every=int(self.t.keep_every), cleanup_tmp=True)
        try:
            self.state, self.tx, self.buffer = self._restore_or_init(template)
            metrics.write_config(config, workdir)  # only now: a refused run leaves the old config.json
            if setup.text_conditioned(config):  # sampling encodes captions with this vocabulary
                captions.check_saved_tokenizer(workdir, captions.tokenizer_for(config.data),
                                               save=jax.process_index() == 0)
        except BaseException:
            self.ckpt.close()
            raise

    def _restore_or_init(self, template: TrainState):
        meta = self.run_.meta
        check = lambda stored: meta.check_matches(RunMeta.from_dict(stored), self.workdir) \
            if stored is not None else None  # noqa: E731
        restored = self.ckpt.restore_newest_valid(template, check_meta=check)
        batch, policy = int(self.t.batch_size), str(self.t.nonfinite)
        if restored is None:
            state, tx = setup.create_train_state(self.config, self.run_.model, self.run_.shape, self.run_.mesh)
            return state, tx, metrics.MetricBuffer(batch, policy)
        if restored.data_state is not None:
            self.it.set_state(restored.data_state)  # refuses another batch size / data / seed
        logging.info("resumed from %s at step %d", self.ckpt.directory, restored.step)
        return (restored.state, create_optimizer(self.config.optim),
                metrics.MetricBuffer.from_json(restored.extra, batch, policy))

    def _dispatches(self, step: int) -> Iterator[tuple[int, dict, dict]]:
        """(n, global batches [n, B, ...], data state after them), `data.prefetch` ahead."""
        spd, prefetch = int(self.t.steps_per_dispatch), max(int(self.config.data.prefetch), 1)
        queue: collections.deque = collections.deque()
        queued = step
        while queue or queued < self.num_steps:
            while len(queue) < prefetch and queued < self.num_steps:
                # Dispatches start at multiples of spd: a resumed run compiles the same programs.
                n = min(spd - queued % spd, self.num_steps - queued)
                queue.append((n, *next_dispatch(self.it, n, self.run_.mesh)))
                queued += n
            yield queue.popleft()

    def run(self) -> TrainState:
        step = int(self.state.step)
        if step >= self.num_steps:
            logging.info("%s is at step %d >= training.num_steps=%d: nothing to train "
                         "(raise --config.training.num_steps to go on).", self.workdir, step, self.num_steps)
            self.ckpt.close()
            return self.state
        t, run = self.t, self.run_
        train_step = make_train_step(self.config, run.model, run.sched, self.tx, run.mesh)
        self.writer = metrics.MetricWriter(self.workdir, resume_step=step)
        self.grids = _SampleGrids(self.config, run, self.writer, self.workdir) if int(t.sample_every) else None
        self.data_state, self.last_log, self.last_values = self.it.get_state(), (step, time.time()), {}
        watcher, preempted = preemption.PreemptionWatcher(), False
        try:
            with files.progress_bar(self.num_steps, "train", unit="step", initial=step) as bar:
                for n, batches, data_state in self._dispatches(step):
                    self.state, step_metrics = train_step(self.state, batches)
                    self.buffer.add(step, step_metrics)
                    prev, step, self.data_state = step, step + n, data_state
                    bar.update(n)
                    preempted = watcher.reached(prev, step)
                    if _crossed(prev, step, int(t.log_every)) or step == self.num_steps:
                        self._log(step, bar)
                    if (_crossed(prev, step, int(t.checkpoint_every)) and step < self.num_steps) or preempted:
                        self._save(step, force=preempted)
                    if preempted:
                        break
                    if self.grids and _crossed(prev, step, int(t.sample_every)) and step < self.num_steps:
                        self.grids.write(self.state.ema_params, step)
                        if not len(self.buffer):  # keep sampling time out of the next images/s
                            self.last_log = (step, time.time())
            if not preempted:
                self._save(step, force=True)
                if self.grids:
                    self.grids.write(self.state.ema_params, step)
            self._close(step, preempted, watcher.reason)
            if watcher.interrupted:
                raise preemption.Interrupted(
                    f"{watcher.reason}: checkpoint of step {step} written to {self.ckpt.directory}; "
                    "rerun the same command to resume.")
        except preemption.Interrupted:
            raise
        except BaseException:
            self._close_after_error()
            raise
        finally:
            watcher.close()
            self.writer.close()
        if not preempted:
            self._report(step)
        return self.state

    def _log(self, step: int, bar) -> None:
        values = self.buffer.summary(time.time() - self.last_log[1])
        self.last_log = (step, time.time())
        if values:
            self.writer.scalars(step, values)
            self.last_values.update(values)
            bar.set_postfix(loss=f"{values['loss']:.4f}")

    def _save(self, step: int, force: bool = False) -> None:
        self.buffer.check_finite()  # never checkpoint past a non-finite step unnoticed (policy "error")
        if step not in self.ckpt.all_steps():  # unlogged steps go along: the log reads as one run
            self.ckpt.save(step, self.state, self.data_state, self.run_.meta.to_dict(), force=force,
                           extra=self.buffer.to_json())

    def _close(self, step: int, preempted: bool, reason: str) -> None:
        self.closing = True
        self.ckpt.close()  # waits for the last save (DiskFullError if it did not fit)
        if preempted:
            logging.warning("%s: checkpoint of step %d written to %s; rerun the same command to resume.",
                            reason, step, self.ckpt.directory)

    def _close_after_error(self) -> None:
        if self.closing:
            return
        try:  # let pending saves finish; the error in flight is the one to report
            self.ckpt.close()
        except Exception as close_err:  # noqa: BLE001
            logging.warning("while stopping: %s", close_err)

    def _report(self, step: int) -> None:
        """The closing lines; with `training.eval_bpd_after`, the test bits/dim of the EMA params."""
        if jax.process_index() == 0:
            print_outputs(self.workdir, step, self.last_values.get("loss"), time.time() - self.started,
                          sampled=self.grids is not None)
        if bool(self.t.eval_bpd_after):
            run = self.run_
            result = dict(bpd.evaluate_bpd(self.config, self.state.ema_params, run.model, run.sched, run.mesh),
                          step=step)
            paths = bpd.write_report(self.workdir, step, result)
            if jax.process_index() == 0:
                print(f"step {step}: {bpd.summary_line(result)}; wrote {paths['json']}", flush=True)


class _SampleGrids:
    """The periodic EMA sample grid: `workdir/samples/step_<k>.png` and TensorBoard."""

    def __init__(self, config, run: setup.Run, writer: metrics.MetricWriter, workdir: str):
        self.config = config
        self.sampler = setup.make_sampler(run, config)
        self.num, self.batch = int(config.training.num_grid_samples), int(config.sampling.batch_size)
        self.writer, self.workdir = writer, workdir
        self.reference = None
        if not imaging.is_image_shape(run.shape):  # toy2d: plot the samples over training points
            ref_it = data.create_train_iterator(config.data, global_batch_size=int(config.training.batch_size),
                                                seed=int(config.seed) + 1)
            self.reference = next(ref_it)["x"]
            ref_it.close()

    def write(self, ema_params, step: int) -> None:
        out = sampler.generate(self.sampler, ema_params, num_samples=self.num, batch_size=self.batch)
        labels = setup.asked_classes(self.config, np.arange(self.num))  # conditional: one row per class
        picture = (imaging.grid_image(out.samples, self.reference, title=f"EMA samples, step {step}")
                   if labels is None else imaging.class_grid(out.samples, labels))
        if jax.process_index() == 0:
            imaging.save_png(os.path.join(self.workdir, "samples", f"step_{step}.png"), picture)
            self.writer.image(step, "samples/ema", picture)


def print_outputs(workdir: str, step: int, loss: float | None, seconds: float, sampled: bool) -> None:
    """The closing lines of a run: where its samples, metrics and checkpoints are."""
    loss_text = "" if loss is None else f", final loss {loss:.4f}"
    lines = [f"trained to step {step} in {seconds:.0f} s (compilation included){loss_text}"]
    if sampled:
        lines.append(f"  samples:     {os.path.join(workdir, 'samples', f'step_{step}.png')}")
    lines += [f"  metrics:     {os.path.join(workdir, 'metrics.jsonl')} "
              f"(TensorBoard: tensorboard --logdir {os.path.join(workdir, 'tb')})",
              f"  checkpoints: {os.path.join(workdir, 'checkpoints')} (rerun the command to resume; "
              "--mode=sample to sample)"]
    print("\n".join(lines), flush=True)
