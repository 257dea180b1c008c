"""Negative log-likelihood in bits/dim: the variational bound of Ho et al. (2020), eq. (5).

    L = L_T + Σ_{t=1}^{T-1} L_t + L_0      (per example, in bits per dimension)

with, in the code's 0-based timesteps (``t`` indexes the schedule tables),

* the prior term L_T = KL(q(x_T | x_0) ‖ N(0, I))           (``diffusion.prior_bpd``);
* for t ≥ 1, KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)) at one draw x_t ~ q(x_t | x_0);
* at t = 0 the decoder NLL −log p_θ(x_0 | x_1) of the discretised Gaussian (eq. (13))
  (both ``GaussianDiffusion.vlb_terms_bpd``; its fixedlarge variance uses β̃_1 at t = 0, as released).

This is the official ``calc_bpd_loop`` (``diffusion_utils_2.py``): one fresh x_t per
timestep, the predicted x_0 clipped to [−1, 1] by default (``eval.bpd_clip_denoised``; pixels only),
and the per-timestep MSE of the predicted x_0. Here the T timesteps are one
``lax.scan`` inside one jit-compiled program per batch, the batch is sharded over the
``('data',)`` mesh, and example i's noise at timestep t comes from its own key
``fold_in(fold_in(key(seed), i), rng.BPD)`` folded with t, so a result depends neither
on the batch size nor on the device count. Data are images on the 256-level grid in
[−1, 1] (``x / 127.5 − 1`` of the uint8 image); padding rows (mask False) are left out
of every average.

On a DDPM of an autoencoder's latents (``data.latents_from``) the same bound is computed on the
normalised latents and reported under ``latent_*`` keys, ``space="latent"``, and a printed
"latent-space bits/dim" (``label_latent``; the caveat in ``LATENT_CAVEAT``).

``evaluate_bpd(config, params, model, sched, mesh)`` is what the training loop
(``training.eval_bpd_after``) and ``--mode=bpd`` (``modes/bpd.py``) call; ``write_report``
writes ``workdir/eval/bpd_<step>.json``, a plot ``workdir/eval/bpd_<step>.png`` and
TensorBoard scalars.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import condition_config, data, diffusion, files, imaging, metrics, parallel, rng, sampling, setup
from ddpm_jax.sampler import padded_batch_size
from ddpm_jax.schedules import Schedule


def example_keys(seed: int, indices) -> jax.Array:
    """Example i's key: fold_in(fold_in(key(seed), i), rng.BPD)."""
    keys = sampling.image_keys(seed, indices)
    return jax.vmap(lambda k: jax.random.fold_in(k, rng.BPD))(keys)


def example_noise(seed: int, indices, t: int, shape: tuple) -> jax.Array:
    """The ε of x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε for the examples ``indices`` at timestep t."""
    return sampling.image_noise(example_keys(seed, indices), t, tuple(shape))


def bpd_terms(apply_fn: Callable, params: Any, process: diffusion.GaussianDiffusion, x0: jnp.ndarray,
              keys: jax.Array, *, cond: dict | None = None) -> dict:
    """Every term of the bound for a batch x0 [B, ...]; one ``lax.scan`` over t = T−1 … 0.

    ``cond`` (rows aligned with x0, ``conditioning.py``): a conditional model's bound given those
    conditions, −log p(x_0 | c), the network called as apply_fn(params, x_t, t, cond); None or {}:
    the unconditional network.

    x̂_0 is clipped as `process.clip_x0` says. Returns dict(total=[B], prior=[B], terms=[B, T]
    (column t: L_t, the decoder NLL at t = 0), mse=[B, T] (mean (x̂_0 − x_0)² at each t)), all
    in float32.
    """
    T, B = process.num_timesteps, x0.shape[0]
    x0 = x0.astype(jnp.float32)

    def one_timestep(carry, t):
        t_b = jnp.full((B,), t, jnp.int32)
        x_t = process.q_sample(x0, t_b, sampling.image_noise(keys, t, x0.shape[1:]))
        net = apply_fn(params, x_t, t_b, {} if cond is None else cond)
        out = process.vlb_terms_bpd(net.astype(jnp.float32), x0, x_t, t_b)
        return carry, (out["kl_bpd"], out["mse"])

    # The official loop's order (t = T−1 down to 0); the rows are then put back in t order.
    _, (terms, mse) = jax.lax.scan(one_timestep, None, jnp.arange(T - 1, -1, -1, dtype=jnp.int32))
    terms, mse = terms[::-1].T, mse[::-1].T
    prior = process.prior_bpd(x0)
    return dict(total=jnp.sum(terms, axis=1) + prior, prior=prior, terms=terms, mse=mse)


