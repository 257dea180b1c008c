"""The launch scripts: --dry-run prints the commands they would run; bad options fail."""

import pathlib
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                          timeout=60)


def test_gpu_workstation_dry_run_runs_main_with_all_flags():
    out = _run("gpu_workstation.sh", "--config=configs/cifar10.py", "--workdir=runs/c",
               "--config.training.batch_size=64", "--gpus=0,1", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "-m ddpm_jax.main --config=configs/cifar10.py --workdir=runs/c" in out.stdout
    assert "--config.training.batch_size=64" in out.stdout
    assert "CUDA_VISIBLE_DEVICES=0,1" in out.stdout


def test_local_multiprocess_dry_run_starts_one_process_per_rank():
    out = _run("local_multiprocess.sh", "--processes=3", "--devices=2", "--port=12345",
               "--config=configs/digits.py", "--workdir=/tmp/x", "--dry-run")
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


def test_slurm_dry_run_prints_the_job_script():
    out = _run("slurm.sh", "--nodes=4", "--gpus-per-node=8", "--partition=gpu", "--requeue",
               "--config=configs/cifar10.py", "--workdir=/shared/run", "--dry-run")
    assert out.returncode == 0, out.stderr
    for directive in ("--nodes=4", "--gpus-per-node=8", "--partition=gpu", "--requeue",
                      "--ntasks-per-node=1"):
        assert f"#SBATCH {directive}" in out.stdout
    assert "srun python3 -m ddpm_jax.main --config=configs/cifar10.py" in out.stdout
    assert not pathlib.Path("/shared/run/slurm_job.sh").exists()


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
