"""Runs a plan of benchmark measurements within a time budget; JSON lines + a summary to --out.

    python -m bench.run_all --plan=gpu1 --out=$OUT --budget_s=540     (one device call; see gpu_session.sh)
    python -m bench.run_all --plan=cpu --out=/tmp/bench_cpu --budget_s=5400
    python -m bench.run_all --plan=gpu1 --dry_run                       (prints the commands)

Each measurement is its own process (`python -m bench.X ...`), run one after the other
in priority order, so the JAX and PyTorch allocators never share the device and every
peak-memory figure belongs to one measurement. A measurement is skipped when the
budget left is below its estimate, and stopped when it overruns; either is recorded
as a JSON line (bench = skipped | failed), so a partial session still reports what it
measured. Files written to --out (at most 8 come back from a device call):
results.jsonl (every record), log.txt (each process's other output), summary.md
(`bench.report` tables and ratios, rewritten after each measurement).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common, report

CIFAR = "--config=configs/cifar10.py"
BF16 = "--config.model.dtype=bfloat16"
CUDNN = "--config.model.attention_impl=cudnn"
WINDOWS = ["--windows=5", "--steps_per_window=30", "--warmup=10"]
PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint", "grain",
            "ml-collections", "numpy", "torch", "diffusers", "huggingface-hub")


@dataclasses.dataclass
class Item:
    name: str
    module: str  # bench.<module>
    args: list
    est_s: float  # expected wall time, process start to exit

    def command(self, out: str) -> list:
        args = [a.replace("$OUT", out) for a in self.args]
        return [sys.executable, "-m", f"bench.{self.module}", *args]


def plan_items(plan: str) -> list[Item]:
    """The measurements of a plan, most important first."""
    if plan == "gpu1":  # the numbers: ours vs the peer, bf16 and float32, train and sample
        return [
            Item("train bf16", "train_throughput", [CIFAR, BF16, *WINDOWS], 150),
            Item("peer train bf16", "peer_diffusers", ["--mode=train", "--precision=bf16", *WINDOWS], 60),
            Item("peer train tf32", "peer_diffusers", ["--mode=train", "--precision=tf32", *WINDOWS], 60),
            Item("train fp32", "train_throughput", [CIFAR, *WINDOWS], 150),
            Item("sample bf16", "sample_speed", [CIFAR, BF16, "--method=ddpm,ddim", "--steps=50", "--runs=2"], 120),
            Item("peer sample bf16", "peer_diffusers",
                 ["--mode=sample", "--precision=bf16", "--method=ddpm,ddim", "--steps=50", "--runs=1"], 90),
            Item("train bf16 cudnn", "train_throughput", [CIFAR, BF16, CUDNN, "--modes=step,train", *WINDOWS], 130),
            Item("peer sample tf32", "peer_diffusers",
                 ["--mode=sample", "--precision=tf32", "--method=ddpm,ddim", "--steps=50", "--runs=1"], 100),
            Item("sample fp32", "sample_speed", [CIFAR, "--method=ddpm,ddim", "--steps=50", "--runs=1"], 120),
        ]
    if plan == "gpu2":  # the speed switches, the 256x256 model, torch.compile, bf16 quality
        big = ["--config=configs/celebahq256.py", BF16, "--batch=64", "--modes=step", "--windows=3",
               "--steps_per_window=10", "--warmup=3"]
        return [
            Item("256x256 bf16 remat batch 64", "train_throughput", [*big, "--config.model.remat=True"], 180),
            Item("256x256 bf16 batch 64", "train_throughput", big, 180),
            Item("train bf16 cudnn spd4 prefetch4", "train_throughput",
                 [CIFAR, BF16, CUDNN, "--config.training.steps_per_dispatch=4", "--config.data.prefetch=4",
                  "--modes=step,train", "--windows=5", "--steps_per_window=32", "--warmup=12"], 150),
            Item("peer train bf16 compile", "peer_diffusers",
                 ["--mode=train", "--precision=bf16", "--compile", *WINDOWS], 180),
            Item("bf16 quality digits", "bf16_quality", ["--plot=$OUT/bf16_loss_gpu.png"], 120),
            Item("peer sample bf16 compile", "peer_diffusers",
                 ["--mode=sample", "--precision=bf16", "--compile", "--method=ddpm,ddim", "--steps=50",
                  "--runs=1"], 150),
            Item("sample bf16 cudnn", "sample_speed",
                 [CIFAR, BF16, CUDNN, "--method=ddpm,ddim", "--steps=50", "--runs=2"], 120),
            Item("train bf16 unsafe_rbg dropout keys", "train_throughput",
                 [CIFAR, BF16, "--prng_impl=unsafe_rbg", "--modes=step", *WINDOWS], 130),
            Item("train fp32 highest", "train_throughput",
                 [CIFAR, "--matmul_precision=highest", "--modes=step", *WINDOWS], 150),
        ]
    if plan == "cpu":  # docs/benchmarks.md's CPU figures (slow: run with a large budget)
        small = ["--windows=3", "--steps_per_window=3", "--warmup=2"]
        return [
            Item("digits train fp32", "train_throughput",
                 ["--config=configs/digits.py", "--windows=5", "--steps_per_window=20"], 150),
            Item("cifar10 U-Net batch 8 fp32", "train_throughput",
                 [CIFAR, "--batch=8", "--modes=step,train", *small], 400),
            Item("peer cifar10 U-Net batch 8 fp32", "peer_diffusers",
                 ["--mode=train", "--precision=fp32", "--batch=8", "--device=cpu", *small], 200),
            Item("cifar10 U-Net ddim-10 batch 8", "sample_speed",
                 [CIFAR, "--method=ddim", "--steps=10", "--batch=8", "--runs=1"], 300),
            Item("peer cifar10 U-Net ddim-10 batch 8", "peer_diffusers",
                 ["--mode=sample", "--precision=fp32", "--method=ddim", "--steps=10", "--batch=8",
                  "--device=cpu", "--runs=1"], 200),
            Item("digits sample 1000", "sample_speed",
                 ["--config=configs/digits.py", "--batch=1000", "--runs=1"], 600),
        ]
    raise common.BenchError(f"--plan={plan}: use gpu1, gpu2 or cpu.")


def env_record() -> dict:
    """Package versions and the GPU as nvidia-smi reports it (clocks, power limit) before the run."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    gpu = None
    if shutil.which("nvidia-smi"):
        query = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        gpu = dict(query=query, value=proc.stdout.strip() or proc.stderr.strip())
    return dict(bench="env", python=sys.version.split()[0], packages=versions, gpu=gpu,
                host=common.host_info(), time=common.utc_now())


