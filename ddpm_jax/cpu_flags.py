"""XLA:CPU flags the package sets for the modes they speed up (measured: docs/benchmarks.md,
"CPU flags the package sets").

XLA reads the XLA_FLAGS environment variable once, when JAX creates its CPU backend, so
`apply` runs in the entry point after the command line is parsed and before anything touches
a device. The package's flags are appended to the user's XLA_FLAGS; a flag the user set keeps
the user's value. `DDPM_JAX_CPU_FLAGS=0` turns the package's flags off. Every flag here is an
`xla_cpu_` flag: the GPU and TPU backends ignore it. XLA refuses flag values it does not know,
so the flags are set only on the jaxlib they were measured on or a newer one.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping

from ddpm_jax.config_loading import MODES

SWITCH = "DDPM_JAX_CPU_FLAGS"
_OFF = ("0", "false", "no", "off")
MIN_JAXLIB = (0, 10, 2)  # the pinned jaxlib, where the flags below were measured

# The pinned jaxlib hands every convolution to YNNPACK by default; XLA's own (Eigen)
# convolutions run the U-Net's 3x3 convolutions about 1.7x faster on an AVX-512 CPU. Measured
# on the MNIST U-Net: the batch-32 train step 1.45x faster and the batch-250 forward pass of a
# sampler step 1.8x; losses and outputs equal to float tolerance. With the convolutions off
# YNNPACK, its reductions (GroupNorm's statistics) still pay in the backward pass and cost
# about 10% in the forward pass, so the modes that only sample drop them as well.
_YNN = "xla_cpu_experimental_ynn_fusion_type"
# The flags of each kind of work (`config_loading.MODES[mode].work`).
WORK_FLAGS: dict[str, dict[str, str]] = {"train": {_YNN: "-individual_convolution"},
                                         "sample": {_YNN: "-individual_convolution,-reduce"}}


def mode_flags(mode: str) -> dict[str, str]:
    """The flags the package sets for `--mode=mode` ({} for none)."""
    return WORK_FLAGS.get(MODES[mode].work, {}) if mode in MODES else {}


def _flag_name(token: str) -> str:
    return token.lstrip("-").split("=", 1)[0]


def merge(user_flags: str, package_flags: dict[str, str]) -> str:
    """`user_flags` (an XLA_FLAGS string) with each of `package_flags` appended unless the user set it."""
    tokens = user_flags.split()
    user_names = {_flag_name(t) for t in tokens}
    tokens += [f"--{name}={value}" for name, value in package_flags.items() if name not in user_names]
    return " ".join(tokens)


def jaxlib_supported(version: str | None = None) -> bool:
    """Whether the installed jaxlib (or `version`) is at least MIN_JAXLIB, which knows the flags' values."""
    if version is None:
        from jaxlib import version as jaxlib_version  # the version module only: no backend starts

        version = jaxlib_version.__version__
    release = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return release is not None and tuple(map(int, release.groups())) >= MIN_JAXLIB


def apply(mode: str, environ: MutableMapping[str, str] = os.environ) -> str:
    """Adds `mode`'s flags to `environ["XLA_FLAGS"]` (unless `DDPM_JAX_CPU_FLAGS=0` or the jaxlib is
    older than MIN_JAXLIB); returns XLA_FLAGS.

    Call it before JAX creates its backend: XLA reads the variable then and never again.
    """
    user_flags = environ.get("XLA_FLAGS", "")
    if environ.get(SWITCH, "1").strip().lower() in _OFF or not mode_flags(mode) or not jaxlib_supported():
        return user_flags
    environ["XLA_FLAGS"] = merge(user_flags, mode_flags(mode))
    return environ["XLA_FLAGS"]
