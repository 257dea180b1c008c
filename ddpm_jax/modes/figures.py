"""``--mode=figures``: the paper's Figures 5–8 from a workdir's newest valid EMA params.

``--config.figures.kind=`` picks one (each writes ``workdir/figures/<kind>_step<k>.png``):

    rate_distortion  Fig. 5, progressive coding: for each t, the rate L_T + Σ_{s ≥ t} L_s (bits/dim,
                     the bound's terms sent from T down to t) and the distortion RMSE(x̂_0, x_0) on the
                     [0, 255] scale, both from the bits/dim loop (``evaluation/bpd.py``) on
                     ``figures.num_examples`` test images; also ``rate_distortion_step<k>.json``.
    progressive      Fig. 6, progressive generation: x̂_0 along the reverse chain, one row per sample,
                     columns from t = T (left) to t = 0, ``figures.num_columns`` of them.
    shared_latents   Fig. 7: one reverse chain from x_T stopped at x_t for t = 3T/4, T/2, T/4 (rows),
                     then ``figures.num_images`` samples of p_θ(x_0 | x_t) from that same x_t; the
                     first column is x_t.
    interpolation    Fig. 8: two test images noised to x_t with the same noise, mixed as
                     (1 − λ) x_t + λ x'_t for λ = 0, 0.1, …, 1 and denoised by the t reverse steps
                     (the same reverse noise for every λ), for t = T/4, T/2, 3T/4 (250, 500, 750 of
                     1000); the last row mixes the pixels, (1 − λ) x_0 + λ x'_0.

The samplers are Alg. 2 with the run's variance (``diffusion.var_type``; a learned one is used),
seeded by ``sampling.seed``.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import checks, data, files, imaging, rng, sampling, setup
from ddpm_jax.evaluation import bpd
from ddpm_jax.modes import require_images, say

KINDS = ("rate_distortion", "progressive", "shared_latents", "interpolation")


def rate_distortion(result: dict) -> dict:
    """Fig. 5's curves from a bits/dim result: rate[t] = L_T + Σ_{s ≥ t} L_s (bits/dim) and
    distortion[t] = RMSE of x̂_0 from x_t on the [0, 255] scale (√mse · 127.5), t = 0 … T−1."""
    terms = np.asarray(result["terms_bpd"], np.float64)
    rate = float(result["prior_bpd"]) + np.cumsum(terms[::-1])[::-1]
    distortion = np.sqrt(np.asarray(result["mse"], np.float64)) * 127.5
    return dict(t=list(range(len(terms))), rate_bpd=rate.tolist(), distortion_rmse=distortion.tolist())


def _plot_rate_distortion(path: str, curves: dict, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415 (no pyplot: no global state)

    t, rate, dist = np.asarray(curves["t"]), np.asarray(curves["rate_bpd"]), np.asarray(curves["distortion_rmse"])
    steps = len(t) - t  # reverse steps taken: T − t
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    ax1.plot(steps, dist)
    ax1.set(xlabel="reverse process steps (T − t)", ylabel="distortion (RMSE [0, 255])")
    ax2.plot(steps, rate)
    ax2.set(xlabel="reverse process steps (T − t)", ylabel="rate (bits/dim)")
    ax3.plot(rate, dist)
    ax3.set(xlabel="rate (bits/dim)", ylabel="distortion (RMSE [0, 255])")
    fig.suptitle(title)
    files.write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=100))


def _rows_grid(rows: list[np.ndarray], scale: int) -> np.ndarray:
    """Rows of [N, H, W, C] images (floats in [−1, 1]) as one enlarged uint8 grid."""
    ncol = max(len(r) for r in rows)
    cells = [np.concatenate([r, np.ones((ncol - len(r),) + r.shape[1:], np.float32)]) for r in rows]
    return imaging.upscale(imaging.make_grid(np.concatenate(cells), ncol=ncol), scale)


def _sample_fn(loaded: setup.LoadedRun, config: ml_collections.ConfigDict, **static):
    """jit(sampling.sample) of Alg. 2 with the run's process (variance, clipping); `static` fixes the plan."""
    kw = dict(method="ddpm", **static)

    def fn(params, indices, seed, x_start=None):
        return sampling.sample(loaded.apply_fn, params, loaded.process, shape=loaded.shape, indices=indices,
                               seed=seed, x_start=x_start, **kw)

    return jax.jit(fn)


