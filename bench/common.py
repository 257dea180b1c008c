"""Shared helpers of the benchmark scripts: records, config overrides, peaks, timing.

Every script prints one JSON object per measurement on its own line (stdout), so
`python -m bench.X ... | tee results.jsonl` collects them. Each record carries the
device, the library versions, the host's load average (a shared machine is slow
for reasons that are not ours), the config and overrides, the batch, the dtype and
the numbers. This module imports no JAX, Flax or ml_collections at import time: the
diffusers peer uses it with only torch + diffusers installed.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
from typing import Any, Callable, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA_VERSION = 1

# The paper's CIFAR-10 U-Net (35.7M params): 12.44 GFLOPs per image forward, so about
# 3x that for forward + backward (Ho et al. 2020 model; counted for the issue). A
# reference constant only: the XLA cost analysis of the compiled step is the measured one.
PAPER_FORWARD_FLOPS_PER_IMAGE = 12.44e9
PAPER_TRAIN_FLOPS_PER_IMAGE = 37.3e9
PAPER_MODEL = dict(ch=128, ch_mult=[1, 2, 2, 2], num_res_blocks=2, attn_resolutions=[16], image_size=32)

# Dense (no sparsity) peak FLOP/s per JAX/torch device, from the vendors' datasheets, by
# a substring of the device kind (first match wins). bf16 = bfloat16 tensor cores;
# tf32 = float32 inputs on tensor cores (what XLA and cuDNN use for float32 by default).
PEAK_FLOPS = (
    ("H100 PCIe", dict(bf16=756e12, tf32=378e12)),
    ("H100 NVL", dict(bf16=835e12, tf32=418e12)),
    ("H100", dict(bf16=989e12, tf32=494.5e12)),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", dict(bf16=989e12, tf32=494.5e12)),
    ("GH200", dict(bf16=989e12, tf32=494.5e12)),
    ("A100", dict(bf16=312e12, tf32=156e12)),
    ("TPU v3", dict(bf16=61.5e12)),  # per core: one JAX device per core, 123 TFLOP/s a chip
    ("TPU v4", dict(bf16=275e12)),
    ("TPU v5 lite", dict(bf16=197e12)),
    ("TPU v5", dict(bf16=459e12)),
    ("TPU v6 lite", dict(bf16=918e12)),
)


class BenchError(ValueError):
    """Bad benchmark arguments; the message names the problem and the fix."""


# ---- records ------------------------------------------------------------------------------------


def host_info() -> dict:
    """CPU count and load average (1, 5, 15 min): the development machine is shared."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return dict(cpus=os.cpu_count(), loadavg=load, machine=platform.machine())


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def jax_env(devices: Sequence[Any] | None = None) -> dict:
    """Device and versions of the JAX side."""
    import flax
    import jax
    import jaxlib
    import optax

    devices = list(devices) if devices is not None else jax.devices()
    return dict(
        device=dict(platform=devices[0].platform, kind=devices[0].device_kind, count=len(devices)),
        versions=dict(python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
                      flax=flax.__version__, optax=optax.__version__),
        host=host_info(), time=utc_now(),
    )


def emit(record: dict, stream=None) -> dict:
    """Prints `record` as one JSON line (flushed) and returns it."""
    record = {"schema": SCHEMA_VERSION, **record}
    print(json.dumps(record, default=_json_default), file=stream or sys.stdout, flush=True)
    return record


def _json_default(value: Any):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


def read_records(text: str) -> list[dict]:
    """The JSON objects of the lines of `text` that hold one (other lines are skipped)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


# ---- config -------------------------------------------------------------------------------------


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(other args, config overrides 'a.b=v') from a command line with `--config.a.b=v` flags."""
    rest, overrides = [], []
    for arg in argv:
        if arg.startswith("--config."):
            if "=" not in arg:
                raise BenchError(f"{arg}: give a value, e.g. --config.model.dtype=bfloat16.")
            overrides.append(arg[len("--config."):])
        else:
            rest.append(arg)
    return rest, overrides


def load_config(path: str, overrides: Sequence[str] = ()):
    """The ConfigDict of `configs/X.py` with 'a.b=value' overrides: `ddpm_jax.config_loading`, as a
    BenchError (imported here, so the diffusers peer runs without JAX installed)."""
    from ddpm_jax import config_loading

    try:
        return config_loading.load_config(path, overrides)
    except config_loading.ConfigError as err:
        raise BenchError(str(err)) from err


