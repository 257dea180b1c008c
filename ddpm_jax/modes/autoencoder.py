"""``--mode=train_autoencoder``: the first stage of latent diffusion (Rombach et al. 2022, Sec. 3.1).

Trains ``models.autoencoder.AutoencoderKL`` on any image source of the data pipeline
(``config.data``) in the DDPM's training loop (``loop.py``, with ``config.autoencoder``'s cadence):
the same checkpoints, metrics.jsonl, exact resume (rerun the same command), preemption and
non-finite policy. The loss is LDM's without the perceptual and adversarial terms:

    L = sum_pixels |x - D(z)|  (or squared: autoencoder.loss = l1 | l2)  +  kl_weight * KL(q(z|x) || N(0, I)),
    z ~ q(z|x) = E(x) (reparameterised), both terms summed per image and averaged over the batch,

as LDM's ``LPIPSWithDiscriminator`` with its perceptual weight and discriminator off and its learned
scalar output log-variance kept at its initial 0 (so ``kl_weight`` means what LDM's 1e-6 means).
Left out, and why: the LPIPS perceptual loss needs pretrained VGG weights (a download this project
does not make at run time); the patch-GAN adversarial term needs a discriminator warm-up (LDM's
KL-f4/f8 configs start it at step 50,001) and many more steps than a CPU run affords. Without them reconstructions are sharp enough for digits but
blurrier than LDM's on natural images.

After the last step (process 0 writes):

* ``autoencoder.json`` — what ``data.latents_from=AE_WORKDIR`` (``data/latents.py``, with
  ``load_autoencoder``) reads: the model
  name and kwargs, image and latent shapes, the step, and ``scale_factor`` = 1 / std of the
  latents (posterior samples) over the training split (LDM's / SD's ``scale_factor``), with the
  latents' mean, per-channel mean / std and the count;
* ``autoencoder_metrics.json`` — test-split reconstruction quality of the posterior mode:
  PSNR in dB on the [0, 255] scale (mean over images, and of the pooled error), and for a
  labelled source the classifier metrics of ``evaluation/sample_quality.py`` with the
  reconstructions of the test images as the "generated" set: the floor (real test images vs
  the training images) is what perfect reconstructions score; printed as one line;
* ``reconstructions.png`` — the first 16 test images, each row of 8 above its reconstructions.

The scale-factor and test passes read the whole split on every process; process 0 writes.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ddpm_jax import checks, data, files, imaging, loop, metrics, parallel, rng
from ddpm_jax.data.latents import INFO_FILE, MODEL_NAME, check_autoencoder_meta
from ddpm_jax.evaluation import classifier, sample_quality
from ddpm_jax.models.autoencoder import AutoencoderKL
from ddpm_jax.modes import require_images, say
from ddpm_jax.train_state import TrainState, adam, lr_schedule

METRICS_FILE = "autoencoder_metrics.json"
PICTURE_FILE = "reconstructions.png"
LOSSES = ("l1", "l2")


# ---- config -> model --------------------------------------------------------------------------


def model_kwargs(config: ml_collections.ConfigDict) -> dict:
    """`AutoencoderKL` kwargs (JSON-able) of `config.autoencoder`, channels from `config.data`."""
    ae, channels = config.autoencoder, int(config.data.num_channels)
    return dict(in_channels=channels, out_channels=channels,
                block_out_channels=[int(c) for c in ae.block_out_channels],
                layers_per_block=int(ae.layers_per_block), latent_channels=int(ae.latent_channels),
                norm_num_groups=int(ae.norm_num_groups), mid_block_add_attention=bool(ae.mid_block_add_attention))


def check_config(config: ml_collections.ConfigDict) -> None:
    """One-line ValueError naming the field, before anything is written or compiled."""
    if data.latents_from(config.data):  # an autoencoder is trained on images, never on latents
        raise ValueError(f"--mode=train_autoencoder trains on the images, but data.latents_from="
                         f"{data.latents_from(config.data)!r} gives latents; set --config.data.latents_from=''.")
    shape = tuple(data.example_shape(config.data))
    require_images(shape, config.data.source, "train_autoencoder")
    ae = config.autoencoder
    if str(ae.loss) not in LOSSES:
        raise ValueError(f"autoencoder.loss={ae.loss!r} is unknown; use one of {', '.join(LOSSES)}.")
    for name in ("kl_weight", "ema_decay"):
        if not float(ae[name]) >= 0:
            raise ValueError(f"autoencoder.{name}={ae[name]} must be >= 0.")
    if float(ae.ema_decay) >= 1:
        raise ValueError(f"autoencoder.ema_decay={ae.ema_decay} must be < 1 (0 = no EMA, as LDM).")
    checks.check_config(config, "train_autoencoder")
    for name in ("eval_batch_size", "layers_per_block", "latent_channels", "norm_num_groups"):
        if int(ae[name]) < 1:
            raise ValueError(f"autoencoder.{name}={ae[name]} must be >= 1.")
    widths = [int(c) for c in ae.block_out_channels]
    if not widths:
        raise ValueError("autoencoder.block_out_channels is empty; give one width per level, e.g. (64, 128, 128).")
    bad = [c for c in widths if c % int(ae.norm_num_groups)]
    if bad:
        raise ValueError(f"autoencoder.block_out_channels={tuple(widths)} has widths {bad} not divisible by "
                         f"autoencoder.norm_num_groups={ae.norm_num_groups}; use multiples of it.")
    f = 2 ** (len(widths) - 1)
    if int(config.data.image_size) % f:
        raise ValueError(f"data.image_size={config.data.image_size} is not divisible by the downsampling factor "
                         f"f={f} (2**(len(autoencoder.block_out_channels)-1)); use an image_size that is a multiple "
                         f"of {f} or fewer levels.")
    parallel.check_batch_size(int(ae.batch_size), parallel.make_mesh(), "autoencoder.batch_size")


def create_model(config: ml_collections.ConfigDict) -> AutoencoderKL:
    return AutoencoderKL(**model_kwargs(config))


def _meta(config: ml_collections.ConfigDict, model: AutoencoderKL, shape: tuple) -> dict:
    """What the checkpoint holds (compared on resume, read by latent loaders)."""
    return dict(model=MODEL_NAME, model_kwargs=model_kwargs(config), image_shape=list(shape),
                latent_shape=list(model.latent_shape(shape)))


def _optimizer(ae: ml_collections.ConfigDict) -> optax.GradientTransformation:
    betas_and_clip = ml_collections.ConfigDict(dict(beta1=float(ae.beta1), beta2=float(ae.beta2), eps=1e-8,
                                                    grad_clip=float(ae.grad_clip)))
    return adam(betas_and_clip, lr_schedule(float(ae.lr), int(ae.warmup_steps), "constant", int(ae.num_steps)))


def _init_state(model: AutoencoderKL, shape: tuple, seed: int, tx) -> Callable[[], TrainState]:
    def init() -> TrainState:
        key = jax.random.fold_in(jax.random.key(seed), rng.AUTOENCODER_INIT)
        params = model.init(key, jnp.zeros((1, *shape), jnp.float32))["params"]
        return TrainState.create(params, tx)

    return init


# ---- the step ---------------------------------------------------------------------------------


def reconstruction_loss(x: jnp.ndarray, x_rec: jnp.ndarray, kind: str) -> jnp.ndarray:
    """Per-image sum over pixels of |x - x_rec| (l1) or (x - x_rec)^2 (l2), float32 [B]."""
    diff = (x.astype(jnp.float32) - x_rec.astype(jnp.float32))
    per_pixel = jnp.abs(diff) if kind == "l1" else jnp.square(diff)
    return jnp.sum(per_pixel, axis=tuple(range(1, diff.ndim)))


def make_train_step(model: AutoencoderKL, tx: optax.GradientTransformation, *, loss: str, kl_weight: float,
                    ema_decay: float, seed: int, mesh, nonfinite: str = "error") -> Callable:
    """`step(state, batches) -> (state, metrics)`: an Adam step on L (module docstring) per batch.

    batches: {"x": [n, B, H, W, C], ...}, n steps in one call (`loop.compile_step`); metrics are [n]
    arrays. nonfinite="skip": a step whose loss or gradient is not finite leaves the state as it was.
    """
    base_key = jax.random.key(seed)

    def one_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(base_key, state.step)  # a resumed run draws the same z
        x = batch["x"]

        def loss_fn(params):
            x_rec, posterior = model.apply({"params": params}, x, key)
            rec, kl = reconstruction_loss(x, x_rec, loss), posterior.kl()
            return jnp.mean(rec) + kl_weight * jnp.mean(kl), (jnp.mean(rec), jnp.mean(kl))

        (total, (rec, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        # ema_decay 0 (LDM's first stage): the EMA is the params themselves, bit for bit.
        new, step_metrics = loop.apply_gradients(state, grads, total, tx, ema_decay, nonfinite)
        return new, dict(step_metrics, rec_loss=rec, kl=kl)

    return loop.compile_step(one_step, mesh)


# ---- the run ----------------------------------------------------------------------------------


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from `workdir`), then writes the scale factor and the test metrics."""
    check_config(config)
    ae, mesh = config.autoencoder, parallel.make_mesh()
    shape = tuple(data.example_shape(config.data))
    model, tx = create_model(config), _optimizer(ae)
    meta = _meta(config, model, shape)
    init = _init_state(model, shape, int(config.seed), tx)
    rep = parallel.replicated(mesh)
    trainer = loop.Trainer(
        name="train_autoencoder", settings=loop.Settings.from_config(config, "autoencoder"),
        step=make_train_step(model, tx, loss=str(ae.loss), kl_weight=float(ae.kl_weight),
                             ema_decay=float(ae.ema_decay), seed=int(config.seed), mesh=mesh,
                             nonfinite=str(ae.nonfinite)),
        template=jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), jax.eval_shape(init)),
        init=jax.jit(init, out_shardings=rep), meta=meta, check_meta=check_autoencoder_meta(meta, workdir),
        mesh=mesh, started=lambda: metrics.write_config(config, workdir, "config_train_autoencoder.json"),
        averaged=("loss", "rec_loss", "kl"), lr_field="autoencoder.lr")
    it = data.create_train_iterator(config.data, global_batch_size=int(ae.batch_size), seed=int(config.seed),
                                    process_index=jax.process_index(), process_count=jax.process_count())
    state = loop.train(trainer, workdir, it)
    if int(state.step) < int(ae.num_steps):  # preempted (SIGTERM): checkpointed; rerun to go on
        return dict(step=int(state.step), preempted=True)
    params = parallel.to_host(state.ema_params)
    info = dict(meta, step=int(state.step),
                **latent_statistics(model, params, config.data, int(ae.eval_batch_size), int(config.seed)))
    result, pairs = evaluate(model, params, config, int(state.step))
    if jax.process_index() == 0:
        files.write_json(os.path.join(workdir, INFO_FILE), info)
        files.write_json(os.path.join(workdir, METRICS_FILE), result)
        imaging.save_png(os.path.join(workdir, PICTURE_FILE), pairs)
        print(summary_line(result, info), flush=True)
    return dict(info=info, metrics=result)


