"""XLA:CPU flags the package sets for the modes they speed up (measured: docs/benchmarks.md,
"CPU flags the package sets").

XLA reads the XLA_FLAGS environment variable once, when JAX creates its CPU backend, so
`apply` runs in the entry point after the command line is parsed and before anything touches
a device. The package's flags are appended to the user's XLA_FLAGS; a flag the user set keeps
the user's value. `DDPM_JAX_CPU_FLAGS=0` turns the package's flags off. Every flag here is an
`xla_cpu_` flag: the GPU and TPU backends ignore it.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SWITCH = "DDPM_JAX_CPU_FLAGS"
_OFF = ("0", "false", "no", "off")

# YNNPACK runs XLA:CPU's convolutions and dots by default in the pinned jaxlib; this also
# hands it the elementwise ops and reductions around them (GroupNorm, SiLU, the residual
# adds). Measured on the MNIST U-Net: the batch-250 forward pass that each sampler step is
# 1.70x faster on a quiet machine and 1.14x on a busy one; the batch-32 train step 1.08x and
# 0.80x; outputs equal to 1.2e-6 relative. Hence the modes that only sample get it and
# training does not.
_SAMPLING_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "+eltwise,+reduce"}
MODE_FLAGS: dict[str, dict[str, str]] = {"sample": _SAMPLING_FLAGS, "eval": _SAMPLING_FLAGS,
                                         "cascade": _SAMPLING_FLAGS}


def _flag_name(token: str) -> str:
    return token.lstrip("-").split("=", 1)[0]


def merge(user_flags: str, package_flags: dict[str, str]) -> str:
    """`user_flags` (an XLA_FLAGS string) with each of `package_flags` appended unless the user set it."""
    tokens = user_flags.split()
    user_names = {_flag_name(t) for t in tokens}
    tokens += [f"--{name}={value}" for name, value in package_flags.items() if name not in user_names]
    return " ".join(tokens)


def apply(mode: str, environ: MutableMapping[str, str] = os.environ) -> str:
    """Adds `mode`'s flags to `environ["XLA_FLAGS"]` (unless `DDPM_JAX_CPU_FLAGS=0`); returns XLA_FLAGS.

    Call it before JAX creates its backend: XLA reads the variable then and never again.
    """
    user_flags = environ.get("XLA_FLAGS", "")
    if environ.get(SWITCH, "1").strip().lower() in _OFF or not MODE_FLAGS.get(mode):
        return user_flags
    environ["XLA_FLAGS"] = merge(user_flags, MODE_FLAGS[mode])
    return environ["XLA_FLAGS"]
