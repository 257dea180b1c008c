"""Which checkpoint a run starts from when some are damaged: the newest one that reads back intact.

A `checkpointing.Checkpointer` reads one step and raises `CorruptCheckpointError` when an item's
checksum differs from the saved one (or it cannot be read at all). Here the steps are tried newest
first, and the two kinds of run treat a damaged one differently:

* training (`newest_valid`, from `loop.py`) resumes from the newest intact step and moves the
  damaged newer ones to `<workdir>/corrupt_checkpoints/<step>`, so that it can write those steps
  again; every process takes the same decision;
* the read-only modes (`newest_valid_ema`: sample, eval, bpd, figures, export, a latent run's
  autoencoder) skip a damaged step with a warning naming the step used instead and leave it where
  it is, as a training run may be writing the same workdir.

If no step reads back, `CorruptCheckpointError` lists every step with its reason.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from etils import epath

from ddpm_jax.checkpointing import Checkpointer, CorruptCheckpointError, Restored, first_line, workdir_path

CORRUPT_DIR = "corrupt_checkpoints"
NEWEST = -1  # `checkpoint_step` meaning the newest checkpoint that reads back intact


def _all_processes(ok: bool) -> bool:
    """True only if `ok` on every process (so all take the same branch)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))


def newest_valid(ckpt: Checkpointer, state_template: Any,
                 check_meta: Callable[[dict | None], None] | None = None) -> Restored | None:
    """The newest checkpoint that reads back intact (None if the workdir has none).

    `check_meta(meta)` may refuse a checkpoint of another model (its error propagates).
    A checkpoint that cannot be read, or whose checksums differ, is skipped with a
    warning and moved to `<workdir>/corrupt_checkpoints/` (so that the run can write
    that step again); if none is readable, CorruptCheckpointError lists why and
    nothing is moved.
    """
    problems: list[tuple[int, str]] = []
    for step in reversed(ckpt.all_steps()):
        try:
            meta = ckpt.read_meta(step)
        except Exception as err:  # noqa: BLE001 - any read failure means a damaged checkpoint
            problems.append((step, first_line(err)))
            continue
        if check_meta is not None:
            check_meta(meta)
        restored, error = None, None
        try:
            restored = ckpt.restore_train(state_template, step)
        except FileNotFoundError as err:
            if "only EMA params" in str(err):
                raise
            error = err
        except Exception as err:  # noqa: BLE001
            error = err
        if not _all_processes(error is None):
            problems.append((step, first_line(error) if error else "unreadable on another process"))
            continue
        for bad_step, why in problems:
            moved = _quarantine(ckpt, bad_step)
            logging.warning("checkpoint %d is unreadable (%s); moved it to %s and resumed from step %d.",
                            bad_step, why, moved, step)
        if problems:
            ckpt.reload()
        return restored
    if problems:
        listing = "; ".join(f"step {s}: {why}" for s, why in problems)
        raise CorruptCheckpointError(
            f"no readable checkpoint under {ckpt.directory} ({listing}); move that directory "
            "aside to start afresh (or restore it from a backup)."
        )
    return None


def _quarantine(ckpt: Checkpointer, step: int) -> str:
    """Moves checkpoint `step` to `<workdir>/corrupt_checkpoints/<step>[-<time>]`."""
    target_dir = epath.Path(workdir_path(ckpt.workdir, CORRUPT_DIR))
    target = target_dir / str(step)
    if target.exists():
        target = target_dir / f"{step}-{int(time.time())}"
    if jax.process_index() == 0:
        target_dir.mkdir(parents=True, exist_ok=True)
        (epath.Path(ckpt.directory) / str(step)).rename(target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"ddpm_jax_quarantine_{step}")
    return str(target)


def newest_valid_ema(ckpt: Checkpointer, params_template: Any,
                     check_meta: Callable[[dict | None], None] | None = None,
                     step: int = NEWEST) -> tuple[int, Any]:
    """(step, EMA params) of the newest checkpoint whose params read back intact, or of `step`.

    The rule of the read-only modes (sample, eval, bpd): a damaged checkpoint is skipped
    with a warning naming it and the step used instead, and left where it is (a training
    run may be writing this workdir; only training quarantines). `check_meta(meta)` may
    refuse a checkpoint of another model (its error propagates). FileNotFoundError if the
    workdir has no checkpoint; CorruptCheckpointError if none reads back. A chosen `step`
    (`checkpoint_step`, for comparing two points of one run) is the only one tried:
    ValueError naming the steps there are if the workdir does not hold it.
    """
    steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(
            f"no checkpoint in {ckpt.directory}; train first (--mode=train) or convert a "
            "released checkpoint (python -m ddpm_jax.convert) into this workdir.")
    if int(step) != NEWEST:
        if int(step) not in steps:
            raise ValueError(f"checkpoint_step={step}: {ckpt.directory} holds steps "
                             f"{', '.join(map(str, steps))}; choose one of them ({NEWEST}: the newest).")
        steps = [int(step)]
    problems: list[tuple[int, str]] = []
    for step in reversed(steps):
        try:
            meta = ckpt.read_meta(step)
        except Exception as err:  # noqa: BLE001 - any read failure means a damaged checkpoint
            problems.append((step, first_line(err)))
            continue
        if meta is not None and check_meta is not None:
            check_meta(meta)
        try:
            params = ckpt.restore_ema_params(params_template, step)
        except Exception as err:  # noqa: BLE001
            problems.append((step, first_line(err)))
            continue
        for bad_step, why in problems:
            logging.warning("checkpoint %d is unreadable (%s); skipped it and used step %d.",
                            bad_step, why, step)
        return step, params
    listing = "; ".join(f"step {s}: {why}" for s, why in problems)
    raise CorruptCheckpointError(f"no readable checkpoint under {ckpt.directory} ({listing}).")
