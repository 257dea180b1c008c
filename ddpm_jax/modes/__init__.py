"""What `--mode=` runs (`config_loading.MODES`): each mode is one module on top of `setup`, and none
imports another but the cascade, which is two sample runs.

Each mode's function takes `(config, workdir)` and first checks the config with `checks.check_config(config, mode)`:

    train      ddpm_jax.train.train_and_evaluate       (the DDPM on loop.py; resumes by itself)
    sample     ddpm_jax.modes.sample.run               grids, arrays, GIFs, partial denoising
    cascade    ddpm_jax.modes.cascade.run              a base model's samples super-resolved (two sample runs)
    eval       ddpm_jax.modes.evaluate.run_eval         samples -> FID / IS
    fid_stats  ddpm_jax.modes.evaluate.run_fid_stats    reference statistics of a split
    bpd        ddpm_jax.modes.bpd.run                   bits/dim of the test split
    figures    ddpm_jax.modes.figures.run               the paper's Figs. 5-8 (figures.kind)
    train_autoencoder  ddpm_jax.modes.autoencoder.run   the KL autoencoder of latent diffusion
                                                        (its workdir: checkpoints, scale factor, PSNR)
    phema      ddpm_jax.modes.phema.run                 post-hoc EMA: the EMA of any σ_rel from the snapshots
    distill    ddpm_jax.modes.distill.run              one round of progressive distillation (2N -> N steps)
    consistency  ddpm_jax.modes.consistency.run        consistency distillation (1-step and multistep sampling)

This package's own helpers are the few things every mode does the same way.
"""

from __future__ import annotations

import sys

import jax

from ddpm_jax import imaging


def say(line: str) -> None:
    """One line for the user, from process 0 (stderr, next to absl's log lines)."""
    if jax.process_index() == 0:
        print(line, file=sys.stderr, flush=True)


def require_images(shape: tuple, source: str, mode: str) -> None:
    """Refuses a mode that needs images on 2-D points (one line naming the data source)."""
    if not imaging.is_image_shape(shape):
        raise ValueError(f"--mode={mode} needs image data; data.source={source!r} gives points of shape "
                         f"{tuple(shape)} (use --mode=sample for 2-D data)")
