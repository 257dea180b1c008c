"""Tests of the KL autoencoder (models/autoencoder.py), its training mode and the diffusers import.

Parity: a diffusers AutoencoderKL with every weight random (none zero), saved with
`save_pretrained`, imported, and run on the same inputs (as tests/test_convert.py for the U-Net).
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import autoencoder_mnist
from ddpm_jax import checkpointing, data, imaging
from ddpm_jax.convert.__main__ import main as cli_main
from ddpm_jax.convert.autoencoder_kl import convert_autoencoder_kl, load_diffusers_autoencoder
from ddpm_jax.convert.diffusers import ConversionError
from ddpm_jax.data import latents
from ddpm_jax.evaluation import classifier
from ddpm_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian
from ddpm_jax.modes import autoencoder as ae_mode
from tests.torch_weights import randomize_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(block_out_channels=(16, 16), layers_per_block=1, latent_channels=2, norm_num_groups=8)
DIFFUSERS_TINY = dict(in_channels=3, out_channels=3, block_out_channels=[32, 64], layers_per_block=1,
                      latent_channels=4, norm_num_groups=32, sample_size=16,
                      down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
# Stable Diffusion's VAE layout (4 levels, 2 ResNet blocks each, mid attention, 4 latent channels) at
# small widths; SD's own is block_out_channels (128, 256, 512, 512).
DIFFUSERS_SD_SMALL = dict(DIFFUSERS_TINY, block_out_channels=[32, 64, 64, 64], layers_per_block=2, sample_size=32,
                          down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


@pytest.mark.parametrize("widths,f", [((16, 16, 16), 4), ((16, 16, 16, 16), 8)])
def test_shapes(widths, f):
    """Shapes and dtypes by tracing only (jax.eval_shape: nothing is compiled)."""
    model = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=widths, layers_per_block=1,
                          latent_channels=3, norm_num_groups=8)
    assert model.downsampling_factor == f
    assert model.latent_shape((16, 16, 3)) == (16 // f, 16 // f, 3)
    x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]
    assert set(params) == {"encoder", "decoder", "quant_conv", "post_quant_conv"}
    assert len(params["encoder"]) == len(widths) + 4  # conv_in, down_blocks_i, mid_block, conv_norm_out, conv_out
    assert "downsamplers_0" not in params["encoder"][f"down_blocks_{len(widths) - 1}"]
    assert len(params["decoder"]["up_blocks_0"]) == 2 + 1  # layers_per_block + 1 resnets, upsampler
    apply = lambda method: (lambda p, a: model.apply({"params": p}, a, method=method))  # noqa: E731
    posterior = jax.eval_shape(apply("encode"), params, x)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 16 // f, 16 // f, 3)
    z = jax.ShapeDtypeStruct(posterior.mean.shape, jnp.float32)
    assert jax.eval_shape(apply("decode"), params, z).shape == (2, 16, 16, 3)
    x_rec, post = jax.eval_shape(lambda p, a: model.apply({"params": p}, a, jax.random.key(2)), params, x)
    assert x_rec.shape == x.shape and x_rec.dtype == jnp.float32
    assert jax.eval_shape(lambda q: q.kl(), post).shape == (2,)
    assert jax.eval_shape(lambda q: q.sample(jax.random.key(1)), post).shape == (2, 16 // f, 16 // f, 3)


def test_kl_against_the_closed_form_and_sampling():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
    logvar = rng.uniform(-3, 2, size=(3, 2, 2, 4)).astype(np.float32)
    posterior = DiagonalGaussian.from_moments(jnp.concatenate([mean, logvar], axis=-1))
    # KL(N(m, s^2) || N(0, 1)) = -log s + (s^2 + m^2) / 2 - 1/2 per dimension (float64).
    s = np.exp(0.5 * logvar.astype(np.float64))
    want = np.sum(-np.log(s) + (s ** 2 + mean.astype(np.float64) ** 2) / 2 - 0.5, axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(posterior.kl()), want, rtol=1e-5)
    np.testing.assert_array_equal(posterior.mode(), mean)
    # LDM's clamp of the log-variance to [-30, 20].
    clipped = DiagonalGaussian.from_moments(jnp.concatenate([mean, jnp.full_like(mean, 50.0)], axis=-1))
    assert float(clipped.logvar.max()) == 20.0
    # The sample is mean + std * eps, deterministic in its key, with the posterior's moments.
    key = jax.random.key(3)
    np.testing.assert_array_equal(posterior.sample(key), posterior.sample(key))
    many = jax.vmap(lambda k: posterior.sample(k))(jax.random.split(key, 4000))
    np.testing.assert_allclose(np.mean(many, 0), mean, atol=0.15 * s.max())
    np.testing.assert_allclose(np.std(many, 0), s, rtol=0.1)


def test_bad_image_size_is_one_line():
    model = AutoencoderKL(in_channels=1, out_channels=1, **TINY)
    with pytest.raises(ValueError, match="not divisible by the autoencoder's downsampling factor f=2") as err:
        model.init(jax.random.key(0), jnp.zeros((1, 9, 9, 1)))
    assert "\n" not in str(err.value)
    config = _tiny_config()
    config.data.image_size = 6
    config.autoencoder.block_out_channels = (16, 16, 16)
    with pytest.raises(ValueError, match=r"data.image_size=6 is not divisible .* f=4") as err:
        ae_mode.check_config(config)
    assert "\n" not in str(err.value)
    config = _tiny_config()
    config.autoencoder.block_out_channels = (16, 20)
    with pytest.raises(ValueError, match="autoencoder.norm_num_groups=8"):
        ae_mode.check_config(config)
    config = _tiny_config()
    config.autoencoder.loss = "l3"
    with pytest.raises(ValueError, match="autoencoder.loss='l3'"):
        ae_mode.check_config(config)
    config = _tiny_config()
    config.data.latents_from = "workdirs/some_autoencoder"  # need not exist: refused before it is read
    with pytest.raises(ValueError, match=r"trains on the images, but data.latents_from='workdirs/some_autoencoder'"):
        ae_mode.check_config(config)


def test_main_refuses_a_bad_image_size_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ddpm_jax.main", "--config=configs/autoencoder_mnist.py",
         f"--workdir={tmp_path / 'ae'}", "--mode=train_autoencoder", "--config.data.image_size=30"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.image_size=30 is not divisible") and "f=4" in last
    assert not (tmp_path / "ae").exists()


# ---- diffusers parity -------------------------------------------------------------------------


def _diffusers_autoencoder(config: dict, seed: int = 0):
    """A diffusers AutoencoderKL with every parameter random at a sensible scale (none zero)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**config).eval()
    randomize_weights(model)
    return model


