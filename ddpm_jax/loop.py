"""The one training loop: restore or initialise, dispatch steps, log, checkpoint, stop cleanly.

A trainer (the DDPM's `train.py`, the autoencoder's `modes/autoencoder.py`) hands `train` a
`Trainer`: its compiled step `(state, batches) -> (state, metrics)`, its state's template and
init, the meta its checkpoints carry and optional hooks. The loop owns the rest, the same for
every trainer:

* Restore or init: the newest checkpoint that reads back intact and whose meta the trainer
  accepts (`checkpoint_recovery.newest_valid`; damaged ones are quarantined), with its
  data-iterator state and unlogged metrics; else the trainer's init.
* Exact resume: a run killed at any moment and restarted with the same command ends with
  bitwise the same state as an uninterrupted one. The step's keys are the trainer's
  (`fold_in(base_key, step)`), the data state travels with each checkpoint, and dispatches of
  `steps_per_dispatch` steps start at multiples of it whatever step the run resumed from, so
  a resumed run compiles the same programs.
* Cadence: metrics every `log_every` steps (metrics.jsonl, TensorBoard, the progress bar),
  checkpoints every `checkpoint_every` steps and at the end (the newest `keep_checkpoints`
  kept, every `keep_every`-th permanently), hooks every `Periodic.every` steps and at the end.
* Preemption (`preemption.py`): a SIGTERM checkpoints at the next dispatch boundary and
  returns; a Ctrl-C does the same and raises `preemption.Interrupted`; after any other error
  the pending saves finish and the error propagates. One run at a time per workdir
  (`workdir_lock.py`).
* Non-finite losses (`<section>.nonfinite`): "error" stops at the next log line or checkpoint,
  naming the first bad step; "skip" counts the updates the step left out (`keep_if_finite`).

* Post-hoc EMA (`post_hoc_ema.py`, `config.ema`): with `ema.sigma_rels`, the loop attaches the
  power-function EMA profiles to the state (its `phema` field), `compile_step` updates them after
  every step (eq. 4) and every `ema.snapshot_every` steps and at the end the loop saves them to
  `<workdir>/ema_snapshots/<step>` (kept whatever the checkpoints' rotation), which
  `--mode=phema` combines into an EMA of any σ_rel.

The state is any `flax.struct` dataclass with `step`, `params`, `ema_params` and (None unless the loop
attaches profiles) `phema` fields: checkpointing saves each field that is not None, and a distillation
student passes its frozen teacher's params to its compiled step outside the state
(`compile_step(..., frozen=teacher)`). The step metrics are [n] arrays with at least
"loss" and "finite".
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from ddpm_jax import (checkpoint_recovery, checkpointing, checks, data, files, metrics, parallel, post_hoc_ema,
                      preemption, workdir_lock)
from ddpm_jax.train_state import ema_update


@dataclasses.dataclass(frozen=True)
class Settings:
    """The loop's cadence, read from a trainer's config section (`training`, `autoencoder`)."""

    section: str  # the config section's name, for messages
    num_steps: int
    batch_size: int  # global batch (for images/s)
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int
    keep_every: int
    steps_per_dispatch: int
    nonfinite: str
    prefetch: int  # dispatches queued ahead of the step (data.prefetch)
    sigma_rels: tuple[float, ...] = ()  # the post-hoc EMA profiles tracked (config.ema; () = none)
    snapshot_every: int = 0  # steps between their snapshots (0 = none)

    @classmethod
    def from_config(cls, config: Any, section: str) -> "Settings":
        s, ema = config[section], config.get("ema") or {}
        sigma_rels = post_hoc_ema.parse_sigma_rels(ema.get("sigma_rels", ()), "ema.sigma_rels")
        snapshot_every = int(ema.get("snapshot_every", 0))
        if snapshot_every < 0 or (snapshot_every and not sigma_rels):
            raise ValueError(f"ema.snapshot_every={snapshot_every} needs ema.sigma_rels (e.g. 0.05,0.1) and must be "
                             ">= 0 (0 = no snapshots).")
        return cls(section=section, num_steps=int(s.num_steps), batch_size=int(s.batch_size),
                   log_every=int(s.log_every), checkpoint_every=int(s.checkpoint_every),
                   keep_checkpoints=int(s.keep_checkpoints), keep_every=int(s.keep_every),
                   steps_per_dispatch=int(s.steps_per_dispatch), nonfinite=str(s.nonfinite),
                   prefetch=max(int(config.data.prefetch), 1), sigma_rels=sigma_rels, snapshot_every=snapshot_every)


@dataclasses.dataclass(frozen=True)
class Periodic:
    """A hook run every `every` steps during training and once after the last step (not after a stop)."""

    every: int
    fn: Callable[[Any, int, metrics.MetricWriter], None]  # (state, step, writer)


@dataclasses.dataclass(frozen=True)
class Trainer:
    """What a trainer supplies to the loop."""

    name: str  # the mode: the workdir lock's owner and the progress bar's label
    settings: Settings
    step: Callable[[Any, Any], tuple[Any, dict]]  # compiled (state, batches [n, B, ...]) -> (state, [n] metrics)
    template: Any  # the state's shapes, dtypes and shardings: the restore target
    init: Callable[[], Any]  # the step-0 state
    meta: dict  # what each checkpoint records about the run
    mesh: Any  # the ('data',) mesh the batches are sharded over
    check_meta: Callable[[dict | None], None] | None = None  # refuses a checkpoint of another run
    started: Callable[[], None] | None = None  # once the workdir's checkpoint is accepted (config.json)
    hooks: tuple[Periodic, ...] = ()
    report: Callable[[Any, int, dict, float], None] | None = None  # (state, step, last log values, seconds)
    averaged: tuple[str, ...] = ("loss",)  # metrics averaged over a log interval (the others: last value)
    lr_field: str = "optim.lr"  # named when a loss turns non-finite


# ---- helpers of the trainers' steps ---------------------------------------------------------------


def keep_if_finite(finite: jnp.ndarray, new: Any, old: Any) -> Any:
    """`new` where the step was finite, else `old` (nonfinite=skip: the update is left out)."""
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)


def apply_gradients(state: Any, grads: Any, loss: jnp.ndarray, tx: optax.GradientTransformation, ema_decay: float,
                    nonfinite: str, **fields: Any) -> tuple[Any, dict]:
    """The end of every trainer's step: the optimizer's update of `state.params`, their EMA
    (`ema_decay` 0: the params themselves, bit for bit), the step count and the trainer's own
    `fields`. With `nonfinite` "skip" a step whose loss or gradient is not finite leaves all
    of them as they were but the step count. Returns the new state and the metrics loss,
    grad_norm and finite."""
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = params if ema_decay == 0 else ema_update(state.ema_params, params, ema_decay)
    new = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state, **fields)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if nonfinite == "skip":
        new = keep_if_finite(finite, new, state.replace(step=state.step + 1))
    return new, dict(loss=loss, grad_norm=grad_norm, finite=finite)


def compile_step(one_step: Callable[..., tuple[Any, dict]], mesh, use_scan: bool | None = None,
                 frozen: Any = None) -> Callable:
    """`step(state, batches) -> (state, metrics)` of `one_step(state, batch)`, compiled for the loop.

    The n = batches' leading size steps run in one call, a `lax.scan` (default on accelerators)
    or unrolled (default on the CPU, where XLA runs convolution gradients inside a while loop
    ~25x slower); metrics come back as [n] arrays. Params replicated, batches sharded on
    their batch axis, the state donated. `frozen` (a distillation teacher's params) is passed
    to every call as an argument, `one_step(state, batch, frozen)`, replicated and never
    donated: the program does not embed it as a constant. A state with post-hoc EMA profiles
    (`phema`) has them updated after each step with its new params (eq. 4), left out where the
    step was not finite.
    """
    scan = jax.default_backend() != "cpu" if use_scan is None else use_scan

    def multi_step(state, batches, *fixed):
        def tracked_step(s, b):
            new, m = one_step(s, b, *fixed)
            profiles = getattr(new, "phema", None)
            if profiles is not None:  # t = new.step: the updates applied, this one included
                new = new.replace(phema=keep_if_finite(m["finite"], post_hoc_ema.update(profiles, new.params, new.step),
                                                       profiles))
            return new, m

        n = jax.tree.leaves(batches)[0].shape[0]
        if n > 1 and scan:
            return jax.lax.scan(tracked_step, state, batches)
        step_metrics = []
        for i in range(n):
            state, m = tracked_step(state, jax.tree.map(lambda b: b[i], batches))
            step_metrics.append(m)
        return state, jax.tree.map(lambda *ms: jnp.stack(ms), *step_metrics)

    rep = parallel.replicated(mesh)
    data_sharding = parallel.data_sharded(mesh, batch_axis=1)
    if frozen is None:
        return jax.jit(multi_step, in_shardings=(rep, data_sharding), out_shardings=(rep, rep), donate_argnums=(0,))
    compiled = jax.jit(multi_step, in_shardings=(rep, data_sharding, rep), out_shardings=(rep, rep),
                       donate_argnums=(0,))
    return lambda state, batches: compiled(state, batches, frozen)


def next_dispatch(it: data.TrainIterator, n: int, mesh) -> tuple[Any, dict]:
    """n host batches stacked to global [n, B, ...] arrays, and the iterator state after them."""
    host = [next(it) for _ in range(n)]
    stacked = jax.tree.map(lambda *bs: np.stack(bs), *host)
    return parallel.host_to_global(stacked, mesh, batch_axis=1), it.get_state()


def _crossed(prev: int, step: int, every: int) -> bool:
    """True if a multiple of `every` lies in (prev, step]: a periodic action is due."""
    return every > 0 and step // every > prev // every


# ---- the loop -----------------------------------------------------------------------------------


def train(trainer: Trainer, workdir: str, it: data.TrainIterator) -> Any:
    """Trains in `workdir` (resuming from its newest valid checkpoint); returns the final state.

    Takes the workdir's lock and closes `it`. Returns early (after a checkpoint) when
    preempted, with `state.step < settings.num_steps`.
    """
    try:
        checks.prepare_workdir(workdir)
        lock = workdir_lock.WorkdirLock(workdir, trainer.name, is_primary=jax.process_index() == 0,
                                        agree=parallel.primary_decides)
        with lock:  # a second training run into this workdir stops here, naming this one
            return _Loop(trainer, workdir, it).run()
    finally:
        it.close()


class _Loop:
    """One training run: restore or initialise, then dispatch steps and do the periodic actions."""

    def __init__(self, trainer: Trainer, workdir: str, it: data.TrainIterator):
        self.trainer, self.s, self.workdir, self.it = trainer, trainer.settings, workdir, it
        self.started = time.time()
        self.closing = False  # set once the final checkpoint is being waited for
        self.ckpt = checkpointing.Checkpointer(workdir, keep=self.s.keep_checkpoints, keep_every=self.s.keep_every,
                                               cleanup_tmp=True)
        self.snapshots = (checkpointing.Checkpointer(workdir, keep=None, cleanup_tmp=True,
                                                     subdir=checkpointing.SNAPSHOT_DIR)
                          if self.s.snapshot_every else None)
        self.meta = dict(trainer.meta)
        if self.s.sigma_rels:  # a resume must track the same profiles
            self.meta["post_hoc_ema"] = dict(sigma_rels=list(self.s.sigma_rels))
        try:
            self.state, self.buffer = self._restore_or_init()
            if trainer.started is not None:  # only now: a refused run leaves the workdir's records as they were
                trainer.started()
        except BaseException:
            self._close_checkpointers()
            raise

    def _check_meta(self, stored: dict | None) -> None:
        """The trainer's check of a checkpoint's meta, and the same post-hoc EMA profiles."""
        stored = None if stored is None else dict(stored)
        tracked = (stored or {}).pop("post_hoc_ema", {}).get("sigma_rels", [])
        if stored is not None and list(tracked) != list(self.s.sigma_rels):
            raise ValueError(f"{self.workdir} tracks post-hoc EMA profiles ema.sigma_rels={tuple(tracked)}, the config "
                             f"gives {self.s.sigma_rels}; rerun with --config.ema.sigma_rels set as it was, or use a "
                             "fresh --workdir.")
        if self.trainer.check_meta is not None:
            self.trainer.check_meta(stored)

    def _restore_or_init(self) -> tuple[Any, metrics.MetricBuffer]:
        template = self.trainer.template
        if self.s.sigma_rels:
            template = template.replace(phema=post_hoc_ema.abstract(template.params, len(self.s.sigma_rels)))
        restored = checkpoint_recovery.newest_valid(self.ckpt, template, check_meta=self._check_meta)
        s = self.s
        fix = (f"lower {self.trainer.lr_field}, check the data, or set --config.{s.section}.nonfinite=skip "
               "to skip such updates")
        saved = {} if restored is None else restored.extra
        buffer = metrics.MetricBuffer.from_json(saved, s.batch_size, s.nonfinite, averaged=self.trainer.averaged,
                                                fix=fix)
        if restored is None:
            state = self.trainer.init()
            if self.s.sigma_rels:
                state = state.replace(phema=post_hoc_ema.create(state.params, self.s.sigma_rels))
            return state, buffer
        if restored.data_state is not None:
            self.it.set_state(restored.data_state)  # refuses another batch size / data / seed
        logging.info("resumed from %s at step %d", self.ckpt.directory, restored.step)
        return restored.state, buffer

    def _dispatches(self, step: int) -> Iterator[tuple[int, Any, dict]]:
        """(n, global batches [n, B, ...], data state after them), `prefetch` dispatches ahead."""
        spd, num_steps = self.s.steps_per_dispatch, self.s.num_steps
        queue: collections.deque = collections.deque()
        queued = step
        while queue or queued < num_steps:
            while len(queue) < self.s.prefetch and queued < num_steps:
                # Dispatches start at multiples of spd: a resumed run compiles the same programs.
                n = min(spd - queued % spd, num_steps - queued)
                queue.append((n, *next_dispatch(self.it, n, self.trainer.mesh)))
                queued += n
            yield queue.popleft()

    def run(self) -> Any:
        step, num_steps = int(self.state.step), self.s.num_steps
        if step >= num_steps:
            logging.info("%s is at step %d >= %s.num_steps=%d: nothing to train (raise --config.%s.num_steps "
                         "to go on).", self.workdir, step, self.s.section, num_steps, self.s.section)
            self._close_checkpointers()
            return self.state
        self.writer = metrics.MetricWriter(self.workdir, resume_step=step)
        self.data_state, self.last_log, self.last_values = self.it.get_state(), (step, time.time()), {}
        watcher = preemption.PreemptionWatcher()
        try:
            step, preempted = self._steps(step, watcher)
            if not preempted:
                self._save(step, force=True)
                self._snapshot(step)
                for hook in self.trainer.hooks:
                    hook.fn(self.state, step, self.writer)
            self._close(step, preempted and not watcher.interrupted, watcher.reason)  # Ctrl-C: main says it
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
        if not preempted and self.trainer.report is not None:
            self.trainer.report(self.state, step, self.last_values, time.time() - self.started)
        return self.state

    def _steps(self, step: int, watcher: preemption.PreemptionWatcher) -> tuple[int, bool]:
        """Dispatches until the last step or a stop request; returns (step reached, stopped early)."""
        s, num_steps = self.s, self.s.num_steps
        with files.progress_bar(num_steps, self.trainer.name, unit="step", initial=step) as bar:
            for n, batches, data_state in self._dispatches(step):
                self.state, step_metrics = self.trainer.step(self.state, batches)
                self.buffer.add(step, step_metrics)
                prev, step, self.data_state = step, step + n, data_state
                bar.update(n)
                preempted = watcher.reached(prev, step)
                if _crossed(prev, step, s.log_every) or step == num_steps:
                    self._log(step, bar)
                if (_crossed(prev, step, s.checkpoint_every) and step < num_steps) or preempted:
                    self._save(step, force=preempted)
                if _crossed(prev, step, s.snapshot_every) and step < num_steps:
                    self._snapshot(step)
                if preempted:
                    return step, True
                due = [h for h in self.trainer.hooks if _crossed(prev, step, h.every) and step < num_steps]
                for hook in due:
                    hook.fn(self.state, step, self.writer)
                if due and not len(self.buffer):  # keep the hooks' time out of the next images/s
                    self.last_log = (step, time.time())
        return step, False

    def _log(self, step: int, bar) -> None:
        # Dispatch is asynchronous: the window's steps are done only once their metrics arrive,
        # so the clock is read after the fetch (else images/s swings with the host's lead).
        self.buffer.fetch()
        now = time.time()
        values = self.buffer.summary(now - self.last_log[1])
        self.last_log = (step, now)
        if values:
            self.writer.scalars(step, values)
            self.last_values.update(values)
            bar.set_postfix(loss=f"{values['loss']:.4f}")

    def _save(self, step: int, force: bool = False) -> None:
        self.buffer.check_finite()  # never checkpoint past a non-finite step unnoticed (policy "error")
        if step not in self.ckpt.all_steps():  # unlogged steps go along: the log reads as one run
            self.ckpt.save(step, self.state, self.data_state, self.meta, force=force,
                           extra=self.buffer.to_json())

    def _snapshot(self, step: int) -> None:
        """The post-hoc EMA profiles at `step` into ema_snapshots/ (a rerun of a step keeps the one written)."""
        if self.snapshots is None or step in self.snapshots.all_steps():
            return
        self.buffer.check_finite()
        profiles = self.state.phema
        snapshot = post_hoc_ema.Snapshot(step=self.state.step, gammas=profiles.gammas, ema_params=profiles.ema_params)
        meta = dict(step=step, sigma_rels=list(self.s.sigma_rels), run=self.meta,
                    gammas=[post_hoc_ema.gamma_from_sigma_rel(v) for v in self.s.sigma_rels])
        self.snapshots.save(step, snapshot, None, meta, force=True)

    def _close_checkpointers(self) -> None:
        """Waits for the pending saves (checkpoints, then snapshots) and closes both."""
        try:
            self.ckpt.close()
        finally:
            if self.snapshots is not None:
                self.snapshots.close()

    def _close(self, step: int, preempted: bool, reason: str) -> None:
        self.closing = True
        self._close_checkpointers()  # waits for the last save (DiskFullError if it did not fit)
        if preempted:
            logging.warning("%s: checkpoint of step %d written to %s; rerun the same command to resume.",
                            reason, step, self.ckpt.directory)

    def _close_after_error(self) -> None:
        if self.closing:
            return
        try:  # let pending saves finish; the error in flight is the one to report
            self._close_checkpointers()
        except Exception as close_err:  # noqa: BLE001
            logging.warning("while stopping: %s", close_err)