def is_paper_cifar10_model(config) -> bool:
    """True when the configured network is the paper's 35.7M-parameter CIFAR-10 U-Net."""
    m = config.model
    return (m.name == "unet" and int(m.ch) == PAPER_MODEL["ch"]
            and [int(c) for c in m.ch_mult] == PAPER_MODEL["ch_mult"]
            and int(m.num_res_blocks) == PAPER_MODEL["num_res_blocks"]
            and [int(r) for r in m.attn_resolutions] == PAPER_MODEL["attn_resolutions"]
            and int(config.data.image_size) == PAPER_MODEL["image_size"]
            and int(config.data.num_channels) == 3)


# ---- peaks and utilisation ----------------------------------------------------------------------


def peak_flops(device_kind: str, flag: float | None = None) -> tuple[float | None, str]:
    """(dense bf16 peak FLOP/s per device, where it came from): the flag, else the table."""
    if flag:
        return float(flag), "flag --peak_flops"
    for key, peaks in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return peaks["bf16"], f"table: {key} dense bf16"
    return None, f"unknown device kind {device_kind!r}: pass --peak_flops"


def tf32_peak(device_kind: str) -> float | None:
    for key, peaks in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return peaks.get("tf32")
    return None


def mfu(flops_per_image: float | None, images_per_sec: float, peak: float | None,
        num_devices: int) -> float | None:
    """Model-FLOPs utilisation: useful FLOP/s over the peak of all devices."""
    if not flops_per_image or not peak:
        return None
    return flops_per_image * images_per_sec / (peak * num_devices)


def xla_cost(cost: Any) -> dict:
    """An XLA cost analysis as one dict (JAX gives a dict, older JAX a list of one; {} if None)."""
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return dict(cost or {})


def xla_flops(cost: Any) -> float | None:
    """The 'flops' of an XLA cost analysis (a dict, or a list of one dict in older JAX)."""
    cost = xla_cost(cost)
    if "flops" not in cost:
        return None
    value = float(cost["flops"])
    return value if value > 0 else None


def device_memory(device) -> dict | None:
    """Peak / current / limit bytes of a JAX device's allocator (None where unsupported, e.g. CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None
    if not stats:
        return None
    keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keys if k in stats}


# ---- timing -------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how much the timing windows disagree."""
    m = median(values)
    return float((max(values) - min(values)) / m) if m else 0.0


def run_cli(measure: Callable[[list[str]], list[dict]], argv: list[str] | None) -> list[dict]:
    """`measure(argv)`; from the command line (argv None) a BenchError is one line and exit 2."""
    try:
        return measure(sys.argv[1:] if argv is None else argv)
    except BenchError as err:
        if argv is not None:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def sampling_methods(method: str, ddim_steps: int) -> list[str]:
    """`--method` (ddpm, ddim or a comma list) as a list; `--steps` only applies to DDIM."""
    methods = [m for m in method.split(",") if m]
    if not methods or set(methods) - {"ddpm", "ddim"}:
        raise BenchError(f"--method={method}: use ddpm, ddim or ddpm,ddim.")
    if ddim_steps and "ddim" not in methods:
        raise BenchError("--steps is for --method=ddim; ancestral DDPM runs all T steps.")
    return methods


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise BenchError(f"--{name}={value} must be >= 1.")


def check_whole_dispatches(steps_per_window: int, steps_per_dispatch: int) -> None:
    """A timing window of the trainer must hold whole dispatches (each runs `steps_per_dispatch` steps)."""
    if steps_per_window % steps_per_dispatch:
        raise BenchError(f"--steps_per_window={steps_per_window} is not a multiple of "
                         f"training.steps_per_dispatch={steps_per_dispatch}; use a multiple of {steps_per_dispatch}.")


def run_windows(step: Callable[[int], None], sync: Callable[[], None], *, windows: int,
                steps_per_window: int, clock: Callable[[], float]) -> list[float]:
    """Seconds of each of `windows` windows of `steps_per_window` calls of step(i), synced at the end."""
    times = []
    for _ in range(windows):
        sync()
        start = clock()
        for i in range(steps_per_window):
            step(i)
        sync()
        times.append(clock() - start)
    return times
