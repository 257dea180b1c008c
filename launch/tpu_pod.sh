#!/usr/bin/env bash
# Run ddpm_jax on every worker of a TPU VM / pod slice (created by tpu_vm_setup.sh).
# jax.distributed.initialize() finds the other workers by itself ("auto").
#
#   launch/tpu_pod.sh --name=ddpm --zone=us-central2-b --bucket=my-bucket \
#       --config=configs/cifar10.py --workdir=/mnt/my-bucket/ddpm/cifar10 [--dry-run]
#
# The workdir must be shared by all workers: --bucket=B mounts gs://B at /mnt/B on
# every worker with gcsfuse (installed by tpu_vm_setup.sh --bucket=B) before the run,
# again after a preemption restarts the VMs. Rerunning the same command resumes from
# the latest checkpoint. Output of every worker goes to ~/ddpm_jax/train.log on it.
# Each worker runs its own ~/ddpm_jax/.venv/bin/python (made by tpu_vm_setup.sh).
set -euo pipefail
source "$(dirname "$0")/common.sh"
usage() { sed -n '2,12p' "$0"; }
KNOWN_OPTS="name zone bucket"
parse_args "$@"
[[ -n "${OPT_name:-}" ]] || die "missing --name=TPU_NAME"
[[ -n "${OPT_zone:-}" ]] || die "missing --zone=ZONE"
require_workdir "shared by all workers, e.g. /mnt/BUCKET/run"

printf -v main_cmd ' %q' "${MAIN_ARGS[@]}"
mount=""
if [[ -n "${OPT_bucket:-}" ]]; then
  mount="sudo mkdir -p /mnt/$OPT_bucket && sudo chown \$USER /mnt/$OPT_bucket && "
  mount+="(mountpoint -q /mnt/$OPT_bucket || gcsfuse --implicit-dirs $OPT_bucket /mnt/$OPT_bucket) && "
fi
remote="${mount}cd ddpm_jax && nohup .venv/bin/python -m ddpm_jax.main$main_cmd --config.distributed.coordinator_address=auto > train.log 2>&1 &"
run gcloud compute tpus tpu-vm ssh "$OPT_name" --zone="$OPT_zone" --worker=all --command="$remote"
