"""What a run writes beside its checkpoints: metrics.jsonl, TensorBoard events, config.json.

All of it is written by process 0 only, and so that an interrupted run (SIGKILL,
preemption) leaves nothing half-written or doubled:

* `config.json` (and any other JSON record) is written to a temporary file and
  renamed over the old one (`write_json_atomic`).
* On resume from step s, `MetricWriter` drops the lines of metrics.jsonl past s (the
  steps the interrupted run did after its last checkpoint, which the resumed run
  redoes) and a torn last line, and tells TensorBoard to purge its events past s, so
  the log reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import jax
import numpy as np
from absl import logging


def write_text_atomic(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary file in the same folder and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_config(config: Any, workdir: str, name: str = "config.json") -> None:
    """The resolved config as JSON in the workdir (process 0; atomic)."""
    if jax.process_index() == 0:
        text = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
        write_text_atomic(os.path.join(workdir, name), text)


def _json_number(v: Any) -> Any:
    v = float(v)
    return v if np.isfinite(v) else str(v)


def truncate_jsonl(path: str, last_step: int) -> int:
    """Keeps the lines of `path` with "step" <= last_step; drops the rest (and torn lines), returns how many."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                keep = line.endswith("\n") and int(json.loads(line).get("step", 0)) <= last_step
            except (ValueError, AttributeError, TypeError):
                keep = False
            if keep:
                kept.append(line)
            elif line.strip():
                dropped += 1
    if dropped:
        write_text_atomic(path, "".join(kept))
    return dropped


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch when torch is not loaded yet.

    tensorboardX imports torch if it is installed (to accept torch tensors, which we never
    pass): seconds at every start of a run. Blocking the import for that moment only
    keeps torch importable later.
    """
    import sys

    block = "torch" not in sys.modules
    if block:
        sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter
    finally:
        if block:
            del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """metrics.jsonl (one JSON object per line with "step") + TensorBoard, on process 0 only."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        dropped = truncate_jsonl(self.path, resume_step)
        if dropped:
            logging.info("dropped %d lines past step %d from %s (redone after the resume).",
                         dropped, resume_step, self.path)
        SummaryWriter = _summary_writer_class()
        # Events at steps > resume_step (from before an interruption) are purged by TensorBoard.
        self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=int(resume_step) + 1)

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **{k: _json_number(v) for k, v in values.items()}}) + "\n")
        for key, value in values.items():
            self._tb.add_scalar(f"train/{key}", float(value), int(step))

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        if self.enabled:
            self._tb.add_image(tag, image, int(step), dataformats="HWC")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
