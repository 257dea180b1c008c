#!/usr/bin/env bash
# One device call of the benchmark: installs the carried wheels, then runs a plan.
#   device run: command "bash bench/gpu_session.sh gpu1", carry [".whl"], timeout_s 600
#   (then gpu2 in a second call). Results land in $OUT: results.jsonl, summary.md, log.txt.
# BUDGET_S (default 540) bounds the measurements; each one is its own process.
set -uo pipefail
cd "$(dirname "$0")/.."
PLAN=${1:-gpu1}
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
START=$(date +%s)
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L || true
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" || exit 1
USED=$(( $(date +%s) - START ))
exec python3 -m bench.run_all --plan="$PLAN" --out="$OUT" --budget_s=$(( ${BUDGET_S:-560} - USED ))
