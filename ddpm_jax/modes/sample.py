"""`--mode=sample`: samples from the newest valid EMA params of a workdir (trained or converted).

Every file is named by what made it, `<tag>` = method and steps, the checkpoint's step,
the seed and the count (`output_tag`, e.g. `ddim50_step2000_seed0_n64`), so another
setting never overwrites an earlier result. Under `<workdir>/samples/`:
  sample_<tag>.png / .npz                  grid (images) or scatter plot (2-D points) of
                                           `sampling.num_samples` samples; the arrays
                                           (float32, uint8 images; a conditional model's
                                           grid has one row per class, its labels saved)
  trajectory_<tag>_every<n>.gif            x_t (left) and predicted x0 (right) every
                                           `sampling.trajectory_every` = n steps
A conditional model's grid and arrays are its kinds' views (`condition_config.sample_views`):
one row per class (labels saved), captions written beside their rows (captions saved), or a
super-resolution model's triples low-res input | SR output | bicubic (`low_res`, `bicubic` saved).
2-D toy data (data.source = toy2d) also gets
  chain_<tag>_every<n>.png                 the reverse chain as a row of scatter plots
  scores_<tag>.json                        energy distance and sliced W2 of the samples against
                                           fresh data, next to their noise floor
                                           (`evaluation/toy2d.py`; also printed in one line)
With `sampling.init_image` (partial denoising: the image noised to step k =
`sampling.start_step` by q(x_k | x_0), eq. (4), then k reverse steps):
  partial_<tag>_k<k>_{original,noised,denoised}.png / .npz
  partial_<tag>_k<k>_psnr.json             PSNR (dB, uint8) of the noised and of the denoised
                                           images against the original (also printed)
  partial_<tag>_k<k>.gif                   the chain from x_k, when trajectory_every > 0; the
                                           chain from pure noise (above) is then written too
The run ends by printing what it wrote, one file a line. A DDPM on an autoencoder's latents
(`data.latents_from`) shows and saves decoded images everywhere (the sampler decodes).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ddpm_jax import (checks, condition_config, files, imaging, rng, run_meta, sampler, sampling, schedules,
                      setup)
from ddpm_jax.data.sources import load_picture
from ddpm_jax.evaluation import toy2d
from ddpm_jax.run_meta import schedule_spec

TRAJECTORY_GIF_IMAGES = 16  # images shown in the trajectory animation


def output_tag(config: ml_collections.ConfigDict, step: int) -> str:
    """What names a sample mode's files: everything that changes them, so none is overwritten.

    e.g. ``ddpm_step2000_seed0_n64``, ``ddim50eta0.5_step2000_seed3_n16``.
    """
    s = config.sampling
    return f"{setup.sampler_tag(config)}_step{step}_seed{int(s.seed)}_n{int(s.num_samples)}"


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
    points = not imaging.is_image_shape(shape)
    n = out.samples.shape[0] if points else min(TRAJECTORY_GIF_IMAGES, out.samples.shape[0])
    ts = [int(t) for t in np.asarray(out.trajectory_t)]
    xs, x0s = list(out.trajectory[:, :n]), list(out.trajectory_x0[:, :n])
    if ts[-1] != 0:  # the chain's end was not a kept frame: show the samples last
        xs, x0s, ts = xs + [out.samples[:n]], x0s + [out.samples[:n]], ts + [0]
    if points:
        return imaging.scatter_frames(np.stack(xs), [f"x_t, t = {t}" for t in ts])
    frames = [_pair_frame(x_t, x0) for x_t, x0 in zip(xs, x0s)]
    if first is not None:
        frames.insert(0, _pair_frame(first[0][:n], first[1][:n]))
    return np.stack(frames)


def _write_png(path: str, image: np.ndarray) -> str:
    if jax.process_index() == 0:
        imaging.save_png(path, image)
    return path


def _write_json(path: str, obj: dict) -> str:
    if jax.process_index() == 0:
        files.write_json(path, obj, indent=2)
    return path


def _write_npz(path: str, **arrays: np.ndarray) -> str:
    if jax.process_index() == 0:
        files.write_npz(path, **arrays)
    return path


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Samples (and optionally animates / partially denoises); returns the written paths by kind."""
    checks.check_config(config, "sample")
    s = config.sampling
    loaded = setup.load_run(config, workdir)
    out_dir = os.path.join(workdir, "samples")
    if not s.init_image:
        paths = _from_noise(config, loaded, out_dir)
    else:
        paths = _partial_denoising(config, loaded, out_dir)
        if int(s.trajectory_every):  # animate the chain from pure noise too
            noise_paths = _from_noise(config, loaded, out_dir)
            paths.update(samples_grid=noise_paths.pop("grid"), samples_npz=noise_paths.pop("npz"))
            paths.update(noise_paths)
    if jax.process_index() == 0:
        print(f"sampled step {loaded.step} of {workdir} ({setup.sampler_options(config)['method']}); wrote:\n"
              + "\n".join(f"  {kind + ':':14s}{path}" for kind, path in paths.items()), flush=True)
    return paths


