"""`--mode=sample`: images from the newest EMA params of a workdir (trained or converted).

Writes, under `<workdir>/samples/`:
  sample_<method>_<step>.png / .npz        grid of `sampling.num_samples` samples; the
                                           arrays (float32 in [-1, 1], uint8 images)
  trajectory_<method>_<step>.gif           x_t (left) and predicted x0 (right) every
                                           `sampling.trajectory_every` steps
  partial_<method>_<step>_k<k>_{original,noised,denoised}.png
                                           partial denoising of `sampling.init_image`
                                           noised to step k = `sampling.start_step`
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ddpm_jax import checkpointing, data, generate, imaging, parallel, sampling, train

MODEL_KWARGS_FILE = "model_kwargs.json"  # written next to converted checkpoints
TRAJECTORY_GIF_IMAGES = 16  # images shown in the trajectory animation


def stored_meta(workdir: str) -> dict:
    """What the workdir's checkpoint says about itself: its meta, plus model_kwargs.json if present."""
    meta = dict(checkpointing.read_meta(workdir) or {})
    path = os.path.join(workdir, MODEL_KWARGS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            kwargs = json.load(f)
        if "kwargs" in kwargs:
            meta["model"] = {"name": kwargs.get("name", "unet"), "kwargs": kwargs["kwargs"]}
        else:
            meta["model"] = {"name": kwargs.pop("name", "unet"), "kwargs": kwargs}
    return meta


def check_compatible(stored: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses (CheckpointMismatchError) a config whose model / data shape / schedule differ.

    Only entries present on both sides are compared (a converted checkpoint may not
    record a schedule); model kwargs that leave the params unchanged are ignored.
    """
    current = train.structural_meta(train.checkpoint_meta(config))
    stored = train.structural_meta(stored)

    def common(a: Any, b: Any) -> tuple[Any, Any]:
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(set(a) & set(b))
            pairs = [common(a[k], b[k]) for k in keys]
            return dict(zip(keys, (p[0] for p in pairs))), dict(zip(keys, (p[1] for p in pairs)))
        return a, b

    checkpointing.check_meta(*common(stored, current), workdir)


def load_ema_params(config, workdir: str, model, shape: tuple, mesh) -> tuple[Any, int]:
    """(EMA params replicated on the mesh, their step) of the workdir's newest checkpoint."""
    check_compatible(stored_meta(workdir), config, workdir)
    ckpt = checkpointing.Checkpointer(workdir, async_save=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(
                f"no checkpoint in {workdir}/checkpoints; train first (--mode=train) or convert a "
                "released checkpoint (python -m ddpm_jax.convert) into this workdir."
            )
        template = jax.eval_shape(lambda: train.init_params(model, shape, 0, mesh))
        template = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(mesh)), template
        )
        try:
            params = ckpt.restore_ema_params(template, step)
        except (ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise checkpointing.CheckpointMismatchError(
                f"the params in {ckpt.directory}/{step} do not fit the config's model ({first}); "
                "use the config the checkpoint was trained/converted with."
            ) from err
    finally:
        ckpt.close()
    return params, int(step)


def _picture(samples: np.ndarray, title: str = "") -> np.ndarray:
    return train.grid_image(samples, title=title)


def _trajectory_frames(out: sampling.SampleOutput, shape: tuple) -> np.ndarray:
    """GIF frames: x_t beside the predicted x0, one frame per kept step (then x_0 if not kept)."""
    # Images: the first few, as grids; 2-D points: all of them, as scatter plots.
    n = out.samples.shape[0] if len(shape) == 1 else min(TRAJECTORY_GIF_IMAGES, out.samples.shape[0])
    ts = [int(t) for t in np.asarray(out.trajectory_t)]
    xs, x0s = list(out.trajectory[:, :n]), list(out.trajectory_x0[:, :n])
    if ts[-1] != 0:  # the chain's end was not a kept frame: show the samples last
        xs, x0s, ts = xs + [out.samples[:n]], x0s + [out.samples[:n]], ts + [0]
    if len(shape) == 1:
        return imaging.scatter_frames(np.stack(xs), [f"x_t, t = {t}" for t in ts])
    frames = []
    for x_t, x0 in zip(xs, x0s):
        left, right = imaging.make_grid(x_t), imaging.make_grid(x0)
        gap = np.full((left.shape[0], 4, left.shape[2]), 255, np.uint8)
        frame = np.concatenate([left, gap, right], axis=1)
        frames.append(imaging.upscale(frame, max(1, 256 // frame.shape[0])))
    return np.stack(frames)


def _write(path: str, image: np.ndarray) -> str:
    if jax.process_index() == 0:
        imaging.save_png(path, image)
    return path


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Samples (and optionally animates / partially denoises); returns the written paths by kind."""
    mesh = parallel.make_mesh()
    shape = tuple(data.example_shape(config.data))
    model, sched = train.create_model(config), train.create_schedule(config)
    params, step = load_ema_params(config, workdir, model, shape, mesh)
    s = config.sampling
    options = generate.sampler_options(s, config.diffusion)
    method, out_dir = options["method"], os.path.join(workdir, "samples")
    paths: dict[str, str] = {}
    if int(s.num_samples) < 1:
        raise ValueError(f"sampling.num_samples={s.num_samples} must be >= 1.")

    if s.init_image:
        paths.update(_partial_denoising(config, params, model, sched, mesh, shape, step, out_dir, options))
        return paths

    every = int(s.trajectory_every)
    sampler = generate.Sampler(generate.model_apply_fn(model), sched, mesh, shape=shape, seed=int(s.seed),
                               trajectory_every=every, **options)
    out = generate.generate(sampler, params, num_samples=int(s.num_samples), batch_size=int(s.batch_size))
    stem = os.path.join(out_dir, f"sample_{method}_{step}")
    paths["grid"] = _write(stem + ".png", _picture(out.samples, f"{method} samples, step {step}"))
    arrays = {"samples": out.samples.astype(np.float32)}
    if len(shape) == 3:
        arrays["images"] = imaging.to_uint8(out.samples)
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        np.savez(stem + ".npz", **arrays)
    paths["npz"] = stem + ".npz"
    if every:
        if out.trajectory is None or out.trajectory.shape[0] == 0:
            logging.warning("sampling.trajectory_every=%d keeps no frame of the %s chain.", every, method)
        else:
            path = os.path.join(out_dir, f"trajectory_{method}_{step}.gif")
            if jax.process_index() == 0:
                imaging.save_gif(path, _trajectory_frames(out, shape), fps=8)
            paths["gif"] = path
    logging.info("sample mode wrote %s", paths)
    return paths


def _partial_denoising(config, params, model, sched, mesh, shape, step, out_dir, options) -> dict[str, str]:
    """Noises `sampling.init_image` to x_k (q(x_k | x_0), eq. (4)) and runs the k reverse steps."""
    from ddpm_jax.data.sources import load_picture

    s = config.sampling
    if len(shape) != 3:
        raise ValueError("sampling.init_image needs an image model; toy2d points cannot be partially denoised.")
    k, T = int(s.start_step), sched.num_timesteps
    if not 1 <= k <= T:
        raise ValueError(f"sampling.start_step={k} must be in 1..T={T} when sampling.init_image is set.")
    x0 = imaging.from_uint8(load_picture(str(s.init_image), shape[0], shape[2]))
    n = int(s.num_samples)
    base = jax.random.fold_in(jax.random.key(int(s.seed)), 0x6E6F)  # noise of x_k, apart from the chain's keys
    noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), shape))(jnp.arange(n))
    x_k = np.asarray(sampling.noised_start(sched, jnp.broadcast_to(x0, (n, *shape)), k, noise))
    sampler = generate.Sampler(generate.model_apply_fn(model), sched, mesh, shape=shape, seed=int(s.seed),
                               start_step=k, **options)
    out = generate.generate(sampler, params, num_samples=n, batch_size=int(s.batch_size), x_start=x_k)
    stem = os.path.join(out_dir, f"partial_{options['method']}_{step}_k{k}")
    paths = {
        "original": _write(stem + "_original.png",
                           imaging.upscale(imaging.to_uint8(x0), max(1, 128 // shape[0]))),
        "noised": _write(stem + "_noised.png", _picture(x_k)),
        "denoised": _write(stem + "_denoised.png", _picture(out.samples)),
    }
    if jax.process_index() == 0:
        np.savez(stem + ".npz", original=x0, noised=x_k, denoised=out.samples)
    paths["npz"] = stem + ".npz"
    return paths
