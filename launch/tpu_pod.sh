#!/usr/bin/env bash
# Run ddpm_jax on every worker of a TPU VM / pod slice (created by tpu_vm_setup.sh).
# jax.distributed.initialize() finds the other workers by itself ("auto").
#
#   launch/tpu_pod.sh --name=ddpm --zone=us-central2-b \
#       --config=configs/cifar10.py --workdir=gs://my-bucket/ddpm/cifar10 [--dry-run]
#
# The workdir must be shared by all workers (a gs:// bucket). Rerunning the same
# command after a preemption resumes from the latest checkpoint. Output of every
# worker goes to ~/ddpm_jax/train.log on that worker.
set -euo pipefail
source "$(dirname "$0")/common.sh"
usage() { sed -n '2,11p' "$0"; }
KNOWN_OPTS="name zone"
parse_args "$@"
[[ -n "${OPT_name:-}" ]] || die "missing --name=TPU_NAME"
[[ -n "${OPT_zone:-}" ]] || die "missing --zone=ZONE"

printf -v main_cmd ' %q' "${MAIN_ARGS[@]}"
remote="cd ddpm_jax && nohup .venv/bin/python -m ddpm_jax.main$main_cmd --config.distributed.coordinator_address=auto > train.log 2>&1 &"
run gcloud compute tpus tpu-vm ssh "$OPT_name" --zone="$OPT_zone" --worker=all --command="$remote"
