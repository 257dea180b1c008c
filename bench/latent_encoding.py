"""Latent diffusion's input: encode the split once and cache it, or encode every batch on the fly?

    python -m bench.latent_encoding --config=configs/latent_mnist.py [--steps=30] \
        [--config.data.latents_from=workdirs/ae_mnist]

One JSON line with, on this machine (its load average in `host`; the dev machine is shared):

* cache: seconds to encode the whole training split once (``data/latents.py``'s ``LatentSource``,
  the first batch of the train iterator: encoder compilation included, then cached for the run);
* on_the_fly: the median seconds of the encoder on one training batch (compiled, timed over
  ``--steps`` calls), and what that costs per epoch (x the batches in an epoch);
* ddpm_step: the median seconds of one DDPM train step on the latents (the config's U-Net), so
  the on-the-fly encoder's cost reads as a fraction of a step.

Without an autoencoder workdir (``data.latents_from`` missing), the config's ``autoencoder``
architecture with random weights is timed (the cost does not depend on the weights).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common


def parse_args(argv):
    rest, overrides = common.split_overrides(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/latent_mnist.py")
    p.add_argument("--steps", type=int, default=30, help="timed calls of the encoder and of the train step")
    args = p.parse_args(rest)
    args.overrides = overrides
    common.check_positive(steps=args.steps)
    return args


def _random_autoencoder(config, workdir: str) -> None:
    """An autoencoder workdir of the config's architecture with its initial weights (no training)."""
    from ddpm_jax.modes import autoencoder as ae_mode

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ae_config = common.load_config(os.path.join(repo, "configs", "autoencoder_mnist.py"), [])
    ae_config.data = config.data.copy_and_resolve_references()
    ae_config.data.latents_from = ""  # the autoencoder itself trains on the images
    ae_config.autoencoder.update(num_steps=1, lr=0.0, warmup_steps=0, eval_classifier=False, checkpoint_every=1)
    ae_mode.run(ae_config, workdir)


def _median_seconds(fn, steps: int) -> float:
    import jax

    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return common.median(times)


def measure(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ddpm_jax import data, imaging, loop, parallel, setup, train
    from ddpm_jax.data import latents

    config = common.load_config(args.config, args.overrides)
    tmp = None
    if not os.path.isfile(os.path.join(str(config.data.latents_from), latents.INFO_FILE)):
        tmp = tempfile.mkdtemp(prefix="ae_random_")
        _random_autoencoder(config, tmp)
        config.data.latents_from = tmp
    mesh, batch = parallel.make_mesh(), int(config.training.batch_size)
    num_train = data.num_examples(config.data, config.data.train_split)

    start = time.perf_counter()
    it = data.create_train_iterator(config.data, global_batch_size=batch, seed=0)
    first = next(it)  # the whole split is encoded here, once
    cache_s = time.perf_counter() - start

    codec = latents.load_codec(str(config.data.latents_from))
    pixels = data.load_pixel_source(config.data, config.data.train_split).read(np.arange(batch))["x"]
    x = jnp.asarray(imaging.as_float(pixels))
    encode = jax.jit(lambda p, x: (codec.model.apply({"params": p}, x, method="encode").mode() - codec.shift)
                     * codec.scale)
    on_the_fly_s = _median_seconds(lambda: encode(codec.params, x), args.steps)

    run = setup.create_run(config, mesh)
    state, tx = setup.create_train_state(config, run.model, run.shape, mesh)
    step_fn = train.make_train_step(config, run.model, run.sched, tx, mesh)
    batches, _ = loop.next_dispatch(it, 1, mesh)
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = step_fn(holder["state"], batches)
        return metrics

    step_s = _median_seconds(one_step, args.steps)
    it.close()
    per_epoch = num_train / batch
    record = dict(
        impl="ddpm_jax", bench="latent_encoding", config=args.config, autoencoder=str(config.data.latents_from),
        random_autoencoder=tmp is not None, num_train=num_train, batch=batch,
        image_shape=list(data.image_shape(config.data)), latent_shape=list(first["x"].shape[1:]),
        cache=dict(encode_split_s=cache_s, per_epoch_s=0.0),
        on_the_fly=dict(encode_batch_s=on_the_fly_s, per_epoch_s=on_the_fly_s * per_epoch,
                        fraction_of_step=on_the_fly_s / step_s),
        ddpm_step=dict(step_s=step_s, per_epoch_s=step_s * per_epoch),
        break_even_epochs=cache_s / (on_the_fly_s * per_epoch),
        **common.jax_env(),
    )
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    return [common.emit(record)]


def main(argv=None) -> list[dict]:
    return common.run_cli(lambda args: measure(parse_args(args)), argv)


if __name__ == "__main__":
    main()
