#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels a GPU session carries: the packages that
# the device image (Python 3.12, jax 0.11.2 CUDA, flax, optax, orbax, torch 2.11) lacks.
#   bash bench/fetch_wheels.sh        then, in the device call: carry [".whl"] and
#   bash bench/gpu_session.sh gpu1    (it installs .whl/*.whl into /tmp/site first)
# Pinned to the versions of requirements.txt / requirements-test.txt (tested together here).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# grain and its needs the image lacks (array-record, portpicker); ml-collections (configs);
# diffusers (the peer; its other needs, huggingface-hub, safetensors, regex, ... are there).
WHEELS=(grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml-collections==1.1.0 diffusers==0.42.1)
mkdir -p .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
ls -l .whl
du -ch .whl/*.whl | tail -1
