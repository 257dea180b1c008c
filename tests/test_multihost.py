"""Several hosts, rehearsed on one machine: 2 processes x 4 fake CPU devices joined by
`jax.distributed.initialize` on 127.0.0.1 (launch/local_multiprocess.sh), against 1 process x 8.

Training reaches the same params (up to the order of the cross-process gradient sum),
checkpoints move between 2 processes and 1 in both directions, a SIGTERM to one host
checkpoints every host at the same step, and sampling / evaluation generation split the
images between the hosts (the same images as one process makes, each made once).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import ddpm_jax.main  # noqa: F401  (puts the repository root on sys.path for `configs`)
from bench import kill_resume as kr
from configs import digits, toy2d
from ddpm_jax import checkpointing, data, parallel, run_meta, setup, train
from ddpm_jax.evaluation import classifier
from ddpm_jax.modes import phema, sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch", "local_multiprocess.sh")
TOY = {"diffusion.num_timesteps": 10, "training.batch_size": 64, "training.steps_per_dispatch": 1,
       "training.log_every": 1, "training.checkpoint_every": 2, "training.sample_every": 0,
       "training.keep_checkpoints": 10, "optim.warmup_steps": 2}
# 2 processes x 4 devices vs 1 x 8: the gradient all-reduce adds the per-device sums in
# another order (gloo across processes), a few float32 ulps, which Adam carries on.
TOLERANCE = 1e-5


def _toy_config(**values):
    config = toy2d.get_config()
    for key, value in {**TOY, **values}.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def _flags(values):
    return [f"--config.{k}={v}" for k, v in values.items()]


def _launch(workdir, *args, config="configs/toy2d.py"):
    """Runs launch/local_multiprocess.sh --processes=2 --devices=4; returns its output (process 0)."""
    cmd = ["bash", LAUNCH, "--processes=2", "--devices=4", f"--python={sys.executable}", f"--config={config}",
           f"--workdir={workdir}", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    log1 = os.path.join(workdir, "logs", "process_1.log")
    other = open(log1).read()[-2000:] if os.path.exists(log1) else ""
    assert proc.returncode == 0, proc.stderr[-3000:] + "\n--- process 1 ---\n" + other
    return proc.stdout + proc.stderr


def _state(workdir, config, step):
    model = setup.create_model(config)
    template = setup.abstract_train_state(config, model, data.example_shape(config.data),
                                          parallel.make_mesh(jax.devices()[:1]))
    with checkpointing.Checkpointer(workdir, async_save=False) as ckpt:
        return jax.device_get(ckpt.restore_train(template, step).state)


def _max_diff(a, b):
    assert int(a.step) == int(b.step)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves((a.params, a.ema_params, a.opt_state)),
                               jax.tree.leaves((b.params, b.ema_params, b.opt_state))))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """A 1 process x 8 devices toy run of 8 steps, checkpoints every 2 (in this process)."""
    workdir = str(tmp_path_factory.mktemp("one") / "run")
    train.train_and_evaluate(_toy_config(**{"training.num_steps": 8}), workdir)
    return workdir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The same run, 4 steps, by 2 processes x 4 devices through the launcher."""
    workdir = str(tmp_path_factory.mktemp("two") / "run")
    _launch(workdir, *_flags({**TOY, "training.num_steps": 4}))
    return workdir


def test_two_processes_train_like_one_and_resume_in_one(one_process, two_processes, tmp_path):
    config = _toy_config(**{"training.num_steps": 8})
    diff = _max_diff(_state(two_processes, config, 4), _state(one_process, config, 4))
    print(f"2 processes x 4 vs 1 x 8 devices after 4 steps: max |diff| = {diff:.3g}")
    assert diff <= TOLERANCE
    # Only process 0 writes the log: one line per step, no duplicates.
    assert [m["step"] for m in kr.metrics_lines(two_processes)] == [1, 2, 3, 4]
    # A checkpoint of 2 processes, resumed by 1 (each process's data state was saved; one
    # process continues the global stream from process 0's).
    resumed = str(tmp_path / "resumed")
    shutil.copytree(two_processes, resumed)
    state = train.train_and_evaluate(config, resumed)
    diff = _max_diff(jax.device_get(state), _state(one_process, config, 8))
    print(f"2 -> 1 process resume, step 8: max |diff| = {diff:.3g}")
    assert diff <= TOLERANCE
    assert [m["step"] for m in kr.metrics_lines(resumed)] == list(range(1, 9))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_to_one_host_checkpoints_every_host_at_one_step(one_process, tmp_path):
    """1 -> 2 processes, then a SIGTERM to process 1 only: both save the same step and exit 0."""
    workdir = str(tmp_path / "run")
    shutil.copytree(one_process, workdir)
    for step in (6, 8):  # resume the 2 processes from the 1-process checkpoint of step 4
        shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
    env = kr.environment(None, devices=4)
    port = _free_port()
    procs = []
    for i in range(2):
        cmd = kr.command(workdir, {**TOY, "training.num_steps": 100_000, "training.log_every": 5},
                         config="configs/toy2d.py")
        cmd += [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"]
        log = open(os.path.join(str(tmp_path), f"process_{i}.log"), "w")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        assert kr.wait_until(procs[0], lambda: max(kr.logged_steps(workdir), default=0) >= 10, poll=0.01)
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = [open(os.path.join(str(tmp_path), f"process_{i}.log")).read() for i in range(2)]
    assert codes == [0, 0], "\n".join(log[-2000:] for log in logs)
    reached = kr.finished_checkpoints(workdir)[-1]
    assert reached >= 10
    for log in logs:
        assert f"preemption notice: checkpoint of step {reached} written" in log
    # Back to one process: two more steps equal a straight 1-process run of reached + 2 steps.
    config = _toy_config(**{"training.num_steps": reached + 2})
    resumed = jax.device_get(train.train_and_evaluate(config, workdir))
    straight = jax.device_get(train.train_and_evaluate(config, str(tmp_path / "straight")))
    diff = _max_diff(resumed, straight)
    print(f"1 -> 2 -> 1 processes, step {reached + 2}: max |diff| = {diff:.3g}")
    assert diff <= TOLERANCE


def test_sample_mode_on_two_hosts_makes_the_same_images(two_processes):
    values = {**TOY, "training.num_steps": 4, "sampling.num_samples": 20, "sampling.batch_size": 16}
    _launch(two_processes, "--mode=sample", *_flags(values))
    config = _toy_config(**values)
    two = np.load(os.path.join(two_processes, "samples", f"sample_{sample.output_tag(config, 4)}.npz"))["samples"]
    one = np.load(sample.run(config, two_processes)["npz"])["samples"]  # 1 process x 8 devices
    assert two.shape == (20, 2)
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-5)


