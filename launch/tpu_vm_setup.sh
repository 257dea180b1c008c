#!/usr/bin/env bash
# Create a Cloud TPU VM (single host, e.g. v3-8, or a pod slice, e.g. v4-32) and
# install ddpm_jax on every worker.
#
#   launch/tpu_vm_setup.sh --name=ddpm --zone=us-central2-b --accelerator=v4-32 \
#       --repo=https://github.com/<you>/ddpm_jax.git [--spot] [--dry-run]
#
# Options: --name, --zone, --accelerator (v3-8, v4-8, v4-32, v5litepod-16, ...),
# --version (TPU software, default tpu-ubuntu2204-base), --repo (git URL to
# clone on every worker), --spot (preemptible capacity; resume is automatic).
set -euo pipefail
source "$(dirname "$0")/common.sh"
usage() { sed -n '2,12p' "$0"; }
KNOWN_OPTS="name zone accelerator version repo spot"
NEEDS_CONFIG=0
parse_args "$@"
(( ${#MAIN_ARGS[@]} == 0 )) || die "unknown option ${MAIN_ARGS[0]} (see --help)"
[[ -n "${OPT_name:-}" ]] || die "missing --name=TPU_NAME"
[[ -n "${OPT_zone:-}" ]] || die "missing --zone=ZONE"
[[ -n "${OPT_accelerator:-}" ]] || die "missing --accelerator=TYPE (e.g. v3-8, v4-32)"
[[ -n "${OPT_repo:-}" ]] || die "missing --repo=GIT_URL (cloned on every worker)"

create=(gcloud compute tpus tpu-vm create "$OPT_name" --zone="$OPT_zone"
        --accelerator-type="$OPT_accelerator" --version="${OPT_version:-tpu-ubuntu2204-base}")
[[ -n "${OPT_spot:-}" ]] && create+=(--spot)
run "${create[@]}"

# Same install on every worker: the pinned requirements, then JAX's TPU build of the same version.
install="set -e; git clone $OPT_repo ddpm_jax || (cd ddpm_jax && git pull); cd ddpm_jax;
python3 -m venv .venv; .venv/bin/pip install -q -r requirements.txt;
.venv/bin/pip install -q \"jax[tpu]==\$(.venv/bin/python -c 'import jax; print(jax.__version__)')\";
.venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count())'"
run gcloud compute tpus tpu-vm ssh "$OPT_name" --zone="$OPT_zone" --worker=all --command="$install"
