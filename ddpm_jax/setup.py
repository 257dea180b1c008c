"""Setup: a config becomes the objects a run needs; the one bridge from ml_collections to the core.

Every mode starts here, and nothing below this module sees a ConfigDict whole:

    run = setup.create_run(config)            # mesh, example shape, model, process, RunMeta
    loaded = setup.load_run(config, workdir)  # the same, plus the newest valid EMA params
    sampler = setup.make_sampler(run, config.sampling)   # a latent run's decodes to images

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

from ddpm_jax import checkpointing, conditioning, data, diffusion, parallel, sampler, sampling, schedules, timestep_sampler
from ddpm_jax.data import captions, latents
from ddpm_jax.models import build_model, text
from ddpm_jax.run_meta import RunMeta, model_spec, schedule_spec
from ddpm_jax.train_state import TrainState, create_optimizer

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_INIT_STREAM = 0x1417  # the init key: disjoint from the per-step keys' base


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


def create_betas(config: ml_collections.ConfigDict) -> np.ndarray:
    """The float64 β_1..β_T of `config.diffusion` (its `schedule_spec`)."""
    spec = schedule_spec(config)
    return schedules.get_betas(spec.pop("name"), spec.pop("num_timesteps"), **spec)


def create_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
    """The float32 Schedule tables of `config.diffusion` (computed in float64)."""
    betas = create_betas(config)
    schedules.warn_if_not_noise(betas)
    return schedules.Schedule.from_betas(betas)


def create_diffusion(config: ml_collections.ConfigDict, sched: schedules.Schedule | None = None, *,
                     clip_denoised: bool | None = None) -> diffusion.GaussianDiffusion:
    """The process of `config.diffusion` (its tables, or `sched` when already built), validated;
    x̂_0 clipped as `clips_x0` decides."""
    d = config.diffusion
    return diffusion.GaussianDiffusion(create_schedule(config) if sched is None else sched,
                                       pred=str(d.pred), var_type=str(d.var_type), loss=str(d.get("loss", "mse")),
                                       clip_x0=clips_x0(config, clip_denoised))


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
    key = jax.random.fold_in(jax.random.key(seed), _INIT_STREAM)
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


def create_run(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Run:
    """Mesh (all devices unless given), example shape, model, process and RunMeta of `config`;
    with `data.latents_from`, the autoencoder whose decoder every sampler applies at its output."""
    mesh = parallel.make_mesh() if mesh is None else mesh
    workdir = data.latents_from(config.data)
    return Run(mesh=mesh, shape=tuple(data.example_shape(config.data)), model=create_model(config),
               process=create_diffusion(config), meta=RunMeta.from_config(config),
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
        step, params = ckpt.restore_newest_valid_ema(
            template, check_meta=check, step=int(config.get("checkpoint_step", checkpointing.NEWEST)))
    return LoadedRun(**{f.name: getattr(run, f.name) for f in dataclasses.fields(Run)},
                     params=params, step=int(step))


def sampler_options(config: ml_collections.ConfigDict) -> dict:
    """The static keyword arguments of `sampling.sample` from `config.sampling`: the method with its
    steps, spacing and η resolved (`sampling.resolve`), and the guidance options."""
    s = config.sampling
    _, steps, spacing, eta = sampling.resolve(str(s.method), int(config.diffusion.num_timesteps),
                                              int(s.steps), str(s.spacing), s.get("eta"))
    return dict(method=str(s.method), num_steps=steps, eta=eta, spacing=spacing, **guidance_options(config))


def num_classes(config: ml_collections.ConfigDict) -> int:
    """`model.num_classes`: 0 for an unconditional model."""
    return int(config.model.get("num_classes", 0))


def text_conditioned(config: ml_collections.ConfigDict) -> bool:
    """A captioned run (`data.captions`): the U-Net reads caption tokens through its text encoder."""
    return bool(config.data.get("captions", False))


def create_conditioning(config: ml_collections.ConfigDict) -> conditioning.Conditioning:
    """The condition kinds of the config's model: caption tokens (`data.captions`), class labels (`model.num_classes`
    > 0) or none; with `data.low_res_factor` > 0 also the low-res image and its level."""
    null = text.null_tokens(1, int(config.model.context_length))[0] if text_conditioned(config) else None
    kinds = ((conditioning.CaptionTokens(tuple(int(i) for i in null)),) if null is not None
             else (conditioning.ClassLabel(num_classes(config)),) if num_classes(config) else ())
    f = int(config.data.get("low_res_factor", 0))
    if f:  # box_downsample checks that f divides the image size
        shape = conditioning.box_downsample(np.zeros(data.example_shape(config.data)), f).shape
        abar = np.cumprod(1.0 - create_betas(config))[:int(config.training.get("low_res_max_level", 0))]
        kinds += (conditioning.LowResImage(shape, f, tuple(float(a) for a in abar)), conditioning.AugmentationLevel())
    return conditioning.Conditioning(kinds)


def guidance_options(config: ml_collections.ConfigDict) -> dict:
    """`sampling.sample`'s guidance_scale and null_cond (one example's ∅, JSON-able: the eval meta
    stores it) for a conditional model; {} otherwise."""
    conds = create_conditioning(config)
    if not conds:
        return {}
    null = {key: np.asarray(value).tolist() for key, value in conds.null().items()}
    return dict(guidance_scale=float(config.sampling.get("guidance_scale", 0.0)), null_cond=null)


def sampler_labels(config: ml_collections.ConfigDict) -> tuple[int, ...] | None:
    """The classes cycled over image indices from `sampling.labels`: '' -> None (the null class:
    unconditional samples), 'all' -> 0..num_classes-1, '3,5' -> (3, 5).
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


