"""Checkpoints: the only module that talks to Orbax.

Layout (one Orbax `CheckpointManager` under `<workdir>/checkpoints`):

    checkpoints/<step>/train        step, params, optimizer state (Standard pytree)
    checkpoints/<step>/ema_params   EMA params (Standard pytree; what sampling/eval read)
    checkpoints/<step>/data         data-iterator state of every process (JSON)
    checkpoints/<step>/meta         model name + kwargs, data shape, schedule (JSON)

Saving is asynchronous (the step loop goes on while arrays are written). Restoring
takes a template whose leaves carry the target shardings of the current mesh, so
a run saved on 8 devices restores onto 1 (or 64). `save_pretrained` writes a
params-only step 0 in the same layout (converted released checkpoints).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

CHECKPOINT_DIR = "checkpoints"
TRAIN, EMA, DATA, META = "train", "ema_params", "data", "meta"


class CheckpointMismatchError(ValueError):
    """The workdir holds a checkpoint of a different model / data / schedule."""


def _join(workdir: str, name: str) -> str:
    """`workdir/name`, made absolute for local paths (Orbax wants absolute ones); gs:// kept."""
    path = os.path.join(str(workdir), name)
    return path if "://" in path else os.path.abspath(path)


def _abstract(tree: Any) -> Any:
    """Shape/dtype/sharding of every leaf: the restore target (arrays stay where the template is)."""

    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        x = np.asarray(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype)

    return jax.tree.map(leaf, tree)