@pytest.mark.parametrize("config", [DIFFUSERS_TINY, DIFFUSERS_SD_SMALL], ids=["tiny", "sd_layout"])
def test_diffusers_parity(tmp_path, config):
    import torch

    reference = _diffusers_autoencoder(config)
    reference.save_pretrained(str(tmp_path / "vae"))
    kwargs, params, _ = load_diffusers_autoencoder(str(tmp_path / "vae"))
    assert kwargs["block_out_channels"] == config["block_out_channels"]
    assert sum(p.size for p in jax.tree.leaves(params)) == sum(p.numel() for p in reference.parameters())
    size, f = config["sample_size"], 2 ** (len(config["block_out_channels"]) - 1)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, size, size)).astype(np.float32)
    z = rng.normal(size=(2, 4, size // f, size // f)).astype(np.float32)
    with torch.no_grad():
        dist = reference.encode(torch.from_numpy(x)).latent_dist
        want_mean, want_logvar = (t.numpy().transpose(0, 2, 3, 1) for t in (dist.mean, dist.logvar))
        want_image = reference.decode(torch.from_numpy(z)).sample.numpy().transpose(0, 2, 3, 1)
    model = AutoencoderKL(**kwargs)
    posterior = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))(params, x.transpose(0, 2, 3, 1))
    image = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))(params, z.transpose(0, 2, 3, 1))
    assert np.abs(want_image).max() > 0.1 and np.abs(want_mean).max() > 0.1  # non-trivial functions
    for got, want in ((posterior.mean, want_mean), (posterior.logvar, want_logvar), (image, want_image)):
        assert got.shape == want.shape
        assert float(np.abs(np.asarray(got) - want).max()) <= 1e-4


