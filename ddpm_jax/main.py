"""Entry point: `python -m ddpm_jax.main --config=configs/X.py --workdir=DIR [--mode=...]`.

Any config field can be overridden: `--config.training.batch_size=64`. The resolved
config is written to the workdir: `config.json` by training once its checks pass
(a refused run leaves the old one), `config_<mode>.json` after another mode succeeds.
Modes:

    train      train (resuming from --workdir by itself)    ddpm_jax.train.train_and_evaluate
    sample     samples from the newest EMA params            ddpm_jax.sample.run
    eval, fid_stats, bpd                                     ddpm_jax.evaluation.run.run(config, workdir, mode)

A bad override (unknown key, wrong type) or bad input (a full disk, an unwritable
workdir, ...) stops with one line naming the problem and a non-zero exit status
(`--debug` shows the traceback instead). A preempted run (SIGTERM) checkpoints and
exits 0: rerun the same command to resume.
"""

from __future__ import annotations

import ast
import difflib
import errno
import importlib
import importlib.util
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# Config files do `from configs import base`: make the repository root importable.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

TRAIN_MODES = ("train", "sample")
EVAL_MODES = ("eval", "fid_stats", "bpd")  # implemented in ddpm_jax/evaluation/run.py
MODES = TRAIN_MODES + EVAL_MODES
_USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
                errno.EISDIR)

config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/digits.py.")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples (resumes from it).")
flags.DEFINE_enum("mode", "train", MODES, "What to run.")
flags.DEFINE_bool("debug", False, "Show full tracebacks instead of one-line errors.")
FLAGS = flags.FLAGS


class UsageError(ValueError):
    """A bad command line: the message is printed as is."""


def _load_config_file(path: str):
    """The ConfigDict of a config file (path[:arg]), loaded as config_flags does."""
    path, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("_ddpm_config", path)
    if spec is None or not os.path.isfile(path):
        raise UsageError(f"--config={path}: no such config file; give e.g. --config=configs/digits.py.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _expected(default) -> str | None:
    """What an override of a field whose default is `default` must look like."""
    if isinstance(default, bool):
        return "True or False"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number (e.g. 2e-4)"
    if isinstance(default, (tuple, list)):
        return f"a tuple like {tuple(default)!r} (quote it in the shell)"
    return None


def _parses_as(default, text: str) -> bool:
    try:
        if isinstance(default, bool):  # as absl's boolean parser
            return text.lower() in ("true", "t", "1", "false", "f", "0")
        if isinstance(default, int):
            try:
                int(text)
            except ValueError:
                int(text, 0)  # 0x10, 0o7, 1_000 as absl reads them
            return True
        if isinstance(default, float):
            float(text)
            return True
        if isinstance(default, (tuple, list)):
            value = ast.literal_eval(text)
            element_types = {type(v) for v in default}
            return isinstance(value, (tuple, list)) and all(type(v) in element_types for v in value) \
                if element_types else isinstance(value, (tuple, list))
    except (ValueError, SyntaxError):
        return False
    return True


def _explain_override_error(argv: list[str], err: Exception) -> str:
    """One line naming the offending `--config.` override and how to fix it."""
    text = " ".join(str(err).split())
    problem = _bad_override(argv)
    if problem:
        return problem
    bad_value = re.match(r"flag --config\.([\w.]+)=(.*?): (.*)", text)
    if bad_value:
        key, value, why = bad_value.groups()
        return f"bad value {value!r} for config key {key!r}: {why}"
    return f"bad --config override: {text}"


def _bad_override(argv: list[str]) -> str | None:
    """The first `--config.` override naming no field or not of its field's type, explained."""
    config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    try:
        config = _load_config_file(config_arg) if config_arg else None
    except Exception:  # noqa: BLE001 - fall back to the raw message below
        config = None
    for arg in argv:
        m = re.match(r"--config\.([\w.]+)(=|$)(.*)", arg)
        if not m or config is None:
            continue
        node, walked = config, []
        for part in m.group(1).split("."):
            if not hasattr(node, "keys") or part not in node:
                options = list(node.keys()) if hasattr(node, "keys") else []
                close = difflib.get_close_matches(part, options, n=1)
                hint = f" (did you mean {'.'.join(walked + close)}?)" if close else ""
                return f"unknown config key {m.group(1)!r}{hint}; see configs/base.py for the fields."
            node, walked = node[part], walked + [part]
        expected = _expected(node)
        if m.group(2) and expected and not _parses_as(node, m.group(3)):
            return f"bad value {m.group(3)!r} for config key {m.group(1)!r}: expected {expected}."
    return None


def _usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _exit_config_load_error(argv: list[str], err: OSError) -> None:
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
    path = path.partition(":")[0]
    if path and not os.path.isfile(path):
        message = f"--config={path}: no such config file; give e.g. --config=configs/digits.py."
    else:
        cause = err.__cause__ or err
        message = f"could not load --config={path}: {type(cause).__name__}: {' '.join(str(cause).split())}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return FLAGS(argv)
    except OSError as err:  # config_flags could not load the config file
        _exit_config_load_error(argv, err)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as err:
        if isinstance(err, flags.Error) and "--config." not in str(err):
            message = " ".join(str(err).split())
        else:
            message = _explain_override_error(argv, err)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


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
    """Dispatches a mode to the module that implements it."""
    if mode == "train":
        from ddpm_jax import train

        return train.train_and_evaluate(config, workdir)
    if mode == "sample":
        from ddpm_jax import sample

        return sample.run(config, workdir)
    try:
        evaluation_run = importlib.import_module("ddpm_jax.evaluation.run")
    except ModuleNotFoundError as err:
        if err.name != "ddpm_jax.evaluation.run":
            raise
        raise UsageError(f"--mode={mode} needs ddpm_jax/evaluation/run.py, which this checkout lacks.") from err
    return evaluation_run.run(config, workdir, mode=mode)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _usage_error(f"unexpected arguments {argv[1:]}; every option is a --flag.")
    try:  # config_flags defers a failed config-file load to the first use of the config
        config = FLAGS.config
        if config is not None:
            config.keys()
    except OSError as err:
        _exit_config_load_error(sys.argv, err)
    if config is None:
        _usage_error("--config is required, e.g. --config=configs/digits.py.")
    problem = _bad_override(sys.argv)  # what config_flags lets through, e.g. ch_mult=(1,a)
    if problem:
        _usage_error(problem)
    if not FLAGS.workdir:
        _usage_error("--workdir is required (checkpoints, metrics and samples go there).")
    _quiet_library_info()
    try:
        from ddpm_jax import metrics, parallel

        # Multi-host: connect the processes before anything touches the devices.
        parallel.initialize(config.get("distributed"))
        run_mode(config, FLAGS.workdir, FLAGS.mode)  # training writes config.json once its checks pass
        if FLAGS.mode != "train":
            metrics.write_config(config, FLAGS.workdir, f"config_{FLAGS.mode}.json")
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