# ---- after training ---------------------------------------------------------------------------


def _eval_batches(data_cfg, split: str, batch_size: int):
    """(float images [B, H, W, C] in [-1, 1], mask [B]) of the whole split on this process."""
    for batch in data.create_eval_iterator(data_cfg, split, batch_size=batch_size):
        yield np.asarray(batch["x"], np.float32), np.asarray(batch["mask"], bool)


def latent_statistics(model: AutoencoderKL, params: Any, data_cfg, batch_size: int, seed: int) -> dict:
    """1 / std of posterior samples z ~ q(z|x) over the training split (LDM's scale_factor), and moments."""
    encode = jax.jit(lambda p, x, k: model.apply({"params": p}, x, method="encode").sample(k))
    key = jax.random.fold_in(jax.random.key(seed), rng.AUTOENCODER_SCALE)
    total = total_sq = None
    count = 0
    for i, (x, mask) in enumerate(_eval_batches(data_cfg, data_cfg.train_split, batch_size)):
        z = np.asarray(encode(params, x, jax.random.fold_in(key, i)), np.float64)[mask]
        sums, sums_sq = z.reshape(-1, z.shape[-1]).sum(0), np.square(z).reshape(-1, z.shape[-1]).sum(0)
        total = sums if total is None else total + sums
        total_sq = sums_sq if total_sq is None else total_sq + sums_sq
        count += int(mask.sum()) * z.shape[1] * z.shape[2]
    mean_c, mean_sq_c = total / count, total_sq / count
    mean, var = float(mean_c.mean()), float(mean_sq_c.mean() - mean_c.mean() ** 2)
    std = float(np.sqrt(max(var, 1e-24)))
    return dict(scale_factor=1.0 / std, latent_mean=mean, latent_std=std,
                channel_mean=mean_c.tolist(), channel_std=np.sqrt(np.maximum(mean_sq_c - mean_c ** 2, 0)).tolist(),
                scale_split=str(data_cfg.train_split), scale_examples=count // int(np.prod(z.shape[1:3])),
                scale_source="1 / std of posterior samples over the training split")


