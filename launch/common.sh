# Shared by the launch scripts: option parsing, --dry-run, and the interpreter.
# Every script takes `--dry-run` (print the commands, run nothing) and passes
# any other `--flag=value` through to `python -m ddpm_jax.main`.
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
        else
          MAIN_ARGS+=("$arg")
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