def _progressive(config, loaded: setup.LoadedRun) -> np.ndarray:
    """Fig. 6: x̂_0 along the chain from x_T, one row per sample, num_columns columns down to t = 0."""
    f, T = config.figures, loaded.sched.num_timesteps
    every = max(1, T // max(int(f.num_columns), 1))
    out = _sample_fn(loaded, config, trajectory_every=every)(
        loaded.params, jnp.arange(int(f.num_images)), int(config.sampling.seed))
    frames = np.asarray(out.trajectory_x0)  # [K, B, ...]: x̂_0 after every `every` steps
    return _rows_grid([frames[:, i] for i in range(frames.shape[1])], _scale(loaded.shape))


def _shared_latents(config, loaded: setup.LoadedRun) -> np.ndarray:
    """Fig. 7: x_t of one chain (t = 3T/4, T/2, T/4), then samples of p_θ(x_0 | x_t) from it."""
    f, T, seed = config.figures, loaded.sched.num_timesteps, int(config.sampling.seed)
    quarter = max(T // 4, 1)
    chain = _sample_fn(loaded, config, trajectory_every=quarter)(loaded.params, jnp.arange(1), seed)
    n, rows = int(f.num_images), []
    for x_t, t in zip(np.asarray(chain.trajectory), np.asarray(chain.trajectory_t)):
        if t == 0:
            continue
        x_start = jnp.broadcast_to(jnp.asarray(x_t), (n, *loaded.shape))
        # Other indices than the chain's: each sample continues from x_t with its own noise.
        out = _sample_fn(loaded, config, start_step=int(t))(loaded.params, jnp.arange(1, n + 1), seed, x_start)
        rows.append(np.concatenate([np.clip(x_t, -1, 1), np.asarray(out.samples)]))
    return _rows_grid(rows, _scale(loaded.shape))


def _interpolation(config, loaded: setup.LoadedRun) -> np.ndarray:
    """Fig. 8: two test images noised to x_t (same ε), mixed with λ ∈ {0, 0.1, …, 1}, denoised."""
    T, sched, seed = loaded.sched.num_timesteps, loaded.sched, int(config.sampling.seed)
    pair = imaging.as_float(data.load_arrays(config.data, str(config.data.eval_split), limit=2)["x"])
    if pair.shape[0] < 2:
        raise ValueError(f"figures.kind=interpolation needs two images in data.eval_split="
                         f"{config.data.eval_split!r}; use a split with at least two.")
    lam = np.linspace(0.0, 1.0, 11, dtype=np.float32).reshape((-1,) + (1,) * len(loaded.shape))
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), rng.FIGURE_MIX), loaded.shape)
    rows = []
    for frac in (0.25, 0.5, 0.75):
        k = max(1, int(round(frac * T)))
        a, b = (np.asarray(sampling.noised_start(sched, jnp.asarray(x)[None], k, noise[None])) for x in pair)
        mixed = jnp.asarray((1.0 - lam) * a + lam * b)
        # The same index for every λ: the same reverse-process noise, so only the mix differs.
        out = _sample_fn(loaded, config, start_step=k)(loaded.params, jnp.zeros((11,), jnp.int32), seed, mixed)
        rows.append(np.concatenate([pair[:1], np.asarray(out.samples), pair[1:]]))
    pixels = (1.0 - lam) * pair[0] + lam * pair[1]
    rows.append(np.concatenate([pair[:1], pixels, pair[1:]]))
    return _rows_grid(rows, _scale(loaded.shape))


def _scale(shape: tuple) -> int:
    """Enlargement that makes an image about 32 pixels wide (8x8 digits are unreadable at 1x)."""
    return max(1, 32 // int(shape[0]))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Writes the figure of ``figures.kind``; returns {"png": path, ...}."""
    checks.check_config(config, "figures")
    kind = str(config.figures.kind)
    if kind not in KINDS:
        raise ValueError(f"figures.kind={kind!r} is unknown; use one of {', '.join(KINDS)}.")
    require_images(data.example_shape(config.data), config.data.source, "figures")
    loaded = setup.load_run(config, workdir)
    stem = os.path.join(workdir, "figures", f"{kind}_step{loaded.step}")
    paths = {"png": stem + ".png"}
    if jax.process_index() == 0:
        for path in (stem + ".png", stem + ".json"):
            files.keep_previous(path)
    if kind == "rate_distortion":
        num = int(config.figures.num_examples)
        result = bpd.evaluate_bpd(config, loaded.params, loaded.model, loaded.sched, loaded.mesh,
                                  num_examples=num if num > 0 else None)
        curves = dict(rate_distortion(result), total_bpd=result["total_bpd"], num_examples=result["num_examples"],
                      step=loaded.step)
        if jax.process_index() == 0:
            paths["json"] = files.write_json(stem + ".json", curves)
            _plot_rate_distortion(paths["png"], curves, f"progressive coding, step {loaded.step}: "
                                  f"{result['total_bpd']:.3f} bits/dim on {result['num_examples']} test images")
    else:
        grid = {"progressive": _progressive, "shared_latents": _shared_latents,
                "interpolation": _interpolation}[kind](config, loaded)
        if jax.process_index() == 0:
            imaging.save_png(paths["png"], grid)
    say(f"figures.kind={kind}: wrote " + ", ".join(paths.values()))
    return paths
