"""Preemption notices: checkpoint at the next step boundary, then exit 0.

Preemptible TPUs and spot GPUs are taken back with a SIGTERM and a grace period
(SLURM: `--signal=TERM@120`; GCE/TPU: about 30 s). The training loop asks
`watcher.reached(prev_step, step)` after every dispatch; when it says yes, the loop
writes a checkpoint of `step`, waits for it to be on disk and returns, so rerunning
the same command resumes exactly there.

* One process: a SIGTERM (or SIGUSR1, which some schedulers send first) handler sets
  a flag; the loop checks it.
* Several processes (multi-host): a signal reaches one host, or the hosts at
  different moments, but a checkpoint is a collective operation, so every host must
  stop at the same step. `jax.distributed.initialize` starts JAX's preemption
  service, which catches SIGTERM itself and agrees on a step with the other hosts:
  `multihost_utils.reached_preemption_sync_point(step)` is True on all of them at
  that step. It must be asked about every step in order, so the loop passes every
  step of a multi-step dispatch.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
from absl import logging

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatcher:
    """Tells the training loop when to checkpoint and stop (see the module docstring)."""

    def __init__(self, signals: tuple = SIGNALS):
        self._event = threading.Event()
        self._signal: int | None = None
        self._previous: dict[int, Any] = {}
        self._multihost = jax.process_count() > 1
        self._service_missing = False
        if self._multihost:  # JAX's preemption service owns SIGTERM (a handler here would replace its own)
            return
        if threading.current_thread() is not threading.main_thread():
            logging.warning("training runs outside the main thread: SIGTERM will not trigger a checkpoint.")
            return
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - signal handler signature
        self._signal = signum
        self._event.set()

    @property
    def reason(self) -> str:
        if self._signal is not None:
            return signal.Signals(self._signal).name
        return "preemption notice" if self._multihost else "request"

    def request(self) -> None:
        """Asks the loop to checkpoint and stop, as a signal would (single process)."""
        self._event.set()

    def reached(self, prev_step: int, step: int) -> bool:
        """True if the loop should checkpoint `step` and stop (the same answer on every host)."""
        if not self._multihost:
            return self._event.is_set()
        if self._service_missing:
            return False
        from jax.experimental import multihost_utils

        hit = False
        try:
            for s in range(prev_step + 1, step + 1):  # every step, in order (the sync protocol counts calls)
                hit |= bool(multihost_utils.reached_preemption_sync_point(s))
        except RuntimeError as err:  # jax_enable_preemption_service is off
            self._service_missing = True
            logging.warning("JAX's preemption service is unavailable (%s): a SIGTERM will stop this run "
                            "without a checkpoint.", err)
            return False
        return hit

    def close(self) -> None:
        """Restores the signal handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "PreemptionWatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
