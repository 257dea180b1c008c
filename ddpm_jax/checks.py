"""Checks made before a run touches anything: the config, and the workdir.

Each failure is one line naming the problem and the fix (a `ValueError`), raised
before any file is written or anything is compiled.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

import ml_collections

from ddpm_jax import parallel

NONFINITE_POLICIES = ("error", "skip")
EVALUATION_RUN = "ddpm_jax.evaluation.run"  # run(config, workdir, mode=...): eval | fid_stats | bpd


class WorkdirError(ValueError):
    """--workdir cannot be created or written."""


def validate_config(config: ml_collections.ConfigDict, mesh) -> None:
    """One-line ValueErrors for settings that cannot work (called before anything is touched)."""
    t = config.training
    if str(t.nonfinite) not in NONFINITE_POLICIES:
        raise ValueError(f"training.nonfinite={t.nonfinite!r} is unknown; use one of {NONFINITE_POLICIES}.")
    for key in ("num_steps", "log_every", "checkpoint_every", "steps_per_dispatch", "keep_checkpoints"):
        if int(t[key]) < 1:
            raise ValueError(f"training.{key}={t[key]} must be >= 1.")
    parallel.check_batch_size(int(t.batch_size), mesh)
    points = str(config.data.source) == "toy2d"
    if str(config.model.name) == "unet" and points:
        raise ValueError("model.name='unet' cannot take the 2-D points of data.source='toy2d'; "
                         "use --config.model.name=mlp.")
    if str(config.model.name) == "mlp" and not points:
        raise ValueError(f"model.name='mlp' takes 2-D points, not the images of data.source="
                         f"{config.data.source!r}; use --config.model.name=unet.")
    if str(config.model.name) == "unet":
        levels, size = len(config.model.ch_mult), int(config.data.image_size)
        factor = 2 ** (levels - 1)
        if size % factor:
            raise ValueError(
                f"data.image_size={size} cannot go through the U-Net: model.ch_mult has {levels} levels, "
                f"so images are halved {levels - 1} times and the size must be a multiple of {factor}; "
                f"use --config.data.image_size={max(factor, size // factor * factor)} or fewer levels.")
    if bool(t.eval_bpd_after) and importlib.util.find_spec(EVALUATION_RUN) is None:
        raise ValueError("training.eval_bpd_after=True needs ddpm_jax/evaluation/run.py, which this "
                         "checkout lacks; set --config.training.eval_bpd_after=False.")


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
