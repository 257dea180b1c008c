"""Checks made before a run touches anything: the config, the files it names, the workdir.

Each failure is one line naming the field and the fix (a `ValueError`), raised
before any file is written or anything is compiled. One entry point per mode,
`check_config(config, mode, mesh)`, called first by every mode, runs the checks that mode uses:

    train      validate_config: the training loop, the schedule, the sampler of the grids
    sample     the schedule, the sampler, the partial-denoising picture
    eval       the schedule, the sampler, eval's sizes and files (check_eval_inputs)
    bpd        the schedule, the bits/dim sizes
    fid_stats  eval's files (no model is involved)
    figures    the schedule, the figure's sizes
    train_autoencoder  the autoencoder's loop settings
    cascade    the schedule (both stages' sample checks: modes/cascade.check_cascade)
Call it after `parallel.initialize` (the schedule tables are built with jax.numpy).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile

import ml_collections
import numpy as np
from PIL import Image

from ddpm_jax import (condition_config, conditioning, data, diffusion, guidance, parallel, sampling, schedules,
                      timestep_sampler)
from ddpm_jax.config_loading import MODES
from ddpm_jax.data import captions
from ddpm_jax.data.sources import SKIMAGE_PICTURES
from ddpm_jax.evaluation import fid, inception
from ddpm_jax.models import unet

NONFINITE_POLICIES = ("error", "skip")
EVAL_METRICS = ("inception", "classifier")  # eval.metric
# The β fields each schedule reads (cosine and jsd have neither), with the paper's values.
_BETA_FIELDS = {"linear": ("beta_start", "beta_end"), "quadratic": ("beta_start", "beta_end"),
                "sigmoid": ("beta_start", "beta_end"), "warmup10": ("beta_start", "beta_end"),
                "warmup50": ("beta_start", "beta_end"), "const": ("beta_end",)}
_PAPER = {"beta_start": 1e-4, "beta_end": 0.02}
_POOL_DIM = 2048  # the FID Inception's pool_3 features, what eval.fid_stats must describe


class WorkdirError(ValueError):
    """--workdir cannot be created or written."""


def check_config(config: ml_collections.ConfigDict, mode: str, mesh=None) -> None:
    """Every check of `mode` that can run before work (see the module docstring); `mesh` for train."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}.")
    if mode in ("train", "train_autoencoder"):  # the autoencoder's other fields: modes/autoencoder.check_config
        return validate_config(config, mesh) if mode == "train" else check_loop(config.autoencoder, "autoencoder")
    check_latent_mode(config, mode)
    if mode != "fid_stats":
        check_schedule(config.diffusion)
        check_objective(config.diffusion)
    if mode in ("sample", "eval"):
        check_sampler(config.sampling, int(config.diffusion.num_timesteps))
        check_labels(config)
        condition_config.check_sampling(config)
    if mode == "sample":
        _positive(config.sampling, "sampling", ("num_samples", "batch_size"))
        check_init_image(config)
    if mode == "bpd":
        _positive(config.eval, "eval", ("bpd_batch_size",))
        check_ode_bpd(config.eval)
        if int(config.eval.bpd_num_examples) < 0:
            raise ValueError(f"eval.bpd_num_examples={config.eval.bpd_num_examples} must be >= 0 "
                             "(0 = the whole split).")
    if mode in ("eval", "fid_stats"):
        check_eval_inputs(config, mode)
    if mode == "figures":
        _positive(config.figures, "figures", ("num_images", "num_columns"))


def check_loop(section: ml_collections.ConfigDict, name: str) -> None:
    """The training loop's fields of a trainer's section (`training`, `autoencoder`; `loop.Settings`)."""
    if str(section.nonfinite) not in NONFINITE_POLICIES:
        raise ValueError(f"{name}.nonfinite={section.nonfinite!r} is unknown; use one of {NONFINITE_POLICIES}.")
    _positive(section, name, ("batch_size", "num_steps", "log_every", "checkpoint_every", "steps_per_dispatch",
                              "keep_checkpoints"))


