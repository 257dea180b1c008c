#!/usr/bin/env bash
# N local processes joined by jax.distributed.initialize on 127.0.0.1, each with
# D devices (fake CPU devices by default): rehearses a multi-host run on one machine.
#
#   launch/local_multiprocess.sh --processes=2 --devices=4 --config=configs/digits.py --workdir=/tmp/mh [--dry-run]
#
# Options: --processes=N (2), --devices=D fake CPU devices per process (4),
# --port=P coordinator port (a free one), --python=PATH (else $PYTHON, else the
# repository's .venv/bin/python, else python3). Every process writes its output to
# <workdir>/logs/process_<i>.log (the paths are printed first); process 0's is also
# shown here. Ctrl-C makes every process checkpoint and stop, as a preemption does (exit
# status 130); a second Ctrl-C kills them. Exits non-zero if any process fails.
set -euo pipefail
source "$(dirname "$0")/common.sh"
usage() { sed -n '2,12p' "$0"; }
KNOWN_OPTS="processes devices port python"
parse_args "$@"

nproc_=${OPT_processes:-2}
ndev=${OPT_devices:-4}
[[ "$nproc_" =~ ^[1-9][0-9]*$ ]] || die "--processes must be a positive integer, got '$nproc_'"
[[ "$ndev" =~ ^[1-9][0-9]*$ ]] || die "--devices must be a positive integer, got '$ndev'"
check_run
port=${OPT_port:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

workdir="$WORKDIR"
logdir="$workdir/logs"
if [[ $DRY_RUN == 0 ]]; then
  mkdir -p "$logdir"
  logdir="$(cd "$logdir" && pwd)"  # printed as an absolute path: it is where the files are
fi
log() { echo "$logdir/process_$1.log"; }

pids=()
# Background processes of a script ignore Ctrl-C, so this script passes it on: the first
# as a SIGTERM (a preemption notice: every process checkpoints the same step, then
# stops), the second as SIGKILL. A SIGTERM sent to this script is passed on as such.
interrupts=0
signals_seen=0  # counted by the traps: a `wait` they interrupt is asked again (wait_for)
on_interrupt() {
  signals_seen=$((signals_seen + 1))
  interrupts=$((interrupts + 1))
  if [[ $interrupts == 1 ]]; then
    echo "interrupted (Ctrl-C): the $nproc_ processes checkpoint and stop; press Ctrl-C again to stop them at once" >&2
    kill -TERM "${pids[@]}" 2>/dev/null || true
  else
    kill -KILL "${pids[@]}" 2>/dev/null || true
  fi
}
if [[ $DRY_RUN == 0 ]]; then  # before the first process starts: no signal may find the script unprepared
  trap on_interrupt INT
  trap 'signals_seen=$((signals_seen + 1)); kill -TERM "${pids[@]}" 2>/dev/null || true' TERM
fi

for ((i = 0; i < nproc_; i++)); do
  cmd=(env JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$ndev"
       "$PY" -m ddpm_jax.main "${MAIN_ARGS[@]}"
       --config.distributed.coordinator_address="127.0.0.1:$port"
       --config.distributed.num_processes="$nproc_"
       --config.distributed.process_id="$i")
  if [[ $DRY_RUN == 1 ]]; then
    run "${cmd[@]}"
    continue
  fi
  show "${cmd[@]}"
  echo "  log: $(log "$i")"
  if [[ $i == 0 ]]; then
    "${cmd[@]}" > >(tee -i "$(log 0)") 2>&1 &  # tee -i: a Ctrl-C must not cut process 0 off
  else
    "${cmd[@]}" >"$(log "$i")" 2>&1 &
  fi
  pids+=($!)
done
[[ $DRY_RUN == 1 ]] && exit 0

# wait_for PID: its exit status. It polls rather than blocking in `wait`: a trap runs
# between two polls, where a signal arriving just before a blocking `wait` could be
# left pending. Bash keeps the status of a child that ended, for the final `wait`.
wait_for() {
  local rc seen
  while kill -0 "$1" 2>/dev/null; do sleep 0.2 || true; done
  while true; do
    seen=$signals_seen
    rc=0
    wait "$1" || rc=$?
    [[ $seen != "$signals_seen" ]] || return "$rc"  # a trap interrupted `wait`: ask again
  done
}

status=0
for i in "${!pids[@]}"; do
  rc=0
  wait_for "${pids[$i]}" || rc=$?
  if [[ $rc != 0 ]]; then
    echo "error: process $i exited with status $rc (log: $(log "$i"))" >&2
    [[ $status != 0 ]] || status=$rc
  fi
done
(( interrupts == 0 )) || exit 130  # as a shell expects of an interrupted command
exit "$status"