def _from_noise(config, loaded: setup.LoadedRun, out_dir: str) -> dict[str, str]:
    """Samples from x_T ~ N(0, I) (Alg. 2 or DDIM): grid, arrays, trajectory GIF, toy2d chain + scores."""
    s, shape, step = config.sampling, loaded.sample_shape, loaded.step  # decoded images of a latent run
    method, every, tag = str(s.method), int(s.trajectory_every), output_tag(config, loaded.step)
    sampler_fn = setup.make_sampler(loaded, config, trajectory_every=every)
    out = sampler.generate(sampler_fn, loaded.params, num_samples=int(s.num_samples),
                           batch_size=int(s.batch_size))
    toy = not imaging.is_image_shape(shape)
    reference = scores = None
    if toy:  # scores against fresh data; the test points drawn in grey under the samples
        scores = toy2d.evaluate(out.samples, config.data)
        reference = toy2d.fresh_points(config.data, str(config.data.eval_split), out.samples.shape[0])
    stem = os.path.join(out_dir, f"sample_{tag}")
    views = condition_config.sample_views(config, out.samples)  # a conditional model's grid and arrays
    picture = views.pop("picture", None)
    if picture is None:
        picture = imaging.grid_image(out.samples, reference, f"{method} samples, step {step}")
    paths = {"grid": _write_png(stem + ".png", picture)}
    arrays = {"samples": out.samples.astype(np.float32), **views}
    if not toy:
        arrays["images"] = imaging.to_uint8(out.samples)
    paths["npz"] = _write_npz(stem + ".npz", **arrays)
    if scores is not None:
        paths["scores"] = _write_json(os.path.join(out_dir, f"scores_{tag}.json"),
                                      _toy_report(config, scores, method, step))
        if jax.process_index() == 0:
            print(_toy_summary(config, scores), flush=True)
    if every:
        if out.trajectory is None or out.trajectory.shape[0] == 0:
            logging.warning("sampling.trajectory_every=%d keeps no frame of the %s chain.", every, method)
        else:
            path = os.path.join(out_dir, f"trajectory_{tag}_every{every}.gif")
            if jax.process_index() == 0:
                imaging.save_gif(path, _trajectory_frames(out, shape), fps=8)
            paths["gif"] = path
            if toy:
                paths["chain"] = _write_png(os.path.join(out_dir, f"chain_{tag}_every{every}.png"),
                                            _toy_chain(out, loaded.sched, shape, int(s.seed), reference))
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
    betas = run_meta.schedule_betas(config)
    return dict(scores, step=step, method=method, var_type=str(config.diffusion.var_type),
                alpha_bar_T=schedules.alpha_bar_final(betas),
                schedule=schedule_spec(config),
                metrics=("energy_distance: D^2 = 2E|X-Y| - E|X-X'| - E|Y-Y'| (squared); "
                         "sliced_w2: sliced Wasserstein-2 over 1000 directions; standardised coordinates"))


