"""Checkpoints: the only module that talks to Orbax (`checkpoint_recovery` picks among them).

Layout (one Orbax `CheckpointManager` under `<workdir>/checkpoints`):

    checkpoints/<step>/train        step, params, optimizer state, timestep history if any (pytree)
    checkpoints/<step>/ema_params   EMA params (pytree; what sampling/eval read)
    checkpoints/<step>/data         data-iterator state of every process (JSON)
    checkpoints/<step>/meta         model name + kwargs, data shape, schedule (JSON)
    checkpoints/<step>/info         checksum of every array item, loop counters (JSON)

Saving is asynchronous (the step loop goes on while arrays are written). Restoring
takes a template whose leaves carry the target shardings of the current mesh, so
a run saved on 8 devices restores onto 1 (or 64). `save_pretrained` writes a
params-only step 0 in the same layout (converted released checkpoints).

What can go wrong, and what happens:
* Killed in the middle of a save: Orbax writes into `<step>.orbax-checkpoint-tmp*`
  and renames it when complete, so an interrupted save is never listed as a step;
  the training `Checkpointer` (`cleanup_tmp=True`) deletes such leftovers.
* NaN/Inf in the state: `save` refuses (`NonFiniteCheckpointError`), nothing is written.
* A damaged checkpoint (a truncated, missing or altered file): every array item's
  checksum (a sum of its bit patterns, exact and independent of the sharding) is
  checked on restore (`CorruptCheckpointError`); `checkpoint_recovery` then falls back to the
  newest good checkpoint (training moves the damaged ones to `<workdir>/corrupt_checkpoints/`).
* Disk full: `DiskFullError`, naming the newest complete checkpoint (still intact).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
from typing import Any, Iterator, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from ddpm_jax import parallel

CHECKPOINT_DIR = "checkpoints"
SNAPSHOT_DIR = "ema_snapshots"  # post-hoc EMA snapshots (`post_hoc_ema.Snapshot`), all kept, beside the rotation
NEWEST = -1  # `checkpoint_step` meaning the newest checkpoint that reads back intact
TRAIN, EMA, DATA, META, INFO = "train", "ema_params", "data", "meta", "info"
_ARRAY_ITEMS = (TRAIN, EMA)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class CorruptCheckpointError(ValueError):
    """A checkpoint cannot be read back, or reads back other values than were saved."""


class NonFiniteCheckpointError(FloatingPointError):
    """The state to save holds NaN or Inf: it is not written."""


class DiskFullError(OSError):
    """A checkpoint could not be written because the disk (or quota) is full."""


class Restored(NamedTuple):
    """A restored training checkpoint."""

    step: int
    state: Any
    data_state: dict | None  # this process's data-iterator state
    extra: dict  # loop counters saved with it (`save(..., extra=)`)


def workdir_path(workdir: str, name: str) -> str:
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


def _restore_args(template: Any) -> ocp.args.PyTreeRestore:
    """Restore onto the template's shardings (leaves without one come back as numpy)."""
    target = _abstract(template)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    return ocp.args.PyTreeRestore(item=target, restore_args=restore_args)