def _write_config(folder, config) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(config, _class_name="AutoencoderKL"), f)
    return str(folder)


@pytest.mark.parametrize("change,match", [
    (dict(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
     r"down_block_types\[1\]='AttnDownEncoderBlock2D' is not supported"),
    (dict(up_block_types=["UpDecoderBlock2D"]), "up_block_types has 1 entries for 2"),
    (dict(act_fn="gelu"), "act_fn='gelu'"),
    (dict(mystery_option=1), "mystery_option"),
])
def test_unsupported_diffusers_config_is_one_line(tmp_path, change, match):
    folder = _write_config(tmp_path / "vae", dict(DIFFUSERS_TINY, **change))
    with pytest.raises(ConversionError, match=match) as err:
        load_diffusers_autoencoder(folder)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_converted_workdir_and_missing_weight(tmp_path):
    from safetensors.numpy import load_file, save_file

    reference = _diffusers_autoencoder(dict(DIFFUSERS_TINY, scaling_factor=0.5))
    reference.save_pretrained(str(tmp_path / "vae"))
    info = convert_autoencoder_kl(str(tmp_path / "vae"), str(tmp_path / "out"))
    assert info["scale_factor"] == 0.5 and info["latent_shape"] == [8, 8, 4]
    assert json.load(open(tmp_path / "out" / latents.INFO_FILE))["image_shape"] == [16, 16, 3]
    assert checkpointing.read_meta(str(tmp_path / "out"))["model"] == latents.MODEL_NAME
    assert cli_main(["--autoencoder-kl", str(tmp_path / "vae"), "--out", str(tmp_path / "cli")]) == 0
    assert json.load(open(tmp_path / "cli" / latents.INFO_FILE))["latent_shape"] == [8, 8, 4]
    assert cli_main(["--autoencoder-kl", str(tmp_path / "vae"), "--out", str(tmp_path / "cli")]) == 1  # not empty
    model, params, loaded_info = latents.load_autoencoder(str(tmp_path / "out"))
    _, converted, _ = load_diffusers_autoencoder(str(tmp_path / "vae"))
    jax.tree.map(np.testing.assert_array_equal, params, converted)
    assert loaded_info == info and model.latent_channels == 4
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    del state["decoder.mid_block.attentions.0.to_q.weight"]
    save_file(state, str(weights))
    with pytest.raises(ConversionError, match="decoder.mid_block.attentions.0.to_q.weight is missing"):
        load_diffusers_autoencoder(str(tmp_path / "vae"))


# ---- training ---------------------------------------------------------------------------------


def _tiny_config():
    config = autoencoder_mnist.get_config()
    config.data.source, config.data.image_size = "digits", 8
    ae = config.autoencoder
    ae.block_out_channels, ae.layers_per_block = TINY["block_out_channels"], TINY["layers_per_block"]
    ae.latent_channels, ae.norm_num_groups = TINY["latent_channels"], TINY["norm_num_groups"]
    ae.batch_size, ae.num_steps, ae.log_every, ae.checkpoint_every = 16, 6, 3, 3
    ae.eval_batch_size, ae.lr, ae.warmup_steps = 300, 3e-3, 0
    return config


def _mse(model, params, x):
    return float(np.mean((ae_mode.reconstruct(model, params, x, 500).astype(np.float64) - imaging.to_uint8(x)) ** 2))


def test_trained_autoencoder_beats_untrained_and_identity_plus_noise():
    config = _tiny_config()
    model, tx = ae_mode.create_model(config), ae_mode._optimizer(config.autoencoder)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    state = jax.jit(ae_mode._init_state(model, (8, 8, 1), 0, tx))()
    step = ae_mode.make_train_step(model, tx, loss="l1", kl_weight=1e-6, ema_decay=0.0, seed=0, mesh=mesh)
    train = imaging.as_float(data.load_arrays(config.data, "train")["x"])
    test = imaging.as_float(data.load_arrays(config.data, "test")["x"])
    untrained = _mse(model, state.params, test)
    rng = np.random.default_rng(0)
    for _ in range(300):
        state, values = step(state, {"x": jnp.asarray(train[rng.integers(0, len(train), 16)])[None]})
    trained = _mse(model, state.params, test)
    # Identity plus Gaussian noise of std 0.25 (on the [-1, 1] scale), measured on the same uint8 scale.
    noisy = imaging.to_uint8(test + rng.normal(0, 0.25, test.shape))
    baseline = float(np.mean((noisy.astype(np.float64) - imaging.to_uint8(test)) ** 2))
    assert np.isfinite(float(values["loss"][-1]))
    assert trained < untrained / 4 and trained < baseline, (trained, untrained, baseline)


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
    """A quickly trained digits classifier (the metric's instrument; its quality is not tested here)."""
    path = str(tmp_path_factory.mktemp("clf"))
    classifier.save(classifier.train(_tiny_config().data, steps=30), path)
    return path


def test_train_mode_writes_checkpoint_scale_factor_metrics_and_resumes(tmp_path, digits_classifier, capsys):
    config = _tiny_config()
    config.eval.classifier_path = digits_classifier
    workdir = str(tmp_path / "ae")
    out = ae_mode.run(config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    info = json.load(open(os.path.join(workdir, latents.INFO_FILE)))
    assert info["step"] == 6 and info["latent_shape"] == [4, 4, 2] and info["image_shape"] == [8, 8, 1]
    assert info["model_kwargs"] == ae_mode.model_kwargs(config)
    assert np.isfinite(info["scale_factor"]) and info["scale_factor"] > 0
    assert info["scale_examples"] == 1500
    assert abs(info["scale_factor"] * info["latent_std"] - 1) < 1e-9
    metrics = json.load(open(os.path.join(workdir, ae_mode.METRICS_FILE)))
    assert metrics["num_images"] == 297 and np.isfinite(metrics["psnr"])
    assert metrics["metrics"]["fd"] > 0 and metrics["floor"]["fd"] > 0 and "ratio" in metrics
    assert out["metrics"]["psnr"] == metrics["psnr"]
    assert os.path.getsize(os.path.join(workdir, ae_mode.PICTURE_FILE)) > 0
    model, params, loaded_info = latents.load_autoencoder(workdir)
    assert loaded_info == info and model.downsampling_factor == 2
    assert jax.tree.structure(params) == jax.tree.structure(jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("autoencoder step 6: test PSNR") and "x floor" in line and "scale factor" in line

    # Resume: with checkpoint 6 gone, the rerun resumes from 3 and ends with the same step-6 params.
    model = ae_mode.create_model(config)
    template = jax.eval_shape(ae_mode._init_state(model, (8, 8, 1), 0, ae_mode._optimizer(config.autoencoder)))

    def restore(step):
        with checkpointing.Checkpointer(workdir, async_save=False) as ckpt:
            return ckpt.restore_train(template, step)

    first = restore(6)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
    config.autoencoder.eval_classifier = False
    ae_mode.run(config, workdir)
    again = restore(6)
    assert again.step == 6 and again.data_state == first.data_state
    jax.tree.map(np.testing.assert_array_equal, first.state.params, again.state.params)
    jax.tree.map(np.testing.assert_array_equal, first.state.opt_state, again.state.opt_state)

    # Another autoencoder into the same workdir is refused, naming what differs.
    config.autoencoder.latent_channels = 3
    with pytest.raises(ValueError, match="another autoencoder"):
        ae_mode.run(config, workdir)