def make_bpd_fn(apply_fn: Callable, process: diffusion.GaussianDiffusion, mesh, *, seed: int) -> Callable:
    """``fn(params, x, indices, cond=None) -> bpd_terms(...)``, jit-compiled over the ('data',) mesh.

    ``x`` [B, ...], ``indices`` [B] (the examples' global indices) and ``cond`` (a conditional
    model's condition rows [B, ...], or None) are global arrays sharded on the batch axis, params
    replicated; the outputs are sharded on the batch.
    """
    rep, shard = parallel.replicated(mesh), parallel.data_sharded(mesh)

    def fn(params, process, x, indices, cond):
        return bpd_terms(apply_fn, params, process, x, example_keys(seed, indices), cond=cond)

    jitted = jax.jit(fn, in_shardings=(rep, rep, shard, shard, shard), out_shardings=shard)
    return lambda params, x, indices, cond=None: jitted(params, process, x, indices, cond)


class BpdAccumulator:
    """Float64 sums of the per-example terms over the examples kept by the mask."""

    def __init__(self, num_timesteps: int):
        self.count = 0
        self.total = self.total_sq = self.prior = 0.0
        self.terms = np.zeros(num_timesteps)
        self.mse = np.zeros(num_timesteps)

    def update(self, out: dict, mask) -> None:
        m = np.asarray(mask, bool)
        terms = np.asarray(out["terms"], np.float64)[m]
        prior = np.asarray(out["prior"], np.float64)[m]
        total = terms.sum(axis=1) + prior   # in float64, so total = prior + decoder + KL exactly
        self.count += int(m.sum())
        self.total += float(total.sum())
        self.total_sq += float(np.square(total).sum())
        self.prior += float(prior.sum())
        self.terms += terms.sum(axis=0)
        self.mse += np.asarray(out["mse"], np.float64)[m].sum(axis=0)

    def result(self) -> dict:
        if self.count == 0:
            raise ValueError("bits/dim saw no example (every row was padding); check the split "
                             "and eval.bpd_num_examples")
        n = self.count
        terms = self.terms / n
        var = max(self.total_sq / n - (self.total / n) ** 2, 0.0)
        return dict(num_examples=n, total_bpd=self.total / n, prior_bpd=self.prior / n,
                    decoder_bpd=float(terms[0]), kl_bpd=float(terms[1:].sum()),
                    total_bpd_stderr=float(np.sqrt(var / max(n - 1, 1))),
                    terms_bpd=terms.tolist(), mse=(self.mse / n).tolist())


