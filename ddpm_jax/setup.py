"""Setup: a DDPM config becomes the objects a run needs.

The DDPM modes (train, sample, eval, bpd, figures) build what they run here:

    run = setup.create_run(config)             # mesh, example shape, model, schedule, RunMeta, codec
    loaded = setup.load_run(config, workdir)   # the same, plus the newest valid EMA params and their step
    sample = setup.make_sampler(loaded, config)  # the sharded sampler of config.sampling (decodes latents)

The modules below this one are given sections of the config (`config.data`, `config.optim`) or
plain values; only `config_loading` (which builds the config), `run_meta` (which records the
model and schedule it names) and `metrics.write_config` (which saves it) take a whole ConfigDict.
The autoencoder mode builds its own model.

`load_run` is how every read-only mode (sample, eval, bpd, figures) gets the params of a
trained or converted run: the checkpoint's `RunMeta` is compared with the config's, and
the newest checkpoint that reads back intact is used (a damaged one is skipped with a
warning that names the step used instead).
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from ddpm_jax import (checkpoint_recovery, checkpointing, data, parallel, rng, sampler, schedules, solvers,
                      timestep_sampler)
from ddpm_jax.data import captions, latents
from ddpm_jax.models import build_model, text
from ddpm_jax.run_meta import RunMeta, model_spec, schedule_spec
from ddpm_jax.train_state import TrainState, create_optimizer

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ---- model and schedule -------------------------------------------------------------------------


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


def create_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
    """The float32 Schedule tables of `config.diffusion` (computed in float64)."""
    spec = schedule_spec(config)
    betas = schedules.get_betas(spec.pop("name"), spec.pop("num_timesteps"), **spec)
    schedules.warn_if_not_noise(betas)
    return schedules.Schedule.from_betas(betas)


def model_apply_fn(model: nn.Module) -> Callable:
    """(params, x_t, t, y=None) -> model output, in eval mode (no dropout); y: the conditioning rows,
    class labels [B] or, for a U-Net with a text encoder, caption tokens [B, L]."""
    text = bool(getattr(model, "vocab_size", 0))

    def apply_fn(params, x, t, y=None):
        if y is None:  # unconditional networks (and the MLP) take no labels
            return model.apply({"params": params}, x, t, train=False)
        if text:
            return model.apply({"params": params}, x, t, tokens=y, train=False)
        return model.apply({"params": params}, x, t, y=y, train=False)

    return apply_fn


# ---- params and train state ---------------------------------------------------------------------


def _init_fn(model: nn.Module, shape: tuple, key: jax.Array) -> Callable[[], Any]:
    def init():
        x = jnp.zeros((1, *shape), jnp.float32)
        return model.init({"params": key}, x, jnp.zeros((1,), jnp.int32), train=False)["params"]

    return init


def init_params(model: nn.Module, shape: tuple, seed: int, mesh: Mesh) -> Any:
    """Initial params, replicated on the mesh (every process computes the same values)."""
    key = jax.random.fold_in(jax.random.key(seed), rng.INIT)
    return jax.jit(_init_fn(model, shape, key), out_shardings=parallel.replicated(mesh))()


def _replicated_structs(tree: Any, mesh: Mesh) -> Any:
    rep = parallel.replicated(mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), tree)


def abstract_params(model: nn.Module, shape: tuple, mesh: Mesh) -> Any:
    """Shapes, dtypes and (replicated) shardings of the params, computing nothing."""
    return _replicated_structs(jax.eval_shape(_init_fn(model, shape, jax.random.key(0))), mesh)


def initial_t_history(config: ml_collections.ConfigDict) -> Callable[[], Any]:
    """A function making the timestep sampler's initial state: `History` (loss_aware) or None."""
    name = str(config.diffusion.get("t_sampler", "uniform"))
    timestep_sampler.check_t_sampler(name)
    T = int(config.diffusion.num_timesteps)
    return (lambda: timestep_sampler.History.create(T)) if name == "loss_aware" else (lambda: None)


