"""The frozen teacher of a distillation trainer (``modes/distill.py``, ``modes/consistency.py``).

A teacher is any trained or converted DDPM workdir (an ε / x0 / v model, or an earlier student):
its own ``RunMeta`` says what it predicts; its network, data shape and schedule must be the
config's (the student is the same network). Read before any work, loaded once the run is built.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from ddpm_jax import checkpoint_recovery, checkpointing, setup
from ddpm_jax.run_meta import RunMeta


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A teacher workdir's meta and, once loaded, its newest valid EMA params and their step."""

    workdir: str
    meta: RunMeta
    params: Any = None
    step: int = 0


def read(config: ml_collections.ConfigDict, workdir: str, field: str) -> Teacher:
    """The teacher at `workdir` (the config field `field` names it), checked against the config's network,
    data shape and schedule (its prediction target may differ); one-line ValueErrors, nothing loaded."""
    if not workdir:
        raise ValueError(f"{field} is empty; set it to the workdir of the trained model "
                         "(or of the previous round's student).")
    stored = checkpointing.read_meta(workdir) if os.path.isdir(workdir) else None
    if stored is None:
        raise ValueError(f"{field}={workdir!r} holds no checkpoint; train the teacher first "
                         "(--mode=train) or give the workdir of a trained or converted model.")
    where = f"{field}={workdir}"
    meta = RunMeta.from_dict(stored, where)
    dataclasses.replace(setup.run_meta(config), pred=meta.pred).check_matches(meta, where)
    return Teacher(workdir, meta)


def load(teacher: Teacher, run: setup.Run) -> Teacher:
    """The teacher with its newest valid EMA params, replicated on the run's mesh."""
    template = setup.abstract_params(run.model, run.shape, run.mesh)
    check = lambda stored: teacher.meta.check_matches(RunMeta.from_dict(stored, teacher.workdir),  # noqa: E731
                                                      teacher.workdir)
    with checkpointing.Checkpointer(teacher.workdir, async_save=False) as ckpt:
        step, params = checkpoint_recovery.newest_valid_ema(ckpt, template, check_meta=check)
    return dataclasses.replace(teacher, params=params, step=int(step))