def validate_config(config: ml_collections.ConfigDict, mesh) -> None:
    """The checks of the training mode: loop settings, model vs data, schedule, grid sampler."""
    t = config.training
    check_loop(t, "training")
    parallel.check_batch_size(int(t.batch_size), mesh)
    _check_model(config)
    check_schedule(config.diffusion)
    check_objective(config.diffusion)
    if int(t.sample_every) > 0:  # the grids written during and after training
        check_sampler(config.sampling, int(config.diffusion.num_timesteps))
        check_labels(config)
        condition_config.check_sampling(config)
    check_conditional_training(config)


# What is not written for a DDPM on latents (data.latents_from), and the way out.
_NOT_ON_LATENTS = {
    "fid_stats": "reference statistics are of the images: run it with --config.data.latents_from=''",
    "figures": "the figures are of pixel-space chains: use --mode=sample (it decodes)",
}


def check_latent_mode(config: ml_collections.ConfigDict, mode: str) -> None:
    """Refuses, in one line, what a latent run cannot do yet (modes, the ODE likelihood, init_image)."""
    workdir = data.latents_from(config.data)
    if not workdir:
        return
    if mode in _NOT_ON_LATENTS:
        raise ValueError(f"--mode={mode} is not written for data.latents_from={workdir!r}; {_NOT_ON_LATENTS[mode]}.")
    if mode == "bpd" and str(config.eval.get("bpd_method", "vlb")) != "vlb":
        raise ValueError(f"eval.bpd_method={config.eval.bpd_method!r} is not written for data.latents_from="
                         f"{workdir!r}; use --config.eval.bpd_method=vlb (bits/dim of the latents).")
    if mode == "sample" and str(config.sampling.get("init_image", "")):
        raise ValueError(f"sampling.init_image is not supported on latents (data.latents_from={workdir!r}); "
                         "sample from noise: --config.sampling.init_image=''.")


def _positive(section: ml_collections.ConfigDict, name: str, keys: tuple) -> None:
    for key in keys:
        if int(section[key]) < 1:
            raise ValueError(f"{name}.{key}={section[key]} must be >= 1.")


def _check_model(config: ml_collections.ConfigDict) -> None:
    points = str(config.data.source) == "toy2d"
    if str(config.model.name) == "unet" and points:
        raise ValueError("model.name='unet' cannot take the 2-D points of data.source='toy2d'; "
                         "use --config.model.name=mlp.")
    if str(config.model.name) == "mlp" and not points:
        raise ValueError(f"model.name='mlp' takes 2-D points, not the images of data.source="
                         f"{config.data.source!r}; use --config.model.name=unet.")
    if str(config.model.name) == "unet":
        levels, size = len(config.model.ch_mult), int(data.example_shape(config.data)[0])
        factor = unet.size_multiple(config.model.ch_mult)
        if size % factor and data.latents_from(config.data):  # the network sees the latents
            raise ValueError(
                f"the {size}x{size} latents of data.latents_from={config.data.latents_from!r} cannot go "
                f"through the U-Net: model.ch_mult has {levels} levels, so the size must be a multiple of "
                f"{factor}; use fewer levels (e.g. --config.model.ch_mult='(1,2)').")
        if size % factor:
            raise ValueError(
                f"data.image_size={size} cannot go through the U-Net: model.ch_mult has {levels} levels, "
                f"so images are halved {levels - 1} times and the size must be a multiple of {factor}; "
                f"use --config.data.image_size={max(factor, size // factor * factor)} or fewer levels.")


# ---- class conditioning -------------------------------------------------------------------------

