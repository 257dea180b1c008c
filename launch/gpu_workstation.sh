#!/usr/bin/env bash
# One process driving every local GPU (data parallel over all of them).
#
#   launch/gpu_workstation.sh --config=configs/cifar10.py --workdir=runs/cifar10 [--dry-run]
#   launch/gpu_workstation.sh --gpus=0,1 --config=... --workdir=...   # a subset of GPUs
#
# Runs the project's interpreter (--python=PATH, else $PYTHON, else .venv/bin/python,
# else python3). Restarting the same command resumes from the latest checkpoint in --workdir.
set -euo pipefail
source "$(dirname "$0")/common.sh"
usage() { sed -n '2,8p' "$0"; }
KNOWN_OPTS="gpus python"
parse_args "$@"
check_run

env_vars=(XLA_PYTHON_CLIENT_MEM_FRACTION=0.95)
# Let XLA overlap collectives with compute and use cuDNN's fused attention where the config asks.
env_vars+=(XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true")
[[ -n "${OPT_gpus:-}" ]] && env_vars+=(CUDA_VISIBLE_DEVICES="$OPT_gpus")
run env "${env_vars[@]}" "$PY" -m ddpm_jax.main "${MAIN_ARGS[@]}"
