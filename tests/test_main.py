"""The command line: config overrides, and one-line errors (no traceback) for bad ones."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *args, config="configs/digits.py"):
    cmd = [sys.executable, "-m", "ddpm_jax.main", f"--config={config}", f"--workdir={tmp_path}", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def _error_line(proc):
    """The one line the user sees: the last non-empty line of stderr."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[-1]


@pytest.mark.parametrize(
    "override, expected",
    [  # what the line must name: the key, the bad value, the fix (wording free)
        ("--config.training.batchsize=64", ("'training.batchsize'", "did you mean training.batch_size?")),
        ("--config.nope.x=1", ("'nope.x'", "configs/base.py")),
        ("--config.training.batch_size=abc", ("'training.batch_size'", "'abc'", "integer")),
        ("--config.optim.lr=fast", ("'optim.lr'", "'fast'", "a number")),
        ("--config.training.num_steps=many", ("'training.num_steps'", "'many'", "integer")),
        ("--config.model.remat=maybe", ("'model.remat'", "'maybe'", "True or False")),
        # config_flags itself takes this one (as (1, 'a')); the check after parsing does not.
        ("--config.model.ch_mult=(1,a)", ("'model.ch_mult'", "'(1,a)'", "a tuple like (1, 2)")),
    ],
)
def test_bad_override_exits_with_one_line_naming_the_key(tmp_path, override, expected):
    proc = _run(tmp_path, override)
    assert proc.returncode != 0
    line = _error_line(proc)
    assert line.startswith("error: ")
    for part in expected:
        assert part in line, line
    assert not os.path.exists(os.path.join(tmp_path, "config.json"))


def test_bad_value_found_at_run_time_is_one_line(tmp_path):
    proc = _run(tmp_path, "--config.training.nonfinite=sometimes")
    assert proc.returncode == 1
    line = _error_line(proc)
    assert "training.nonfinite='sometimes'" in line and "error" in line and "skip" in line


def test_missing_config_file_and_workdir(tmp_path):
    proc = _run(tmp_path, config="configs/does_not_exist.py")
    assert proc.returncode != 0 and "does_not_exist.py" in _error_line(proc)
    proc = subprocess.run([sys.executable, "-m", "ddpm_jax.main", "--config=configs/digits.py"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--workdir is required" in proc.stderr


@pytest.mark.parametrize("source, expected", [  # the file, where or what went wrong, the fix
    ("def get_config(:\n", ("broken.py", "line 1", "fix the file")),
    ("def get_config():\n    return 1 / 0\n", ("broken.py", "ZeroDivisionError")),
])
def test_a_broken_config_file_is_one_line_naming_it(tmp_path, source, expected):
    path = tmp_path / "broken.py"
    path.write_text(source)
    for extra in ((), ("--config.seed=1",)):  # config_flags loads it at parse time, or at first use
        proc = _run(tmp_path / "w", *extra, config=str(path))
        assert proc.returncode == 2
        line = _error_line(proc)
        assert line.startswith("error: --config=") and all(part in line for part in expected), proc.stderr[-2000:]
        assert not os.path.exists(tmp_path / "w")


def test_print_config_lists_every_field_with_its_comment(tmp_path):
    proc = _run(tmp_path, "--print_config", "--config.training.batch_size=64")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert any(re.match(r"^training\.batch_size = 64 +# Global batch over all devices and hosts\.$", ln)
               for ln in lines), lines
    assert any(ln.startswith("training.dispatch_loop = 'auto'") and "lax.scan" in ln for ln in lines)
    assert len(lines) >= 80 and not os.path.exists(tmp_path / "config.json")  # every field, one a line
