"""Test-wide setup: eight fake CPU devices, float32 matmuls, no network."""

import hashlib
import os
import signal

# Must happen before jax is imported anywhere: every test process sees 8 CPU devices,
# so data-parallel code paths run as they would on an 8-GPU host.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tests compare `python -m ddpm_jax.main` subprocesses with in-process runs bit for bit, so the
# subprocesses compile the same programs: without the package's XLA:CPU flags (tests/test_cpu_flags.py
# turns them on where it checks them).
os.environ.setdefault("DDPM_JAX_CPU_FLAGS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The Ctrl-C tests need SIGINT as a terminal delivers it. Started from a background job
# (`make test &`, nohup), Python inherits SIGINT ignored and keeps it so, its children too,
# and bash cannot trap a signal ignored at its start: restore Python's default handler.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _tree_checksums(root) -> dict:
    """{relative path: (mode, sha256)} of every file under `root`: "nothing was written, no mode changed"
    is an equality."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = (os.stat(path).st_mode, hashlib.sha256(f.read()).hexdigest())
    return out


@pytest.fixture
def checksums():
    """`checksums(root)`: the mode and sha256 of every file under root, by relative path."""
    return _tree_checksums