def check_labels(config: ml_collections.ConfigDict) -> None:
    """model.num_classes >= 0 (a UNet only), and sampling.labels / guidance_scale that it can honour
    (a captioned run's sampling.captions: `check_captions`)."""
    if condition_config.text_conditioned(config) or str(config.sampling.get("captions", "")).strip():
        check_captions(config)
        return
    n, s = condition_config.num_classes(config), config.sampling
    if n < 0:
        raise ValueError(f"model.num_classes={n} must be >= 0 (0 = unconditional).")
    if n and str(config.model.name) != "unet":
        raise ValueError(f"model.num_classes={n} needs model.name='unet' (the MLP takes no labels); "
                         "set --config.model.num_classes=0.")
    labels, w = condition_config.sampler_labels(config), float(s.get("guidance_scale", 0.0))
    guidance.check_scale(w, "sampling.guidance_scale")
    if not n:
        if labels is not None:
            raise ValueError(f"sampling.labels={s.labels!r} needs a class-conditional model, but "
                             "model.num_classes=0; set --config.sampling.labels=''.")
        if w and not condition_config.create_conditioning(config):  # an image-conditioned model guides on its image
            raise ValueError(f"sampling.guidance_scale={w:g} needs a class-conditional model "
                             "(model.num_classes > 0); set --config.sampling.guidance_scale=0.")
        return
    if labels is not None:
        bad = [c for c in labels if not 0 <= c < n]
        if bad:
            raise ValueError(f"sampling.labels={s.labels!r} holds {bad[0]}, outside 0..{n - 1} "
                             f"(model.num_classes={n}); use classes in that range or 'all'.")
    if w and labels is None:
        raise ValueError(f"sampling.guidance_scale={w:g} guides towards a class, but sampling.labels is '' "
                         "(the null class); set --config.sampling.labels=all (or e.g. 3,5).")


def check_captions(config: ml_collections.ConfigDict) -> None:
    """A captioned run (data.captions, a U-Net without class labels) and sampling.captions / guidance it
    can honour: each caption fits model.context_length (checked by encoding them)."""
    s, w = config.sampling, float(config.sampling.get("guidance_scale", 0.0))
    if not condition_config.text_conditioned(config):
        raise ValueError(f"sampling.captions={s.captions!r} needs a text-conditional model, but "
                         "data.captions=False; set --config.sampling.captions=''.")
    if str(config.model.name) != "unet" or condition_config.num_classes(config):
        raise ValueError("data.captions needs model.name='unet' without class labels (model.num_classes=0): "
                         "a caption can name the class.")
    if str(s.get("labels", "")).strip():
        raise ValueError(f"sampling.labels={s.labels!r} is for class-conditional models; a captioned run takes "
                         "--config.sampling.captions (e.g. 'a thick seven|a thin one').")
    guidance.check_scale(w, "sampling.guidance_scale")
    if w and not str(s.get("captions", "")).strip():
        raise ValueError(f"sampling.guidance_scale={w:g} guides towards a caption, but sampling.captions is '' "
                         "(the null caption); give captions, e.g. --config.sampling.captions='a thick seven'.")
    condition_config.sampler_conditions(config)  # a caption longer than model.context_length: one line naming it


def check_conditional_training(config: ml_collections.ConfigDict) -> None:
    """training.label_dropout in [0, 1]; a conditional model needs the data's own class count."""
    n = condition_config.num_classes(config)
    conditioning.check_dropout(config.training.get("label_dropout", 0.0))
    if condition_config.text_conditioned(config):
        length = int(config.model.context_length)
        train, tokenizer = captions.split_captions(config.data, str(config.data.train_split)), captions.tokenizer_for(config.data)
        too_long = [c for c in train if len(tokenizer.ids(c)) > length]
        if too_long:
            raise ValueError(f"{len(too_long)} training caption(s) have more than model.context_length={length} words "
                             f"(e.g. {too_long[0]!r}); raise --config.model.context_length.")
        check_captions(config)
    if not n:
        return
    found = data.num_classes(config.data)
    if found != n:
        what = "has no labels" if not found else f"has {found} classes"
        fix = ("use a labelled source or --config.model.num_classes=0" if not found
               else f"set --config.model.num_classes={found}")
        raise ValueError(f"model.num_classes={n}, but data.source={config.data.source!r} {what}; {fix}.")


