"""The training loop: `train_and_evaluate(config, workdir)`.

One data-parallel step, `jax.jit` over the ('data',) mesh: params replicated, the
global batch sharded on its batch axis, the train state donated. Optimiser: Adam
with linear warmup, global-norm clipping and an EMA of the params (Ho et al. 2020,
App. B). The loss is L_simple (eq. (14)). The step's key is
`fold_in(base_key, step)`, so a resumed run draws exactly what an uninterrupted one
would; together with the checkpointed data-iterator state it sees the same batches.

Exact resume: a run killed at any moment and restarted with the same command ends
with bitwise the same params, EMA and optimiser state as an uninterrupted one. Besides
the keys and the data state, this needs the same compiled programs: dispatches of
`training.steps_per_dispatch` steps start at multiples of it, whatever step the run
resumed from. Bad input stops before any work, with one line naming the fix; a
SIGTERM checkpoints at the next step boundary and returns (`preemption.py`).
"""

from __future__ import annotations

import collections
import importlib
import json
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from ddpm_jax import (checkpointing, checks, data, diffusion, generate, imaging, metrics, parallel,
                      preemption, schedules)
from ddpm_jax.checks import NONFINITE_POLICIES, WorkdirError, prepare_workdir, validate_config  # noqa: F401
from ddpm_jax.models import build_model
from ddpm_jax.train_state import TrainState, create_optimizer, ema_update, learning_rate_schedule

EVALUATION_RUN = checks.EVALUATION_RUN
# Model hyper-parameters that do not change the params' shapes: a checkpoint may be
# resumed or sampled with other values (e.g. dropout off, bfloat16 compute).
NON_STRUCTURAL_KWARGS = ("dropout", "dtype", "param_dtype", "attention_impl", "remat", "gate_init")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
MetricWriter = metrics.MetricWriter  # (moved to metrics.py)


class NonFiniteError(FloatingPointError):
    """The loss or the gradient norm became NaN/Inf (training.nonfinite='error')."""


# ---- model, schedule, state ---------------------------------------------------------------------


def model_spec(config: ml_collections.ConfigDict) -> tuple[str, dict]:
    """(name, JSON-able keyword hyper-parameters) of the configured network."""
    m = config.model
    if m.name == "unet":
        return "unet", dict(
            ch=int(m.ch), out_ch=int(config.data.num_channels), ch_mult=[int(c) for c in m.ch_mult],
            num_res_blocks=int(m.num_res_blocks), attn_resolutions=[int(r) for r in m.attn_resolutions],
            dropout=float(m.dropout), resamp_with_conv=bool(m.resamp_with_conv), dtype=str(m.dtype),
            attention_impl=str(m.attention_impl), remat=bool(m.remat),
        )
    if m.name == "mlp":
        return "mlp", dict(num_timesteps=int(config.diffusion.num_timesteps), hidden=int(m.mlp_hidden),
                           out_dim=2, dtype=str(m.dtype), gate_init=str(m.get("mlp_gate_init", "ones")))
    raise ValueError(f"unknown model.name={m.name!r}; use unet or mlp (--config.model.name=unet).")


def build_from_spec(name: str, kwargs: dict) -> nn.Module:
    """The module for a (name, kwargs) spec, with the dtype names turned into dtypes."""
    kwargs = dict(kwargs)
    for key in ("dtype", "param_dtype"):
        if isinstance(kwargs.get(key), str):
            if kwargs[key] not in _DTYPES:
                raise ValueError(f"model.{key}={kwargs[key]!r} is unknown; use one of {sorted(_DTYPES)}.")
            kwargs[key] = _DTYPES[kwargs[key]]
    return build_model(name, **kwargs)


def create_model(config: ml_collections.ConfigDict) -> nn.Module:
    """The network of `config.model` (explicit kwargs; the model never sees the config)."""
    return build_from_spec(*model_spec(config))


def schedule_spec(config: ml_collections.ConfigDict) -> dict:
    d = config.diffusion
    return dict(name=str(d.schedule), num_timesteps=int(d.num_timesteps),
                beta_start=float(d.beta_start), beta_end=float(d.beta_end))


def create_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
    """The float32 Schedule tables of `config.diffusion` (computed in float64)."""
    spec = schedule_spec(config)
    betas = schedules.get_betas(spec.pop("name"), spec.pop("num_timesteps"), **spec)
    schedules.warn_if_not_noise(betas)
    return schedules.Schedule.from_betas(betas)


def checkpoint_meta(config: ml_collections.ConfigDict) -> dict:
    """What a checkpoint must agree with to be resumed / sampled: model, data shape, schedule."""
    name, kwargs = model_spec(config)
    return dict(model=dict(name=name, kwargs=kwargs), data_shape=list(data.example_shape(config.data)),
                schedule=schedule_spec(config), pred=str(config.diffusion.pred))


