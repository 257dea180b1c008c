"""Preemption notices and Ctrl-C: checkpoint at the next step boundary, then stop.

Preemptible TPUs and spot GPUs are taken back with a SIGTERM and a grace period
(SLURM: `--signal=TERM@120`; GCE/TPU: about 30 s). The training loop asks
`watcher.reached(prev_step, step)` after every dispatch; when it says yes, the loop
writes a checkpoint of `step`, waits for it to be on disk and returns, so rerunning
the same command resumes exactly there. The process then exits with
`watcher.exit_code`: 0 after a preemption (the scheduler's restart is the normal
path), 130 after Ctrl-C, as a shell expects of an interrupted command (128 + SIGINT).

* One process: a SIGTERM (or SIGUSR1, which some schedulers send first) or SIGINT
  handler sets a flag; the loop checks it. A second Ctrl-C raises KeyboardInterrupt
  at once, in whatever the process is doing (the newest checkpoint is not touched).
  A process started with SIGINT ignored (nohup, a script's background job) keeps
  ignoring it; launch/local_multiprocess.sh turns its Ctrl-C into SIGTERMs instead.
* Several processes (multi-host): a signal reaches one host, or the hosts at
  different moments, but a checkpoint is a collective operation, so every host must
  stop at the same step. `jax.distributed.initialize` starts JAX's preemption
  service, which catches SIGTERM itself and agrees on a step with the other hosts:
  `multihost_utils.reached_preemption_sync_point(step)` is True on all of them at
  that step. It must be asked about every step in order, so the loop passes every
  step of a multi-step dispatch. A Ctrl-C is turned into such a notice: the handler
  sends this process a SIGTERM, which the service sees and spreads, so every host
  checkpoints the same step (the hosts that saw the Ctrl-C exit 130, the others 0).
  Without the service nothing could agree on a step, so Ctrl-C keeps Python's
  behaviour there (KeyboardInterrupt at once).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
from absl import logging

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
INTERRUPT_EXIT_CODE = 128 + signal.SIGINT
INTERRUPT_REASON = "interrupted (Ctrl-C)"


class Interrupted(KeyboardInterrupt):
    """Raised (by the caller) once the checkpoint of a Ctrl-C is written; exit with `exit_code`."""

    exit_code = INTERRUPT_EXIT_CODE


def _preemption_service_running() -> bool:
    """True when JAX's preemption service (multi-host) owns SIGTERM in this process."""
    try:
        from jax._src import distributed
    except ImportError:
        return False
    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class PreemptionWatcher:
    """Tells the training loop when to checkpoint and stop (see the module docstring)."""

    def __init__(self, signals: tuple = SIGNALS, *, handle_interrupt: bool = True):
        self._event = threading.Event()
        self._signal: int | None = None
        self._interrupts = 0  # Ctrl-Cs seen: the first asks for a checkpoint, the second stops at once
        self._announced = False
        self._previous: dict[int, Any] = {}
        self._multihost = jax.process_count() > 1
        self._service_missing = False
        if threading.current_thread() is not threading.main_thread():
            logging.warning("training runs outside the main thread: SIGTERM and Ctrl-C will not "
                            "trigger a checkpoint.")
            return
        # An ignored SIGINT (nohup, a script's background job) stays ignored, as Python itself does.
        handle_interrupt = handle_interrupt and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
        if self._multihost:  # JAX's preemption service owns SIGTERM (a handler here would replace its own)
            if handle_interrupt and _preemption_service_running():
                self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle_interrupt)
            return
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        if handle_interrupt:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle_interrupt)

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - signal handler signature
        if self._signal is None:
            self._signal = signum
        self._event.set()

    def _handle_interrupt(self, signum: int, frame: Any) -> None:
        self._interrupts += 1
        if self._interrupts > 1:
            raise KeyboardInterrupt
        if self._multihost:  # a preemption notice to JAX's service, which agrees on a step with the others
            os.kill(os.getpid(), signal.SIGTERM)
        self._handle(signum, frame)

    @property
    def interrupted(self) -> bool:
        """True once a Ctrl-C (SIGINT) asked this process to stop."""
        return self._interrupts > 0

    @property
    def exit_code(self) -> int:
        """What the process should exit with: 130 after Ctrl-C, else 0 (also after a preemption)."""
        return INTERRUPT_EXIT_CODE if self.interrupted else 0

    @property
    def reason(self) -> str:
        """What stopped the run, for the log line: e.g. 'SIGTERM' or 'interrupted (Ctrl-C)'."""
        if self.interrupted:
            return INTERRUPT_REASON
        if self._signal is not None:
            return signal.Signals(self._signal).name
        return "preemption notice"

    def reached(self, prev_step: int, step: int) -> bool:
        """True if the loop should checkpoint `step` and stop (the same answer on every host)."""
        hit = self._event.is_set() if not self._multihost else self._reached_sync_point(prev_step, step)
        if hit and not self._announced:
            self._announced = True
            if self.interrupted:
                logging.warning("%s: writing a checkpoint of step %d; press Ctrl-C again to stop at once",
                                INTERRUPT_REASON, step)
            else:
                logging.warning("%s: writing a checkpoint of step %d, then stopping", self.reason, step)
        return hit

    def _reached_sync_point(self, prev_step: int, step: int) -> bool:
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
