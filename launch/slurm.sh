#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node driving all its GPUs,
# joined by jax.distributed.initialize() (which reads SLURM's environment).
#
#   launch/slurm.sh --nodes=4 --gpus-per-node=8 --partition=gpu --time=72:00:00 \
#       --config=configs/cifar10.py --workdir=/shared/runs/cifar10 [--requeue] [--dry-run]
#
# Checks the flags, the workdir and the config first, then writes <workdir>/slurm_job.sh
# and submits it with sbatch (--dry-run prints it instead; without sbatch on PATH
# nothing is written). The workdir must be on a filesystem every node sees. With
# --requeue, a preempted job restarts and resumes from its latest checkpoint.
# srun runs the project's interpreter (--python=PATH, else $PYTHON, else the
# repository's .venv/bin/python, else python3), which every node must see too.
set -euo pipefail
source "$(dirname "$0")/common.sh"
usage() { sed -n '2,13p' "$0"; }
KNOWN_OPTS="nodes gpus-per-node partition time account python"
parse_args "$@"
nodes=${OPT_nodes:-1}
gpus=${OPT_gpus_per_node:-8}
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$nodes'"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got '$gpus'"
check_run "on a filesystem shared by all nodes"
workdir="$WORKDIR"
[[ $DRY_RUN == 1 ]] || command -v sbatch >/dev/null || die "sbatch not found on PATH: submit from a SLURM" \
  "login node, or pass --dry-run to see the job script"

printf -v main_cmd ' %q' "${MAIN_ARGS[@]}"
directives=(--job-name=ddpm_jax --nodes="$nodes" --ntasks-per-node=1 --gpus-per-node="$gpus"
            --output="$workdir/slurm-%j.out" --signal=TERM@120)
[[ -n "${OPT_partition:-}" ]] && directives+=(--partition="$OPT_partition")
[[ -n "${OPT_time:-}" ]] && directives+=(--time="$OPT_time")
[[ -n "${OPT_account:-}" ]] && directives+=(--account="$OPT_account")
[[ -n "${OPT_requeue:-}" ]] && directives+=(--requeue)
script="#!/usr/bin/env bash"$'\n'
for d in "${directives[@]}"; do script+="#SBATCH $d"$'\n'; done
script+="set -euo pipefail
cd $(printf %q "$PWD")
export PYTHONPATH=$(printf %q "$REPO_ROOT")\${PYTHONPATH:+:\$PYTHONPATH}
srun $(printf %q "$PY") -m ddpm_jax.main$main_cmd --config.distributed.coordinator_address=auto"

if [[ $DRY_RUN == 1 ]]; then
  echo "# $workdir/slurm_job.sh"; echo "$script"; echo "+ sbatch $workdir/slurm_job.sh"
  exit 0
fi
mkdir -p "$workdir"
echo "$script" > "$workdir/slurm_job.sh"
run sbatch "$workdir/slurm_job.sh"