class _SampledLabels:
    """`sampling.labels` of a class-conditional run: its table, tag part, meta and classes."""

    @staticmethod
    def table(config: ml_collections.ConfigDict) -> np.ndarray | None:
        labels = sampler_labels(config)
        return None if labels is None else np.asarray(labels, np.int32)

    @staticmethod
    def tag(config: ml_collections.ConfigDict) -> str:
        labels = str(config.sampling.get("labels", "")).strip()
        return "_null" if not labels else "_y" + labels.replace(",", "-").replace(" ", "")

    @staticmethod
    def meta(config: ml_collections.ConfigDict) -> dict:
        return {"labels": sampler_labels(config)}

    @staticmethod
    def captions(config: ml_collections.ConfigDict, indices: np.ndarray) -> None:
        return None

    @staticmethod
    def classes(config: ml_collections.ConfigDict, indices: np.ndarray) -> np.ndarray | None:
        table = _SampledLabels.table(config)
        return None if table is None else conditioning.cycle({"label": table}, indices)["label"]


class _SampledCaptions:
    """`sampling.captions` of a captioned run: its token table, tag part, meta and named classes."""

    @staticmethod
    def table(config: ml_collections.ConfigDict) -> np.ndarray:
        spec = captions.sampling_captions(config.sampling.get("captions", ""), config.data)
        return captions.tokenizer_for(config.data).encode(spec, int(config.model.context_length))[0]

    @staticmethod
    def tag(config: ml_collections.ConfigDict) -> str:  # literal captions by a checksum: a short file name
        spec = str(config.sampling.get("captions", "")).strip()
        if not spec:
            return "_cnull"
        return "_cevalsplit" if spec == captions.EVAL_SPLIT_CAPTIONS else f"_c{zlib.crc32(spec.encode()):08x}"

    @staticmethod
    def meta(config: ml_collections.ConfigDict) -> dict:  # the spec names them, with the data
        return {"captions": str(config.sampling.get("captions", "")).strip()}

    @staticmethod
    def captions(config: ml_collections.ConfigDict, indices: np.ndarray) -> list[str]:
        spec = captions.sampling_captions(config.sampling.get("captions", ""), config.data)
        return [spec[int(i) % len(spec)] for i in indices]

    @staticmethod
    def classes(config: ml_collections.ConfigDict, indices: np.ndarray) -> np.ndarray | None:
        named = [captions.named_class(c) for c in _SampledCaptions.captions(config, indices)]
        return None if None in named else np.asarray(named, np.int32)


