# Shared by the launch scripts: option parsing, --dry-run, the interpreter, and the checks.
# Every script takes `--dry-run` (print the commands, run nothing) and passes
# ddpm_jax.main's own flags (--config, --config.FIELD=VALUE, --workdir, --mode, --debug)
# through to `python -m ddpm_jax.main`; any other flag is refused. Before anything is
# written, started or submitted (a dry run included), check_run refuses a missing or
# unwritable --workdir and a config that does not load with its overrides.
#
# The interpreter is the project's own, chosen here once for every script (after
# parse_args, in $PY): --python=PATH if the script takes it, else $PYTHON, else the
# repository's .venv/bin/python if there is one, else python3 from PATH.

DRY_RUN=0
MAIN_ARGS=()
# Commands run from wherever the user is (relative --workdir paths keep their
# meaning); the package is found through PYTHONPATH.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

MAIN_FLAGS="config workdir mode debug"
die() { echo "error: $*" >&2; exit 2; }

# resolve_python: sets PY (see the top of this file).
resolve_python() {
  if [[ -n "${OPT_python:-}" ]]; then PY="$OPT_python"
  elif [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
  elif [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PY="$REPO_ROOT/.venv/bin/python"
  else PY=python3
  fi
}

# parse_args "$@": fills DRY_RUN and MAIN_ARGS; KNOWN_OPTS (set by the caller)
# lists the script's own --name=value options, which land in variables OPT_<name>
# (dashes become underscores). With NEEDS_CONFIG=0 no --config is required.
# Sets PY, the interpreter (resolve_python).
parse_args() {
  for arg in "$@"; do
    case "$arg" in
      --dry-run) DRY_RUN=1 ;;
      --help|-h) usage; exit 0 ;;
      --spot|--requeue) printf -v "OPT_${arg#--}" '%s' 1 ;;
      --*=*)
        local name="${arg%%=*}"; name="${name#--}"
        if [[ " ${KNOWN_OPTS:-} " == *" $name "* ]]; then
          printf -v "OPT_${name//-/_}" '%s' "${arg#*=}"
        elif [[ " $MAIN_FLAGS " == *" $name "* || "$name" == config.* ]]; then
          MAIN_ARGS+=("$arg")
        else
          die "unknown option $arg: this script takes --${KNOWN_OPTS// /, --}, ddpm_jax.main takes" \
              "--${MAIN_FLAGS// /, --} and --config.FIELD=VALUE (see --help)"
        fi ;;
      *) die "unexpected argument '$arg' (options look like --name=value; see --help)" ;;
    esac
  done
  resolve_python
  if [[ "${NEEDS_CONFIG:-1}" != 0 ]]; then
    local has_config=0
    for a in "${MAIN_ARGS[@]}"; do [[ "$a" == --config=* ]] && has_config=1; done
    [[ $has_config == 1 ]] || die "missing --config=configs/<experiment>.py"
  fi
}

# main_arg NAME: the value of ddpm_jax.main's --NAME=VALUE ("" if absent).
main_arg() {
  local a value=""
  for a in "${MAIN_ARGS[@]}"; do [[ "$a" == "--$1="* ]] && value="${a#--$1=}"; done
  echo "$value"
}

# require_workdir HINT: sets WORKDIR, refusing its absence (HINT says where it must be).
require_workdir() {
  WORKDIR="$(main_arg workdir)"
  [[ -n "$WORKDIR" ]] || die "missing --workdir=DIR${1:+ ($1)}"
}

# check_run HINT: the checks every local launch makes before writing or starting anything:
# --workdir given, a directory (or creatable: its nearest existing parent is a writable
# directory), and the config loadable with its overrides (ddpm_jax.main --print_config,
# whose one-line error is shown as is).
check_run() {
  require_workdir "${1:-}"
  local probe="$WORKDIR"
  [[ ! -e "$probe" || -d "$probe" ]] || die "--workdir=$WORKDIR exists and is not a directory; pass a directory"
  while [[ ! -e "$probe" ]]; do probe="$(dirname "$probe")"; done
  [[ -d "$probe" && -w "$probe" ]] || die "--workdir=$WORKDIR cannot be written: $probe is not a writable" \
    "directory; pass a workdir you can write"
  local err
  if ! err=$("$PY" -m ddpm_jax.main "${MAIN_ARGS[@]}" --print_config 2>&1 >/dev/null); then
    err="$(printf '%s\n' "$err" | grep -v '^[[:space:]]*$' | tail -n 1)"
    echo "${err:-error: $PY -m ddpm_jax.main --print_config failed}" >&2
    exit 2
  fi
}

# run CMD...: print the command; execute it unless --dry-run.
run() {
  show "$@"
  [[ $DRY_RUN == 1 ]] || "$@"
}

# show CMD...: print a command as a shell would read it, quoting only what needs it.
show() {
  local out="+" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=" $a"; else out+=" $(printf '%q' "$a")"; fi
  done
  echo "$out"
}
