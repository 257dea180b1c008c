"""Kill and resume: does a run killed (SIGKILL) at random moments end bitwise equal to an uninterrupted one?

    python -m bench.kill_resume [--trials=20] [--steps=24] [--checkpoint_every=4] [--seed=0]
        [--no-cache] [--keep] [--workdir=DIR]

A tiny digits U-Net (CPU, 8 fake devices) is trained for `--steps` steps once without
interruption (the reference). Then each trial trains the same command in a fresh
workdir, kills it (SIGKILL) at a random moment between its first logged step and
the end (so kills land between steps, inside checkpoint saves, during metric writes
...), restarts the same command until it exits 0, and compares the final checkpoint
with the reference: step, params, EMA params and optimizer state must be equal bit
for bit, and metrics.jsonl must list the same steps with the same losses.

Prints one JSON line: trials, matched (the count that were bitwise equal), how many
kills landed inside a checkpoint save (Orbax's temporary directory left behind) or
before the first checkpoint, and the wall time. `--no-cache` compiles every restart
from scratch (as a restart on a fresh machine does); by default the restarts share a
persistent compilation cache (the same compiled programs, faster).

The helpers (`command`, `start`, `kill_mid_save`, `final_state`, `compare`, ...) are
also used by tests/test_reliability.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_MARK = ".orbax-checkpoint-tmp"

# A U-Net small enough for a 2-core CPU, on 8x8 digits (configs/digits.py otherwise).
TINY = {
    "model.ch_mult": (1,), "model.num_res_blocks": 1, "model.attn_resolutions": (), "model.dropout": 0.1,
    "diffusion.num_timesteps": 20, "training.batch_size": 16, "training.sample_every": 0,
    "optim.warmup_steps": 2, "training.eval_bpd_after": False,
}


def overrides(num_steps: int, checkpoint_every: int, log_every: int = 2, keep: int = 2, **more: Any) -> dict:
    return {**TINY, "training.num_steps": num_steps, "training.checkpoint_every": checkpoint_every,
            "training.log_every": log_every, "training.keep_checkpoints": keep, **more}


def _flag_value(v: Any) -> str:
    if isinstance(v, tuple):
        return "(" + "".join(f"{x}," for x in v) + ")"
    return str(v)


def command(workdir: str, values: dict, config: str = "configs/digits.py") -> list[str]:
    """`python -m ddpm_jax.main` with `values` as --config.KEY=VALUE overrides."""
    return [sys.executable, "-m", "ddpm_jax.main", f"--config={config}", f"--workdir={workdir}",
            *(f"--config.{k}={_flag_value(v)}" for k, v in values.items())]


def config_of(values: dict, config: str = "configs/digits.py"):
    """The ConfigDict the command line of `command(..., values)` resolves to."""
    from ddpm_jax import config_loading

    return config_loading.load_config(config, [f"{k}={_flag_value(v)}" for k, v in values.items()])


def environment(cache_dir: str | None, devices: int = 8) -> dict:
    """The subprocess environment: CPU, `devices` fake devices, optional compilation cache."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO_ROOT)
    if cache_dir:
        env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2")
    return env


def start(workdir: str, values: dict, env: dict, log_name: str = "run") -> subprocess.Popen:
    """Starts the training command; its output goes to <workdir>/../<basename>.<log_name>.log."""
    log = open(f"{workdir.rstrip('/')}.{log_name}.log", "w")
    return subprocess.Popen(command(workdir, values), cwd=REPO_ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, timeout: float = 600) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def wait_until(proc: subprocess.Popen, predicate: Callable[[], bool], timeout: float = 600,
               poll: float = 0.002) -> bool:
    """Polls `predicate` until it holds (True) or the process exits (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(poll)
    raise TimeoutError("the training run neither got there nor exited")


def temporary_checkpoints(workdir: str) -> list[str]:
    """Orbax's unfinished saves under <workdir>/checkpoints."""
    try:
        return [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if TMP_MARK in n]
    except FileNotFoundError:
        return []


def finished_checkpoints(workdir: str) -> list[int]:
    try:
        return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
    except FileNotFoundError:
        return []


def logged_steps(workdir: str) -> list[int]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    steps = []
    with open(path) as f:
        for line in f:
            try:
                steps.append(int(json.loads(line)["step"]))
            except (ValueError, KeyError):
                pass
    return steps


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def kill_mid_save(proc: subprocess.Popen, workdir: str, after_step: int = 0) -> bool | None:
    """SIGKILL as soon as a checkpoint save of a step > `after_step` is in progress.

    The process is frozen (SIGSTOP) the moment the temporary directory shows up, so
    what is on disk at the kill can be checked. Returns True if the save was caught
    unfinished, False if it had completed in between, None if the run ended first.
    """
    def saving() -> bool:
        return any(int(n.split(".")[0]) > after_step for n in temporary_checkpoints(workdir))

    if not wait_until(proc, saving):
        proc.wait()
        return None
    proc.send_signal(signal.SIGSTOP)
    caught = saving()
    kill(proc)
    return caught