def create_train_state(config: ml_collections.ConfigDict, model: nn.Module, shape: tuple, mesh: Mesh
                       ) -> tuple[TrainState, optax.GradientTransformation]:
    """A fresh train state (params from `config.seed`), replicated on the mesh, and its optimiser."""
    tx = create_optimizer(config.optim)
    params = init_params(model, shape, int(config.seed), mesh)
    history = initial_t_history(config)
    state = jax.jit(lambda p: TrainState.create(p, tx, history()), out_shardings=parallel.replicated(mesh))(params)
    return state, tx


def abstract_train_state(config: ml_collections.ConfigDict, model: nn.Module, shape: tuple, mesh: Mesh
                         ) -> TrainState:
    """The train state's shapes, dtypes and shardings: the restore target, computing nothing.

    Tracing the model also checks its hyper-parameters against the data shape before any work.
    """
    tx = create_optimizer(config.optim)
    init = _init_fn(model, shape, jax.random.key(0))
    history = initial_t_history(config)
    return _replicated_structs(jax.eval_shape(lambda: TrainState.create(init(), tx, history())), mesh)


# ---- a run --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    """What every mode needs, built from a config."""

    mesh: Mesh
    shape: tuple[int, ...]  # what the network sees: the images, or a latent run's latents
    model: nn.Module
    sched: schedules.Schedule
    meta: RunMeta
    codec: latents.Codec | None = None  # a latent run's autoencoder: samples are decoded by it

    @property
    def apply_fn(self) -> Callable:
        return model_apply_fn(self.model)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of what the sampler returns: the decoded images of a latent run."""
        return self.shape if self.codec is None else self.codec.image_shape


@dataclasses.dataclass(frozen=True)
class LoadedRun(Run):
    """A run with the EMA params of a checkpoint (replicated on the mesh) and their step."""

    params: Any = None
    step: int = 0


def create_run(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Run:
    """Mesh (all devices unless given), example shape, model, schedule and RunMeta of `config`;
    with `data.latents_from`, the autoencoder whose decoder every sampler applies at its output."""
    mesh = parallel.make_mesh() if mesh is None else mesh
    workdir = data.latents_from(config.data)
    return Run(mesh=mesh, shape=tuple(data.example_shape(config.data)), model=create_model(config),
               sched=create_schedule(config), meta=RunMeta.from_config(config),
               codec=latents.load_codec(workdir) if workdir else None)


def warn_untrained_null(config: ml_collections.ConfigDict, workdir: str) -> None:
    """One line when guidance (sampling.guidance_scale > 0) mixes in the null condition of a model whose
    `config.json` says it never saw it (training.label_dropout = 0): its ε(x, ∅) is untrained."""
    w, path = float(config.sampling.get("guidance_scale", 0.0)), os.path.join(str(workdir), "config.json")
    if not w or not os.path.isfile(path):
        return
    with open(path) as f:
        trained = json.load(f).get("training", {}).get("label_dropout")
    if trained == 0:
        print(f"warning: sampling.guidance_scale={w:g} mixes in the unconditional prediction, but {workdir} was "
              "trained with training.label_dropout=0 (never unconditioned): its null condition is untrained; "
              "sample with guidance_scale=0 or train with label_dropout > 0.", flush=True)


def load_run(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh | None = None) -> LoadedRun:
    """`create_run(config)` with the EMA params of the workdir's newest valid checkpoint.

    The checkpoint must be of the config's model, data shape, schedule and prediction
    target (`RunMeta.check_matches`); nothing is written to the workdir.
    """
    run = create_run(config, mesh)
    warn_untrained_null(config, workdir)
    if not os.path.isdir(os.path.join(str(workdir), checkpointing.CHECKPOINT_DIR)):
        raise FileNotFoundError(
            f"no checkpoint in {workdir}; train first (--mode=train) or convert a released "
            "checkpoint (python -m ddpm_jax.convert) into this workdir.")
    if text_conditioned(config):  # the captions must be encoded with the vocabulary it was trained on
        captions.check_saved_tokenizer(str(workdir), captions.tokenizer_for(config.data))
    template = abstract_params(run.model, run.shape, run.mesh)
    check = lambda stored: run.meta.check_matches(RunMeta.from_dict(stored, str(workdir)), str(workdir))  # noqa: E731
    with checkpointing.Checkpointer(workdir, async_save=False) as ckpt:
        step, params = checkpoint_recovery.newest_valid_ema(
            ckpt, template, check_meta=check, step=int(config.get("checkpoint_step", checkpoint_recovery.NEWEST)))
    return LoadedRun(**{f.name: getattr(run, f.name) for f in dataclasses.fields(Run)},
                     params=params, step=int(step))


def sampler_options(config: ml_collections.ConfigDict) -> dict:
    """The static keyword arguments of `sampling.sample` from `config.sampling` / `config.diffusion`."""
    s, method = config.sampling, str(config.sampling.method)
    solver = method in solvers.METHODS  # the few-step solvers: sampling.solver_steps / solver_spacing
    return dict(
        method=method,
        num_steps=int(s.ddim_steps) if method == "ddim" else int(s.solver_steps) if solver else None,
        eta=float(s.ddim_eta),
        spacing=solver_spacing(config) if solver else str(s.ddim_spacing),
        var_type=str(config.diffusion.var_type),
        clip_denoised=clips_x0(config, bool(s.clip_denoised)),
        pred=str(config.diffusion.pred),
        **guidance_options(config),
    )


def clips_x0(config: ml_collections.ConfigDict, requested: bool) -> bool:
    """Whether x̂_0 is clipped to [−1, 1]: as `requested` on pixels, never on latents.

    Pixels live in [−1, 1]; the normalised latents of `data.latents_from` have unit variance and
    no bound (LDM samples them unclipped), so clipping them would cut off the data itself.
    """
    return requested and not data.latents_from(config.data)


def solver_spacing(config: ml_collections.ConfigDict) -> str:
    """`sampling.solver_spacing`, or the method's default when "" (logsnr; Heun: karras)."""
    return str(config.sampling.get("solver_spacing", "")) or solvers.DEFAULT_SPACING[str(config.sampling.method)]


