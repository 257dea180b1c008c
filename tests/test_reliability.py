"""Reliability: exact resume after SIGKILL (also in the middle of a checkpoint save), SIGTERM,
non-finite losses and states, damaged checkpoints, a full disk, and bad input on the command line.

The command-line runs share one persistent compilation cache (the same compiled programs,
so a restart costs its imports, not a compilation) and one reference run: a tiny digits
U-Net trained for 12 steps without interruption.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import ddpm_jax.main  # noqa: F401  (puts the repository root on sys.path for `configs`)
import ddpm_jax.workdir_lock
from bench import kill_resume as kr
from configs import toy2d
from ddpm_jax import checkpoint_recovery, checkpointing, data, files, loop, metrics, parallel, setup, train

STEPS, EVERY = 12, 4
VALUES = kr.overrides(STEPS, EVERY)  # log every 2 steps, keep 2 checkpoints


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return kr.environment(str(tmp_path_factory.mktemp("jax_cache")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """(workdir, final state) of the uninterrupted 12-step run."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    assert kr.finish(kr.start(workdir, VALUES, env, "reference")) == 0, _log(workdir, "reference")
    return workdir, kr.final_state(workdir, VALUES)


def _log(workdir, name):
    with open(f"{workdir}.{name}.log") as f:
        return f.read()[-3000:]


def _copy(workdir, tmp_path):
    target = str(tmp_path / "run")
    shutil.copytree(workdir, target)
    return target


# ---- exact resume ------------------------------------------------------------------------------


