#!/usr/bin/env bash
# Create a Cloud TPU VM (single host, e.g. v3-8, or a pod slice, e.g. v4-32) and
# install ddpm_jax on every worker.
#
#   launch/tpu_vm_setup.sh --name=ddpm --zone=us-central2-b --accelerator=v4-32 \
#       --repo=https://github.com/<you>/ddpm_jax.git [--bucket=BUCKET] [--spot] [--dry-run]
#
# Options: --name, --zone, --accelerator (v3-8, v4-8, v4-32, v5litepod-16, ...),
# --version (TPU software, default tpu-ubuntu2204-base), --repo (git URL to
# clone on every worker), --bucket (install gcsfuse, for tpu_pod.sh --bucket to
# mount gs://BUCKET as the shared workdir), --spot (preemptible; resume is automatic).
set -euo pipefail
source "$(dirname "$0")/common.sh"
usage() { sed -n '2,11p' "$0"; }
KNOWN_OPTS="name zone accelerator version repo spot bucket"
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
if [[ -n "${OPT_bucket:-}" ]]; then  # gcsfuse from Google's apt repository (its documented install)
  install+="; echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list;
curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null;
sudo apt-get update -q && sudo apt-get install -y -q gcsfuse"
fi
run gcloud compute tpus tpu-vm ssh "$OPT_name" --zone="$OPT_zone" --worker=all --command="$install"