# ---- the diffusion schedule ---------------------------------------------------------------------

def check_objective(d: ml_collections.ConfigDict) -> None:
    """diffusion.pred / var_type / loss / min_snr_gamma / t_sampler valid together (one line naming the field)."""
    try:
        diffusion.validate(str(d.pred), str(d.var_type), str(d.get("loss", "mse")),
                           float(d.get("min_snr_gamma", 0.0)))
        timestep_sampler.check_t_sampler(str(d.get("t_sampler", "uniform")))
    except ValueError as err:
        raise ValueError(f"diffusion.{err}".replace("diffusion.unknown ", "unknown diffusion.")
                         .replace("use loss=", "use --config.diffusion.loss=")) from None


def check_schedule(diffusion: ml_collections.ConfigDict) -> None:
    """β in (0, 1) at every step and finite float32 tables, naming the `diffusion.` field at fault."""
    name, T = str(diffusion.schedule), diffusion.num_timesteps
    if name not in schedules.SCHEDULES:
        raise ValueError(f"diffusion.schedule={name!r} is unknown; use one of {', '.join(schedules.SCHEDULES)}.")
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"diffusion.num_timesteps={T!r} must be an integer >= 1 (the paper uses 1000).")
    for key in _BETA_FIELDS.get(name, ()):
        value = float(diffusion[key])
        if not (math.isfinite(value) and 0.0 < value < 1.0):
            raise ValueError(
                f"diffusion.{key}={value} must lie strictly between 0 and 1 (a β of 1 leaves no signal: "
                f"ᾱ = 0 and the tables divide by it; β <= 0 adds no noise); use e.g. "
                f"--config.diffusion.{key}={_PAPER[key]} (the paper's value).")
    betas = schedules.get_betas(name, int(T), beta_start=float(diffusion.beta_start),
                                beta_end=float(diffusion.beta_end))
    if np.max(betas) >= 1.0:
        step = int(np.argmax(betas >= 1.0))
        raise ValueError(
            f"diffusion.schedule={name!r} reaches β = 1 at t={step} (of T={T}): ᾱ_t = 0 there, so "
            f"x_0 cannot be recovered from ε and the tables hold 1/√ᾱ = inf; use another schedule, "
            f"e.g. --config.diffusion.schedule=linear.")
    with np.errstate(all="ignore"):  # what overflows is reported below, as one line
        tables = schedules.Schedule.from_betas(betas)
    for field in dataclasses.fields(tables):
        values = np.asarray(getattr(tables, field.name))
        if not np.all(np.isfinite(values)):
            abar_T = schedules.alpha_bar_final(betas)
            fix = ("a smaller --config.diffusion.beta_end or fewer --config.diffusion.num_timesteps"
                   if abar_T < 0.5 else "larger --config.diffusion.beta_start / beta_end")
            raise ValueError(
                f"diffusion: schedule {name!r} with T={T}, beta_start={diffusion.beta_start}, beta_end="
                f"{diffusion.beta_end} gives a non-finite {field.name} at t="
                f"{int(np.argmin(np.isfinite(values)))} in float32 (ᾱ_T = {abar_T:.3g}); use {fix}.")


# ---- sampling -----------------------------------------------------------------------------------