def test_sigkill_at_any_moment_resumes_bitwise(reference, env, tmp_path):
    ref_dir, ref_state = reference
    w = str(tmp_path / "run")
    # 1. Killed as soon as the first save is seen in progress (wherever the kill lands).
    kr.kill_mid_save(kr.start(w, VALUES, env, "1"), w)
    # 2. Killed between saves: checkpoint 4 is done and later steps were logged (to be redone).
    proc = kr.start(w, VALUES, env, "2")
    assert kr.wait_until(proc, lambda: 4 in kr.finished_checkpoints(w) and max(kr.logged_steps(w), default=0) > 4)
    kr.kill(proc)
    # 3. A save cut off half-way, made by hand so that it is there for sure: the newest finished
    #    checkpoint copied under Orbax's temporary name of the next one, one array file truncated.
    newest = kr.finished_checkpoints(w)[-1]
    half = os.path.join(w, "checkpoints", f"{newest + EVERY}{kr.TMP_MARK}1234567")
    shutil.copytree(os.path.join(w, "checkpoints", str(newest)), half)
    array_files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(half, "train")) for f in fs]
    target = max(array_files, key=os.path.getsize)
    with open(target, "r+b") as f:
        f.truncate(os.path.getsize(target) // 2)
    # 4. The same command again, to the end.
    assert kr.finish(kr.start(w, VALUES, env, "4")) == 0, _log(w, "4")
    assert kr.temporary_checkpoints(w) == []  # the half-written save was removed, not restored
    equal, max_diff = kr.compare(kr.final_state(w, VALUES), ref_state)
    assert equal, f"resumed run differs from the uninterrupted one by up to {max_diff}"
    assert kr.same_log(w, ref_dir)  # metrics.jsonl: the same steps and losses, no duplicates
    assert [m["step"] for m in kr.metrics_lines(w)] == list(range(2, STEPS + 1, 2))


def test_preemption_checkpoints_the_step_reached_and_resumes_bitwise(tmp_path, monkeypatch):
    """The loop's side of a SIGTERM (the signal's side is tests/test_preemption.py): the watcher says
    "stop" after step 6, the loop checkpoints step 6 and returns; the same run again ends as if alone."""
    straight, w = str(tmp_path / "straight"), str(tmp_path / "run")
    train.train_and_evaluate(kr.config_of(VALUES), straight)
    monkeypatch.setattr(loop.preemption.PreemptionWatcher, "reached", lambda self, prev, step: step >= 6)
    state = train.train_and_evaluate(kr.config_of(VALUES), w)
    assert int(state.step) == 6 and kr.finished_checkpoints(w)[-1] == 6
    monkeypatch.undo()
    train.train_and_evaluate(kr.config_of(VALUES), w)
    equal, max_diff = kr.compare(kr.final_state(w, VALUES), kr.final_state(straight, VALUES))
    assert equal, max_diff
    assert kr.same_log(w, straight)  # the unlogged steps before the preemption were carried over


def test_scan_dispatch_resumes_bitwise_and_matches_unrolled_steps(tmp_path):
    """training.dispatch_loop=scan, the accelerators' path, on the CPU: 3 steps per dispatch,
    interrupted after the first dispatch, resumed, equals the uninterrupted scan run bitwise."""
    def config(loop):
        values = dict(VALUES, **{"training.num_steps": 6, "training.steps_per_dispatch": 3, "training.log_every": 1,
                                 "training.checkpoint_every": 3, "training.dispatch_loop": loop})
        return kr.config_of(values)

    straight = jax.device_get(train.train_and_evaluate(config("scan"), str(tmp_path / "straight")))
    first = config("scan")
    first.training.num_steps = 3
    train.train_and_evaluate(first, str(tmp_path / "resumed"))
    resumed = jax.device_get(train.train_and_evaluate(config("scan"), str(tmp_path / "resumed")))
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert kr.same_log(str(tmp_path / "resumed"), str(tmp_path / "straight"))
    # The unrolled program computes the same steps: the same batches and keys give the same losses
    # (up to the float32 rounding of another fusion; another batch or key gives another loss).
    train.train_and_evaluate(config("unroll"), str(tmp_path / "unrolled"))
    scan_loss = [m["loss"] for m in kr.metrics_lines(str(tmp_path / "straight"))]
    unrolled_loss = [m["loss"] for m in kr.metrics_lines(str(tmp_path / "unrolled"))]
    assert len(scan_loss) == 2  # logs fall on dispatch boundaries: steps 3 and 6
    np.testing.assert_allclose(scan_loss, unrolled_loss, rtol=1e-4)


def test_the_progress_bar_eta_takes_pauses_as_part_of_the_run():
    """0.1 s steps with a 10 s checkpoint every 100: the ETA after a pause is the run's remaining time
    (380 s for 1,899 steps), not one slow update taken as the new speed (hours)."""
    clock = [0.0]
    with files.progress_bar(2000, "train", unit="step") as bar:
        bar._time = lambda: clock[0]
        bar.start_t = bar.last_print_t = 0.0
        bar.mininterval, bar.miniters, bar.dynamic_miniters = 0, 1, False
        for step in range(1, 102):
            clock[0] += 0.1 + (10.0 if step == 101 else 0.0)
            bar.update(1)
        info = bar.format_dict
        eta = (info["total"] - info["n"]) / (info["rate"] or info["n"] / info["elapsed"])
    assert 300 < eta < 450, eta


def test_ctrl_c_checkpoints_exits_130_and_resumes_bitwise(env, tmp_path):
    long_run = kr.overrides(10_000, 10_000)  # it cannot end by itself before the Ctrl-C
    w = str(tmp_path / "run")
    proc = kr.start(w, long_run, env, "ctrl_c")
    assert kr.wait_until(proc, lambda: max(kr.logged_steps(w), default=0) >= 4)
    proc.send_signal(signal.SIGINT)
    assert kr.finish(proc) == 130, _log(w, "ctrl_c")
    reached = kr.finished_checkpoints(w)[-1]
    errors = [ln for ln in _log(w, "ctrl_c").splitlines() if ln.startswith("error:")]
    assert errors == [f"error: interrupted (Ctrl-C): checkpoint of step {reached} written to "
                      f"{os.path.join(w, 'checkpoints')}; rerun the same command to resume."]
    assert "Traceback" not in _log(w, "ctrl_c")
    assert _log(w, "ctrl_c").count(f"checkpoint of step {reached} written to") == 1  # said once, by main
    # Resumed to reached + 4 equals a run straight to reached + 4.
    target = kr.overrides(reached + 4, 10_000)
    assert kr.finish(kr.start(w, target, env, "resume")) == 0, _log(w, "resume")
    straight = str(tmp_path / "straight")
    assert kr.finish(kr.start(straight, target, env, "straight")) == 0, _log(straight, "straight")
    equal, max_diff = kr.compare(kr.final_state(w, target), kr.final_state(straight, target))
    assert equal, max_diff
    assert kr.same_log(w, straight)


def test_a_second_training_run_into_a_busy_workdir_stops_and_the_first_is_unchanged(reference, env, tmp_path):
    ref_dir, ref_state = reference
    w = str(tmp_path / "run")
    first = kr.start(w, VALUES, env, "first")
    assert kr.wait_until(first, lambda: max(kr.logged_steps(w), default=0) >= 2)
    first.send_signal(signal.SIGSTOP)  # holds the lock, frozen: the second run surely meets it
    try:
        second = subprocess.run(kr.command(w, VALUES), cwd=kr.REPO_ROOT, env=env, capture_output=True,
                                text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1, second.stderr[-3000:]
    errors = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"{w} is in use by a training run" in errors[0], second.stderr[-3000:]
    assert f"pid {first.pid}" in errors[0]
    assert kr.finish(first) == 0, _log(w, "first")
    equal, max_diff = kr.compare(kr.final_state(w, VALUES), ref_state)
    assert equal, max_diff  # the first run ended exactly as if alone
    assert kr.same_log(w, ref_dir)
    assert not os.path.exists(os.path.join(w, ".lock"))  # released at the end


def test_sampling_beside_a_running_training_and_past_a_damaged_checkpoint(reference, env, tmp_path):
    ref_dir, _ = reference
    w = _copy(ref_dir, tmp_path)
    damaged = os.path.join(w, "checkpoints", "16")
    os.makedirs(damaged)
    open(os.path.join(damaged, "x"), "w").close()  # a step directory with nothing readable in it
    args = ["--mode=sample", "--config.sampling.num_samples=4", "--config.sampling.batch_size=8"]
    lock = ddpm_jax.workdir_lock.WorkdirLock(w, "train")
    with lock:  # as a training run would hold it: reading modes do not take the lock
        proc = subprocess.run(kr.command(w, kr.overrides(STEPS, EVERY)) + args, cwd=kr.REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warning = [ln for ln in proc.stderr.splitlines() if "checkpoint 16 is unreadable" in ln]
    assert len(warning) == 1 and "used step 12" in warning[0], proc.stderr[-3000:]
    assert os.path.isdir(damaged)  # only training moves damaged checkpoints aside
    assert os.path.isfile(os.path.join(w, "samples", "sample_ddpm_step12_seed0_n4.npz"))


def test_every_reading_mode_loads_the_newest_valid_checkpoint(reference, tmp_path, caplog):
    """sample, eval and bpd get their params from setup.load_run: past a damaged newest
    checkpoint (left where it is), and refusing an empty workdir without creating anything."""
    w = _copy(reference[0], tmp_path)
    config = kr.config_of(VALUES)
    os.makedirs(os.path.join(w, "checkpoints", "16"))
    with caplog.at_level("WARNING"):
        loaded = setup.load_run(config, w)
    assert loaded.step == 12 and "checkpoint 16 is unreadable" in caplog.text and "used step 12" in caplog.text
    assert os.path.isdir(os.path.join(w, "checkpoints", "16"))
    with checkpointing.Checkpointer(reference[0], async_save=False) as ckpt:  # the undamaged original
        step_12 = ckpt.restore_ema_params(setup.abstract_params(loaded.model, loaded.shape, loaded.mesh), 12)
    for a, b in zip(jax.tree.leaves(jax.device_get(loaded.params)), jax.tree.leaves(jax.device_get(step_12))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        setup.load_run(config, str(tmp_path / "empty"))
    assert not os.path.exists(tmp_path / "empty")


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(reference, env, tmp_path):
    ref_dir, ref_state = reference
    w = _copy(ref_dir, tmp_path)
    assert kr.finished_checkpoints(w) == [8, 12]
    # Flip a byte of the largest array file of checkpoint 12: Orbax reads it back without
    # complaint (only its indexes carry checksums), the checkpoint's own checksum catches it.
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(w, "checkpoints", "12", "train")) for f in fs]
    target = max(files, key=os.path.getsize)
    raw = bytearray(open(target, "rb").read())
    raw[len(raw) // 2] ^= 0x40
    open(target, "wb").write(bytes(raw))
    proc = subprocess.run(kr.command(w, VALUES), cwd=kr.REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warning = [ln for ln in proc.stderr.splitlines() if "checkpoint 12 is unreadable" in ln]
    assert len(warning) == 1 and "resumed from step 8" in warning[0], proc.stderr[-3000:]
    assert os.path.isdir(os.path.join(w, "corrupt_checkpoints", "12"))  # kept aside, not deleted
    equal, _ = kr.compare(kr.final_state(w, VALUES), ref_state)
    assert equal  # steps 9..12 redone from checkpoint 8


# ---- bad input on the command line --------------------------------------------------------------


def _cli(workdir, *args, env, config="configs/digits.py"):
    cmd = [sys.executable, "-m", "ddpm_jax.main", f"--config={config}", f"--workdir={workdir}", *args]
    return subprocess.run(cmd, cwd=kr.REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def _error_line(proc):
    """The one line the user sees: the last non-empty line of stderr, with no traceback."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: "), proc.stderr[-3000:]
    return lines[-1]


TINY_FLAGS = [a for a in kr.command("x", VALUES)[5:]]


@pytest.mark.parametrize("args, expected", [
    (["--config.training.batchsize=64"], r"unknown config key 'training.batchsize' \(did you mean training.batch_size\?\)"),
    (["--config.training.batch_size=abc"], r"bad value 'abc' for config key 'training.batch_size'"),
    (["--config.model.ch=64"], r"holds a checkpoint with model.kwargs.ch=32, but the config gives model.kwargs.ch=64; "
                               r"use a fresh --workdir or the config it was trained with"),
    (["--config.training.batch_size=12"], r"training.batch_size=12 is not divisible by the 8 devices of the mesh; "
                                          r"use a multiple of 8"),
    (["--config.training.batch_size=32"], r"The data state was saved with global_batch_size=16 but this run has "
                                          r"global_batch_size=32: resume with the same data config, seed and batch size"),
])
def test_bad_input_on_an_existing_run_changes_nothing(reference, env, tmp_path, checksums, args, expected):
    import re

    w = _copy(reference[0], tmp_path)
    before = checksums(w)
    proc = _cli(w, *TINY_FLAGS, "--config.training.num_steps=16", *args, env=env)
    assert re.search(expected, _error_line(proc)), proc.stderr[-2000:]
    assert checksums(w) == before  # config.json, metrics, checkpoints: untouched


def test_image_size_the_unet_cannot_take_stops_before_any_work(env, tmp_path):
    w = tmp_path / "run"
    proc = _cli(w, "--config.data.image_size=28", "--config.model.ch_mult=(1,2,2,2)", env=env)
    line = _error_line(proc)
    assert "data.image_size=28 cannot go through the U-Net" in line and "multiple of 8" in line
    assert "--config.data.image_size=24" in line
    assert not w.exists()  # nothing was created


def test_dataset_not_prepared_gives_the_prepare_command(env, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    proc = _cli(tmp_path / "run", "--config.data.source=tfds", "--config.data.tfds_name=cifar10",
                f"--config.data.tfds_data_dir={data_dir}", "--config.data.image_size=8",
                config="configs/cifar10.py", env=env)
    line = _error_line(proc)
    assert f"python -m ddpm_jax.data.prepare --dataset=cifar10 --data_dir={data_dir}" in line
    assert not (tmp_path / "run").exists()


def test_unwritable_workdir(env, tmp_path):
    # Runs as root here, where a read-only mode does not stop writes: a path under a regular
    # file cannot be created by anyone.
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = _cli(blocker / "run", *TINY_FLAGS, env=env)
    line = _error_line(proc)
    assert f"--workdir={blocker / 'run'} is not a writable directory" in line
    assert "choose a directory you can write to" in line
    if os.geteuid() != 0:  # an ordinary user: a read-only directory too
        readonly = tmp_path / "readonly"
        readonly.mkdir(mode=0o555)
        line = _error_line(_cli(readonly / "run", *TINY_FLAGS, env=env))
        assert "is not a writable directory" in line


def test_eval_with_missing_inception_weights(reference, env, tmp_path, checksums):
    w = _copy(reference[0], tmp_path)
    before = checksums(w)
    missing = tmp_path / "inception_fid.npz"
    proc = _cli(w, *TINY_FLAGS, "--mode=eval", "--config.eval.metric=inception", f"--config.eval.inception_weights={missing}",
                "--config.eval.num_samples=8", "--config.eval.batch_size=8", "--config.eval.chunk_size=8",
                env=env)
    assert proc.returncode == 1
    line = _error_line(proc)
    assert f"FID Inception weights not found at {str(missing)!r}" in line
    assert "python -m ddpm_jax.evaluation.convert_inception" in line
    after = checksums(w)
    assert after == before  # refused before any sample was made


def test_schedule_that_does_not_reach_noise_warns_and_trains(env, tmp_path):
    proc = _cli(tmp_path / "run", "--config.diffusion.num_timesteps=10", "--config.diffusion.beta_end=0.01",
                "--config.training.num_steps=1", "--config.training.sample_every=0",
                "--config.training.steps_per_dispatch=1", "--config.training.batch_size=64",
                config="configs/toy2d.py", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [ln for ln in proc.stderr.splitlines() if "does not reach noise" in ln]
    assert warnings and "alpha_bar_T" in warnings[0], proc.stderr[-3000:]
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "1")


# ---- in-process: non-finite values, damaged checkpoints, full disk ----------------------------


def _toy(num_steps, **training):
    config = toy2d.get_config()
    config.diffusion.num_timesteps = 10
    config.training.update(batch_size=32, num_steps=num_steps, log_every=1, sample_every=0, checkpoint_every=2,
                           steps_per_dispatch=1, keep_checkpoints=10)
    config.training.update(**training)
    return config


class _PoisonedIterator:
    """The training iterator with NaN in the batches of the given (0-based) steps."""

    def __init__(self, it, nan_steps):
        self._it, self._nan_steps, self._count = it, set(nan_steps), 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._it)
        if self._count in self._nan_steps:
            batch = {**batch, "x": np.full_like(batch["x"], np.nan)}
        self._count += 1
        return batch

    def __getattr__(self, name):
        return getattr(self._it, name)


def _poison(monkeypatch, nan_steps):
    original = data.create_train_iterator
    monkeypatch.setattr(data, "create_train_iterator",
                        lambda *a, **k: _PoisonedIterator(original(*a, **k), nan_steps))


def _restore_all(workdir, config):
    model = setup.create_model(config)
    template = setup.abstract_train_state(config, model, data.example_shape(config.data),
                                          parallel.make_mesh(jax.devices()[:1]))
    with checkpointing.Checkpointer(workdir, async_save=False) as ckpt:
        return {s: ckpt.restore_train(template, s) for s in ckpt.all_steps()}


def _all_finite(state):
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state) if np.asarray(x).dtype.kind == "f")


def test_nonfinite_error_names_the_step_and_checkpoints_stay_finite(monkeypatch, tmp_path):
    _poison(monkeypatch, nan_steps=[4])  # the 5th update sees a NaN batch
    config = _toy(8, log_every=7)  # found by the guard of the save at step 6, not by a log
    with pytest.raises(metrics.NonFiniteError, match=r"non-finite loss or gradient at step 5;.*nonfinite=skip"):
        train.train_and_evaluate(config, str(tmp_path))
    restored = _restore_all(str(tmp_path), config)
    assert sorted(restored) == [2, 4]
    assert all(_all_finite(r.state) for r in restored.values())
    assert kr.temporary_checkpoints(str(tmp_path)) == []


def test_nonfinite_skip_counts_the_skipped_updates(monkeypatch, tmp_path):
    _poison(monkeypatch, nan_steps=[4, 5])
    config = _toy(8, log_every=4, nonfinite="skip")
    state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 8 and _all_finite(state)
    lines = kr.metrics_lines(str(tmp_path))
    assert [(m["step"], m["skipped_steps"]) for m in lines] == [(4, 0), (8, 2)]
    restored = _restore_all(str(tmp_path), config)
    assert restored[6].extra["skipped_steps"] == 0  # 2 skips unlogged at step 6 travel with it ...
    assert [not f for m in restored[6].extra["unlogged_metrics"] for f in m["metrics"]["finite"]] == [True, True]
    assert restored[8].extra["skipped_steps"] == 2 and all(_all_finite(r.state) for r in restored.values())


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_a_state_holding_inf_is_never_checkpointed(tmp_path):
    # An lr of 1e39 is inf in float32: the first update makes the params infinite while its own
    # loss was finite, and "skip" then skips every later (NaN) step; the save must refuse.
    config = _toy(4, nonfinite="skip")
    config.optim.update(lr=1e39, warmup_steps=0, grad_clip=0.0)
    with pytest.raises(checkpointing.NonFiniteCheckpointError,
                       match=r"refusing to checkpoint step 2: .*params.* hold NaN or Inf \(nothing was written"):
        train.train_and_evaluate(config, str(tmp_path))
    assert kr.finished_checkpoints(str(tmp_path)) == [] and kr.temporary_checkpoints(str(tmp_path)) == []


def _wait_until_quiet(folder, quiet=1.0, timeout=60.0):
    """Waits until the files under `folder` (names and sizes) stop changing for `quiet` seconds."""
    def listing():
        return sorted((os.path.join(d, f), os.path.getsize(os.path.join(d, f)))
                      for d, _, fs in os.walk(folder) for f in fs if os.path.exists(os.path.join(d, f)))

    last, since, deadline = None, time.time(), time.time() + timeout
    while time.time() < deadline:
        now = listing()
        if now != last:
            last, since = now, time.time()
        elif time.time() - since >= quiet:
            return
        time.sleep(0.05)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(monkeypatch, tmp_path):
    workdir = str(tmp_path)
    original = ocp.JsonCheckpointHandler._save_fn

    async def no_space_for_step_4(self, x, directory):
        if str(directory.parent.name).startswith("4."):  # <workdir>/checkpoints/4.orbax-checkpoint-tmp/<item>
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await original(self, x, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", no_space_for_step_4)
    with pytest.raises(checkpointing.DiskFullError) as info:
        train.train_and_evaluate(_toy(6), workdir)
    message = str(info.value)
    assert "disk full while writing checkpoint step 4" in message and "\n" not in message
    assert "the newest complete checkpoint, step 2, is intact: free space" in message
    assert "rerun the same command" in message
    assert kr.finished_checkpoints(workdir) == [2]
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", original)
    # In this process the array writes of the failed save may still be landing (a real run
    # exits on the error): let them finish before the rerun deletes the unfinished save.
    _wait_until_quiet(os.path.join(workdir, "checkpoints"))
    state = train.train_and_evaluate(_toy(6), workdir)  # space freed: the same command resumes from 2
    assert int(state.step) == 6 and kr.temporary_checkpoints(workdir) == []
    assert [m["step"] for m in kr.metrics_lines(workdir)] == [1, 2, 3, 4, 5, 6]


def test_damaged_checkpoints_fall_back_and_all_damaged_is_an_error(tmp_path, caplog):
    config = _toy(6)
    workdir = str(tmp_path)
    train.train_and_evaluate(config, workdir)
    assert kr.finished_checkpoints(workdir) == [2, 4, 6]
    # Step 6: a missing file (a partial copy); step 4: a truncated one.
    for step, damage in ((6, "delete"), (4, "truncate")):
        files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(workdir, "checkpoints", str(step), "train"))
                 for f in fs if "ocdbt" in d]
        target = max(files, key=os.path.getsize)
        if damage == "delete":
            os.remove(target)
        else:
            with open(target, "r+b") as f:
                f.truncate(os.path.getsize(target) // 2)
    model = setup.create_model(config)
    template = setup.abstract_train_state(config, model, (2,), parallel.make_mesh())
    with checkpointing.Checkpointer(workdir) as ckpt, caplog.at_level("WARNING"):
        restored = checkpoint_recovery.newest_valid(ckpt, template)
        assert restored.step == 2 and ckpt.all_steps() == [2]
    assert sorted(os.listdir(os.path.join(workdir, "corrupt_checkpoints"))) == ["4", "6"]
    assert sum("is unreadable" in r.getMessage() and "resumed from step 2" in r.getMessage()
               for r in caplog.records) == 2
    # Nothing readable left: an error that lists why, and nothing is moved.
    shutil.rmtree(os.path.join(workdir, "checkpoints", "2", "ema_params"))
    with checkpointing.Checkpointer(workdir) as ckpt:
        with pytest.raises(checkpointing.CorruptCheckpointError, match=r"no readable checkpoint under .*step 2: "):
            checkpoint_recovery.newest_valid(ckpt, template)
    assert kr.finished_checkpoints(workdir) == [2]


def test_metrics_log_drops_the_lines_past_the_resume_step_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4, 6)) + '{"step": 8, "lo')
    assert metrics.truncate_jsonl(str(path), 4) == 2
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [2, 4]


def test_config_json_is_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    path.write_text('{"old": true}\n')

    def fail(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        files.write_text(str(path), '{"new": true}\n')
    assert path.read_text() == '{"old": true}\n' and os.listdir(tmp_path) == ["config.json"]
