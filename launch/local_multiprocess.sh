#!/usr/bin/env bash
# N local processes joined by jax.distributed.initialize on 127.0.0.1, each with
# D devices (fake CPU devices by default): rehearses a multi-host run on one machine.
#
#   launch/local_multiprocess.sh --processes=2 --devices=4 --config=configs/digits.py --workdir=/tmp/mh [--dry-run]
#
# Options: --processes=N (2), --devices=D fake CPU devices per process (4),
# --port=P coordinator port (a free one), --python=PATH. Process 0's output is
# shown; the others' go to <workdir>/logs/process_<i>.log. Exits non-zero if any
# process fails.
set -euo pipefail
source "$(dirname "$0")/common.sh"
usage() { sed -n '2,11p' "$0"; }
KNOWN_OPTS="processes devices port python"
parse_args "$@"

nproc_=${OPT_processes:-2}
ndev=${OPT_devices:-4}
python=${OPT_python:-python3}
port=${OPT_port:-$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
[[ "$nproc_" =~ ^[1-9][0-9]*$ ]] || die "--processes must be a positive integer, got '$nproc_'"
[[ "$ndev" =~ ^[1-9][0-9]*$ ]] || die "--devices must be a positive integer, got '$ndev'"

workdir=""
for a in "${MAIN_ARGS[@]}"; do [[ "$a" == --workdir=* ]] && workdir="${a#--workdir=}"; done
[[ -n "$workdir" ]] || die "missing --workdir=DIR"
logdir="$workdir/logs"
[[ $DRY_RUN == 1 ]] || mkdir -p "$logdir"

pids=()
for ((i = 0; i < nproc_; i++)); do
  cmd=(env JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$ndev"
       "$python" -m ddpm_jax.main "${MAIN_ARGS[@]}"
       --config.distributed.coordinator_address="127.0.0.1:$port"
       --config.distributed.num_processes="$nproc_"
       --config.distributed.process_id="$i")
  if [[ $DRY_RUN == 1 ]]; then
    run "${cmd[@]}"
  elif [[ $i == 0 ]]; then
    show "${cmd[@]}"
    "${cmd[@]}" &
    pids+=($!)
  else
    "${cmd[@]}" >"$logdir/process_$i.log" 2>&1 &
    pids+=($!)
  fi
done
[[ $DRY_RUN == 1 ]] && exit 0

trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "error: process $i failed (log: $logdir/process_$i.log)" >&2
    status=1
  fi
done
exit $status
