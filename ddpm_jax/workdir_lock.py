"""One writing run per workdir: an exclusive lock file, ``WORKDIR/.lock``.

The file holds the owner's record (JSON: host, boot id, pid and the pid's start
time, mode, command, start time). It is created complete and atomically: the record
is written to a private temporary file, which is then hard-linked to ``.lock``
(``link`` fails if ``.lock`` exists, also over NFS, where ``O_EXCL`` was not always
atomic); filesystems without hard links fall back to ``O_CREAT | O_EXCL``.

Why a lock file rather than ``fcntl.flock`` alone: a flock dies with its process, even
with SIGKILL, but it is local-only or absent on several shared filesystems (Lustre
without ``-o flock``, gcsfuse), where it would let two hosts' runs share a workdir.
The file works everywhere; its cost is the lock a killed run leaves behind. That one
is *stale* and taken over (with a warning naming it) when this host can tell that
its owner is gone: same host and the pid is dead or now another process (its start
time differs), or the host was rebooted since (another boot id), or it is an earlier
attempt of the same scheduler job (SLURM requeue: same job id, lower restart count).
A lock of another host is never taken over: this host cannot check it.

Multi-host on a shared filesystem: only the primary process (process 0) touches the
file; every process then agrees on its outcome through ``agree`` (e.g. a broadcast of
process 0's flag), so all of them go on or all stop.
"""

from __future__ import annotations

import atexit
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Callable, Optional

from absl import logging

LOCK_NAME = ".lock"
RUN_NOUNS = {"train": "a training run", "sample": "a sampling run", "eval": "an evaluation run",
             "fid_stats": "a fid_stats run", "bpd": "a bits/dim run"}

_HELD: dict[str, dict] = {}  # realpath of a lock file this process holds -> {depth, record}
_HELD_GUARD = threading.Lock()


class WorkdirBusyError(ValueError):
    """The workdir is held by another run (the message names it, in one line)."""


def _read_first_line(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.readline().strip() or None
    except OSError:
        return None


def _pid_start(pid: int) -> Optional[str]:
    """The start time of `pid` in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name, which may hold spaces


def _job() -> Optional[dict]:
    """The scheduler's job id and restart count (SLURM), or None outside a job."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    return {"id": job_id, "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)}


def owner_record(mode: str, command: Optional[str] = None) -> dict:
    """The record this process writes into the lock file."""
    now = time.time()
    return {
        "host": socket.gethostname(),
        "boot_id": _read_first_line("/proc/sys/kernel/random/boot_id"),
        "pid": os.getpid(),
        "pid_start": _pid_start(os.getpid()),
        "mode": mode,
        "command": command if command is not None else " ".join(sys.argv),
        "started": datetime.datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds"),
        "job": _job(),
        "token": uuid.uuid4().hex,  # tells our own file from one that replaced it
    }


def describe(record: dict) -> str:
    """E.g. 'a training run (host h1, pid 42, started 2026-12-01 21:30:02)'."""
    started = str(record.get("started", "?")).replace("T", " ")[:19]
    noun = RUN_NOUNS.get(str(record.get("mode")), f"a {record.get('mode', '?')} run")
    return f"{noun} (host {record.get('host', '?')}, pid {record.get('pid', '?')}, started {started})"


def owner_is_gone(record: dict) -> Optional[str]:
    """Why the owner of `record` has certainly stopped (a short reason), or None if it may run.

    Only a lock of this host can be judged (or an earlier attempt of this very job).
    """
    job, mine = record.get("job"), _job()
    if job and mine and job.get("id") == mine["id"] and int(job.get("restart", 0)) < mine["restart"]:
        return f"an earlier attempt of job {mine['id']}"
    if record.get("host") != socket.gethostname():
        return None
    boot = _read_first_line("/proc/sys/kernel/random/boot_id")
    if record.get("boot_id") and boot and record["boot_id"] != boot:
        return "the host has restarted since"
    pid = int(record.get("pid", -1))
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"pid {pid} is not running"
    except PermissionError:  # alive, another user's
        pass
    start = _pid_start(pid)
    if record.get("pid_start") and start and start != record["pid_start"]:
        return f"pid {pid} is now another process"
    return None


def _create(path: str, record: dict) -> bool:
    """Creates `path` holding `record`, complete, if it does not exist; False if it does."""
    text = json.dumps(record, indent=1) + "\n"
    tmp = f"{path}.{record['token']}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as err:  # no hard links here (some FUSE filesystems): exclusive create
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EXDEV):
            raise
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return True
    finally:
        os.remove(tmp)


def _read(path: str) -> tuple[Optional[dict], Optional[os.stat_result]]:
    """The record in `path` and the file's stat, (None, None) if there is no file."""
    try:
        with open(path) as f:
            st = os.fstat(f.fileno())
            text = f.read()
    except FileNotFoundError:
        return None, None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        record = {}
    return (record if isinstance(record, dict) else {}), st


