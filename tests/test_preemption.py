"""PreemptionWatcher with real signals sent to this process.

`os.kill(os.getpid(), sig)` from the main thread runs the Python handler before
`os.kill` returns (CPython checks for pending signals right after a kill of its own
process), so every answer below is decided without waiting.
"""

import os
import signal
import socket
import subprocess
import sys
import threading

import pytest
from absl import logging
from jax.experimental import multihost_utils

from ddpm_jax import preemption
from ddpm_jax.preemption import PreemptionWatcher


@pytest.fixture
def warnings(monkeypatch):
    seen = []
    monkeypatch.setattr(logging, "warning", lambda msg, *args: seen.append(msg % args))
    return seen


@pytest.fixture
def handlers():
    """Restores the SIGINT / SIGTERM / SIGUSR1 handlers after the test, whatever it did."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_first_ctrl_c_checkpoints_at_the_step_boundary_second_stops_at_once(handlers, warnings):
    with PreemptionWatcher() as watcher:
        assert not watcher.reached(0, 1) and watcher.exit_code == 0
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the loop decides
        assert watcher.interrupted and warnings == []
        assert watcher.reached(1, 3)
        assert watcher.reached(3, 4)  # stays set; announced once
        assert warnings == ["interrupted (Ctrl-C): writing a checkpoint of step 3; "
                            "press Ctrl-C again to stop at once"]
        assert watcher.reason == "interrupted (Ctrl-C)" and watcher.exit_code == 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_sigterm_and_sigusr1_are_preemption_notices_exit_0(handlers, warnings):
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        warnings.clear()
        with PreemptionWatcher() as watcher:
            assert not watcher.reached(0, 2)
            os.kill(os.getpid(), sig)
            assert watcher.reached(2, 4)
            assert watcher.reason == sig.name and watcher.exit_code == 0 and not watcher.interrupted
            assert warnings == [f"{sig.name}: writing a checkpoint of step 4, then stopping"]


def test_ctrl_c_after_a_preemption_notice_still_exits_130(handlers):
    with PreemptionWatcher() as watcher:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert watcher.reached(0, 1) and watcher.exit_code == 130


def test_close_restores_the_previous_handlers(handlers):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    watcher = PreemptionWatcher()
    assert signal.getsignal(signal.SIGINT) != before[signal.SIGINT]
    watcher.close()
    assert {sig: signal.getsignal(sig) for sig in before} == before
    with pytest.raises(KeyboardInterrupt):  # Python's own Ctrl-C is back
        os.kill(os.getpid(), signal.SIGINT)


def test_handle_interrupt_false_leaves_ctrl_c_alone(handlers):
    with PreemptionWatcher(handle_interrupt=False) as watcher:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert not watcher.reached(0, 1)


def test_an_ignored_ctrl_c_stays_ignored(handlers):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for a background job of a script, or nohup
    with PreemptionWatcher() as watcher:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)
        assert not watcher.interrupted and not watcher.reached(0, 1)


def test_outside_the_main_thread_no_handler_is_installed(handlers, warnings):
    before = signal.getsignal(signal.SIGINT)
    made = []
    thread = threading.Thread(target=lambda: made.append(PreemptionWatcher()))
    thread.start()
    thread.join()
    assert signal.getsignal(signal.SIGINT) is before
    assert "outside the main thread" in warnings[0]
    assert not made[0].reached(0, 1)


@pytest.fixture
def multihost(monkeypatch, handlers):
    """Two processes as this one sees them: JAX's service stood in for by a SIGTERM recorder
    (it catches SIGTERM in C++) and a sync point that every host reaches at step 5."""
    notices = []
    monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
    monkeypatch.setattr(preemption, "_preemption_service_running", lambda: True)
    signal.signal(signal.SIGTERM, lambda signum, frame: notices.append(signum))
    asked = []

    def sync_point(step):
        asked.append(step)
        return bool(notices) and step == 5

    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", sync_point)
    return notices, asked


def test_multihost_ctrl_c_becomes_a_preemption_notice(multihost, warnings):
    notices, asked = multihost
    with PreemptionWatcher() as watcher:
        assert signal.getsignal(signal.SIGTERM) is not watcher._handle  # the service keeps SIGTERM
        assert not watcher.reached(0, 2)
        os.kill(os.getpid(), signal.SIGINT)
        assert notices == [signal.SIGTERM]  # passed on to the service, which tells the other hosts
        assert not watcher.reached(2, 4)  # the hosts agreed on step 5
        assert watcher.reached(4, 6) and asked == [1, 2, 3, 4, 5, 6]
        assert watcher.exit_code == 130
        assert warnings == ["interrupted (Ctrl-C): writing a checkpoint of step 6; "
                            "press Ctrl-C again to stop at once"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert notices == [signal.SIGTERM]


def test_multihost_notice_from_another_host_exits_0(multihost):
    notices, _ = multihost
    with PreemptionWatcher() as watcher:
        notices.append(signal.SIGTERM)  # the service heard of a preemption elsewhere
        assert watcher.reached(0, 5) and watcher.exit_code == 0 and watcher.reason == "preemption notice"


def test_multihost_without_the_service_ctrl_c_stops_at_once(multihost, monkeypatch):
    monkeypatch.setattr(preemption, "_preemption_service_running", lambda: False)
    with PreemptionWatcher():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


WORKER = """
import os, signal, sys
import jax
port, rank = sys.argv[1], int(sys.argv[2])
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=rank)
from jax._src import distributed
from ddpm_jax.preemption import PreemptionWatcher
watcher = PreemptionWatcher()
client = distributed.global_state.client
for step in range(200_000):
    client.wait_at_barrier(f"step_{step}", 60_000)  # the hosts move in step, as training does
    if rank == 0 and step == 3:
        os.kill(os.getpid(), signal.SIGINT)
    if watcher.reached(step, step + 1):
        print("stopped", step + 1, watcher.exit_code, flush=True)
        break
"""


def test_two_processes_ctrl_c_on_one_stops_both_at_the_same_step():
    """The real thing: jax.distributed on 127.0.0.1, JAX's preemption service catching the SIGTERM."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": repo}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(rank)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    lines = [[ln.split() for ln in out.splitlines() if ln.startswith("stopped")] for out, _ in outs]
    assert all(p.returncode == 0 for p in procs) and all(lines), [err[-2000:] for _, err in outs]
    (_, step0, code0), (_, step1, code1) = lines[0][0], lines[1][0]
    assert step0 == step1 and (code0, code1) == ("130", "0")
    assert "press Ctrl-C again to stop at once" in outs[0][1]
