"""Entry point: `python -m ddpm_jax.main --config=configs/X.py --workdir=DIR [--mode=...]`.

Any config field can be overridden: `--config.training.batch_size=64`. The resolved
config is written to the workdir: `config.json` by training once its checks pass
(a refused run leaves the old one), `config_<mode>.json` after another mode succeeds.
The modes are `config_loading.MODES` (what each runs: `ddpm_jax/modes/__init__.py`); this module
parses the command line, runs the mode's function (which checks the config first, with
`checks.check_config`) and turns the errors a user can fix into one line.

A bad override (unknown key, wrong type) or bad input (a full disk, an unwritable
workdir, ...) stops with one line naming the problem and a non-zero exit status
(`--debug` shows the traceback instead). A preempted run (SIGTERM) checkpoints and
exits 0; Ctrl-C checkpoints too and exits 130; rerun the same command to resume.

The modes that only sample add XLA:CPU flags to XLA_FLAGS before JAX starts (`cpu_flags`;
`DDPM_JAX_CPU_FLAGS=0` turns them off).
"""

from __future__ import annotations

import errno
import importlib
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import config_loading, cpu_flags

config_loading.ensure_configs_importable()

_USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
                errno.EISDIR)

config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/digits.py.")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples (resumes from it).")
flags.DEFINE_enum("mode", "train", list(config_loading.MODES), "What to run.")
flags.DEFINE_bool("debug", False, "Show full tracebacks instead of one-line errors.")
flags.DEFINE_bool("print_config", False, "Print every config field with its value and comment, then exit.")
FLAGS = flags.FLAGS


def _explain_override_error(argv: list[str], err: Exception) -> str:
    """One line naming the offending `--config.` override and how to fix it."""
    problem = config_loading.override_problem(argv)
    if problem:
        return problem
    text = " ".join(str(err).split())
    bad_value = re.match(r"flag --config\.([\w.]+)=(.*?): (.*)", text)
    if bad_value:
        key, value, why = bad_value.groups()
        return f"bad value {value!r} for config key {key!r}: {why}"
    return f"bad --config override: {text}"


def _usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _exit_config_load_error(argv: list[str], err: OSError) -> None:
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
    try:
        config_loading.load_config_file(path)
        cause = err.__cause__ or err
        message = f"could not load --config={path}: {type(cause).__name__}: {' '.join(str(cause).split())}"
    except config_loading.ConfigError as load_err:
        message = str(load_err)
    _usage_error(message)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return FLAGS(argv)
    except (OSError, SyntaxError) as err:  # config_flags could not load the config file
        _exit_config_load_error(argv, err)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as err:
        if isinstance(err, flags.Error) and "--config." not in str(err):
            message = " ".join(str(err).split())
        else:
            message = _explain_override_error(argv, err)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:  # noqa: BLE001 - the user's config file failed: one line naming it
        _exit_config_load_error(argv, err)


def _quiet_library_info() -> None:
    """Keep only the warnings of Orbax (a dozen INFO lines per checkpoint) and of JAX's backend
    probing ("Unable to initialize backend 'tpu'" on every machine without one)."""
    import logging as py_logging

    noisy = (f"{os.sep}orbax{os.sep}", f"{os.sep}jax{os.sep}_src{os.sep}xla_bridge.py")

    class _DropLibraryInfo(py_logging.Filter):
        def filter(self, record: py_logging.LogRecord) -> bool:
            return record.levelno >= py_logging.WARNING or not any(n in record.pathname for n in noisy)

    logging.get_absl_handler().addFilter(_DropLibraryInfo())


def run_mode(config, workdir: str, mode: str):
    """Runs `mode`'s function `(config, workdir)` (`config_loading.MODES`), which starts with
    `checks.check_config(config, mode)`; it is imported only now: `--help` needs no JAX."""
    module, function = config_loading.MODES[mode].run.split(":")
    return getattr(importlib.import_module(module), function)(config, workdir)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _usage_error(f"unexpected arguments {argv[1:]}; every option is a --flag.")
    try:  # config_flags defers a failed config-file load to the first use of the config
        config = FLAGS.config
        if config is not None:
            config.keys()
    except Exception as err:  # noqa: BLE001 - the user's config file failed: one line naming it
        _exit_config_load_error(sys.argv, err)
    if config is None:
        _usage_error("--config is required, e.g. --config=configs/digits.py.")
    problem = config_loading.override_problem(sys.argv)  # what config_flags lets through, e.g. ch_mult=(1,a)
    if problem:
        _usage_error(problem)
    if FLAGS.print_config:
        print(config_loading.describe(config))
        return
    if not FLAGS.workdir:
        _usage_error("--workdir is required (checkpoints, metrics and samples go there).")
    _quiet_library_info()
    cpu_flags.apply(FLAGS.mode)  # before the backend starts: XLA reads XLA_FLAGS once
    try:
        from ddpm_jax import metrics, parallel

        # Multi-host: connect the processes before anything touches the devices.
        parallel.initialize(config.get("distributed"))
        run_mode(config, FLAGS.workdir, FLAGS.mode)  # training writes config.json once its checks pass
        if FLAGS.mode != "train":
            metrics.write_config(config, FLAGS.workdir, f"config_{FLAGS.mode}.json")
    except KeyboardInterrupt as err:  # preemption.Interrupted: Ctrl-C, checkpoint written
        if FLAGS.debug:
            raise
        message = str(err) or ("stopped at once (a second Ctrl-C); rerun the same command to resume "
                               "from the newest checkpoint.")
        print(f"error: {message}", file=sys.stderr)
        sys.exit(130)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, OSError) as err:
        if FLAGS.debug or (isinstance(err, OSError) and not _user_os_error(err)):
            raise
        logging.debug("stopping on %s", type(err).__name__, exc_info=True)
        print(f"error: {_one_line(err)}", file=sys.stderr)
        sys.exit(1)


def _user_os_error(err: OSError) -> bool:
    """OS errors the user can fix (full disk, permissions, a missing file), not bugs."""
    from ddpm_jax.checkpointing import DiskFullError

    return isinstance(err, (FileNotFoundError, FileExistsError, DiskFullError)) or err.errno in _USER_ERRNOS


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        text += " (disk full): free space on that disk or move --workdir, then rerun the same command"
    return text


def run() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