def check_sampler(s: ml_collections.ConfigDict, num_timesteps: int) -> None:
    """sampling.method known, sampling.steps in 0..T (refused, never clamped), sampling.spacing one
    of the method's, sampling.eta only for a method with η (`sampling.resolve`'s rules)."""
    method, steps, eta = str(s.method), s.get("steps", 0), s.get("eta")
    if method not in sampling.METHODS:
        raise ValueError(f"sampling.method={method!r} is unknown; use one of {', '.join(sampling.METHODS)} "
                         "(DPM-Solver++ has orders 2 and 3: dpmpp_2m, dpmpp_3m).")
    entry = sampling.METHODS[method]
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= num_timesteps:
        raise ValueError(
            f"sampling.steps={steps!r} must lie in 0..T={num_timesteps} (diffusion.num_timesteps; 0: the method's "
            f"default) with sampling.method={method}; use e.g. --config.sampling.steps="
            f"{min(entry.default_steps or num_timesteps, num_timesteps)}, or --config.sampling.method=ddpm for all "
            "T steps.")
    if not entry.default_steps and steps not in (0, num_timesteps):
        raise ValueError(f"sampling.steps={steps} with sampling.method={method}, which runs all T={num_timesteps} "
                         "steps; use --config.sampling.steps=0, or --config.sampling.method=ddim for fewer steps.")
    if eta is not None and entry.eta is None:
        raise ValueError(f"sampling.eta={eta} has no meaning for sampling.method={method}; leave it unset "
                         f"(methods with η: {', '.join(m.name for m in sampling.METHODS.values() if m.eta is not None)}).")
    try:
        sampling.resolve(method, num_timesteps, steps, str(s.get("spacing", "")), eta)
    except ValueError as err:
        raise ValueError(f"sampling.{err}".replace("sampling.unknown ", "unknown sampling.")) from None


def check_ode_bpd(ev: ml_collections.ConfigDict) -> None:
    """eval.bpd_method known; for the ODE likelihood, eval.ode_steps >= 1 and a known eval.ode_trace."""
    method = str(ev.get("bpd_method", "vlb"))
    if method not in ("vlb", "ode", "both"):
        raise ValueError(f"eval.bpd_method={method!r} is unknown; use vlb (the bound), ode (the probability-"
                         "flow ODE likelihood) or both.")
    if method == "vlb":
        return
    steps, trace = ev.get("ode_steps", 100), str(ev.get("ode_trace", "hutchinson"))
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"eval.ode_steps={steps!r} must be an int >= 1 (RK4 steps); use e.g. "
                         "--config.eval.ode_steps=100.")
    if trace not in ("hutchinson", "exact"):
        raise ValueError(f"eval.ode_trace={trace!r} is unknown; use hutchinson or exact.")


def check_init_image(config: ml_collections.ConfigDict) -> None:
    """sampling.init_image (if set): a readable picture (or a scikit-image name), an image model,
    and sampling.start_step in 1..T."""
    s = config.sampling
    path = str(s.init_image)
    if not path:
        return
    if str(config.data.source) == "toy2d":
        raise ValueError("sampling.init_image needs an image model; toy2d points cannot be partially "
                         "denoised: set --config.sampling.init_image=''.")
    T = int(config.diffusion.num_timesteps)
    if not 1 <= int(s.start_step) <= T:
        raise ValueError(f"sampling.start_step={s.start_step} must lie in 1..T={T} when sampling.init_image "
                         f"is set (the step to noise the picture to); use e.g. "
                         f"--config.sampling.start_step={max(1, T // 2)}.")
    if os.path.isfile(path):
        problem = _image_problem(path)
        if problem:
            raise ValueError(f"sampling.init_image={path!r} is not a readable image ({problem}); give a "
                             "PNG or JPEG file.")
    elif path not in SKIMAGE_PICTURES:
        what = "is a directory" if os.path.isdir(path) else "not found"
        raise ValueError(f"sampling.init_image={path!r} {what}: give an image file or one of the "
                         f"scikit-image pictures ({', '.join(SKIMAGE_PICTURES)}).")


