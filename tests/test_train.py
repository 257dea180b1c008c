"""End-to-end training: tfds (mock CIFAR-10), digits and toy2d; resume; non-finite policy; sample mode."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import ddpm_jax.main  # noqa: F401  (puts the repository root on sys.path for `configs`)
from configs import cifar10, digits, toy2d
from ddpm_jax import checkpointing, data, metrics, parallel, run_meta, setup, train
from ddpm_jax.modes import sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _main(workdir, *args, config="configs/digits.py", check=True):
    cmd = [sys.executable, "-m", "ddpm_jax.main", f"--config={config}", f"--workdir={workdir}", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


TINY_UNET = ["--config.model.ch_mult=(1,)", "--config.model.num_res_blocks=1",
             "--config.model.attn_resolutions=()", "--config.diffusion.num_timesteps=20"]


def test_cifar10_mock_tfds_end_to_end(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = cifar10.get_config()
    config.model.ch, config.model.ch_mult, config.model.num_res_blocks = 32, (1,), 1
    config.model.attn_resolutions = ()
    config.diffusion.num_timesteps = 10
    config.training.update(batch_size=8, num_steps=3, log_every=1, sample_every=3, checkpoint_every=2,
                           num_grid_samples=4)
    workdir = str(tmp_path)
    with tfds.testing.mock_data(num_examples=24):
        state = train.train_and_evaluate(config, workdir)
    assert int(state.step) == 3
    lines = _metrics(workdir)
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert all(np.isfinite(m["loss"]) and m["images_per_sec"] > 0 and m["lr"] >= 0 for m in lines)
    assert Image.open(os.path.join(workdir, "samples", "step_3.png")).mode == "RGB"
    with checkpointing.Checkpointer(workdir) as ckpt:
        assert ckpt.all_steps() == [2, 3]
    assert checkpointing.read_meta(workdir)["data_shape"] == [32, 32, 3]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "tb")))


@pytest.fixture(scope="module")
def digits_workdir(tmp_path_factory):
    """A tiny digits run through the command line, as `make demo` runs it: 4 steps, checkpoints
    at 2 and 4, then test bits/dim (training.eval_bpd_after) on 32 test digits. (workdir, stdout)"""
    workdir = str(tmp_path_factory.mktemp("digits") / "run")
    proc = _main(workdir, *TINY_UNET, "--config.training.num_steps=4", "--config.training.log_every=2",
                 "--config.training.sample_every=4", "--config.training.checkpoint_every=2",
                 "--config.training.batch_size=16", "--config.training.num_grid_samples=8",
                 "--config.eval.bpd_num_examples=32", "--config.training.eval_bpd_after=True")
    return workdir, proc.stdout


def _tiny_digits_config():
    config = digits.get_config()
    config.model.ch_mult, config.model.num_res_blocks, config.model.attn_resolutions = (1,), 1, ()
    config.diffusion.num_timesteps = 20
    return config


def test_digits_main_writes_config_metrics_samples_checkpoints(digits_workdir):
    workdir, stdout = digits_workdir
    with open(os.path.join(workdir, "config.json")) as f:
        written = json.load(f)
    assert written["training"]["num_steps"] == 4 and written["model"]["ch_mult"] == [1]
    assert [m["step"] for m in _metrics(workdir)] == [2, 4]
    assert os.path.isfile(os.path.join(workdir, "samples", "step_4.png"))
    with checkpointing.Checkpointer(workdir) as ckpt:
        assert ckpt.all_steps() == [2, 4]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "tb")))
    # The closing lines say where everything is, then the test bits/dim.
    loss = _metrics(workdir)[-1]["loss"]
    assert "trained to step 4 in " in stdout and f"final loss {loss:.4f}" in stdout
    assert f"samples:     {os.path.join(workdir, 'samples', 'step_4.png')}" in stdout
    assert f"metrics:     {os.path.join(workdir, 'metrics.jsonl')}" in stdout
    with open(os.path.join(workdir, "eval", "bpd_4.json")) as f:
        bpd = json.load(f)
    assert bpd["num_examples"] == 32 and bpd["total_bpd"] > 0
    assert f"step 4: bits/dim on test (32 examples): {bpd['total_bpd']:.4f}" in stdout


def test_sample_mode_writes_grid_npz_and_trajectory_gif(digits_workdir):
    workdir, _ = digits_workdir
    _main(workdir, *TINY_UNET, "--mode=sample", "--config.sampling.num_samples=10",
          "--config.sampling.batch_size=8", "--config.sampling.trajectory_every=5")
    assert os.path.isfile(os.path.join(workdir, "config_sample.json"))
    out = os.path.join(workdir, "samples")
    grid = Image.open(os.path.join(out, "sample_ddpm_step4_seed0_n10.png"))
    assert grid.size[0] >= 64
    arrays = np.load(os.path.join(out, "sample_ddpm_step4_seed0_n10.npz"))
    assert arrays["samples"].shape == (10, 8, 8, 1) and arrays["images"].dtype == np.uint8
    assert np.abs(arrays["samples"]).max() <= 1.0 + 1e-6
    gif = Image.open(os.path.join(out, "trajectory_ddpm_step4_seed0_n10_every5.gif"))
    assert gif.n_frames == 20 // 5  # x_t (and predicted x0) every 5 of the 20 steps


def test_sample_mode_partial_denoising_ddim_and_model_mismatch(digits_workdir):
    workdir, _ = digits_workdir
    config = _tiny_digits_config()
    config.sampling.update(num_samples=4, batch_size=8, init_image="camera", start_step=10,
                           method="ddim", steps=5)
    paths = sample.run(config, workdir)
    for kind in ("original", "noised", "denoised"):
        assert os.path.basename(paths[kind]) == f"partial_ddim5_step4_seed0_n4_k10_{kind}.png"
        assert os.path.isfile(paths[kind])
    arrays = np.load(paths["npz"])
    assert arrays["noised"].shape == arrays["denoised"].shape == (4, 8, 8, 1)
    assert not np.allclose(arrays["noised"][0], arrays["noised"][1])  # each copy has its own noise

    config.model.ch = 64
    with pytest.raises(run_meta.CheckpointMismatchError, match="model.kwargs.ch=32"):
        sample.run(config, workdir)


def test_toy2d_main_writes_scatter_grid(tmp_path):
    workdir = str(tmp_path)
    _main(workdir, "--config.training.num_steps=6", "--config.training.log_every=3",
          "--config.training.sample_every=6", "--config.training.checkpoint_every=3",
          "--config.training.batch_size=64", "--config.training.num_grid_samples=50",
          "--config.diffusion.num_timesteps=10", "--config.training.steps_per_dispatch=3",
          config="configs/toy2d.py")
    assert [m["step"] for m in _metrics(workdir)] == [3, 6]
    picture = np.asarray(Image.open(os.path.join(workdir, "samples", "step_6.png")))
    assert picture.ndim == 3 and picture.shape[0] > 100
    assert checkpointing.read_meta(workdir)["model"]["name"] == "mlp"


def _toy_config(num_steps):
    config = toy2d.get_config()
    config.diffusion.num_timesteps = 10
    # One step per dispatch: the toy2d config dispatches 10, and logs fall on dispatch boundaries.
    config.training.update(batch_size=32, num_steps=num_steps, log_every=1, sample_every=0,
                           checkpoint_every=3, steps_per_dispatch=1)
    return config


def test_resume_continues_with_the_same_batches_and_params(tmp_path):
    straight = train.train_and_evaluate(_toy_config(6), str(tmp_path / "straight"))
    resumed_dir = str(tmp_path / "resumed")
    half = train.train_and_evaluate(_toy_config(3), resumed_dir)
    assert int(half.step) == 3
    with checkpointing.Checkpointer(resumed_dir) as ckpt:
        _, data_state = ckpt.restore(half)
    # The saved iterator state gives the 4th batch of an uninterrupted stream.
    fresh = data.create_train_iterator(_toy_config(6).data, global_batch_size=32, seed=0)
    expected = [next(fresh)["x"] for _ in range(4)][-1]
    it = data.create_train_iterator(_toy_config(6).data, global_batch_size=32, seed=0)
    it.set_state(data_state)
    np.testing.assert_array_equal(next(it)["x"], expected)

    resumed = train.train_and_evaluate(_toy_config(6), resumed_dir)
    assert int(resumed.step) == 6
    for a, b in zip(jax.tree.leaves(jax.device_get((straight.params, straight.ema_params))),
                    jax.tree.leaves(jax.device_get((resumed.params, resumed.ema_params)))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    steps = [m["step"] for m in _metrics(resumed_dir)]
    assert steps == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([m["loss"] for m in _metrics(resumed_dir)],
                               [m["loss"] for m in _metrics(str(tmp_path / "straight"))], rtol=1e-5)


def test_resume_refuses_a_different_model(tmp_path):
    train.train_and_evaluate(_toy_config(1), str(tmp_path))
    config = _toy_config(2)
    config.model.mlp_hidden = 64
    with pytest.raises(run_meta.CheckpointMismatchError, match="model.kwargs.hidden=128"):
        train.train_and_evaluate(config, str(tmp_path))


def test_nonfinite_error_names_the_step(tmp_path):
    config = _toy_config(4)
    config.optim.update(lr=1e38, warmup_steps=0, grad_clip=0.0)
    with pytest.raises(metrics.NonFiniteError, match=r"non-finite loss or gradient at step [12]\b"):
        train.train_and_evaluate(config, str(tmp_path))
    assert checkpointing.read_meta(str(tmp_path)) is None  # nothing non-finite was checkpointed


def test_lr_decay_is_validated_before_any_work(tmp_path):
    for overrides, match in ((dict(lr_decay="exponential"), "optim.lr_decay='exponential' is unknown"),
                             (dict(lr_decay="cosine", warmup_steps=4), r"more steps \(4\) than warmup steps \(4\)")):
        config = _toy_config(4)
        config.optim.update(overrides)
        with pytest.raises(ValueError, match=match):
            train.train_and_evaluate(config, str(tmp_path))
        assert not (tmp_path / "config.json").exists() and checkpointing.read_meta(str(tmp_path)) is None


def test_batch_not_divisible_by_devices(tmp_path):
    config = _toy_config(1)
    config.training.batch_size = 12
    with pytest.raises(ValueError, match=r"training.batch_size=12 is not divisible by the 8 devices"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")  # refused before the workdir was made


def test_sample_mode_reads_a_converted_checkpoint(tmp_path):
    config = _tiny_digits_config()
    config.diffusion.num_timesteps = 5
    config.sampling.update(num_samples=3, batch_size=8)
    model = setup.create_model(config)
    params = jax.device_get(setup.init_params(model, (8, 8, 1), 0, parallel.make_mesh()))
    meta = dataclasses.replace(run_meta.RunMeta.from_config(config), source={"format": "test"})
    out = tmp_path / "converted"
    checkpointing.save_pretrained(str(out), params, meta.to_dict())
    paths = sample.run(config, str(out))
    assert os.path.basename(paths["grid"]) == "sample_ddpm_step0_seed0_n3.png"
    assert np.load(paths["npz"])["samples"].shape == (3, 8, 8, 1)

    config.model.ch = 64  # the converted checkpoint's own meta decides what it holds
    with pytest.raises(run_meta.CheckpointMismatchError, match="model.kwargs.ch=32.*model.kwargs.ch=64"):
        sample.run(config, str(out))