def _remove_if_same(path: str, st: os.stat_result) -> bool:
    """Removes `path` if it is still the file `st` describes; False if it was replaced meanwhile.

    Under an flock of that file, so that two runs taking over one stale lock cannot
    remove the lock the first of them has just created.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no flock on this filesystem: the inode check below still narrows the race
            pass
        now = os.fstat(fd)
        if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
            return False
        try:
            if os.stat(path).st_ino != st.st_ino:
                return False
            os.remove(path)
        except FileNotFoundError:
            pass
        return True
    finally:
        os.close(fd)


class WorkdirLock:
    """``with WorkdirLock(workdir, "train"):`` holds ``workdir/.lock`` for the block.

    Or explicitly: ``lock.acquire(is_primary, agree)`` ... ``lock.release()``. Re-entrant
    within one process; released by ``release``, by leaving the ``with`` block (also on an
    exception or KeyboardInterrupt) and at interpreter exit.
    """

    def __init__(self, workdir: str, mode: str = "train", *, command: Optional[str] = None,
                 is_primary: bool = True, agree: Optional[Callable[[bool], bool]] = None):
        self.workdir = str(workdir)
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self.mode = mode
        self.command = command
        self.is_primary, self.agree = is_primary, agree  # what `with` passes to acquire
        self._key: Optional[str] = None

    def acquire(self, is_primary: Optional[bool] = None,
                agree: Optional[Callable[[bool], bool]] = None) -> None:
        """Takes the lock (primary only), then lets every process agree on the outcome.

        `agree(ok)` returns the primary's `ok` on every process (multi-host: e.g.
        ``lambda ok: bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))``); it is
        called exactly once on every process, also when the primary failed, so no
        process waits forever. Raises WorkdirBusyError (or the primary's OSError).
        """
        is_primary = self.is_primary if is_primary is None else is_primary
        agree = self.agree if agree is None else agree
        error: Optional[BaseException] = None
        if is_primary:
            try:
                self._take()
            except (WorkdirBusyError, OSError) as err:
                error = err
        ok = error is None
        if agree is not None:
            ok = bool(agree(ok))
        if error is not None:
            raise error
        if not ok:
            self.release()
            raise WorkdirBusyError(self._refused_by_primary())

    def _take(self) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        key = os.path.realpath(self.path)
        with _HELD_GUARD:
            if key in _HELD:  # nested: the outermost holder keeps the file
                _HELD[key]["depth"] += 1
                self._key = key
                return
        record = owner_record(self.mode, self.command)
        while not _create(self.path, record):
            current, st = _read(self.path)
            if current is None:
                continue  # released between our attempt and the read: try again
            gone = self._gone(current)
            if gone is None:
                raise WorkdirBusyError(self._busy_message(current))
            if _remove_if_same(self.path, st):
                logging.warning("%s: taking over the lock of %s: %s.", self.workdir, describe(current), gone)
        with _HELD_GUARD:
            _HELD[key] = {"depth": 1, "record": record}
        self._key = key
        atexit.register(self.release)

    def _gone(self, record: dict) -> Optional[str]:
        if not record:
            return None  # unreadable: refuse, and say so (see _busy_message)
        if record.get("host") == socket.gethostname() and record.get("pid") == os.getpid() \
                and record.get("pid_start") == _pid_start(os.getpid()):
            return "left by this process"  # an earlier lock object that was never released
        return owner_is_gone(record)

    def _busy_message(self, record: dict) -> str:
        if not record:
            return (f"{self.workdir} is locked by {self.path}, which holds no owner record; if no run "
                    f"uses this workdir, delete {self.path} and rerun, or use another --workdir")
        line = f"{self.workdir} is in use by {describe(record)}"
        if record.get("host") != socket.gethostname():
            return (f"{line}, on another host, which this one cannot check; wait for it to finish, or "
                    f"use another --workdir (if that run is over, delete {self.path})")
        return f"{line}; wait for it to finish, or use another --workdir"

    def _refused_by_primary(self) -> str:
        current, _ = _read(self.path)
        if current:
            return self._busy_message(current)
        return f"{self.workdir} is in use: process 0 could not lock it (its log names the reason)"

    def release(self) -> None:
        """Releases the lock if this object holds it (the outermost holder removes the file)."""
        if self._key is None:
            return
        key, self._key = self._key, None
        atexit.unregister(self.release)
        with _HELD_GUARD:
            held = _HELD.get(key)
            if held is None:
                return
            held["depth"] -= 1
            if held["depth"] > 0:
                return
            del _HELD[key]
        record = held["record"]
        if record["pid"] != os.getpid():  # a forked child never removes its parent's lock
            return
        current, st = _read(self.path)
        if current and current.get("token") == record["token"]:
            _remove_if_same(self.path, st)

    @property
    def held(self) -> bool:
        """True while this object holds the lock file (only ever on the primary process)."""
        return self._key is not None

    def __enter__(self) -> "WorkdirLock":
        self.acquire(self.is_primary, self.agree)
        return self

    def __exit__(self, *exc) -> None:
        self.release()