def bpd_over_batches(bpd_fn: Callable, params: Any, batches: Iterable[dict], mesh, *,
                     num_timesteps: int, global_batch: int, limit: int, process_index: int = 0,
                     process_count: int = 1, progress: bool = False,
                     condition: Callable[[dict], dict] | None = None) -> dict:
    """Averages ``bpd_fn`` over an eval iterator's host batches (dicts ``x``, ``mask``, ``cond``; the
    true condition ``condition(batch)``, the run's condition of it (``Conditioning.of_batch``), is
    given to ``bpd_fn``; ``condition`` None: the unconditional bound).

    Global batch k holds examples [k·global_batch, (k+1)·global_batch), host p its p-th
    block (``data.create_eval_iterator``'s layout); examples with index ≥ ``limit`` and
    padding rows are left out. Stops after the last batch that holds a kept example.
    """
    acc = BpdAccumulator(num_timesteps)
    host_batch = global_batch // process_count
    num_batches = -(-limit // global_batch)
    params = jax.device_put(params, parallel.replicated(mesh))
    with files.progress_bar(limit, "bits/dim", unit="ex", enabled=progress) as bar:
        for k, batch in enumerate(batches):
            if k >= num_batches:
                break
            x, host_mask = np.asarray(batch["x"]), np.asarray(batch["mask"], bool)
            if x.shape[0] != host_batch:
                raise ValueError(f"batch {k} has {x.shape[0]} rows, expected {host_batch} per host")
            lo = k * global_batch
            host_idx = lo + process_index * host_batch + np.arange(host_batch)
            idx_global = parallel.host_to_global(host_idx.astype(np.int32), mesh)
            x_global = parallel.host_to_global(x, mesh)
            mask_global = parallel.to_host(parallel.host_to_global(host_mask & (host_idx < limit), mesh))
            cond = None if condition is None else parallel.host_to_global(condition(batch), mesh)
            out = parallel.to_host(bpd_fn(params, x_global, idx_global, cond))
            acc.update(out, mask_global)
            bar.update(int(min(lo + global_batch, limit) - lo))
    return acc.result()


def evaluate_bpd(config: ml_collections.ConfigDict, params: Any, model, sched: Schedule, mesh, *,
                 split: str | None = None, num_examples: int | None = None,
                 apply_fn: Callable | None = None, progress: bool = True) -> dict:
    """Bits/dim of ``params`` (EMA params, replicated on ``mesh``) over a data split.

    ``split`` defaults to ``data.eval_split``; ``num_examples`` to ``eval.bpd_num_examples``
    (0 = the whole split). The training loop calls this at the end; ``run`` is ``--mode=bpd``.
    Returns dict(total_bpd, prior_bpd, decoder_bpd (t = 0), kl_bpd (Σ over t ≥ 1),
    total_bpd_stderr, terms_bpd [T], mse [T], num_examples, split, seconds, ...).
    """
    shape = tuple(data.example_shape(config.data))
    if not imaging.is_image_shape(shape):
        raise ValueError(f"bits/dim needs image data on the 256-level grid, but data.source="
                         f"{config.data.source!r} gives points of shape {shape}; use an image dataset")
    ev = config.eval
    split = str(split or config.data.eval_split)
    requested = int(ev.bpd_num_examples if num_examples is None else num_examples)
    if requested < 0:
        raise ValueError(f"eval.bpd_num_examples={requested} must be >= 0 (0 = the whole split)")
    available = data.num_examples(config.data, split)
    limit = available if requested == 0 else min(requested, available)
    if int(ev.bpd_batch_size) < 1:
        raise ValueError(f"eval.bpd_batch_size={ev.bpd_batch_size} must be >= 1")
    global_batch = padded_batch_size(min(int(ev.bpd_batch_size), limit), mesh)
    process = setup.create_diffusion(config, sched, clip_denoised=bool(ev.get("bpd_clip_denoised", True)))
    bpd_fn = make_bpd_fn(apply_fn or setup.model_apply_fn(model), process, mesh, seed=int(config.seed))
    it = data.create_eval_iterator(config.data, split, batch_size=global_batch,
                                   process_index=jax.process_index(), process_count=jax.process_count())
    conds = condition_config.create_conditioning(config)
    start = time.time()
    result = bpd_over_batches(bpd_fn, params, it, mesh, num_timesteps=sched.num_timesteps,
                              global_batch=global_batch, limit=limit,
                              process_index=jax.process_index(), process_count=jax.process_count(),
                              progress=progress, condition=conds.of_batch if conds else None)
    if conds:  # the bound of -log p(x | c), each image given its true condition
        result["given"] = "true " + " and ".join(k.noun for k in conds.kinds)
    result.update(split=split, seconds=time.time() - start, num_timesteps=sched.num_timesteps,
                  var_type=process.var_type, clip_denoised=process.clip_x0, seed=int(config.seed))
    return label_latent(result, data.latents_from(config.data))


LATENT_PREFIX = "latent_"
_BPD_KEYS = ("total_bpd", "prior_bpd", "decoder_bpd", "kl_bpd", "total_bpd_stderr", "terms_bpd")
LATENT_CAVEAT = ("bits per latent dimension of the normalised latents, not of the images: the decoder term treats "
                 "each latent value as if on the 256-level grid of [-1, 1], and the autoencoder's own "
                 "-log p(x|z) is not included; not comparable with a pixel-space bits/dim")


def label_latent(result: dict, latents_from: str) -> dict:
    """A latent run's bits/dim under ``latent_*`` keys with ``space="latent"`` and the caveat; else as is."""
    if not latents_from:
        return result
    out = {(LATENT_PREFIX + k if k in _BPD_KEYS else k): v for k, v in result.items()}
    return dict(out, space="latent", latents_from=str(latents_from), caveat=LATENT_CAVEAT)


def _get(result: dict, key: str) -> Any:
    """``result[key]``, or its ``latent_`` name in a latent run's result."""
    return result[LATENT_PREFIX + key] if result.get("space") == "latent" else result[key]


def summary_line(result: dict) -> str:
    """One line: the total and its breakdown."""
    latent = "latent-space " if result.get("space") == "latent" else ""
    return (f"{latent}bits/dim on {result.get('split', '?')} ({result['num_examples']} examples): "
            f"{_get(result, 'total_bpd'):.4f} ± {_get(result, 'total_bpd_stderr'):.4f} = prior (L_T) "
            f"{_get(result, 'prior_bpd'):.4f} + decoder (L_0, t=0) {_get(result, 'decoder_bpd'):.4f} "
            f"+ KL terms (t≥1) {_get(result, 'kl_bpd'):.4f}")


def plot_terms(path: str, result: dict, title: str = "") -> None:
    """PNG: per-timestep terms of the bound (bits/dim) and the x0 MSE at each t."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415 (no pyplot: no global state)

    terms, mse = np.asarray(_get(result, "terms_bpd")), np.asarray(result["mse"])
    t = np.arange(len(terms))
    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(t[1:], terms[1:], label="KL(q(x_{t-1}|x_t,x_0) ‖ p(x_{t-1}|x_t)), t ≥ 1")
    ax1.plot([0], terms[:1], "o", color="C3", label="decoder NLL (t = 0)")
    ax1.set_yscale("log")
    ax1.set(xlabel="timestep t (0-based)", ylabel="bits/dim", title="terms of the bound")
    ax1.legend(fontsize=8)
    ax2.plot(t, mse)
    ax2.set_yscale("log")
    ax2.set(xlabel="timestep t (0-based)", ylabel="mean (x̂_0 − x_0)²", title="x_0 prediction MSE")
    fig.suptitle(title or (f"{_get(result, 'total_bpd'):.4f} bits/dim = prior {_get(result, 'prior_bpd'):.4f} + "
                           f"decoder {_get(result, 'decoder_bpd'):.4f} + KL {_get(result, 'kl_bpd'):.4f}"))
    files.write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=100))


def write_report(workdir: str, step: int, result: dict) -> dict[str, str]:
    """``workdir/eval/bpd_<step>.json``, ``bpd_<step>.png`` and TensorBoard scalars (process 0)."""
    out_dir = os.path.join(workdir, "eval")
    paths = dict(json=os.path.join(out_dir, f"bpd_{step}.json"), png=os.path.join(out_dir, f"bpd_{step}.png"))
    if jax.process_index() != 0:
        return paths
    for path in paths.values():
        files.keep_previous(path)
    files.write_json(paths["json"], {**result, "step": int(step)})
    plot_terms(paths["png"], result, title=f"step {step}: " + summary_line(result).split(": ", 1)[1])
    prefix = LATENT_PREFIX if result.get("space") == "latent" else ""
    metrics.write_scalars(workdir, step, {f"eval/{prefix}{key}": _get(result, key)
                                          for key in ("total_bpd", "prior_bpd", "decoder_bpd", "kl_bpd")})
    return paths