def num_classes(config: ml_collections.ConfigDict) -> int:
    """`model.num_classes`: 0 for an unconditional model."""
    return int(config.model.get("num_classes", 0))


def text_conditioned(config: ml_collections.ConfigDict) -> bool:
    """A captioned run (`data.captions`): the U-Net reads caption tokens through its text encoder."""
    return bool(config.data.get("captions", False))


def null_condition(config: ml_collections.ConfigDict) -> int | tuple[int, ...] | None:
    """The conditioning of the unconditional branch (guidance, label dropout): the null class, or the
    null caption's tokens [context_length]; None for an unconditional model."""
    if text_conditioned(config):
        return tuple(int(i) for i in text.null_tokens(1, int(config.model.context_length))[0])
    return num_classes(config) or None


def guidance_options(config: ml_collections.ConfigDict) -> dict:
    """`sampling.sample`'s guidance_scale and null_label for a conditional model; {} otherwise
    (so an unconditional run's options, and the eval meta that stores them, hold no guidance fields)."""
    if null_condition(config) is None:
        return {}
    return dict(guidance_scale=float(config.sampling.get("guidance_scale", 0.0)), null_label=null_condition(config))


def sampler_conditions(config: ml_collections.ConfigDict) -> np.ndarray | tuple[int, ...] | None:
    """What the sampler cycles over image indices: the classes of `sampling.labels`, or a captioned
    run's `sampling.captions` as tokens int32 [K, context_length] (a caption longer than the
    context is a one-line error); None: an unconditional model."""
    if not text_conditioned(config):
        return sampler_labels(config)
    spec = captions.sampling_captions(config.sampling.get("captions", ""), config.data)
    return captions.tokenizer_for(config.data).encode(spec, int(config.model.context_length))[0]


def sampled_captions(config: ml_collections.ConfigDict, indices: np.ndarray) -> list[str] | None:
    """The caption of each image `indices` of a captioned run (`sampling.captions` cycled); None otherwise."""
    if not text_conditioned(config):
        return None
    spec = captions.sampling_captions(config.sampling.get("captions", ""), config.data)
    return [spec[int(i) % len(spec)] for i in indices]