def test_eval_generation_splits_the_chunks_between_hosts(tmp_path):
    """--mode=eval on 2 hosts: process p makes chunks p, p+2, ...; the images equal 1 process's."""
    config = digits.get_config()
    config.model.update(ch_mult=(1,), num_res_blocks=1, attn_resolutions=())
    config.diffusion.num_timesteps = 8
    model = setup.create_model(config)
    abstract = setup.abstract_train_state(config, model, (8, 8, 1), parallel.make_mesh(jax.devices()[:1]))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), abstract.params)
    workdir = str(tmp_path / "pretrained")
    checkpointing.save_pretrained(workdir, params, run_meta.RunMeta.from_config(config).to_dict())
    clf_path = str(tmp_path / "classifier")  # a few steps: the test is about who makes which chunk
    classifier.save(classifier.train(config.data, steps=4), clf_path)
    flags = ["--config.model.ch_mult=(1,)", "--config.model.num_res_blocks=1", "--config.model.attn_resolutions=()",
             "--config.diffusion.num_timesteps=8", "--config.eval.num_samples=24", "--config.eval.chunk_size=8",
             "--config.eval.batch_size=16", "--config.eval.metric=classifier",
             f"--config.eval.classifier_path={clf_path}"]
    out = _launch(workdir, "--mode=eval", *flags, config="configs/digits.py")
    assert "process 0's 16 of 24" in out  # chunks 0 and 2 here, chunk 1 on process 1
    chunks = os.path.join(workdir, "eval", "step_0_ddpm_seed0", "samples")
    two = [np.load(os.path.join(chunks, f"chunk_{c:05d}.npz")) for c in range(3)]
    assert [list(c["indices"]) for c in two] == [list(range(8 * c, 8 * c + 8)) for c in range(3)]
    assert sorted(f for f in os.listdir(chunks) if f.startswith("chunk_")) == [f"chunk_{c:05d}.npz" for c in range(3)]
    one_dir = str(tmp_path / "one")
    shutil.copytree(workdir, one_dir, ignore=shutil.ignore_patterns("eval"))
    from ddpm_jax.modes import evaluate

    config.eval.update(num_samples=24, chunk_size=8, batch_size=16, metric="classifier", classifier_path=clf_path)
    evaluate.run_eval(config, one_dir)
    one = [np.load(os.path.join(one_dir, "eval", "step_0_ddpm_seed0", "samples", f"chunk_{c:05d}.npz"))
           for c in range(3)]
    for a, b in zip(two, one):
        np.testing.assert_array_equal(a["images"], b["images"])
    results = json.load(open(os.path.join(workdir, "eval", "step_0_ddpm_seed0", "results_classifier.json")))
    assert results["num_samples"] == 24 and results["counts"]["generated"] == 24


def test_two_processes_snapshot_and_reconstruct_post_hoc_ema_like_one(tmp_path):
    """Post-hoc EMA on 2 processes x 4 devices: the snapshots (written once, by every process's
    save) and --mode=phema's reconstruction match 1 process x 8."""
    values = {**TOY, "training.num_steps": 4, "ema.sigma_rels": (0.05, 0.1), "ema.snapshot_every": 2,
              "ema.sigma_rel": "0.07"}
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    _launch(two, *_flags(values))
    _launch(two, *_flags(values), "--mode=phema")
    config = _toy_config(**values)
    train.train_and_evaluate(config, one)
    phema.run(config, one)
    for workdir in (one, two):
        with checkpointing.Checkpointer(workdir, keep=None, subdir=checkpointing.SNAPSHOT_DIR) as snaps:
            assert snaps.all_steps() == [2, 4]
    made = [jax.device_get(setup.load_run(config, phema.out_workdir(config, w, 0.07)).params) for w in (two, one)]
    diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b)))) for a, b in
               zip(jax.tree.leaves(made[0]), jax.tree.leaves(made[1])))
    print(f"post-hoc EMA σ_rel 0.07, 2 processes x 4 vs 1 x 8 devices: max |diff| = {diff:.3g}")
    assert diff <= TOLERANCE
