"""What a run writes beside its checkpoints: metrics.jsonl, TensorBoard events, config.json.

All of it is written by process 0 only, and so that an interrupted run (SIGKILL,
preemption) leaves nothing half-written or doubled:

* `config.json` (and any other JSON record) is written to a temporary file and
  renamed over the old one (`files.py`).
* On resume from step s, `MetricWriter` drops the lines of metrics.jsonl past s (the
  steps the interrupted run did after its last checkpoint, which the resumed run
  redoes) and a torn last line, and tells TensorBoard to purge its events past s, so
  the log reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from ddpm_jax import files


CONFIG_HISTORY = "config_history.jsonl"


def write_config(config: Any, workdir: str, name: str = "config.json") -> None:
    """The resolved config as JSON in the workdir (process 0; atomic).

    The training config (`config.json`) keeps its history: a resume with changed fields (another
    learning rate, batch size, ...) appends them, old and new, to `config_history.jsonl` and says
    so in one line, so the steps trained before the change stay told apart.
    """
    if jax.process_index() != 0:
        return
    text = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
    path = os.path.join(workdir, name)
    if name == "config.json" and os.path.isfile(path):
        changed = _changed_fields(files.read_json(path), json.loads(text))
        if changed:
            record = dict(time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), changed=changed)
            with open(os.path.join(workdir, CONFIG_HISTORY), "a") as f:
                f.write(json.dumps(record) + "\n")
            listed = ", ".join(f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in list(changed.items())[:4])
            more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
            print(f"config changed since this workdir's last run: {listed}{more}; recorded in "
                  f"{os.path.join(workdir, CONFIG_HISTORY)}", flush=True)
    files.write_text(path, text)


def _changed_fields(old: Any, new: Any, prefix: str = "") -> dict[str, list]:
    """{dotted key: [old, new]} of every leaf that differs between two JSON configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: dict[str, list] = {}
        for key in sorted(set(old) | set(new)):
            out.update(_changed_fields(old.get(key), new.get(key), f"{prefix}{key}."))
        return out
    return {} if old == new else {prefix.rstrip("."): [old, new]}


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
        files.write_text(path, "".join(kept))
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


def tensorboard_hint(logdir: str) -> str:
    """How to view the events in `logdir`: tensorboardX writes them; the viewer (the tensorboard
    package) is not a requirement of a run, so the hint installs it where it is missing."""
    import importlib.util

    view = f"tensorboard --logdir {logdir}"
    if importlib.util.find_spec("tensorboard") is None:
        return f"TensorBoard events (tensorboardX); view: pip install tensorboard && {view}"
    return f"TensorBoard: {view}"


def write_scalars(workdir: str, step: int, scalars: dict) -> None:
    """Evaluation scalars {tag: value} into the workdir's TensorBoard events (process 0)."""
    if jax.process_index() != 0 or not scalars:
        return
    with _summary_writer_class()(os.path.join(workdir, "tb")) as tb:
        for tag, value in scalars.items():
            tb.add_scalar(tag, float(value), int(step))


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


class NonFiniteError(FloatingPointError):
    """The loss or the gradient norm became NaN/Inf (nonfinite='error')."""


class MetricBuffer:
    """The per-step metrics of the dispatches since the last log line.

    Each dispatch adds (first step, {name: [n] array}) without waiting for the device;
    `summary` fetches them, checks finiteness (the "finite" metric) and makes one log line:
    the mean of the `averaged` metrics over the finite steps, the last value of the others.
    The part not yet logged when a checkpoint is written travels with it (`to_json` /
    `from_json`), so a resumed run's metrics.jsonl reads as one uninterrupted run.
    Step k is the k-th update (1-based), as "step" in metrics.jsonl.
    """

    def __init__(self, batch_size: int, nonfinite: str, skipped: int = 0, *, averaged: tuple[str, ...] = ("loss",),
                 fix: str):
        self.batch_size, self.nonfinite = int(batch_size), str(nonfinite)
        self.averaged, self.fix = tuple(averaged), fix  # fix: the way out named by NonFiniteError
        self.skipped = int(skipped)  # updates skipped as non-finite and logged, over the whole run
        self._pending: list[tuple[int, dict]] = []

    def add(self, first_step: int, step_metrics: dict) -> None:
        self._pending.append((int(first_step), step_metrics))

    def __len__(self) -> int:
        return len(self._pending)

    def fetch(self) -> None:
        """Waits for the pending steps and brings their metrics to the host."""
        self._pending = [(s0, jax.device_get(m)) for s0, m in self._pending]

    def check_finite(self) -> list[int]:
        """The non-finite steps pending; raises NonFiniteError under policy "error"."""
        self.fetch()
        bad = [s0 + i + 1 for s0, m in self._pending for i, ok in enumerate(m["finite"]) if not ok]
        if bad and self.nonfinite == "error":
            raise NonFiniteError(f"non-finite loss or gradient at step {bad[0]}; {self.fix}.")
        return bad

    def summary(self, seconds: float) -> dict | None:
        """The averaged metrics, the others' last values and throughput over `seconds`; empties the buffer."""
        if not self._pending:
            return None
        self.skipped += len(self.check_finite())
        host, self._pending = self._pending, []
        values = {}
        for name in self.averaged:
            v = np.concatenate([m[name] for _, m in host])
            ok = np.isfinite(v)
            values[name] = float(np.mean(v[ok])) if ok.any() else float("nan")
        last = host[-1][1]
        values.update({k: float(last[k][-1]) for k in sorted(last) if k != "finite" and k not in self.averaged})
        steps, seconds = sum(len(m["finite"]) for _, m in host), max(seconds, 1e-9)
        values.update(images_per_sec=steps * self.batch_size / seconds, steps_per_sec=steps / seconds)
        if self.nonfinite == "skip":
            values["skipped_steps"] = self.skipped
        return values

    def to_json(self) -> dict:
        """The unlogged steps and the skip count, as a checkpoint's loop counters."""
        self.fetch()
        return {"skipped_steps": self.skipped,
                "unlogged_metrics": [dict(first_step=s0, metrics={k: np.asarray(v).tolist() for k, v in m.items()})
                                     for s0, m in self._pending]}

    @classmethod
    def from_json(cls, saved: dict, batch_size: int, nonfinite: str, **options: Any) -> "MetricBuffer":
        """The buffer a checkpoint's loop counters describe (`{}`: a fresh one); options as `__init__`'s."""
        buffer = cls(batch_size, nonfinite, skipped=int(saved.get("skipped_steps", 0)), **options)
        for m in saved.get("unlogged_metrics", []):
            buffer.add(int(m["first_step"]), {k: np.asarray(v, bool if k == "finite" else np.float32)
                                              for k, v in m["metrics"].items()})
        return buffer
