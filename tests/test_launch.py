"""The launch scripts: --dry-run prints the commands they would run; bad options, workdirs and
configs fail before anything is written; every script runs the project's interpreter ($PYTHON,
else the repository's .venv, else python3)."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"
# A stand-in interpreter: records its arguments (one per line) in a file of its own under the
# folder $ARGV_LOG, named by the time of the call, so that processes started together cannot
# interleave their records. The scripts' config check (--print_config) is recorded too.
FAKE_PYTHON = """#!/usr/bin/env bash
mkdir -p "$ARGV_LOG"
printf '%s\\n' "$@" > "$ARGV_LOG/.$$"
mv "$ARGV_LOG/.$$" "$ARGV_LOG/$(date +%s%N).$$"
echo "fake python ran"
"""


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    return {**env, **extra}


def _real(**extra: str) -> dict:
    """The environment with this interpreter as $PYTHON: the config checks run for real."""
    return _env(PYTHON=sys.executable, **extra)


CHECK = "--print_config"


def _run(script: str, *args: str, launch: pathlib.Path = LAUNCH, env: dict | None = None,
         cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(launch / script), *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=cwd)


def _fake_python(path: pathlib.Path) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    return path


def _calls(log: pathlib.Path) -> list[list[str]]:
    """The argument lists the fake interpreter was called with, in order."""
    if not log.exists():
        return []
    records = sorted(log.glob("[0-9]*"), key=lambda path: int(path.name.split(".")[0]))
    return [path.read_text().splitlines() for path in records]


def test_gpu_workstation_dry_run_runs_main_with_all_flags():
    out = _run("gpu_workstation.sh", "--config=configs/cifar10.py", "--workdir=runs/c",
               "--config.training.batch_size=64", "--gpus=0,1", "--dry-run", env=_real())
    assert out.returncode == 0, out.stderr
    assert "-m ddpm_jax.main --config=configs/cifar10.py --workdir=runs/c" in out.stdout
    assert "--config.training.batch_size=64" in out.stdout
    assert "CUDA_VISIBLE_DEVICES=0,1" in out.stdout


def test_local_multiprocess_dry_run_starts_one_process_per_rank():
    out = _run("local_multiprocess.sh", "--processes=3", "--devices=2", "--port=12345",
               "--config=configs/digits.py", "--workdir=/tmp/x", "--dry-run", env=_real())
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stdout.splitlines() if "ddpm_jax.main" in l]
    assert len(lines) == 3
    for rank, line in enumerate(lines):
        assert f"--config.distributed.process_id={rank}" in line
        assert "--config.distributed.coordinator_address=127.0.0.1:12345" in line
        assert "--config.distributed.num_processes=3" in line
        assert "--xla_force_host_platform_device_count=2" in line


def test_tpu_scripts_dry_run_use_every_worker():
    setup = _run("tpu_vm_setup.sh", "--name=t", "--zone=us-central2-b", "--accelerator=v4-32",
                 "--repo=https://example.com/ddpm_jax.git", "--spot", "--bucket=b", "--dry-run")
    assert setup.returncode == 0, setup.stderr
    assert "tpu-vm create t --zone=us-central2-b --accelerator-type=v4-32" in setup.stdout
    assert "--spot" in setup.stdout and "--worker=all" in setup.stdout
    assert "apt-get install -y -q gcsfuse" in setup.stdout
    pod = _run("tpu_pod.sh", "--name=t", "--zone=z", "--config=configs/cifar10.py",
               "--bucket=b", "--workdir=/mnt/b/run", "--dry-run")
    assert pod.returncode == 0, pod.stderr
    assert "--worker=all" in pod.stdout
    remote = pod.stdout.replace("\\", "")  # the printed command escapes spaces
    assert "gcsfuse --implicit-dirs b /mnt/b" in remote and "--workdir=/mnt/b/run" in remote
    assert "coordinator_address=auto" in pod.stdout


def test_slurm_dry_run_prints_the_job_script(tmp_path):
    out = _run("slurm.sh", "--nodes=4", "--gpus-per-node=8", "--partition=gpu", "--requeue",
               "--config=configs/cifar10.py", f"--workdir={tmp_path / 'run'}", "--dry-run", env=_real())
    assert out.returncode == 0, out.stderr
    for directive in ("--nodes=4", "--gpus-per-node=8", "--partition=gpu", "--requeue",
                      "--ntasks-per-node=1"):
        assert f"#SBATCH {directive}" in out.stdout
    assert "-m ddpm_jax.main --config=configs/cifar10.py" in out.stdout.split("srun ", 1)[1]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script,args,message", [
    ("gpu_workstation.sh", ["--workdir=x"], "missing --config"),
    ("local_multiprocess.sh", ["--config=c.py", "--workdir=x", "--processes=zero"],
     "--processes must be a positive integer"),
    ("tpu_vm_setup.sh", ["--name=t", "--bogus=1"], "unknown option --bogus=1"),
    ("slurm.sh", ["--config=c.py"], "missing --workdir"),
    ("tpu_pod.sh", ["positional"], "unexpected argument"),
])
def test_bad_options_fail_with_one_line(script, args, message):
    out = _run(script, *args, "--dry-run")
    assert out.returncode != 0
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def _files(root: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("script,args,message", [
    ("slurm.sh", ["--nodes=4", "--gpu-per-node=8", "--config=configs/digits.py", "--workdir=RUN"],
     "unknown option --gpu-per-node=8: this script takes --nodes, --gpus-per-node, --partition, --time, "
     "--account, --python, ddpm_jax.main takes --config, --workdir, --mode, --debug and --config.FIELD=VALUE "
     "(see --help)"),
    ("gpu_workstation.sh", ["--config=configs/digits.py"], "missing --workdir=DIR"),
    ("gpu_workstation.sh", ["--config=configs/nope.py", "--workdir=RUN"],
     "--config=configs/nope.py: no such config file; give e.g. --config=configs/digits.py."),
    ("local_multiprocess.sh", ["--config=configs/digits.py", "--config.training.lr=3", "--workdir=RUN"],
     "unknown config key 'training.lr'; see configs/base.py for the fields."),
    ("slurm.sh", ["--nodes=two", "--config=configs/digits.py", "--workdir=RUN"],
     "--nodes must be a positive integer, got 'two'"),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_flags_workdir_and_config_are_checked_before_anything_is_written(tmp_path, script, args, message, dry_run):
    args = [a.replace("RUN", str(tmp_path / "run")) for a in args] + (["--dry-run"] if dry_run else [])
    out = _run(script, *args, env=_real(ARGV_LOG=str(tmp_path / "argv")), cwd=LAUNCH.parent)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [f"error: {message}"]
    assert _files(tmp_path) == []  # no workdir, no job script, no process started


def test_an_unwritable_workdir_is_refused_in_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    out = _run("gpu_workstation.sh", "--config=configs/digits.py", f"--workdir={tmp_path / 'file' / 'run'}",
               "--dry-run", env=_real(), cwd=LAUNCH.parent)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"error: --workdir={tmp_path / 'file' / 'run'} cannot be written: {tmp_path / 'file'} is not a writable "
        "directory; pass a workdir you can write"]


def test_slurm_without_sbatch_writes_nothing(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "grep", "tail", "mkdir", "cat"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    out = _run("slurm.sh", "--config=configs/digits.py", f"--workdir={tmp_path / 'run'}", cwd=LAUNCH.parent,
               env=_real(PATH=str(bin_dir)))
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: sbatch not found on PATH: submit from a SLURM login node, or pass --dry-run to see the job script"]
    assert not (tmp_path / "run").exists()


# ---- the interpreter ----------------------------------------------------------------------------

def test_every_script_runs_the_python_given_in_PYTHON(tmp_path):
    log = tmp_path / "argv"
    fake = _fake_python(tmp_path / "bin" / "python")
    env = _env(PYTHON=str(fake), ARGV_LOG=str(log))
    out = _run("gpu_workstation.sh", "--config=configs/cifar10.py", f"--workdir={tmp_path / 'w'}",
               "--config.training.batch_size=64", env=env)
    assert out.returncode == 0, out.stderr
    main = ["-m", "ddpm_jax.main", "--config=configs/cifar10.py", f"--workdir={tmp_path / 'w'}",
            "--config.training.batch_size=64"]
    assert _calls(log) == [main + [CHECK], main]
    slurm = _run("slurm.sh", "--nodes=2", "--config=configs/cifar10.py", f"--workdir={tmp_path / 'shared'}",
                 "--dry-run", env=env)
    assert slurm.returncode == 0, slurm.stderr
    assert f"srun {fake} -m ddpm_jax.main --config=configs/cifar10.py" in slurm.stdout


def test_local_multiprocess_runs_PYTHON_and_prints_log_paths_that_exist(tmp_path):
    log = tmp_path / "argv"
    fake = _fake_python(tmp_path / "bin" / "python")
    workdir = tmp_path / "run"
    out = _run("local_multiprocess.sh", "--processes=2", "--devices=3", "--port=23456",
               "--config=configs/digits.py", f"--workdir={workdir}", env=_env(PYTHON=str(fake), ARGV_LOG=str(log)))
    assert out.returncode == 0, out.stderr
    check, *calls = _calls(log)
    assert check[-1] == CHECK and not any(CHECK in c for c in calls)
    assert sorted(c[c.index("-m") + 1] for c in calls) == ["ddpm_jax.main"] * 2
    assert sorted(a for c in calls for a in c if a.startswith("--config.distributed.process_id=")) == \
        ["--config.distributed.process_id=0", "--config.distributed.process_id=1"]
    printed = [line.split("log: ", 1)[1] for line in out.stdout.splitlines() if line.startswith("  log: ")]
    assert printed == [str(workdir / "logs" / f"process_{i}.log") for i in (0, 1)]
    for path in printed:
        assert pathlib.Path(path).read_text() == "fake python ran\n"
    assert "fake python ran" in out.stdout  # process 0 is also shown


def test_local_multiprocess_names_the_log_of_a_failed_process(tmp_path):
    failing = tmp_path / "bin" / "python"
    failing.parent.mkdir(parents=True)
    failing.write_text('#!/usr/bin/env bash\n[[ " $* " == *" --print_config "* ]] && exit 0\n'
                       'echo "No module named absl" >&2\nexit 3\n')
    failing.chmod(0o755)
    out = _run("local_multiprocess.sh", "--processes=2", "--port=23457", "--config=configs/digits.py",
               f"--workdir={tmp_path / 'run'}", env=_env(PYTHON=str(failing)))
    assert out.returncode == 3
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: process")]
    assert len(errors) == 2
    for i, line in enumerate(errors):
        path = line.split("(log: ", 1)[1].rstrip(")")
        assert line.startswith(f"error: process {i} exited with status 3")
        assert "No module named absl" in pathlib.Path(path).read_text()


@pytest.fixture
def repo_copy(tmp_path):
    """The launch scripts in a repository of their own, to give it a .venv or not."""
    root = tmp_path / "repo"
    shutil.copytree(LAUNCH, root / "launch")
    return root


def test_without_PYTHON_the_repository_venv_is_preferred(repo_copy, tmp_path):
    log = tmp_path / "argv"
    venv_python = _fake_python(repo_copy / ".venv" / "bin" / "python")
    env = _env(ARGV_LOG=str(log))
    out = _run("gpu_workstation.sh", "--config=configs/digits.py", "--workdir=w", launch=repo_copy / "launch",
               env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f" {venv_python} -m ddpm_jax.main" in out.stdout and len(_calls(log)) == 2  # the check, the run
    workdir = tmp_path / "mp"
    out = _run("local_multiprocess.sh", "--processes=1", "--port=23458", "--config=configs/digits.py",
               f"--workdir={workdir}", launch=repo_copy / "launch", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert len(_calls(log)) == 4 and (workdir / "logs" / "process_0.log").exists()
    # --python= still wins over both
    other = _fake_python(tmp_path / "other" / "python")
    out = _run("gpu_workstation.sh", "--config=c.py", "--workdir=w", f"--python={other}", "--dry-run",
               launch=repo_copy / "launch", env=_env(PYTHON=str(venv_python)))
    assert f" {other} -m ddpm_jax.main" in out.stdout


def test_without_PYTHON_or_a_venv_python3_is_used(repo_copy, tmp_path):
    log = tmp_path / "argv"
    _fake_python(tmp_path / "bin" / "python3")
    env = _env(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", ARGV_LOG=str(log))
    out = _run("gpu_workstation.sh", "--config=c.py", "--workdir=w", "--dry-run", launch=repo_copy / "launch",
               env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert " python3 -m ddpm_jax.main --config=c.py" in out.stdout
    assert _calls(log) == [["-m", "ddpm_jax.main", "--config=c.py", "--workdir=w", CHECK]]  # checked, not run
    slurm = _run("slurm.sh", "--config=c.py", f"--workdir={tmp_path / 'w'}", "--dry-run",
                 launch=repo_copy / "launch", env=env)
    assert "srun python3 -m ddpm_jax.main --config=c.py" in slurm.stdout


# A stand-in training process: says it is ready, then blocks reading a fifo nobody writes
# (no child process that could outlive it); on SIGTERM it records its rank and exits 0, as
# a checkpointing run does. IGNORE_TERM=1: it ignores SIGTERM.
WAITING_PYTHON = """#!/usr/bin/env bash
[[ " $* " == *" --print_config "* ]] && exit 0
rank=$(printf '%s\\n' "$@" | sed -n 's/^--config.distributed.process_id=//p')
[[ "${IGNORE_TERM:-0}" == 1 ]] && trap '' TERM || trap 'echo "$rank" >> "$TERM_LOG"; exit 0' TERM
mkfifo "$READY_DIR/.fifo_$rank"
exec 3<> "$READY_DIR/.fifo_$rank"
touch "$READY_DIR/$rank"
read -r -u 3
"""


def _start_waiting_run(tmp_path, **env):
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(WAITING_PYTHON)
    fake.chmod(0o755)
    ready = tmp_path / "ready"
    ready.mkdir()
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "local_multiprocess.sh"), "--processes=2", "--port=23459",
         "--config=configs/digits.py", f"--workdir={tmp_path / 'run'}"],
        env=_env(PYTHON=str(fake), READY_DIR=str(ready), TERM_LOG=str(tmp_path / "term.log"), **env),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60  # a bound for a failure, not what decides the outcome
    while len(list(ready.glob("[0-9]"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc


def test_local_multiprocess_ctrl_c_asks_every_process_to_checkpoint(tmp_path):
    proc = _start_waiting_run(tmp_path)
    os.killpg(proc.pid, signal.SIGINT)  # what a Ctrl-C in the terminal does: the whole group
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert sorted((tmp_path / "term.log").read_text().split()) == ["0", "1"]
    assert "interrupted (Ctrl-C): the 2 processes checkpoint and stop; press Ctrl-C again" in err
    assert "error: process" not in err  # they stopped as asked


def test_local_multiprocess_second_ctrl_c_stops_at_once(tmp_path):
    proc = _start_waiting_run(tmp_path, IGNORE_TERM="1")  # processes that take their time to stop
    os.killpg(proc.pid, signal.SIGINT)
    assert "interrupted (Ctrl-C)" in proc.stderr.readline()  # the first one is handled
    # Ctrl-C again, as a user would until it stops: bash drops a SIGINT that arrives while its
    # INT trap is still running, so how many it takes may vary; what it does may not.
    for _ in range(100):
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            pass
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "error: process 0 exited with status 137" in err and "error: process 1 exited with status 137" in err


@pytest.mark.parametrize("script", ["gpu_workstation.sh", "local_multiprocess.sh", "slurm.sh", "tpu_pod.sh",
                                    "tpu_vm_setup.sh"])
def test_help_prints_the_header_comment_whole(script):
    out = _run(script, "--help")
    header = []
    for line in (LAUNCH / script).read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        header.append(line)
    assert out.returncode == 0 and out.stdout.splitlines() == header