def _state_fields(state: Any) -> dict:
    """The train state without the EMA params (they are their own item)."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != EMA}


def _gather_process_states(data_state: dict | None) -> list:
    """Every process's iterator state (they differ per host), gathered as a list.

    Single process: `[data_state]`. Several: the JSON strings are all-gathered
    as padded bytes, so the primary process can write all of them.
    """
    if jax.process_count() == 1:
        return [data_state]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(data_state).encode(), np.uint8)
    length = multihost_utils.process_allgather(np.array([raw.size], np.int32))
    padded = np.zeros(int(np.max(length)), np.uint8)
    padded[: raw.size] = raw
    all_raw = multihost_utils.process_allgather(padded)
    return [
        json.loads(bytes(all_raw[i, : int(length[i, 0])]).decode())
        for i in range(jax.process_count())
    ]


class Checkpointer:
    """Async Orbax checkpoints of a workdir: keep the latest `keep` plus every `keep_every` steps."""

    def __init__(self, workdir: str, keep: int = 3, keep_every: int = 0, async_save: bool = True):
        self.directory = _join(workdir, CHECKPOINT_DIR)
        policies = [ocp.checkpoint_managers.LatestN(n=max(int(keep), 1))]
        if keep_every and int(keep_every) > 0:
            policies.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=int(keep_every)))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # ---- queries ----------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def _resolve(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(
                    f"no checkpoint under {self.directory}; train first "
                    "(--mode=train) or point --workdir at a run or converted checkpoint."
                )
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} under {self.directory}; "
                f"available: {self.all_steps()}."
            )
        return int(step)

    def _items(self, step: int) -> set[str]:
        path = epath.Path(self.directory) / str(step)
        return {p.name for p in path.iterdir()} if path.is_dir() else set()

    def read_meta(self, step: int | None = None) -> dict | None:
        """The JSON meta (model, data shape, schedule) of a checkpoint, or None."""
        step = self.latest_step() if step is None else step
        if step is None or META not in self._items(step):
            return None
        restored = self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
        return dict(restored[META])

    # ---- save -------------------------------------------------------------------------------
    def save(
        self, step: int, state: Any, data_state: dict | None, meta: dict, force: bool = False
    ) -> bool:
        """Starts an async save of `state` (a TrainState), the data-iterator state and `meta`.

        Must be called on every process (multi-host). Returns whether a save started.
        """
        items = {
            TRAIN: ocp.args.StandardSave(_state_fields(state)),
            EMA: ocp.args.StandardSave(state.ema_params),
            DATA: ocp.args.JsonSave({"process_count": jax.process_count(),
                                     "processes": _gather_process_states(data_state)}),
            META: ocp.args.JsonSave(dict(meta)),
        }
        return bool(self._manager.save(int(step), args=ocp.args.Composite(**items), force=force))

    # ---- restore ----------------------------------------------------------------------------
    def restore(self, state_template: Any, step: int | None = None) -> tuple[Any, dict | None]:
        """Restores a TrainState onto the template's shardings; returns (state, data_state).

        `data_state` is this process's iterator state (None when the checkpoint has none).
        """
        step = self._resolve(step)
        items = self._items(step)
        if TRAIN not in items:
            raise FileNotFoundError(
                f"checkpoint {self.directory}/{step} holds only EMA params (a converted or "
                "pretrained checkpoint): it can be sampled or evaluated, not resumed; "
                "train in a fresh --workdir."
            )
        args = {
            TRAIN: ocp.args.StandardRestore(_abstract(_state_fields(state_template))),
            EMA: ocp.args.StandardRestore(_abstract(state_template.ema_params)),
        }
        if DATA in items:
            args[DATA] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        state = state_template.replace(**dict(restored[TRAIN]), ema_params=restored[EMA])
        data_state = None
        if DATA in items:
            saved = restored[DATA]
            processes = saved["processes"]
            if int(saved.get("process_count", 1)) != jax.process_count():
                # The data pipeline's state names the global position in the stream (the
                # same on every host), so process 0's continues on another host count.
                logging.info(
                    "checkpoint %d was written by %s processes, this run has %d: every process "
                    "resumes the data stream from process 0's state.",
                    step, saved.get("process_count"), jax.process_count(),
                )
                data_state = processes[0]
            else:
                data_state = processes[jax.process_index()]
        return state, data_state

    def restore_ema_params(self, params_template: Any, step: int | None = None) -> Any:
        """Restores only the EMA params (for sampling / evaluation) onto the template's shardings."""
        step = self._resolve(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{EMA: ocp.args.StandardRestore(_abstract(params_template))})
        )
        return restored[EMA]

    # ---- lifecycle --------------------------------------------------------------------------
    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_pretrained(directory: str, params: Any, meta: dict) -> None:
    """Writes a params-only checkpoint (step 0, EMA item + meta) readable by `restore_ema_params`.

    Used by the converters of released checkpoints: `--mode=sample --workdir=directory`
    then samples from these weights.
    """
    with Checkpointer(directory, keep=1, async_save=False) as ckpt:
        if ckpt.latest_step() is not None:
            raise FileExistsError(
                f"{ckpt.directory} already holds checkpoints {ckpt.all_steps()}; "
                "write a converted checkpoint into an empty directory."
            )
        items = {EMA: ocp.args.StandardSave(params), META: ocp.args.JsonSave(dict(meta))}
        ckpt._manager.save(0, args=ocp.args.Composite(**items), force=True)


def read_meta(workdir: str) -> dict | None:
    """The meta (model name + kwargs, data shape, schedule) of the workdir's newest checkpoint."""
    if not (epath.Path(workdir) / CHECKPOINT_DIR).is_dir():
        return None
    with Checkpointer(workdir, async_save=False) as ckpt:
        return ckpt.read_meta()


def _first_difference(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """(dotted key, stored value, current value) of the first difference, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None
    a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))  # tuples == lists
    return None if a == b else (path, a, b)


def check_meta(stored: dict | None, current: dict, workdir: str) -> None:
    """Raises CheckpointMismatchError naming the first differing entry of the meta."""
    if stored is None:
        return
    found = _first_difference(stored, current)
    if found:
        key, a, b = found
        raise CheckpointMismatchError(
            f"{workdir} holds a checkpoint with {key}={json.dumps(a)}, but the config gives "
            f"{key}={json.dumps(b)}; use a fresh --workdir or the config it was trained with."
        )