class _SampledLowRes:
    """`sampling.cond_images` of a super-resolution run: that split's first images box-downsampled and
    noised to `sampling.low_res_level` (`LowResImage.at_level`), '' the null image; the level's table is s."""

    @staticmethod
    def table(config: ml_collections.ConfigDict) -> np.ndarray | None:
        s = config.sampling
        kind = next(k for k in create_conditioning(config).kinds if isinstance(k, conditioning.LowResImage))
        images = data.low_res_images(config.data, str(s.cond_images), int(s.num_samples)) if s.cond_images else None
        return None if images is None else kind.at_level(images, int(s.low_res_level), int(s.seed))[kind.key]

    tag = staticmethod(lambda c: f"_sr{c.sampling.cond_images}_s{c.sampling.low_res_level}" if c.sampling.cond_images
                       else "_srnull")
    meta = staticmethod(lambda c: {"cond_images": c.sampling.cond_images, "low_res_level": c.sampling.low_res_level})
    captions = classes = staticmethod(lambda config, indices: None)


class _SampledLevel(_SampledLowRes):
    table = staticmethod(lambda config: np.asarray([int(config.sampling.low_res_level)], np.int32))
    tag, meta = staticmethod(lambda config: ""), staticmethod(lambda config: {})


# How `config.sampling` asks each condition kind for its samples.
_SAMPLED = {conditioning.ClassLabel: _SampledLabels, conditioning.CaptionTokens: _SampledCaptions,
            conditioning.LowResImage: _SampledLowRes, conditioning.AugmentationLevel: _SampledLevel}


def _sampled(config: ml_collections.ConfigDict) -> list:
    return [_SAMPLED[type(kind)] for kind in create_conditioning(config).kinds]


def sampler_conditions(config: ml_collections.ConfigDict) -> dict | None:
    """What the sampler cycles over image indices: {kind key: table [K, ...]} (classes of
    `sampling.labels`, a captioned run's `sampling.captions` as tokens int32 [K, context_length]:
    a caption longer than the context is a one-line error); None: unconditional samples (an
    unconditional model, or `sampling.labels` '': the null class)."""
    kinds = create_conditioning(config).kinds
    tables = {kind.key: _SAMPLED[type(kind)].table(config) for kind in kinds}
    return None if not tables or any(t is None for t in tables.values()) else tables


def sampled_captions(config: ml_collections.ConfigDict, indices: np.ndarray) -> list[str] | None:
    """The caption of each image `indices` of a captioned run (`sampling.captions` cycled); None otherwise."""
    found = [c for c in (s.captions(config, indices) for s in _sampled(config)) if c is not None]
    return found[0] if found else None


def asked_classes(config: ml_collections.ConfigDict, indices: np.ndarray) -> np.ndarray | None:
    """The class each image `indices` was asked for: its label, or the digit its caption names
    (MNIST captions); None when unconditional or when a caption names no single digit."""
    found = [c for c in (s.classes(config, indices) for s in _sampled(config)) if c is not None]
    return found[0] if found else None


def sampled_meta(config: ml_collections.ConfigDict) -> dict:
    """What the samples were asked for, as a samples directory records it ({}: unconditional)."""
    return {key: value for s in _sampled(config) for key, value in s.meta(config).items()}


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
    tag += "".join(sampled.tag(config) for sampled in _sampled(config))
    if create_conditioning(config) and float(s.get("guidance_scale", 0.0)):
        tag += f"_w{float(s.guidance_scale):g}"
    return tag


def make_sampler(run: Run, config: ml_collections.ConfigDict, *, mesh: Mesh | None = None,
                 **overrides: Any) -> sampler.Sampler:
    """The compiled sharded sampler of `config.sampling` for `run` (seed, trajectory, start step...).

    A latent run's sampler decodes its outputs (samples and trajectories): every caller sees images.

    `overrides` replace the config's options (e.g. `trajectory_every=10`, `start_step=k`).
    """
    options = dict(seed=int(config.sampling.seed), cond=sampler_conditions(config), **sampler_options(config))
    options.update(overrides)
    decode = None if run.codec is None else (run.codec.decode_fn, run.codec.params)
    return sampler.Sampler(run.apply_fn, run.process, run.mesh if mesh is None else mesh, shape=run.shape,
                           decode=decode, **options)