def _image_problem(path: str) -> str | None:
    """Why PIL cannot decode the file at `path` (a short phrase), or None."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes it all: a truncated file fails here, not later
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return " ".join(str(err).split()) or type(err).__name__
    return None


# ---- evaluation ---------------------------------------------------------------------------------

def check_eval_inputs(config: ml_collections.ConfigDict, mode: str) -> None:
    """eval / fid_stats: sizes >= 1 and the files they need, usable, before a sample is made.

    Both modes need eval.inception_weights (a converted .npz); eval also reads
    eval.fid_stats when it is set (without it only the Inception Score is computed).
    """
    ev = config.eval
    metric = str(ev.get("metric", "inception"))
    if mode == "eval" and metric not in EVAL_METRICS:
        raise ValueError(f"eval.metric={metric!r} is unknown; use one of {', '.join(EVAL_METRICS)}.")
    if mode == "eval":
        _positive(ev, "eval", ("num_samples", "batch_size", "chunk_size", "inception_batch_size"))
        if metric == "classifier":  # its network is found, or trained once, by the eval mode
            return
    else:
        _positive(ev, "eval", ("inception_batch_size",))
    problem = inception_weights_problem(str(ev.inception_weights))
    if problem:
        raise ValueError(f"--mode={mode} needs the FID Inception: {problem}")
    if mode == "eval" and str(ev.fid_stats):
        problem = fid_stats_problem(str(ev.fid_stats))
        if problem:
            raise ValueError(f"--mode=eval cannot compute FID: {problem}")


def inception_weights_problem(path: str) -> str | None:
    """Why `path` is not a converted FID Inception file (one line naming the field), or None."""
    convert = (f"download {inception.FID_WEIGHTS_URL}, convert it once with `python -m "
               f"ddpm_jax.evaluation.convert_inception --pth {inception.FID_WEIGHTS_PTH} --out "
               f"inception_fid.npz` and pass --config.eval.inception_weights=inception_fid.npz")
    if not path:
        return "eval.inception_weights is not set: " + convert
    if not os.path.isfile(path):
        return "eval.inception_weights: " + inception.missing_weights_message(path)
    if path.endswith(".pth"):
        return (f"eval.inception_weights={path!r} is the PyTorch state dict; convert it first with `python -m "
                f"ddpm_jax.evaluation.convert_inception --pth {path} --out inception_fid.npz`")
    try:
        with np.load(path, allow_pickle=False) as f:
            tag = str(f["format"]) if "format" in f.files else None
    except (OSError, ValueError):
        return f"eval.inception_weights={path!r} is not an .npz file: " + convert
    if tag != inception.FORMAT_TAG:
        return f"eval.inception_weights={path!r} is not a converted FID Inception file: " + convert
    return None


def fid_stats_problem(path: str) -> str | None:
    """Why `path` is not pytorch-fid statistics of the Inception's pool_3 (one line), or None."""
    how = ("compute them with --mode=fid_stats (or `python -m pytorch_fid --save-stats DATA_DIR FILE.npz`) "
           "and pass --config.eval.fid_stats=FILE.npz")
    if not os.path.isfile(path):
        return f"eval.fid_stats={path!r} not found: {how}"
    try:
        mu, _ = fid.load_stats(path)
    except (OSError, ValueError, KeyError) as err:
        return f"eval.fid_stats={path!r} cannot be read ({' '.join(str(err).split())}): {how}"
    if mu.shape != (_POOL_DIM,):
        return (f"eval.fid_stats={path!r} holds {mu.shape[0]}-d statistics, not the {_POOL_DIM}-d pool_3 "
                f"features of the FID Inception: {how}")
    return None


# ---- the workdir --------------------------------------------------------------------------------

def prepare_workdir(workdir: str) -> None:
    """Creates `workdir` and checks that files can be written there (WorkdirError if not)."""
    if "://" in str(workdir):
        raise WorkdirError(
            f"--workdir={workdir}: metrics, samples and config.json are written with local file I/O; "
            "mount the bucket (e.g. `gcsfuse --implicit-dirs BUCKET /mnt/BUCKET`) or use a shared "
            "filesystem, and pass that path.")
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test_"):
            pass
    except OSError as err:
        why = err.strerror or type(err).__name__
        raise WorkdirError(f"--workdir={workdir} is not a writable directory ({why}: {err.filename}); "
                           "choose a directory you can write to.") from err
