"""Data parallelism: one ('data',) device mesh, shardings, host-local -> global arrays.

One code path serves one GPU, eight GPUs and a multi-host TPU pod: the train step
is a `jax.jit` over a `('data',)` mesh with the params replicated and the batch
sharded on its leading axis; XLA inserts the gradient all-reduce. (This is what
`jax.pmap` has become; pmap itself is in maintenance mode.)
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

_initialized = False


def initialize(distributed_cfg: Any | None) -> None:
    """Starts `jax.distributed` when the config asks for several processes.

    `coordinator_address`: "" = a single process (nothing to do); "auto" = let
    `jax.distributed.initialize()` detect the cluster (TPU pod, SLURM, ...);
    "host:port" = explicit coordinator with `num_processes` and `process_id`.
    Safe to call twice.
    """
    global _initialized
    if _initialized or distributed_cfg is None:
        return
    address = str(distributed_cfg.get("coordinator_address", "") or "")
    if not address:
        return
    if address == "auto":
        jax.distributed.initialize()
    else:
        num = int(distributed_cfg.get("num_processes", 1))
        pid = int(distributed_cfg.get("process_id", 0))
        if not 0 <= pid < num:
            raise ValueError(
                f"distributed.process_id={pid} is outside [0, num_processes={num}); "
                "give each process a distinct id below num_processes."
            )
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    _initialized = True
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D `('data',)` mesh over `devices` (default: all devices of all processes).

    The axis type is Auto: sharding is propagated by the compiler, which is what a
    plain data-parallel `jax.jit` step wants (`jax.make_mesh` defaults to Explicit).
    """
    auto = (jax.sharding.AxisType.Auto,)
    if devices is None:
        return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=auto)
    devices = list(devices)
    return Mesh(np.array(devices), (DATA_AXIS,), axis_types=auto)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (params, optimizer state, scalars)."""
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """The array is split over devices along `batch_axis` (0 for [B, ...])."""
    return NamedSharding(mesh, P(*([None] * batch_axis), DATA_AXIS))


def num_devices(mesh: Mesh) -> int:
    return int(mesh.devices.size)


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "training.batch_size") -> None:
    """Raises a one-line ValueError if the global batch cannot be split evenly."""
    n = num_devices(mesh)
    if global_batch <= 0 or global_batch % n:
        raise ValueError(
            f"{what}={global_batch} is not divisible by the {n} devices of the mesh; "
            f"use a multiple of {n} (e.g. --config.{what}={max(n, global_batch // n * n or n)})."
        )
    if global_batch % jax.process_count():
        raise ValueError(
            f"{what}={global_batch} is not divisible by the {jax.process_count()} processes; "
            "use a multiple of the process count."
        )


def host_to_global(batch: Any, mesh: Mesh, batch_axis: int = 0) -> Any:
    """Assembles host-local numpy arrays into global arrays sharded along `batch_axis`.

    Each process passes its own slice ([global/process_count, ...] along
    `batch_axis`); the result has the global shape and lives on all devices.
    """
    sharding = data_sharded(mesh, batch_axis)

    def to_global(x):
        x = np.asarray(x)
        global_shape = list(x.shape)
        global_shape[batch_axis] *= jax.process_count()
        return jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))

    return jax.tree.map(to_global, batch)


def primary_decides(ok: bool) -> bool:
    """Process 0's `ok` on every process (one process: `ok`), so all take the same branch."""
    if jax.process_count() == 1:
        return bool(ok)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree (identical on every process) replicated on the mesh."""
    return jax.device_put(tree, replicated(mesh))


def to_host(tree: Any) -> Any:
    """Fetches a pytree of (possibly multi-host) global arrays as numpy on every process.

    Fully-addressable arrays are copied directly; arrays spread over several
    processes are all-gathered first.
    """

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(fetch, tree)
