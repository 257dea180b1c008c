"""The workdir lock: a second run refuses naming the first, stale locks are taken over,
other hosts' locks never are, and every process of a multi-host run agrees with process 0.

The holders are real processes, synchronised through pipes (they hold the lock until
their stdin closes), so no outcome depends on timing.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from absl import logging

from ddpm_jax import workdir_lock
from ddpm_jax.workdir_lock import LOCK_NAME, WorkdirBusyError, WorkdirLock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLDER = """
import sys
from ddpm_jax.workdir_lock import WorkdirLock
with WorkdirLock(sys.argv[1], sys.argv[2]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def _holder(workdir, mode="train"):
    """A process that holds the lock of `workdir` until its stdin is closed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir), mode], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
    return proc


def _write_lock(workdir, **fields):
    record = {**workdir_lock.owner_record("train", "python -m ddpm_jax.main"), **fields}
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, LOCK_NAME), "w") as f:
        json.dump(record, f)
    return record


@pytest.fixture
def warnings(monkeypatch):
    seen = []
    monkeypatch.setattr(logging, "warning", lambda msg, *args: seen.append(msg % args))
    return seen


def test_second_run_refuses_with_one_line_naming_the_first(tmp_path):
    holder = _holder(tmp_path, "train")
    try:
        with pytest.raises(WorkdirBusyError) as err:
            WorkdirLock(str(tmp_path), "train").acquire()
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith(f"{tmp_path} is in use by a training run (host {socket.gethostname()}, "
                                  f"pid {holder.pid}, started ")
        assert message.endswith("wait for it to finish, or use another --workdir")
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0
    assert not (tmp_path / LOCK_NAME).exists()  # released on leaving the block
    with WorkdirLock(str(tmp_path), "train") as lock:
        assert lock.held and json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, warnings):
    holder = _holder(tmp_path / "w")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    assert (tmp_path / "w" / LOCK_NAME).exists()  # SIGKILL leaves it
    with WorkdirLock(str(tmp_path / "w"), "train"):
        assert json.loads((tmp_path / "w" / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert len(warnings) == 1
    assert f"taking over the lock of a training run (host {socket.gethostname()}, pid {holder.pid}" \
           in warnings[0] and f"pid {holder.pid} is not running" in warnings[0]


def test_reused_pid_and_rebooted_host_are_stale(tmp_path, warnings):
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:  # a live pid, but not the process that wrote the lock
        _write_lock(tmp_path / "a", pid=other.pid, pid_start="1")
        with WorkdirLock(str(tmp_path / "a")):
            pass
        _write_lock(tmp_path / "b", pid=other.pid, pid_start=workdir_lock._pid_start(other.pid))
        with pytest.raises(WorkdirBusyError, match=f"pid {other.pid}"):
            WorkdirLock(str(tmp_path / "b")).acquire()
        _write_lock(tmp_path / "c", pid=other.pid, boot_id="another-boot")
        with WorkdirLock(str(tmp_path / "c")):
            pass
    finally:
        other.stdin.close()
        other.wait(timeout=60)
    assert [("is now another process" in w, "restarted" in w) for w in warnings] == [(True, False), (False, True)]


def test_lock_of_another_host_is_never_taken_over(tmp_path, warnings):
    _write_lock(tmp_path, host="elsewhere", pid=1, pid_start=None, boot_id=None, mode="train")
    with pytest.raises(WorkdirBusyError) as err:
        WorkdirLock(str(tmp_path)).acquire()
    message = str(err.value)
    assert "in use by a training run (host elsewhere, pid 1" in message
    assert "another host, which this one cannot check" in message
    assert f"delete {tmp_path / LOCK_NAME}" in message and "\n" not in message
    assert warnings == [] and json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "elsewhere"


def test_earlier_attempt_of_the_same_job_is_stale(tmp_path, monkeypatch, warnings):
    _write_lock(tmp_path, host="node7", pid=1, job={"id": "991", "restart": 0})
    monkeypatch.setenv("SLURM_JOB_ID", "991")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(WorkdirBusyError, match="host node7"):  # the same attempt: it may be running
        WorkdirLock(str(tmp_path)).acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued: the attempt before was stopped
    with WorkdirLock(str(tmp_path)):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["job"] == {"id": "991", "restart": 1}
    assert "an earlier attempt of job 991" in warnings[0]


def test_unreadable_lock_refuses_and_says_how_to_clear_it(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")
    with pytest.raises(WorkdirBusyError, match="holds no owner record; if no run uses this workdir, delete"):
        WorkdirLock(str(tmp_path)).acquire()


def test_released_on_an_exception_and_reentrant_in_one_process(tmp_path):
    with pytest.raises(RuntimeError):
        with WorkdirLock(str(tmp_path)):
            raise RuntimeError("boom")
    assert not (tmp_path / LOCK_NAME).exists()
    outer = WorkdirLock(str(tmp_path))
    outer.acquire()
    with WorkdirLock(str(tmp_path), "sample"):  # e.g. the bits/dim evaluation at the end of training
        pass
    assert (tmp_path / LOCK_NAME).exists()  # the outer holder keeps it
    outer.release()
    outer.release()  # a second release is a no-op
    assert not (tmp_path / LOCK_NAME).exists()


def test_released_when_a_ctrl_c_stops_the_holder(tmp_path):
    holder = _holder(tmp_path)
    holder.send_signal(signal.SIGINT)  # KeyboardInterrupt in the block: the `with` releases on the way out
    assert holder.wait(timeout=60) != 0
    assert "KeyboardInterrupt" in holder.stderr.read()
    assert not (tmp_path / LOCK_NAME).exists()


def test_without_hard_links_an_exclusive_create_does_the_same(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with WorkdirLock(str(tmp_path), "train"):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # no temporary file left
        _write_lock(tmp_path / "other", host="elsewhere")
        with pytest.raises(WorkdirBusyError, match="host elsewhere"):
            WorkdirLock(str(tmp_path / "other")).acquire()
    assert not (tmp_path / LOCK_NAME).exists()


def test_released_at_interpreter_exit_without_release(tmp_path):
    code = "import sys; from ddpm_jax.workdir_lock import WorkdirLock; WorkdirLock(sys.argv[1]).acquire()"
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, check=True, timeout=60)
    assert not (tmp_path / LOCK_NAME).exists()


def test_other_processes_follow_process_0(tmp_path):
    calls = []

    def agree_with(primary_ok):
        def agree(ok):
            calls.append(ok)
            return primary_ok
        return agree

    holder = _holder(tmp_path)
    try:
        # Process 0 refused: a worker stops too, naming the run it read from the shared lock file.
        with pytest.raises(WorkdirBusyError, match=f"in use by a training run .*pid {holder.pid}"):
            WorkdirLock(str(tmp_path)).acquire(is_primary=False, agree=agree_with(False))
        # Process 0 refused: it still takes part in the agreement, saying no (no process waits forever).
        with pytest.raises(WorkdirBusyError):
            WorkdirLock(str(tmp_path)).acquire(is_primary=True, agree=agree_with(True))
        assert len(calls) == 2 and calls[1] is False
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    worker = WorkdirLock(str(tmp_path), is_primary=False, agree=agree_with(True))
    with worker:  # process 0 took it: a worker goes on and never touches the file
        assert not worker.held and not (tmp_path / LOCK_NAME).exists()
    with pytest.raises(WorkdirBusyError, match="process 0 could not lock it"):
        WorkdirLock(str(tmp_path)).acquire(is_primary=False, agree=agree_with(False))
    assert len(calls) == 4