def structural_meta(meta: dict) -> dict:
    """`meta` without the model kwargs that leave the params' shapes unchanged."""
    meta = json.loads(json.dumps(meta))
    kwargs = meta.get("model", {}).get("kwargs", {})
    for key in NON_STRUCTURAL_KWARGS:
        kwargs.pop(key, None)
    return meta


def init_params(model: nn.Module, shape: tuple, seed: int, mesh) -> Any:
    """Initial params, replicated on the mesh (every process computes the same values)."""
    key = jax.random.fold_in(jax.random.key(seed), 0x1417)  # disjoint from the per-step keys' base

    def init():
        x = jnp.zeros((1, *shape), jnp.float32)
        return model.init({"params": key}, x, jnp.zeros((1,), jnp.int32), train=False)["params"]

    return jax.jit(init, out_shardings=parallel.replicated(mesh))()


def create_train_state(config, model, shape, mesh) -> tuple[TrainState, optax.GradientTransformation]:
    tx = create_optimizer(config.optim)
    params = init_params(model, shape, int(config.seed), mesh)
    state = jax.jit(lambda p: TrainState.create(p, tx), out_shardings=parallel.replicated(mesh))(params)
    return state, tx


def abstract_train_state(config, model: nn.Module, shape: tuple, mesh) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of the train state, computing nothing.

    The restore target on resume (no initialisation to compile); tracing the model
    also checks its hyper-parameters against the data shape before any work.
    """
    tx = create_optimizer(config.optim)

    def create():
        x = jnp.zeros((1, *shape), jnp.float32)
        t = jnp.zeros((1,), jnp.int32)
        return TrainState.create(model.init({"params": jax.random.key(0)}, x, t, train=False)["params"], tx)

    rep = parallel.replicated(mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
                        jax.eval_shape(create))


# ---- the step -----------------------------------------------------------------------------------


def make_train_step(config, model: nn.Module, sched: schedules.Schedule,
                    tx: optax.GradientTransformation, mesh) -> Callable:
    """`step(state, batches) -> (state, metrics)`, compiled; batches: {"x": [n, B, ...]}.

    n = steps_per_dispatch steps run in one call (lax.scan); metrics are [n] arrays.
    The state argument is donated: its buffers are reused for the new state.
    """
    base_key = jax.random.key(int(config.seed))
    decay = float(config.optim.ema_decay)
    pred = str(config.diffusion.pred)
    skip = str(config.training.nonfinite) == "skip"
    lr_fn = learning_rate_schedule(config.optim)

    def one_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        dropout_key, loss_key = jax.random.split(jax.random.fold_in(base_key, state.step))

        def loss_fn(params):
            def model_fn(x_t, t):
                return model.apply({"params": params}, x_t, t, train=True, rngs={"dropout": dropout_key})

            return jnp.mean(diffusion.loss_simple(sched, model_fn, batch["x"], loss_key, pred=pred))

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, decay)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip:  # a non-finite step leaves params, EMA and optimiser state untouched
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
            params, ema = keep(params, state.params), keep(ema, state.ema_params)
            opt_state = keep(opt_state, state.opt_state)
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        metrics = dict(loss=loss, grad_norm=grad_norm, lr=jnp.asarray(lr_fn(state.step), jnp.float32),
                       finite=finite)
        return new_state, metrics

    def multi_step(state, batches):
        n = jax.tree.leaves(batches)[0].shape[0]
        if n > 1 and jax.default_backend() != "cpu":
            return jax.lax.scan(one_step, state, batches)
        # One step, or XLA:CPU, which runs convolution gradients inside a while loop (scan)
        # ~25x slower than outside it: unroll the n steps in the compiled program instead.
        metrics = []
        for i in range(n):
            state, m = one_step(state, jax.tree.map(lambda b: b[i], batches))
            metrics.append(m)
        return state, jax.tree.map(lambda *ms: jnp.stack(ms), *metrics)

    rep = parallel.replicated(mesh)
    return jax.jit(multi_step, in_shardings=(rep, parallel.data_sharded(mesh, batch_axis=1)),
                   out_shardings=(rep, rep), donate_argnums=(0,))


# ---- the loop -----------------------------------------------------------------------------------


def grid_image(samples: np.ndarray, reference: np.ndarray | None = None, title: str = "") -> np.ndarray:
    """A uint8 picture of samples: an image grid (small images enlarged) or a 2-D scatter plot."""
    if samples.ndim == 2:
        return imaging.scatter_image(samples, reference=reference, title=title)
    grid = imaging.make_grid(samples)
    return imaging.upscale(grid, max(1, 512 // max(grid.shape[:2])))


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


def _next_dispatch(it, n: int, mesh) -> tuple[dict, dict]:
    """n host batches stacked to [n, b, ...] -> global arrays, and the iterator state after them."""
    batches = [next(it) for _ in range(n)]
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    return parallel.host_to_global(stacked, mesh, batch_axis=1), it.get_state()


def _crossed(prev: int, step: int, every: int) -> bool:
    return every > 0 and step // every > prev // every


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (resuming from `workdir` if it holds a checkpoint); returns the final state.

    Returns early (after a checkpoint) when preempted: see `preemption.py`.
    """
    parallel.initialize(config.get("distributed"))
    mesh = parallel.make_mesh()
    validate_config(config, mesh)
    t = config.training
    num_steps, batch_size = int(t.num_steps), int(t.batch_size)
    shape = data.example_shape(config.data)
    model, sched = create_model(config), create_schedule(config)  # warns if abar_T > 1e-2
    template = abstract_train_state(config, model, shape, mesh)
    # An unprepared dataset stops here, before the workdir is touched or anything compiles.
    it = data.create_train_iterator(config.data, global_batch_size=batch_size, seed=int(config.seed),
                                    process_index=jax.process_index(), process_count=jax.process_count())
    try:
        return _train(config, workdir, mesh, shape, model, sched, template, it)
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def _train(config, workdir, mesh, shape, model, sched, template, it) -> TrainState:
    started = time.time()
    t = config.training
    num_steps, batch_size = int(t.num_steps), int(t.batch_size)
    prepare_workdir(workdir)
    meta = checkpoint_meta(config)
    ckpt = checkpointing.Checkpointer(workdir, keep=int(t.keep_checkpoints), keep_every=int(t.keep_every),
                                      cleanup_tmp=True)
    skipped = 0  # updates skipped as non-finite (policy "skip") and logged, over the whole run
    # (first step, metrics [n]) of the steps since the last log; a checkpoint carries them over.
    pending: list[tuple[int, dict]] = []
    try:
        restored = ckpt.restore_newest_valid(template, check_meta=lambda stored: checkpointing.check_meta(
            None if stored is None else structural_meta(stored), structural_meta(meta), workdir))
        if restored is None:
            state, tx = create_train_state(config, model, shape, mesh)
        else:
            state, tx = restored.state, create_optimizer(config.optim)
            if restored.data_state is not None:
                it.set_state(restored.data_state)  # refuses another batch size / data / seed
            skipped = int(restored.extra.get("skipped_steps", 0))
            pending.extend((int(m["first_step"]), {k: np.asarray(v, bool if k == "finite" else np.float32)
                                                   for k, v in m["metrics"].items()})
                           for m in restored.extra.get("unlogged_metrics", []))
            logging.info("resumed from %s at step %d", ckpt.directory, restored.step)
        metrics.write_config(config, workdir)  # only now: a refused run leaves the old config.json
    except BaseException:
        ckpt.close()
        raise
    step = int(state.step)
    if step >= num_steps:
        logging.info("%s is at step %d >= training.num_steps=%d: nothing to train "
                     "(raise --config.training.num_steps to go on).", workdir, step, num_steps)
        ckpt.close()
        return state

    train_step = make_train_step(config, model, sched, tx, mesh)
    writer = metrics.MetricWriter(workdir, resume_step=step)
    watcher = preemption.PreemptionWatcher()
    sampler, reference = None, None
    if int(t.sample_every) > 0:
        sampler = generate.Sampler(generate.model_apply_fn(model), sched, mesh, shape=shape,
                                   seed=int(config.sampling.seed),
                                   **generate.sampler_options(config.sampling, config.diffusion))
        if len(shape) == 1:  # toy2d: plot the samples over a batch of training points
            ref_it = data.create_train_iterator(config.data, global_batch_size=batch_size,
                                                seed=int(config.seed) + 1)
            reference = next(ref_it)["x"]
            ref_it.close()

    def write_samples(at_step: int) -> None:
        out = generate.generate(sampler, state.ema_params, num_samples=int(t.num_grid_samples),
                                batch_size=int(config.sampling.batch_size))
        picture = grid_image(out.samples, reference, title=f"EMA samples, step {at_step}")
        if jax.process_index() == 0:
            imaging.save_png(os.path.join(workdir, "samples", f"step_{at_step}.png"), picture)
            writer.image(at_step, "samples/ema", picture)

    def nonfinite_steps(host: list) -> list[int]:
        """The non-finite steps in `host`; raises NonFiniteError under policy "error"."""
        # Step k is the k-th update (1-based), as "step" in metrics.jsonl.
        bad = [s0 + i + 1 for s0, m in host for i, ok in enumerate(m["finite"]) if not ok]
        if bad and str(t.nonfinite) == "error":
            raise NonFiniteError(
                f"non-finite loss or gradient at step {bad[0]}; lower optim.lr, check the data, or "
                "set --config.training.nonfinite=skip to skip such updates.")
        return bad

    def flush_metrics(at_step: int) -> dict | None:
        """Writes the mean loss etc. of the steps since the last log; checks finiteness."""
        nonlocal skipped
        if not pending:
            return None
        host = [(s0, jax.device_get(m)) for s0, m in pending]  # waits for the steps to finish
        pending.clear()
        now = time.time()
        elapsed, last_log[:] = now - last_log[1], [at_step, now]
        skipped += len(nonfinite_steps(host))
        loss = np.concatenate([m["loss"] for _, m in host])
        ok = np.isfinite(loss)
        values = dict(loss=float(np.mean(loss[ok])) if ok.any() else float("nan"),
                      grad_norm=float(host[-1][1]["grad_norm"][-1]), lr=float(host[-1][1]["lr"][-1]),
                      images_per_sec=len(loss) * batch_size / max(elapsed, 1e-9),
                      steps_per_sec=len(loss) / max(elapsed, 1e-9))
        if str(t.nonfinite) == "skip":
            values["skipped_steps"] = skipped
        writer.scalars(at_step, values)
        return values

    def save(at_step: int, force: bool = False) -> None:
        pending[:] = [(s0, jax.device_get(m)) for s0, m in pending]
        nonfinite_steps(pending)  # never checkpoint past a non-finite step unnoticed (policy "error")
        if at_step not in ckpt.all_steps():  # the steps since the last log go along: the log reads as one run
            unlogged = [dict(first_step=s0, metrics={k: np.asarray(v).tolist() for k, v in m.items()})
                        for s0, m in pending]
            ckpt.save(at_step, state, consumed_data_state, meta, force=force,
                      extra={"skipped_steps": skipped, "unlogged_metrics": unlogged})

    last_logged: dict = {}  # the newest metrics.jsonl values, for the closing summary
    progress = None
    if jax.process_index() == 0:
        from tqdm.auto import tqdm

        progress = tqdm(total=num_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)

    spd, prefetch = int(t.steps_per_dispatch), max(int(config.data.prefetch), 1)
    queue: collections.deque = collections.deque()
    queued_steps = step
    consumed_data_state = it.get_state()
    last_log = [step, time.time()]
    preempted = closing = False
    try:
        while step < num_steps and not preempted:
            while len(queue) < prefetch and queued_steps < num_steps:
                # Dispatches start at multiples of spd: a resumed run compiles the same programs.
                n = min(spd - queued_steps % spd, num_steps - queued_steps)
                queue.append((n, *_next_dispatch(it, n, mesh)))
                queued_steps += n
            n, batches, consumed_data_state = queue.popleft()
            state, step_metrics = train_step(state, batches)
            pending.append((step, step_metrics))
            prev, step = step, step + n
            if progress is not None:
                progress.update(n)
            preempted = watcher.reached(prev, step)
            if _crossed(prev, step, int(t.log_every)) or step == num_steps:
                values = flush_metrics(step)
                if values:
                    last_logged.update(values)
                if progress is not None and values:
                    progress.set_postfix(loss=f"{values['loss']:.4f}")
            if (_crossed(prev, step, int(t.checkpoint_every)) and step < num_steps) or preempted:
                save(step, force=preempted)
            if sampler is not None and _crossed(prev, step, int(t.sample_every)) and step < num_steps \
                    and not preempted:
                write_samples(step)
                if not pending:  # keep sampling time out of the next images/s
                    last_log[1] = time.time()
        if not preempted:
            save(step, force=True)
            if sampler is not None:
                write_samples(step)
        closing = True
        ckpt.close()  # waits for the last save (DiskFullError if it did not fit)
        if preempted:
            logging.warning("%s: checkpoint of step %d written to %s; rerun the same command to resume.",
                            watcher.reason, step, ckpt.directory)
    except BaseException:
        if not closing:
            try:  # let pending saves finish; the error in flight is the one to report
                ckpt.close()
            except Exception as close_err:  # noqa: BLE001
                logging.warning("while stopping: %s", close_err)
        raise
    finally:
        watcher.close()
        if progress is not None:
            progress.close()
        writer.close()
    if not preempted and jax.process_index() == 0:
        print_outputs(workdir, step, last_logged.get("loss"), time.time() - started, sampled=sampler is not None)
    if bool(t.eval_bpd_after) and not preempted:  # test-set bits/dim of the final EMA params
        importlib.import_module(EVALUATION_RUN).run(config, workdir, mode="bpd")
    return state
