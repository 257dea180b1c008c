"""`--mode=sample`: samples from the newest EMA params of a workdir (trained or converted).

Writes, under `<workdir>/samples/`:
  sample_<method>_<step>.png / .npz        grid (images) or scatter plot (2-D points) of
                                           `sampling.num_samples` samples; the arrays
                                           (float32, uint8 images)
  trajectory_<method>_<step>.gif           x_t (left) and predicted x0 (right) every
                                           `sampling.trajectory_every` steps
2-D toy data (data.source = toy2d) also gets
  chain_<method>_<step>.png                the reverse chain as a row of scatter plots,
                                           x_T ... x_0 every `sampling.trajectory_every` steps
  scores_<method>_<step>.json              energy distance and sliced W2 of the samples against
                                           fresh data, next to their noise floor
                                           (`evaluation/toy2d.py`; also logged in one line)
With `sampling.init_image` (partial denoising: the image noised to step k =
`sampling.start_step` by q(x_k | x_0), eq. (4), then k reverse steps):
  partial_<method>_<step>_k<k>_{original,noised,denoised}.png / .npz
  partial_<method>_<step>_k<k>_psnr.json   PSNR (dB, uint8) of the noised and of the denoised
                                           images against the original (also logged)
  partial_<method>_<step>_k<k>.gif         the chain from x_k, when trajectory_every > 0; the
                                           chain from pure noise (above) is then written too
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

from ddpm_jax import checkpointing, data, generate, imaging, parallel, sampling, schedules, train

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


def _pair_frame(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two image grids side by side (x_t | predicted x0), enlarged to about 256 px high."""
    left, right = imaging.make_grid(left), imaging.make_grid(right)
    gap = np.full((left.shape[0], 4, left.shape[2]), 255, np.uint8)
    frame = np.concatenate([left, gap, right], axis=1)
    return imaging.upscale(frame, max(1, 256 // frame.shape[0]))


def _trajectory_frames(out: sampling.SampleOutput, shape: tuple, first=None) -> np.ndarray:
    """GIF frames: x_t beside the predicted x0, one frame per kept step (then x_0 if not kept).

    `first` = (x_start, right image) adds an opening frame (the chain's start).
    """
    # Images: the first few, as grids; 2-D points: all of them, as scatter plots.
    n = out.samples.shape[0] if len(shape) == 1 else min(TRAJECTORY_GIF_IMAGES, out.samples.shape[0])
    ts = [int(t) for t in np.asarray(out.trajectory_t)]
    xs, x0s = list(out.trajectory[:, :n]), list(out.trajectory_x0[:, :n])
    if ts[-1] != 0:  # the chain's end was not a kept frame: show the samples last
        xs, x0s, ts = xs + [out.samples[:n]], x0s + [out.samples[:n]], ts + [0]
    if len(shape) == 1:
        return imaging.scatter_frames(np.stack(xs), [f"x_t, t = {t}" for t in ts])
    frames = [_pair_frame(x_t, x0) for x_t, x0 in zip(xs, x0s)]
    if first is not None:
        frames.insert(0, _pair_frame(first[0][:n], first[1][:n]))
    return np.stack(frames)


def _write(path: str, image: np.ndarray) -> str:
    if jax.process_index() == 0:
        imaging.save_png(path, image)
    return path


def _write_json(path: str, obj: dict) -> str:
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)
    return path


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Samples (and optionally animates / partially denoises); returns the written paths by kind."""
    mesh = parallel.make_mesh()
    shape = tuple(data.example_shape(config.data))
    model, sched = train.create_model(config), train.create_schedule(config)
    params, step = load_ema_params(config, workdir, model, shape, mesh)
    s = config.sampling
    options = generate.sampler_options(s, config.diffusion)
    out_dir = os.path.join(workdir, "samples")
    if int(s.num_samples) < 1:
        raise ValueError(f"sampling.num_samples={s.num_samples} must be >= 1.")
    args = (config, params, model, sched, mesh, shape, step, out_dir, options)
    if not s.init_image:
        paths = _from_noise(*args)
    else:
        paths = _partial_denoising(*args)
        if int(s.trajectory_every):  # animate the chain from pure noise too
            noise_paths = _from_noise(*args)
            paths.update(samples_grid=noise_paths["grid"], samples_npz=noise_paths["npz"])
            paths.update({k: v for k, v in noise_paths.items() if k not in ("grid", "npz")})
    logging.info("sample mode wrote %s", paths)
    return paths


def _from_noise(config, params, model, sched, mesh, shape, step, out_dir, options) -> dict[str, str]:
    """Samples from x_T ~ N(0, I) (Alg. 2 or DDIM): grid, arrays, trajectory GIF, toy2d chain + scores."""
    s = config.sampling
    method, every = options["method"], int(s.trajectory_every)
    sampler = generate.Sampler(generate.model_apply_fn(model), sched, mesh, shape=shape, seed=int(s.seed),
                               trajectory_every=every, **options)
    out = generate.generate(sampler, params, num_samples=int(s.num_samples), batch_size=int(s.batch_size))
    stem = os.path.join(out_dir, f"sample_{method}_{step}")
    toy = len(shape) == 1
    reference = None
    scores = None
    if toy:  # scores against fresh data; the test points drawn in grey under the samples
        from ddpm_jax.evaluation import toy2d

        scores = toy2d.evaluate(out.samples, config.data)
        reference = toy2d.fresh_points(config.data, str(config.data.eval_split), out.samples.shape[0])
    paths = {"grid": _write(stem + ".png", train.grid_image(out.samples, reference,
                                                            f"{method} samples, step {step}"))}
    arrays = {"samples": out.samples.astype(np.float32)}
    if len(shape) == 3:
        arrays["images"] = imaging.to_uint8(out.samples)
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        np.savez(stem + ".npz", **arrays)
    paths["npz"] = stem + ".npz"
    if scores is not None:
        paths["scores"] = _write_json(os.path.join(out_dir, f"scores_{method}_{step}.json"),
                                      _toy_report(config, scores, method, step))
        print(_toy_summary(config, scores), flush=True)
    if every:
        if out.trajectory is None or out.trajectory.shape[0] == 0:
            logging.warning("sampling.trajectory_every=%d keeps no frame of the %s chain.", every, method)
        else:
            path = os.path.join(out_dir, f"trajectory_{method}_{step}.gif")
            if jax.process_index() == 0:
                imaging.save_gif(path, _trajectory_frames(out, shape), fps=8)
            paths["gif"] = path
            if toy:
                paths["chain"] = _write(os.path.join(out_dir, f"chain_{method}_{step}.png"),
                                        _toy_chain(out, sched, shape, int(s.seed), reference))
    return paths


def _toy_chain(out: sampling.SampleOutput, sched, shape: tuple, seed: int, reference) -> np.ndarray:
    """The reverse chain x_T, ..., x_0 as a row of scatter plots (the kept frames, x_T first)."""
    n = out.samples.shape[0]
    T = sched.num_timesteps
    # x_T exactly as the sampler drew it: image i's start is fold_in(key_i, T) (sampling.sample).
    x_T = np.asarray(sampling.image_noise(sampling.image_keys(seed, np.arange(n)), T, shape))
    ts = [T] + [int(t) for t in np.asarray(out.trajectory_t)]
    frames = [x_T] + list(out.trajectory)
    if ts[-1] != 0:
        ts, frames = ts + [0], frames + [out.samples]
    return imaging.scatter_row([np.stack(frames)], [f"x_{t}" for t in ts], reference=reference)


def _toy_report(config, scores: dict, method: str, step: int) -> dict:
    betas = schedules.get_betas(str(config.diffusion.schedule), int(config.diffusion.num_timesteps),
                                beta_start=float(config.diffusion.beta_start),
                                beta_end=float(config.diffusion.beta_end))
    return dict(scores, step=step, method=method, var_type=str(config.diffusion.var_type),
                alpha_bar_T=schedules.alpha_bar_final(betas),
                schedule=train.schedule_spec(config),
                metrics=("energy_distance: D^2 = 2E|X-Y| - E|X-X'| - E|Y-Y'| (squared); "
                         "sliced_w2: sliced Wasserstein-2 over 1000 directions; standardised coordinates"))


def _toy_summary(config, scores: dict) -> str:
    a, f, r = scores["samples"], scores["noise_floor"], scores["ratio"]
    return (f"toy2d {config.data.toy_name}, {scores['num_points']} samples vs fresh data: "
            f"energy distance D^2 {a['energy_distance']:.5f} (noise floor {f['energy_distance']:.5f}, "
            f"{r['energy_distance']:.1f}x), sliced W2 {a['sliced_w2']:.4f} "
            f"(noise floor {f['sliced_w2']:.4f}, {r['sliced_w2']:.1f}x)")


def _partial_denoising(config, params, model, sched, mesh, shape, step, out_dir, options) -> dict[str, str]:
    """Noises `sampling.init_image` to x_k (q(x_k | x_0), eq. (4)) and runs the k reverse steps."""
    from ddpm_jax.data.sources import load_picture

    s = config.sampling
    if len(shape) != 3:
        raise ValueError("sampling.init_image needs an image model; toy2d points cannot be "
                         "partially denoised.")
    k, T = int(s.start_step), sched.num_timesteps
    if not 1 <= k <= T:
        raise ValueError(f"sampling.start_step={k} must be in 1..T={T} when sampling.init_image is set.")
    original = load_picture(str(s.init_image), shape[0], shape[2])
    x0 = imaging.from_uint8(original)
    n, every = int(s.num_samples), int(s.trajectory_every)
    # The noise of x_k, apart from the chain's keys.
    base = jax.random.fold_in(jax.random.key(int(s.seed)), 0x6E6F)
    noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), shape))(jnp.arange(n))
    x_k = np.asarray(sampling.noised_start(sched, jnp.broadcast_to(x0, (n, *shape)), k, noise))
    sampler = generate.Sampler(generate.model_apply_fn(model), sched, mesh, shape=shape, seed=int(s.seed),
                               start_step=k, trajectory_every=every, **options)
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
    # PSNR of what is shown (uint8, the noised image clipped to [-1, 1]) against the original.
    noised_db = [imaging.psnr(x, original) for x in x_k]
    denoised_db = [imaging.psnr(x, original) for x in out.samples]
    report = dict(start_step=k, alpha_bar_k=float(np.asarray(sched.alphas_cumprod)[k - 1]),
                  psnr_noised=float(np.mean(noised_db)), psnr_denoised=float(np.mean(denoised_db)),
                  psnr_noised_per_image=noised_db, psnr_denoised_per_image=denoised_db,
                  method=options["method"], step=step, image=str(s.init_image))
    paths["psnr"] = _write_json(stem + "_psnr.json", report)
    line = (f"partial denoising of {s.init_image} from step k={k} (alpha_bar_k={report['alpha_bar_k']:.4f}), "
            f"{n} images: PSNR noised {report['psnr_noised']:.2f} dB, "
            f"denoised {report['psnr_denoised']:.2f} dB")
    print(line, flush=True)
    if every and out.trajectory is not None and out.trajectory.shape[0]:
        if jax.process_index() == 0:
            imaging.save_gif(stem + ".gif", _trajectory_frames(out, shape, first=(x_k, x_k)), fps=8)
        paths["partial_gif"] = stem + ".gif"
    return paths
