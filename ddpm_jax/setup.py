"""Setup: a DDPM config becomes the objects a run needs.

The DDPM modes (train, sample, eval, bpd, figures) build what they run here:

    run = setup.create_run(config)             # mesh, example shape, model, process, RunMeta, codec
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
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from ddpm_jax import (checkpoint_recovery, checkpointing, condition_config, data, diffusion, parallel, rng, sampler,
                      sampling, schedules, timestep_sampler)
from ddpm_jax.data import captions, latents
from ddpm_jax.models import build_model
from ddpm_jax.run_meta import RunMeta, model_spec, schedule_betas
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
    return build_from_spec(*model_spec(config, condition_config.create_conditioning(config).network_kwargs()))


def create_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
    """The float32 Schedule tables of `config.diffusion` (computed in float64)."""
    betas = schedule_betas(config)
    schedules.warn_if_not_noise(betas)
    return schedules.Schedule.from_betas(betas)


def create_diffusion(config: ml_collections.ConfigDict, sched: schedules.Schedule | None = None, *,
                     clip_denoised: bool | None = None) -> diffusion.GaussianDiffusion:
    """The process of `config.diffusion` (its tables, or `sched` when already built), validated;
    x̂_0 clipped as `clips_x0` decides."""
    d = config.diffusion
    return diffusion.GaussianDiffusion(create_schedule(config) if sched is None else sched,
                                       pred=str(d.pred), var_type=str(d.var_type), loss=str(d.get("loss", "mse")),
                                       clip_x0=clips_x0(config, clip_denoised),
                                       min_snr_gamma=float(d.get("min_snr_gamma", 0.0)))


def clips_x0(config: ml_collections.ConfigDict, requested: bool | None = None) -> bool:
    """Whether x̂_0 is clipped to [−1, 1]: as `requested` (None: `sampling.clip_denoised`) on pixels,
    never on latents.

    Pixels live in [−1, 1]; the normalised latents of `data.latents_from` have unit variance and
    no bound (LDM samples them unclipped), so clipping them would cut off the data itself.
    """
    requested = bool(config.sampling.clip_denoised if requested is None else requested)
    return requested and not data.latents_from(config.data)


def model_apply_fn(model: nn.Module) -> Callable:
    """(params, x_t, t, cond=None) -> model output, in eval mode (no dropout); cond: the condition
    pytree of rows aligned with x_t (`conditioning.py`), None or {} for the unconditional network."""

    def apply_fn(params, x, t, cond=None):
        return model.apply({"params": params}, x, t, cond, train=False)

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
    tx = create_optimizer(config)
    params = init_params(model, shape, int(config.seed), mesh)
    history = initial_t_history(config)
    state = jax.jit(lambda p: TrainState.create(p, tx, history()), out_shardings=parallel.replicated(mesh))(params)
    return state, tx


def abstract_train_state(config: ml_collections.ConfigDict, model: nn.Module, shape: tuple, mesh: Mesh
                         ) -> TrainState:
    """The train state's shapes, dtypes and shardings: the restore target, computing nothing.

    Tracing the model also checks its hyper-parameters against the data shape before any work.
    """
    tx = create_optimizer(config)
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
    process: diffusion.GaussianDiffusion
    meta: RunMeta
    codec: latents.Codec | None = None  # a latent run's autoencoder: samples are decoded by it

    @property
    def sched(self) -> schedules.Schedule:
        return self.process.sched

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


def run_meta(config: ml_collections.ConfigDict) -> RunMeta:
    """What a checkpoint of `config` records: its network, shapes, schedule, pred and conditions."""
    conds = condition_config.create_conditioning(config)
    return RunMeta.from_config(config, conds.record(), conds.network_kwargs())


def create_run(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Run:
    """Mesh (all devices unless given), example shape, model, process and RunMeta of `config`;
    with `data.latents_from`, the autoencoder whose decoder every sampler applies at its output."""
    mesh = parallel.make_mesh() if mesh is None else mesh
    workdir = data.latents_from(config.data)
    return Run(mesh=mesh, shape=tuple(data.example_shape(config.data)), model=create_model(config),
               process=create_diffusion(config),
               meta=run_meta(config),
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


def warn_student_sampler(config: ml_collections.ConfigDict, meta: RunMeta, workdir: str) -> None:
    """One line when a progressive-distillation student (`meta.source["distill"]`) is sampled with other
    than the DDIM steps it was distilled for: its network is trained for those timesteps only."""
    want = meta.source.get("distill", {}).get("sampler")
    if not want:
        return
    opts = sampler_options(config)
    have = dict(method=opts["method"], steps=opts["num_steps"], spacing=opts["spacing"], eta=opts["eta"])
    if have != want:
        print(f"warning: {workdir} is a student distilled for {want['steps']} DDIM steps; sampling it with "
              f"{have} differs: set --config.sampling.method=ddim --config.sampling.steps={want['steps']} "
              f"--config.sampling.spacing={want['spacing']} --config.sampling.eta=0.", flush=True)


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
    if condition_config.text_conditioned(config):  # the captions must be encoded with the vocabulary it was trained on
        captions.check_saved_tokenizer(str(workdir), captions.tokenizer_for(config.data))
    template = abstract_params(run.model, run.shape, run.mesh)
    used: list[RunMeta] = []

    def check(stored: dict) -> None:
        used.append(RunMeta.from_dict(stored, str(workdir)))
        run.meta.check_matches(used[-1], str(workdir))

    with checkpointing.Checkpointer(workdir, async_save=False) as ckpt:
        step, params = checkpoint_recovery.newest_valid_ema(
            ckpt, template, check_meta=check, step=int(config.get("checkpoint_step", checkpoint_recovery.NEWEST)))
    if used:
        warn_student_sampler(config, used[-1], str(workdir))
    return LoadedRun(**{f.name: getattr(run, f.name) for f in dataclasses.fields(Run)},
                     params=params, step=int(step))


def sampler_options(config: ml_collections.ConfigDict) -> dict:
    """The static keyword arguments of `sampling.sample` from `config.sampling`: the method with its
    steps, spacing and η resolved (`sampling.resolve`), and the guidance options."""
    s = config.sampling
    _, steps, spacing, eta = sampling.resolve(str(s.method), int(config.diffusion.num_timesteps),
                                              int(s.steps), str(s.spacing), s.get("eta"))
    return dict(method=str(s.method), num_steps=steps, eta=eta, spacing=spacing, **condition_config.guidance_options(config))


def sampler_tag(config: ml_collections.ConfigDict) -> str:
    """A file-name part naming the sampler of `config.sampling`: ``ddpm``, ``ddim50``, ``ddim50eta0.5``,
    the few-step solvers by method, steps N and spacing: ``dpmpp_2m20-logsnr``, ``heun18-karras`` (NFE 35);
    a conditional model's labels and guidance follow: ``ddpm_yall_w2``, ``ddim50_y3-5``, ``ddpm_null``; a
    captioned run's captions: ``ddpm_cnull``, ``ddpm_cevalsplit_w3``, ``ddpm_c1a2b3c4d`` (crc32 of the list)."""
    s, method = config.sampling, str(config.sampling.method)
    opts = sampler_options(config)
    entry, spacing, eta = sampling.METHODS[method], opts["spacing"], opts["eta"]
    tag = method if not entry.default_steps else f"{method}{opts['num_steps']}"
    tag += f"-{spacing}" if entry.tag_spacing and entry.spacings else ""
    tag += f"eta{eta:g}" if eta is not None and eta != entry.eta else ""
    tag += f"-{spacing}" if not entry.tag_spacing and spacing != entry.default_spacing else ""
    tag = tag if clips_x0(config) else tag + "_noclip"
    tag += "".join(sampled.tag(config) for sampled in condition_config._sampled(config))
    if condition_config.create_conditioning(config) and float(s.get("guidance_scale", 0.0)):
        tag += f"_w{float(s.guidance_scale):g}"
    return tag


def make_sampler(run: Run, config: ml_collections.ConfigDict, *, mesh: Mesh | None = None,
                 **overrides: Any) -> sampler.Sampler:
    """The compiled sharded sampler of `config.sampling` for `run` (seed, trajectory, start step...).

    A latent run's sampler decodes its outputs (samples and trajectories): every caller sees images.

    `overrides` replace the config's options (e.g. `trajectory_every=10`, `start_step=k`).
    """
    options = dict(seed=int(config.sampling.seed), cond=condition_config.sampler_conditions(config), **sampler_options(config))
    options.update(overrides)
    decode = None if run.codec is None else (run.codec.decode_fn, run.codec.params)
    return sampler.Sampler(run.apply_fn, run.process, run.mesh if mesh is None else mesh, shape=run.shape,
                           decode=decode, **options)