def _toy_summary(config, scores: dict) -> str:
    a, f, r = scores["samples"], scores["noise_floor"], scores["ratio"]
    return (f"toy2d {config.data.toy_name}, {scores['num_points']} samples vs fresh data: "
            f"energy distance D^2 {a['energy_distance']:.5f} (noise floor {f['energy_distance']:.5f}, "
            f"{r['energy_distance']:.1f}x), sliced W2 {a['sliced_w2']:.4f} "
            f"(noise floor {f['sliced_w2']:.4f}, {r['sliced_w2']:.1f}x)")


def _partial_denoising(config, loaded: setup.LoadedRun, out_dir: str) -> dict[str, str]:
    """Noises `sampling.init_image` to x_k (q(x_k | x_0), eq. (4)) and runs the k reverse steps."""
    s, shape, sched = config.sampling, loaded.shape, loaded.sched
    if not imaging.is_image_shape(shape):
        raise ValueError("sampling.init_image needs an image model; toy2d points cannot be "
                         "partially denoised.")
    k = int(s.start_step)  # in 1..T: checks.check_init_image
    original = load_picture(str(s.init_image), shape[0], shape[2])
    x0 = imaging.from_uint8(original)
    n, every = int(s.num_samples), int(s.trajectory_every)
    base = jax.random.fold_in(jax.random.key(int(s.seed)), rng.NOISED_START)
    noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), shape))(jnp.arange(n))
    x_k = np.asarray(sampling.noised_start(sched, jnp.broadcast_to(x0, (n, *shape)), k, noise))
    sampler_fn = setup.make_sampler(loaded, config, start_step=k, trajectory_every=every)
    out = sampler.generate(sampler_fn, loaded.params, num_samples=n, batch_size=int(s.batch_size), x_start=x_k)
    stem = os.path.join(out_dir, f"partial_{output_tag(config, loaded.step)}_k{k}")
    paths = {
        "original": _write_png(stem + "_original.png",
                               imaging.upscale(imaging.to_uint8(x0), max(1, 128 // shape[0]))),
        "noised": _write_png(stem + "_noised.png", imaging.grid_image(x_k)),
        "denoised": _write_png(stem + "_denoised.png", imaging.grid_image(out.samples)),
        "npz": _write_npz(stem + ".npz", original=x0, noised=x_k, denoised=out.samples),
    }
    # PSNR of what is shown (uint8, the noised image clipped to [-1, 1]) against the original.
    noised_db = [imaging.psnr(x, original) for x in x_k]
    denoised_db = [imaging.psnr(x, original) for x in out.samples]
    report = dict(start_step=k, alpha_bar_k=float(np.asarray(sched.alphas_cumprod)[k - 1]),
                  psnr_noised=float(np.mean(noised_db)), psnr_denoised=float(np.mean(denoised_db)),
                  psnr_noised_per_image=noised_db, psnr_denoised_per_image=denoised_db,
                  method=str(s.method), step=loaded.step, image=str(s.init_image))
    paths["psnr"] = _write_json(stem + "_psnr.json", report)
    if jax.process_index() == 0:
        print(f"partial denoising of {s.init_image} from step k={k} (alpha_bar_k={report['alpha_bar_k']:.4f}), "
              f"{n} images: PSNR noised {report['psnr_noised']:.2f} dB, "
              f"denoised {report['psnr_denoised']:.2f} dB", flush=True)
    if every and out.trajectory is not None and out.trajectory.shape[0]:
        if jax.process_index() == 0:
            imaging.save_gif(stem + ".gif", _trajectory_frames(out, shape, first=(x_k, x_k)), fps=8)
        paths["partial_gif"] = stem + ".gif"
    return paths