def _reconstruct_fn(model: AutoencoderKL) -> Callable:
    """(params, x [-1, 1]) -> D(mode of q(z|x)), compiled."""
    return jax.jit(lambda p, x: model.apply({"params": p}, x)[0])


def reconstruct(model: AutoencoderKL, params: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
    """uint8 reconstructions D(mode of q(z|x)) of uint8 (or [-1, 1]) images, in batches."""
    fn, x = _reconstruct_fn(model), imaging.as_float(images)
    out = [imaging.to_uint8(np.asarray(fn(params, x[s:s + batch_size]))) for s in range(0, len(x), batch_size)]
    return np.concatenate(out)


def evaluate(model: AutoencoderKL, params: Any, config: ml_collections.ConfigDict, step: int
             ) -> tuple[dict, np.ndarray]:
    """Test-split PSNR of the reconstructions and (labelled data) their classifier metrics vs the floor;
    and a picture: the first 16 test images (odd rows) above their reconstructions (even rows)."""
    data_cfg, batch = config.data, int(config.autoencoder.eval_batch_size)
    fn = _reconstruct_fn(model)
    psnrs, sq_err, recons, count = [], 0.0, [], 0
    for x, mask in _eval_batches(data_cfg, data_cfg.eval_split, batch):
        real, rec = imaging.to_uint8(x[mask]), imaging.to_uint8(np.asarray(fn(params, x))[mask])
        psnrs += [imaging.psnr(r, o) for r, o in zip(rec, real)]
        sq_err += float(np.sum((rec.astype(np.float64) - real.astype(np.float64)) ** 2))
        count += real.size
        if not recons:
            first = real[:16]
        recons.append(rec)
    pooled = 10.0 * np.log10(255.0 ** 2 / max(sq_err / count, 1e-12))
    result: dict[str, Any] = dict(step=step, split=str(data_cfg.eval_split), num_images=len(psnrs),
                                  psnr=float(np.mean(np.minimum(psnrs, 100.0))), psnr_pooled=float(pooled))
    if data.num_classes(data_cfg) >= 2 and bool(config.autoencoder.eval_classifier):
        clf = classifier.load_or_train(data_cfg, classifier.resolve_path(config), log=say)
        quality = sample_quality.evaluate_samples(clf, data_cfg, np.concatenate(recons))
        result["classifier"] = dict(path=classifier.resolve_path(config), test_accuracy=clf.info["test_accuracy"])
        result.update(quality)
    rows = [im for r in range(0, len(first), 8) for im in (first[r:r + 8], recons[0][r:r + 8])]
    grid = imaging.make_grid(np.concatenate(rows), ncol=8)
    return result, imaging.upscale(grid, max(1, 128 // grid.shape[0]))


def summary_line(result: dict, info: dict) -> str:
    """One line: step, PSNR, the classifier fd beside its floor, the scale factor."""
    line = (f"autoencoder step {result['step']}: test PSNR {result['psnr']:.2f} dB (mean of {result['num_images']} "
            f"images; pooled {result['psnr_pooled']:.2f} dB)")
    if "metrics" in result:
        fd, floor = result["metrics"]["fd"], result["floor"]["fd"]
        line += f"; classifier fd of reconstructions {fd:.3g} (floor {floor:.3g}, {result['ratio']['fd']:.2f}x floor)"
    return line + f"; latent scale factor {info['scale_factor']:.4g} (latents {tuple(info['latent_shape'])})"