def final_state(workdir: str, values: dict) -> dict:
    """{name: numpy array} of the newest checkpoint: step, params, opt_state, ema_params leaves."""
    import jax
    import numpy as np

    from ddpm_jax import checkpointing, data, parallel, setup

    config = config_of(values)
    mesh = parallel.make_mesh(jax.devices()[:1])
    model = setup.create_model(config)
    template = setup.abstract_train_state(config, model, data.example_shape(config.data), mesh)
    with checkpointing.Checkpointer(workdir, async_save=False) as ckpt:
        restored = ckpt.restore_train(template)
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(restored.state))[0]
    out = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}
    out["<data_state>"] = np.frombuffer(json.dumps(restored.data_state, sort_keys=True).encode(), np.uint8)
    return out


def compare(a: dict, b: dict) -> tuple[bool, float]:
    """(bitwise equal, max |a - b| over the float leaves) of two `final_state` dicts."""
    import numpy as np

    if a.keys() != b.keys():
        return False, float("inf")
    equal, diff = True, 0.0
    for key in a:
        x, y = a[key], b[key]
        if x.shape != y.shape or x.dtype != y.dtype:
            return False, float("inf")
        equal &= x.tobytes() == y.tobytes()
        if np.issubdtype(x.dtype, np.floating):
            diff = max(diff, float(np.max(np.abs(x.astype(np.float64) - y), initial=0.0)))
    return bool(equal), diff


def metrics_lines(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def same_log(a: str, b: str) -> bool:
    """metrics.jsonl of two runs: the same steps with the same losses and learning rates."""
    keys = ("step", "loss", "lr", "grad_norm")
    rows = [[[m.get(k) for k in keys] for m in metrics_lines(w)] for w in (a, b)]
    return rows[0] == rows[1]


def trial(workdir: str, values: dict, env: dict, kill_at: float, reference: dict, reference_dir: str) -> dict:
    """One killed-and-resumed run; `kill_at` seconds after its first logged step."""
    proc = start(workdir, values, env, "killed")
    started = wait_until(proc, lambda: bool(logged_steps(workdir)))
    killed, mid_save, before_first = False, False, False
    if started and proc.poll() is None:
        time.sleep(kill_at)
        if proc.poll() is None:
            proc.send_signal(signal.SIGSTOP)
            mid_save = bool(temporary_checkpoints(workdir))
            before_first = not finished_checkpoints(workdir)
            kill(proc)
            killed = True
    if proc.poll() is None:
        finish(proc)
    restarts = 0
    while killed or proc.returncode != 0:
        if restarts >= 3:
            break
        restarts += 1
        proc = start(workdir, values, env, f"resume{restarts}")
        killed = False
        finish(proc)
    ok = proc.returncode == 0
    equal, diff = compare(final_state(workdir, values), reference) if ok else (False, float("inf"))
    return dict(killed=bool(started), kill_at=round(kill_at, 3), mid_save=mid_save,
                before_first_checkpoint=before_first, exit_ok=ok, bitwise_equal=equal, max_abs_diff=diff,
                same_metrics_log=ok and same_log(workdir, reference_dir),
                leftover_tmp=temporary_checkpoints(workdir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--checkpoint_every", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill times")
    parser.add_argument("--no-cache", action="store_true", help="no persistent compilation cache")
    parser.add_argument("--workdir", default="", help="where the runs go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the workdirs")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.steps < 2 or args.checkpoint_every < 1:
        print("error: --trials >= 1, --steps >= 2 and --checkpoint_every >= 1 are needed", file=sys.stderr)
        return 2
    os.environ.update(JAX_PLATFORMS="cpu")
    root = args.workdir or tempfile.mkdtemp(prefix="kill_resume_")
    os.makedirs(root, exist_ok=True)
    env = environment(None if args.no_cache else os.path.join(root, "jax_cache"))
    values = overrides(args.steps, args.checkpoint_every)
    begin = time.time()
    ref_dir = os.path.join(root, "reference")
    proc = start(ref_dir, values, env, "reference")
    t_first = None
    wait_until(proc, lambda: bool(logged_steps(ref_dir)), poll=0.01)
    t_first = time.time()
    if finish(proc) != 0:
        print(f"error: the reference run failed; see {ref_dir}.reference.log", file=sys.stderr)
        return 1
    train_seconds = time.time() - t_first
    reference = final_state(ref_dir, values)
    rng = random.Random(args.seed)
    results = []
    for i in range(args.trials):
        result = trial(os.path.join(root, f"trial_{i:02d}"), values, env, rng.uniform(0, train_seconds),
                       reference, ref_dir)
        results.append(result)
        print(json.dumps({"trial": i, **result}), file=sys.stderr, flush=True)
    record = dict(
        bench="kill_resume", trials=args.trials, steps=args.steps, checkpoint_every=args.checkpoint_every,
        matched=sum(r["bitwise_equal"] for r in results),
        metrics_log_matched=sum(r["same_metrics_log"] for r in results),
        kills_mid_save=sum(r["mid_save"] for r in results),
        kills_before_first_checkpoint=sum(r["before_first_checkpoint"] for r in results),
        max_abs_diff=max(r["max_abs_diff"] for r in results), compilation_cache=not args.no_cache,
        reference_train_seconds=round(train_seconds, 2), wall_seconds=round(time.time() - begin, 1),
        loadavg=[round(x, 2) for x in os.getloadavg()], cpus=os.cpu_count(),
    )
    print(json.dumps(record), flush=True)
    if not args.keep and not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if record["matched"] == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