def asked_classes(config: ml_collections.ConfigDict, indices: np.ndarray) -> np.ndarray | None:
    """The class each image `indices` was asked for: its label, or the digit its caption names
    (MNIST captions); None when unconditional or when a caption names no single digit."""
    if not text_conditioned(config):
        return sampler.cycle_labels(sampler_labels(config), indices)
    named = [captions.named_class(c) for c in sampled_captions(config, indices)]
    return None if None in named else np.asarray(named, np.int32)


def sampler_labels(config: ml_collections.ConfigDict) -> tuple[int, ...] | None:
    """The classes cycled over image indices (`sampler.Sampler(labels=...)`) from `sampling.labels`:
    '' -> None (the null class: unconditional samples), 'all' -> 0..num_classes-1, '3,5' -> (3, 5).
    Ranges are checked by `checks.check_labels`."""
    spec = str(config.sampling.get("labels", "")).strip()
    if not spec:
        return None
    if spec == "all":
        return tuple(range(num_classes(config)))
    try:
        return tuple(int(c) for c in spec.split(","))
    except ValueError:
        raise ValueError(f"sampling.labels={spec!r} is not 'all' or a comma-separated list of class "
                         "indices; use e.g. --config.sampling.labels=3,5") from None


def sampler_tag(config: ml_collections.ConfigDict) -> str:
    """A file-name part naming the sampler of `config.sampling`: ``ddpm``, ``ddim50``, ``ddim50eta0.5``,
    the few-step solvers by method, steps N and spacing: ``dpmpp_2m20-logsnr``, ``heun18-karras`` (NFE 35);
    a conditional model's labels and guidance follow: ``ddpm_yall_w2``, ``ddim50_y3-5``, ``ddpm_null``; a
    captioned run's captions: ``ddpm_cnull``, ``ddpm_cevalsplit_w3``, ``ddpm_c1a2b3c4d`` (crc32 of the list)."""
    s, method = config.sampling, str(config.sampling.method)
    tag = f"{method}{int(s.ddim_steps)}" if method == "ddim" else method
    if method in solvers.METHODS:
        tag += f"{int(s.solver_steps)}-{solver_spacing(config)}"
    if method == "ddim" and float(s.ddim_eta):
        tag += f"eta{float(s.ddim_eta):g}"
    if method == "ddim" and str(s.ddim_spacing) != "leading":
        tag += f"-{s.ddim_spacing}"
    tag = tag if clips_x0(config, bool(s.clip_denoised)) else tag + "_noclip"
    if num_classes(config):
        labels = str(s.get("labels", "")).strip()
        tag += "_null" if not labels else "_y" + labels.replace(",", "-").replace(" ", "")
    if text_conditioned(config):  # literal captions by a checksum: a tag stays a short file name
        spec = str(s.get("captions", "")).strip()
        if not spec:
            tag += "_cnull"
        elif spec == captions.EVAL_SPLIT_CAPTIONS:
            tag += "_cevalsplit"
        else:
            tag += f"_c{zlib.crc32(spec.encode()):08x}"
    if null_condition(config) is not None and float(s.get("guidance_scale", 0.0)):
        tag += f"_w{float(s.guidance_scale):g}"
    return tag


def make_sampler(run: Run, config: ml_collections.ConfigDict, *, mesh: Mesh | None = None,
                 **overrides: Any) -> sampler.Sampler:
    """The compiled sharded sampler of `config.sampling` for `run` (seed, trajectory, start step...).

    A latent run's sampler decodes its outputs (samples and trajectories): every caller sees images.

    `overrides` replace the config's options (e.g. `trajectory_every=10`, `start_step=k`).
    """
    options = dict(seed=int(config.sampling.seed), labels=sampler_conditions(config), **sampler_options(config))
    options.update(overrides)
    decode = None if run.codec is None else (run.codec.decode_fn, run.codec.params)
    return sampler.Sampler(run.apply_fn, run.sched, run.mesh if mesh is None else mesh, shape=run.shape,
                           decode=decode, **options)