def run_plan(items: list[Item], out: str, budget_s: float, dry_run: bool = False) -> list[dict]:
    """Runs `items` in order within `budget_s`; returns every record (also appended to out/)."""
    os.makedirs(out, exist_ok=True)
    results, log = os.path.join(out, "results.jsonl"), os.path.join(out, "log.txt")
    deadline = time.monotonic() + budget_s
    records = []

    def keep(record: dict) -> None:
        records.append(record)
        with open(results, "a") as f:
            f.write(json.dumps(record) + "\n")

    if dry_run:
        for item in items:
            keep(dict(bench="planned", name=item.name, est_s=item.est_s, command=item.command(out)))
        return records
    keep(env_record())
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2",
               XLA_PYTHON_CLIENT_MEM_FRACTION=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (common.REPO_ROOT, env.get("PYTHONPATH")) if p)
    for item in items:
        left = deadline - time.monotonic()
        if left < item.est_s:
            keep(dict(bench="skipped", name=item.name, reason=f"{left:.0f} s left < estimate {item.est_s:.0f} s"))
            continue
        cmd = item.command(out)
        print(f"[run_all] {item.name}: {' '.join(cmd[2:])} ({left:.0f} s left)", flush=True)
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=common.REPO_ROOT, env=env, capture_output=True, text=True,
                                  timeout=max(left - 2, 1))
            stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as err:
            stdout, stderr, code = _text(err.stdout), _text(err.stderr), None
        took = time.monotonic() - start
        found = common.read_records(stdout)
        for record in found:
            keep(dict(record, name=item.name, wall_s=round(took, 1)))
        with open(log, "a") as f:
            f.write(f"==== {item.name} ({took:.1f} s, exit {code}): {' '.join(cmd[2:])}\n")
            f.write("".join(line + "\n" for line in stdout.splitlines() if not line.startswith("{")))
            f.write(stderr[-20000:] + "\n")
        if code != 0 or not found:
            why = "timeout (budget)" if code is None else f"exit {code}"
            last = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:] or [""]
            keep(dict(bench="failed", name=item.name, reason=f"{why}: {last[0][:300]}", wall_s=round(took, 1)))
        print(f"[run_all] {item.name}: {len(found)} record(s), {took:.0f} s, exit {code}", flush=True)
        with open(os.path.join(out, "summary.md"), "w") as f:
            f.write(report.markdown(records))
    return records


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", default="gpu1")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench_out"))
    p.add_argument("--budget_s", type=float, default=540.0)
    p.add_argument("--dry_run", action="store_true")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        items = plan_items(args.plan)
    except common.BenchError as err:
        if argv is not None:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    records = run_plan(items, args.out, args.budget_s, dry_run=args.dry_run)
    if args.dry_run:
        for r in records:
            print(json.dumps(r))
    else:
        summary = report.markdown(records)
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write(summary)
        print(summary)
    return records


if __name__ == "__main__":
    main()
