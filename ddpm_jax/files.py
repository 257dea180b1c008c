"""Files a run writes: every write is atomic, and every long loop shows one progress bar.

A file is written to a temporary name in its own folder and renamed over the target
(`os.replace` is atomic on POSIX), so a run killed at any moment leaves either the old
file or the new one, never half of one. The file gets the mode `open` would give it (0666 less
the umask): `mkstemp` makes its temporary file 0600, which the rename would keep, so colleagues
on a shared machine could read the checkpoints but not the samples or results. Every module
that writes JSON, NumPy archives, text or pictures goes through here; so does every progress
bar (shown by process 0 only, so a multi-host run prints one). A result written again is kept
under another name first (`keep_previous`), never silently replaced.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from typing import Any, Callable, Iterator

import numpy as np


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (no window for other threads)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes(path: str, write: Callable[[Any], None], *, binary: bool = True) -> str:
    """Atomically writes `path` with `write(file_object)`; creates the folder; returns the path."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return path


def keep_previous(path: str) -> str | None:
    """Before a result is written again: moves an existing `path` aside to `<name>.<its UTC time>.<ext>`
    and says so in one line, so that a rerun with other settings never silently replaces a result
    (e.g. bits/dim on 32 test images over the full split's). Returns where it went (None if new)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return None
    stem, ext = os.path.splitext(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(os.stat(path).st_mtime))
    kept, n = f"{stem}.{stamp}{ext}", 1
    while os.path.exists(kept):
        kept, n = f"{stem}.{stamp}-{n}{ext}", n + 1
    os.replace(path, kept)
    print(f"{path} existed; kept it as {kept}", flush=True)
    return kept


def write_text(path: str, text: str) -> str:
    """Atomically writes `text` to `path`."""
    return write_bytes(path, lambda f: f.write(text), binary=False)


def write_json(path: str, obj: Any, *, indent: int = 1, sort_keys: bool = False) -> str:
    """Atomically writes `obj` as JSON (one trailing newline)."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def write_npz(path: str, *, compressed: bool = False, **arrays: np.ndarray) -> str:
    """Atomically writes a NumPy archive exactly at `path` (numpy appends no suffix to a file object)."""
    save = np.savez_compressed if compressed else np.savez
    return write_bytes(path, lambda f: save(f, **arrays))


def write_image_file(path: str, save: Callable[[io.BytesIO], None]) -> str:
    """Atomically writes what `save(buffer)` puts in an in-memory buffer (PIL's `save`)."""
    buffer = io.BytesIO()
    save(buffer)
    return write_bytes(path, lambda f: f.write(buffer.getvalue()))


class _NoBar:
    """What non-primary processes get instead of a tqdm bar."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def progress_bar(total: int, desc: str, unit: str = "img", initial: int = 0, enabled: bool = True
                 ) -> Iterator[Any]:
    """A tqdm bar on process 0 (a no-op elsewhere, or when `enabled` is False), closed on exit."""
    import jax

    if not enabled or jax.process_index() != 0:
        yield _NoBar()
        return
    from tqdm.auto import tqdm

    # smoothing=0: the rate is the average since the bar started, pauses included. tqdm's default
    # (an average weighted to the last update) takes one update after a checkpoint or log pause as
    # the new speed: 10 s over one 0.1 s step read as 3 s a step, an ETA of hours for a run of minutes.
    bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, smoothing=0)
    try:
        yield bar
    finally:
        bar.close()
