"""Config files and `--config.a.b=value` overrides: loaded and checked the same way everywhere.

`ddpm_jax.main` parses its command line with ml_collections' `config_flags` and asks
`override_problem` about what that lets through; the bench scripts and the classifier
command use `load_config(path, overrides)`. Every failure is a `ConfigError`, one line
naming the file or the field and what it takes.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import re
import sys
from typing import Any, NamedTuple, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Mode(NamedTuple):
    """What `--mode=<name>` runs: `run` is "module:function" (`main.run_mode` imports it only then, so
    `--help` needs no JAX), taking `(config, workdir)`; `work` ("train", "sample" or "") picks the
    XLA:CPU flags of `cpu_flags`."""

    run: str
    work: str = ""


# The values of `--mode`: `main.run_mode` runs each one, `checks.check_config` checks each one.
MODES = {
    "train": Mode("ddpm_jax.train:train_and_evaluate", "train"),
    "sample": Mode("ddpm_jax.modes.sample:run", "sample"),
    "eval": Mode("ddpm_jax.modes.evaluate:run_eval", "sample"),
    "fid_stats": Mode("ddpm_jax.modes.evaluate:run_fid_stats"),
    "bpd": Mode("ddpm_jax.modes.bpd:run", "sample"),
    "figures": Mode("ddpm_jax.modes.figures:run"),
    "train_autoencoder": Mode("ddpm_jax.modes.autoencoder:run", "train"),
    "cascade": Mode("ddpm_jax.modes.cascade:run", "sample"),
    "phema": Mode("ddpm_jax.modes.phema:run"),
    "distill": Mode("ddpm_jax.modes.distill:run", "train"),
    "consistency": Mode("ddpm_jax.modes.consistency:run", "train"),
}


class ConfigError(ValueError):
    """A config file that cannot be loaded, or an override that names no field or misfits its type."""


def ensure_configs_importable() -> None:
    """Config files do `from configs import base`: make the repository root importable."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)


def load_config_file(path: str):
    """The ConfigDict of a config file `path[:arg]` (as config_flags loads it), or ConfigError."""
    ensure_configs_importable()
    path, _, arg = str(path).partition(":")
    full = path if os.path.isabs(path) or os.path.isfile(path) else os.path.join(REPO_ROOT, path)
    if not os.path.isfile(full):
        raise ConfigError(f"--config={path}: no such config file; give e.g. --config=configs/digits.py.")
    spec = importlib.util.spec_from_file_location("_ddpm_config", full)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except SyntaxError as err:
        raise ConfigError(f"--config={path}: syntax error at line {err.lineno}: {err.msg}; fix the file.") from err
    except Exception as err:  # noqa: BLE001 - any failure of user code in the config file
        raise ConfigError(f"--config={path} could not be loaded: {type(err).__name__}: "
                          f"{' '.join(str(err).split())}") from err


def expected_type(default: Any) -> str | None:
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


def parse_value(text: str, default: Any) -> Any:
    """`text` as a value of `default`'s type (absl's spellings); ValueError if it is not one."""
    if isinstance(default, bool):
        low = text.strip().lower()
        if low in ("true", "t", "1"):
            return True
        if low in ("false", "f", "0"):
            return False
        raise ValueError(text)
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            return int(text, 0)  # 0x10, 0o7, 1_000 as absl reads them
    if isinstance(default, float):
        return float(text)
    if isinstance(default, (tuple, list)):
        value = ast.literal_eval(text)
        value = value if isinstance(value, (tuple, list)) else (value,)
        element_types = {type(v) for v in default}
        if element_types and not all(type(v) in element_types for v in value):
            raise ValueError(text)
        return type(default)(value)
    return text


def _field(config, key: str):
    """(parent node, leaf name) of the dotted `key`, or ConfigError naming the closest field."""
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        if not hasattr(node, "keys") or part not in node:
            options = list(node.keys()) if hasattr(node, "keys") else []
            close = difflib.get_close_matches(part, options, n=1)
            hint = f" (did you mean {'.'.join(parts[:i] + close)}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}; see configs/base.py for the fields.")
        if i < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def check_override(config, key: str, text: str | None) -> None:
    """ConfigError if `key` names no field of `config`, or `text` does not fit the field's type."""
    node, leaf = _field(config, key)
    default = node[leaf]
    expected = expected_type(default)
    if text is None or expected is None:
        return
    try:
        parse_value(text, default)
    except (ValueError, SyntaxError):
        raise ConfigError(f"bad value {text!r} for config key {key!r}: expected {expected}.") from None


def apply_overrides(config, overrides: Sequence[str]) -> None:
    """Applies 'a.b=value' overrides in place, each parsed as its field's type."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--config.{key}: give a value, e.g. --config.{key}=VALUE.")
        check_override(config, key, text)
        node, leaf = _field(config, key)
        current = node[leaf]
        if current is None and node.get_type(leaf) in (bool, int, float):  # an unset typed placeholder
            current = node.get_type(leaf)()
        node[leaf] = parse_value(text, current) if current is not None else text


def load_config(path: str, overrides: Sequence[str] = ()):
    """The ConfigDict of `path` with 'a.b=value' overrides applied."""
    config = load_config_file(path)
    apply_overrides(config, overrides)
    return config


def override_problem(argv: Sequence[str]) -> str | None:
    """The first `--config.` override on a command line naming no field or misfitting its type."""
    config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    try:
        config = load_config_file(config_arg) if config_arg else None
    except ConfigError:
        return None  # reported as such by the caller
    for arg in argv:
        m = re.match(r"--config\.([\w.]+)(=|$)(.*)", arg)
        if not m or config is None:
            continue
        try:
            check_override(config, m.group(1), m.group(3) if m.group(2) else None)
        except ConfigError as err:
            return str(err)
    return None


def _field_comments(base_path: str) -> dict[str, str]:
    """{"section.field": comment} from configs/base.py: a field's inline comment, or else the block
    of comment lines right above it."""
    comments, aliases, above = {}, {}, []
    with open(base_path) as f:
        lines = f.read().splitlines()
    for line in lines:
        m = re.match(r"\s*#\s*(.*)$", line)
        if m:
            if not m.group(1).startswith("----"):
                above.append(m.group(1))
            continue
        m = re.match(r"\s*config\.(\w+) = (\w+) = ml_collections\.ConfigDict\(\)", line)
        if m:
            aliases[m.group(2)] = m.group(1)
            above = []
            continue
        m = re.match(r"\s*(\w+)\.(\w+) = [^#]*(?:#\s*(.*))?$", line)
        if m and (m.group(1) in aliases or m.group(1) == "config"):
            section = "" if m.group(1) == "config" else aliases[m.group(1)]
            text = m.group(3) or " ".join(above)
            if text:
                comments[f"{section}.{m.group(2)}" if section else m.group(2)] = text
        above = []
    return comments


def describe(config) -> str:
    """Every field of `config` with its value and the comment configs/base.py gives it, one per line."""
    comments = _field_comments(os.path.join(REPO_ROOT, "configs", "base.py"))
    rows = []

    def walk(node, prefix: str) -> None:
        for key in sorted(node.keys()):
            value, name = node[key], f"{prefix}{key}"
            if hasattr(value, "keys"):
                walk(value, name + ".")
            else:
                rows.append((name, repr(value), comments.get(name, "")))

    walk(config, "")
    width = max(len(f"{n} = {v}") for n, v, _ in rows)
    return "\n".join(f"{n} = {v}".ljust(width) + (f"  # {c}" if c else "") for n, v, c in rows)