def _state_fields(state: Any) -> dict:
    """The train state without the EMA params (they are their own item) and its unused (None) fields."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
            if f.name != EMA and getattr(state, f.name) is not None}


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


# ---- integrity: finiteness and checksums ------------------------------------------------------


def _leaf_summary(x: np.ndarray) -> tuple[bool, int]:
    """(all finite, sum of the bit patterns as uint32 words mod 2**32) of one array."""
    x = np.ascontiguousarray(x)
    finite = bool(np.isfinite(x).all()) if np.issubdtype(x.dtype, np.inexact) else True
    if x.dtype.itemsize in (1, 2, 4):
        words = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])
    else:
        words = x.reshape(-1).view(np.uint8)
    return finite, int(words.sum(dtype=np.uint64)) % 2**32


def summarize(parts: dict) -> dict:
    """{name: {"finite": bool, "checksum": int}} of each pytree in `parts` (on any mesh).

    The checksum is exact and independent of the sharding: leaf i's word sum times 2i + 1
    (so swapped leaves count too), summed mod 2**32. Computed on the host from the copy
    that saving makes anyway (no compilation).
    """
    out = {}
    for name, tree in parts.items():
        finite, total = True, 0
        for i, leaf in enumerate(jax.tree.leaves(parallel.to_host(tree))):
            leaf_finite, words = _leaf_summary(np.asarray(leaf))
            finite &= leaf_finite
            total = (total + words * (2 * i + 1)) % 2**32
        out[name] = {"finite": finite, "checksum": total}
    return out


def _parts(state: Any) -> dict:
    return {**_state_fields(state), EMA: state.ema_params}


def first_line(err: BaseException, limit: int = 240) -> str:
    """`err` as one line of at most `limit` characters (its type's name if it has no text)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_disk_full(err: BaseException | None) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return True
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


class Checkpointer:
    """Async Orbax checkpoints of a workdir: keep the latest `keep` (None: all) plus every `keep_every` steps.

    `subdir` is the workdir's folder of them (SNAPSHOT_DIR: the post-hoc EMA snapshots). `cleanup_tmp=True` (training) deletes the leftovers of interrupted saves; readers
    (sampling, evaluation) leave them, as a run may be saving into the same workdir.
    """

    def __init__(self, workdir: str, keep: int | None = 3, keep_every: int = 0, async_save: bool = True,
                 cleanup_tmp: bool = False, subdir: str = CHECKPOINT_DIR):
        self.workdir = str(workdir)
        self.directory = workdir_path(workdir, subdir)
        policies = [ocp.checkpoint_managers.LatestN(n=None if keep is None else max(int(keep), 1))]
        if keep_every and int(keep_every) > 0:
            policies.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=int(keep_every)))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=cleanup_tmp,
            # Multi-host: the snapshots' manager saves beside the checkpoints', so its barriers get their own names.
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=None if subdir == CHECKPOINT_DIR else subdir),
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_item_handlers())
        self._writing: int | None = None  # the step of the save in flight

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

    def _read_json(self, step: int, item: str) -> dict | None:
        if item not in self._items(step):
            return None
        restored = self._manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
        return dict(restored[item])

    def reload(self) -> None:
        """Lists the steps on disk afresh (after checkpoints were moved away)."""
        self._manager.reload()

    def read_meta(self, step: int | None = None) -> dict | None:
        """The JSON meta (model, data shape, schedule) of a checkpoint, or None."""
        step = self.latest_step() if step is None else step
        return None if step is None else self._read_json(step, META)

    # ---- save -------------------------------------------------------------------------------
    def save(self, step: int, state: Any, data_state: dict | None, meta: dict, force: bool = False,
             extra: dict | None = None) -> bool:
        """Starts an async save of `state` (a TrainState), the data-iterator state and `meta`.

        Refuses a state holding NaN/Inf (NonFiniteCheckpointError: nothing is written).
        `extra` (JSON-able loop counters) comes back from `restore_train`. Must be called
        on every process (multi-host). Returns whether a save started.
        """
        summary = summarize(_parts(state))
        bad = [name for name, s in summary.items() if not s["finite"]]
        if bad:
            raise NonFiniteCheckpointError(
                f"refusing to checkpoint step {step}: {', '.join(bad)} hold NaN or Inf (nothing was "
                f"written; {self._newest_other(step)}); lower "
                "optim.lr or check the data, then rerun the same command."
            )
        items = {
            TRAIN: ocp.args.PyTreeSave(_state_fields(state)),
            EMA: ocp.args.PyTreeSave(state.ema_params),
            DATA: ocp.args.JsonSave({"process_count": jax.process_count(),
                                     "processes": _gather_process_states(data_state)}),
            META: ocp.args.JsonSave(dict(meta)),
            INFO: ocp.args.JsonSave({"checksums": {k: s["checksum"] for k, s in summary.items()},
                                     "extra": dict(extra or {})}),
        }
        with self._reporting_disk_full():  # also raises the failure of a previous async save
            started = bool(self._manager.save(int(step), args=ocp.args.Composite(**items), force=force))
        if started:
            self._writing = int(step)
        return started

    def _newest_other(self, step: int | None) -> str:
        """Where a resume would start: the newest complete checkpoint other than `step`."""
        done = [s for s in self.all_steps() if s != step]
        return f"the newest complete checkpoint, step {done[-1]}, is intact" if done else \
            "there is no complete checkpoint yet"

    @contextlib.contextmanager
    def _reporting_disk_full(self) -> Iterator[None]:
        """Turns a full disk (ENOSPC / EDQUOT anywhere in the error chain) into DiskFullError."""
        try:
            yield
        except Exception as err:
            if not _is_disk_full(err):
                raise
            step, self._writing = self._writing, None
            raise DiskFullError(
                f"disk full while writing checkpoint step {step} under {self.directory} "
                f"({first_line(err, 120)}); {self._newest_other(step)}: free space (or lower "
                "training.keep_checkpoints, or move --workdir to a larger disk), then rerun the same "
                "command to resume from it."
            ) from err

    # ---- restore ----------------------------------------------------------------------------
    def _verify(self, step: int, restored: dict, info: dict | None) -> None:
        """Raises CorruptCheckpointError if a restored item's checksum differs from the saved one."""
        saved = (info or {}).get("checksums")
        if not saved:  # written before checksums existed: nothing to compare
            return
        parts = {}
        if TRAIN in restored:
            parts.update(dict(restored[TRAIN]))
        if EMA in restored:
            parts[EMA] = restored[EMA]
        for name, summary in summarize({k: v for k, v in parts.items() if k in saved}).items():
            if summary["checksum"] != int(saved[name]):
                raise CorruptCheckpointError(
                    f"checkpoint {self.directory}/{step}: {name} reads back with checksum "
                    f"{summary['checksum']}, saved as {saved[name]} (a damaged file)."
                )

    def restore_train(self, state_template: Any, step: int | None = None) -> Restored:
        """Restores a TrainState onto the template's shardings, checking its checksums."""
        step = self._resolve(step)
        items = self._items(step)
        if TRAIN not in items:
            if EMA in items:
                raise FileNotFoundError(
                    f"checkpoint {self.directory}/{step} holds only EMA params (a converted or "
                    "pretrained checkpoint): it can be sampled or evaluated, not resumed; "
                    "train in a fresh --workdir."
                )
            raise CorruptCheckpointError(f"checkpoint {self.directory}/{step} has no {TRAIN!r} item.")
        args = {TRAIN: _restore_args(_state_fields(state_template)),
                EMA: _restore_args(state_template.ema_params)}
        for item in (DATA, INFO):
            if item in items:
                args[item] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        info = restored[INFO] if INFO in items else None
        self._verify(step, restored, info)
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
        return Restored(step, state, data_state, dict((info or {}).get("extra", {})))

    def restore(self, state_template: Any, step: int | None = None) -> tuple[Any, dict | None]:
        """Restores a TrainState onto the template's shardings; returns (state, data_state).

        `data_state` is this process's iterator state (None when the checkpoint has none).
        """
        restored = self.restore_train(state_template, step)
        return restored.state, restored.data_state

    def restore_ema_params(self, params_template: Any, step: int | None = None) -> Any:
        """Restores only the EMA params (for sampling / evaluation) onto the template's shardings."""
        step = self._resolve(step)
        items = self._items(step)
        args = {EMA: _restore_args(params_template)}
        if INFO in items:
            args[INFO] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        self._verify(step, restored, restored[INFO] if INFO in items else None)
        return restored[EMA]

    # ---- lifecycle --------------------------------------------------------------------------
    def wait(self) -> None:
        """Blocks until pending async saves are on disk (DiskFullError if the disk filled up)."""
        with self._reporting_disk_full():
            self._manager.wait_until_finished()
        self._writing = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _item_handlers() -> dict:
    """Array items: pytree handler with replica-parallel writes only on TPU.

    Replica-parallel saving splits every replicated array over its replicas with one
    small compiled slice per (shape, device): worth it for a TPU pod, pure compile
    time (~10 s per process for a small U-Net on 8 CPU devices) elsewhere.
    """
    th = ocp.type_handlers
    registry = th.create_type_handler_registry(
        (jax.Array, th.ArrayHandler(use_replica_parallel=jax.default_backend() == "tpu")),
        (np.ndarray, th.NumpyHandler()),
        (int, th.ScalarHandler()),
        (float, th.ScalarHandler()),
        (np.number, th.ScalarHandler()),
    )
    arrays = {name: ocp.PyTreeCheckpointHandler(type_handler_registry=registry) for name in _ARRAY_ITEMS}
    return {**arrays, **{name: ocp.JsonCheckpointHandler() for name in (DATA, META, INFO)}}


def save_pretrained(directory: str, params: Any, meta: dict, step: int = 0) -> None:
    """Writes a params-only checkpoint (`step`, EMA item + meta) readable by `restore_ema_params`.

    Used by the converters of released checkpoints: `--mode=sample --workdir=directory`
    then samples from these weights.
    """
    with Checkpointer(directory, keep=1, async_save=False) as ckpt:
        if ckpt.latest_step() is not None:
            raise FileExistsError(
                f"{ckpt.directory} already holds checkpoints {ckpt.all_steps()}; "
                "write a converted checkpoint into an empty directory."
            )
        summary = summarize({EMA: params})[EMA]
        if not summary["finite"]:
            raise NonFiniteCheckpointError("refusing to save params holding NaN or Inf.")
        items = {EMA: ocp.args.PyTreeSave(params), META: ocp.args.JsonSave(dict(meta)),
                 INFO: ocp.args.JsonSave({"checksums": {EMA: summary["checksum"]}, "extra": {}})}
        ckpt._manager.save(int(step), args=ocp.args.Composite(**items), force=True)


def read_meta(workdir: str) -> dict | None:
    """The stored meta (a `RunMeta` as JSON) of the workdir's newest checkpoint, or None."""
    if not (epath.Path(workdir) / CHECKPOINT_DIR).is_dir():
        return None
    with Checkpointer(workdir, async_save=False) as ckpt:
        return ckpt.read_meta()
