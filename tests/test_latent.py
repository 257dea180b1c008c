"""Diffusion on an autoencoder's latents (`data.latents_from`): training with exact resume, sampling
and eval decoded to images, bits/dim labelled latent, and the one-line refusals."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image, ImageSequence

import ddpm_jax.main  # noqa: F401  (puts the repository root on sys.path for `configs`)
from configs import autoencoder_mnist, digits
from ddpm_jax import checkpointing, checks, data, imaging, parallel, run_meta, sampler, setup, train
from ddpm_jax.data import latents, sources
from ddpm_jax.evaluation import chunked_generation, classifier
from ddpm_jax.modes import autoencoder as ae_mode
from ddpm_jax.modes import bpd as bpd_mode
from ddpm_jax.modes import evaluate, sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ae_config(seed=0):
    """A tiny f=2 autoencoder on the 8x8 digits: 4x4x2 latents, 4 steps."""
    config = autoencoder_mnist.get_config()
    config.data.source, config.data.image_size, config.seed = "digits", 8, seed
    ae = config.autoencoder
    ae.block_out_channels, ae.layers_per_block, ae.latent_channels, ae.norm_num_groups = (16, 16), 1, 2, 8
    ae.batch_size, ae.num_steps, ae.log_every, ae.checkpoint_every = 16, 4, 2, 4
    ae.eval_batch_size, ae.warmup_steps, ae.eval_classifier = 500, 0, False
    return config


@pytest.fixture(scope="module")
def ae_workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ae") / "ae")
    ae_mode.run(_ae_config(), workdir)
    return workdir


def _config(ae_workdir, num_steps=4):
    config = digits.get_config()
    config.data.latents_from = ae_workdir
    config.model.ch, config.model.ch_mult, config.model.num_res_blocks = 32, (1,), 1
    config.model.attn_resolutions = ()
    config.diffusion.num_timesteps = 10
    config.training.update(batch_size=16, num_steps=num_steps, log_every=1, sample_every=4, checkpoint_every=2,
                           num_grid_samples=8, steps_per_dispatch=1)
    config.sampling.update(num_samples=8, batch_size=8, trajectory_every=5)
    config.eval.update(bpd_num_examples=16, bpd_batch_size=16, num_samples=8, batch_size=8, chunk_size=8)
    return config


def _decode(ae_workdir, z):
    """The autoencoder's own decode of normalised latents [..., 4, 4, 2]: pixels, clipped to [-1, 1]."""
    model, params, info = latents.load_autoencoder(ae_workdir)
    z = np.asarray(z, np.float64)
    flat = z.reshape((-1, *z.shape[-3:])) / info["scale_factor"] + info["latent_mean"]
    x = np.asarray(model.apply({"params": params}, flat.astype(np.float32), method="decode"))
    assert x.shape[1:] == (8, 8, 1)  # images of the pixel data's shape, not 4x4x2 latents
    return np.clip(x, -1.0, 1.0).reshape((*z.shape[:-3], 8, 8, 1))


@pytest.fixture(scope="module")
def latent_workdir(ae_workdir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ddpm") / "run")
    train.train_and_evaluate(_config(ae_workdir), workdir)
    return workdir


def test_the_source_is_the_normalised_posterior_mode_and_flips_pick_mirrored_encodings(ae_workdir):
    config = _config(ae_workdir)
    assert data.example_shape(config.data) == (4, 4, 2) and data.image_shape(config.data) == (8, 8, 1)
    model, params, info = latents.load_autoencoder(ae_workdir)
    images = data.load_arrays(config.data, "train", limit=5)["x"]  # still the images
    assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 1)
    mode = model.apply({"params": params}, imaging.as_float(images), method="encode").mode()
    expected = (np.asarray(mode) - info["latent_mean"]) * info["scale_factor"]
    src = data.load_source(config.data, "train")
    np.testing.assert_allclose(src.read(np.arange(5))["x"], expected, rtol=1e-5, atol=1e-5)
    assert src.read([0])["cond"]["label"] == data.load_arrays(config.data, "train", limit=1)["cond"]["label"]

    config.data.random_flip = True
    flipping = data.load_source(config.data, "train")
    batch = flipping.read(np.arange(5))
    flipping.flip_rows(batch, np.arange(5), np.array([True, False, True, False, False]))
    mirrored = latents.load_codec(ae_workdir).encode(images[:, :, ::-1])
    np.testing.assert_allclose(batch["x"][0], mirrored[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batch["x"][1], expected[1], rtol=1e-5, atol=1e-5)


def test_latent_training_records_the_autoencoder_and_resumes_exactly(ae_workdir, latent_workdir, tmp_path):
    meta = checkpointing.read_meta(latent_workdir)
    info = json.load(open(os.path.join(ae_workdir, latents.INFO_FILE)))
    assert meta["data_shape"] == [4, 4, 2] and meta["model"]["kwargs"]["out_ch"] == 2
    assert meta["latents"] == dict(autoencoder=os.path.normpath(ae_workdir), latent_shape=[4, 4, 2],
                                   scale_factor=info["scale_factor"], latent_mean=info["latent_mean"],
                                   autoencoder_step=4)
    # The step-4 grid shows the autoencoder's decode of the EMA sampler's latents.
    run = setup.load_run(_config(ae_workdir), latent_workdir)
    latent = sampler.generate(setup.make_sampler(dataclasses.replace(run, codec=None), _config(ae_workdir)),
                              run.params, num_samples=8, batch_size=8).samples
    expected = imaging.grid_image(_decode(ae_workdir, latent))
    np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(latent_workdir, "samples", "step_4.png"))),
                                  expected[..., 0])

    resumed_dir = str(tmp_path / "resumed")
    assert int(train.train_and_evaluate(_config(ae_workdir, 2), resumed_dir).step) == 2
    resumed = train.train_and_evaluate(_config(ae_workdir, 4), resumed_dir)
    run = setup.create_run(_config(ae_workdir))
    template = setup.abstract_train_state(_config(ae_workdir), run.model, run.shape, run.mesh)
    with checkpointing.Checkpointer(latent_workdir) as ckpt:
        straight, _ = ckpt.restore(template)
    assert int(resumed.step) == int(straight.step) == 4
    for a, b in zip(jax.tree.leaves(jax.device_get((straight.params, straight.ema_params))),
                    jax.tree.leaves(jax.device_get((resumed.params, resumed.ema_params)))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_sample_and_eval_see_decoded_images(ae_workdir, latent_workdir, tmp_path):
    config = _config(ae_workdir)
    paths = sample.run(config, latent_workdir)
    loaded = setup.load_run(config, latent_workdir)
    raw = sampler.generate(setup.make_sampler(dataclasses.replace(loaded, codec=None), config, trajectory_every=5),
                           loaded.params, num_samples=8, batch_size=8)
    assert raw.samples.shape == (8, 4, 4, 2)  # the chain runs on latents, which the autoencoder decodes
    decoded = raw._replace(samples=_decode(ae_workdir, raw.samples), trajectory=_decode(ae_workdir, raw.trajectory),
                           trajectory_x0=_decode(ae_workdir, raw.trajectory_x0))
    with np.load(paths["npz"]) as f:
        assert f["samples"].shape == (8, 8, 8, 1) and f["images"].dtype == np.uint8
        assert f["samples"].min() >= -1 and f["samples"].max() <= 1  # the pixel range
        np.testing.assert_allclose(f["samples"], decoded.samples, atol=1e-5)
        np.testing.assert_array_equal(f["images"], imaging.to_uint8(decoded.samples))
    with Image.open(paths["gif"]) as gif:  # x_t beside x̂_0, every frame decoded
        frames = [np.asarray(frame.convert("L")) for frame in ImageSequence.Iterator(gif)]
    expected = sample._trajectory_frames(decoded, (8, 8, 1))[..., 0]
    assert len(frames) == len(expected) == 2  # x_5 and x_0 of the T = 10 chain
    for frame, want in zip(frames, expected):  # to one level: jit vs eager float32 at the .5 boundaries
        assert np.max(np.abs(frame.astype(int) - want.astype(int))) <= 1
    out_dir, gen = evaluate._generate(config, loaded, str(tmp_path / "step"))
    (_, images), = chunked_generation.read_chunks(out_dir, [0], num_samples=8, chunk_size=8)
    assert gen["images_generated"] == 8 and images.shape == (8, 8, 8, 1) and images.dtype == np.uint8


def test_latents_are_never_clipped_to_the_pixel_range(ae_workdir):
    pixels, on_latents = digits.get_config(), _config(ae_workdir)
    assert setup.create_diffusion(pixels).clip_x0 is True
    assert setup.create_diffusion(on_latents).clip_x0 is False  # though sampling.clip_denoised=True
    assert setup.sampler_tag(on_latents).endswith("_noclip") and "noclip" not in setup.sampler_tag(pixels)
    assert setup.clips_x0(pixels, False) is False


def test_the_feature_classifier_of_a_latent_run_is_the_pixel_one(ae_workdir):
    """The classifier scores decoded images: a latent run must accept the one its pixel data trained."""
    latent_cfg, pixel_cfg = _config(ae_workdir), digits.get_config()
    assert classifier.expected_info(latent_cfg.data) == classifier.expected_info(pixel_cfg.data)
    # while the pipeline's own fingerprint still tells latents from pixels (iterator states)
    assert (sources.source_fingerprint(latent_cfg.data, "train", 10)
            != sources.source_fingerprint(pixel_cfg.data, "train", 10))


def test_bpd_is_labelled_latent(ae_workdir, latent_workdir, capsys):
    result = bpd_mode.run(_config(ae_workdir), latent_workdir)
    assert result["space"] == "latent" and "total_bpd" not in result and result["latent_total_bpd"] > 0
    assert "not comparable" in result["caveat"]
    stored = json.load(open(result["paths"]["json"]))
    assert stored["latent_total_bpd"] == result["latent_total_bpd"]
    assert "step 4: latent-space bits/dim on test (16 examples)" in capsys.readouterr().out


def test_a_missing_autoencoder_is_refused_in_one_line(ae_workdir, tmp_path):
    config = _config(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"data.latents_from='.*nowhere' does not exist; train") as err:
        data.example_shape(config.data)
    assert "\n" not in str(err.value)
    os.makedirs(tmp_path / "empty")
    config.data.latents_from = str(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"has no autoencoder.json; train"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_an_autoencoder_of_other_images_is_refused(ae_workdir, tmp_path):
    config = _config(ae_workdir)
    config.data.image_size = 16
    with pytest.raises(ValueError, match=r"autoencoder of \(8, 8, 1\) images, but data.image_size / num_channels "
                                         r"give \(16, 16, 1\)") as err:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert "\n" not in str(err.value)


def test_resuming_or_sampling_with_another_autoencoder_is_refused(ae_workdir, latent_workdir, tmp_path):
    other = str(tmp_path / "other_ae")
    shutil.copytree(ae_workdir, other)  # the same weights elsewhere: still another autoencoder's name
    config = _config(other, num_steps=6)
    with pytest.raises(run_meta.CheckpointMismatchError,
                       match=r"trained on the latents of autoencoder '.*ae', but the config gives "
                             r"data.latents_from='.*other_ae'") as err:
        train.train_and_evaluate(config, latent_workdir)
    assert "\n" not in str(err.value)
    with pytest.raises(run_meta.CheckpointMismatchError, match="latents.autoencoder"):
        sample.run(config, latent_workdir)
    pixels = _config("")
    with pytest.raises(run_meta.CheckpointMismatchError, match=r"data.latents_from=''"):
        setup.load_run(pixels, latent_workdir)


def test_what_latents_do_not_support_is_refused_before_work(ae_workdir):
    config = _config(ae_workdir)
    for mode, match in (("figures", "--mode=figures is not written"), ("fid_stats", "--mode=fid_stats")):
        with pytest.raises(ValueError, match=match):
            checks.check_config(config, mode)
    config.eval.bpd_method = "ode"
    with pytest.raises(ValueError, match="eval.bpd_method='ode' is not written"):
        checks.check_config(config, "bpd")
    config.model.ch_mult = (1, 2, 2, 2)
    with pytest.raises(ValueError, match="the 4x4 latents of data.latents_from"):
        checks.check_config(config, "train", parallel.make_mesh())


def test_the_encoding_bench_times_the_cache_and_the_on_the_fly_encoder(ae_workdir):
    from bench import latent_encoding

    (record,) = latent_encoding.main([
        f"--config={os.path.join(REPO, 'configs', 'digits.py')}", "--steps=2", f"--config.data.latents_from={ae_workdir}",
        "--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()", "--config.model.num_res_blocks=1",
        "--config.diffusion.num_timesteps=10", "--config.training.batch_size=16"])
    assert record["bench"] == "latent_encoding" and not record["random_autoencoder"]
    assert record["latent_shape"] == [4, 4, 2] and record["num_train"] == 1500
    assert record["cache"]["encode_split_s"] > 0 and record["on_the_fly"]["encode_batch_s"] > 0
    assert record["ddpm_step"]["step_s"] > 0 and len(record["host"]["loadavg"]) == 3


def test_a_converted_diffusers_autoencoder_trains_and_samples_as_latents_from(tmp_path, capsys):
    """`convert --autoencoder-kl` writes what `data.latents_from` reads: diffusers' shift_factor is the
    latent mean, so the codec decodes as diffusers' decode(z / scaling_factor + shift_factor)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from ddpm_jax.convert.__main__ import main as convert_main
    from tests.torch_weights import randomize_weights

    torch.manual_seed(0)
    reference = diffusers.AutoencoderKL(
        in_channels=1, out_channels=1, block_out_channels=[16, 16], layers_per_block=1, latent_channels=2,
        norm_num_groups=8, sample_size=8, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, scaling_factor=0.5, shift_factor=0.25).eval()
    randomize_weights(reference)
    reference.save_pretrained(str(tmp_path / "vae"))
    ae_dir = str(tmp_path / "ae")
    assert convert_main(["--autoencoder-kl", str(tmp_path / "vae"), "--out", ae_dir]) == 0
    assert "latents [4, 4, 2], scale factor 0.5, latent mean 0.25" in capsys.readouterr().out
    info = json.load(open(os.path.join(ae_dir, latents.INFO_FILE)))
    assert (info["scale_factor"], info["latent_mean"], "shift_factor" in info) == (0.5, 0.25, False)

    codec = latents.load_codec(ae_dir)
    z = np.random.default_rng(0).normal(size=(3, 4, 4, 2)).astype(np.float32)
    with torch.no_grad():
        want = reference.decode(torch.from_numpy(z.transpose(0, 3, 1, 2)) / 0.5 + 0.25).sample
    want = np.clip(want.numpy().transpose(0, 2, 3, 1), -1, 1)
    np.testing.assert_allclose(np.asarray(codec.decode_fn(codec.params, z)), want, atol=1e-4)
    images = data.load_arrays(digits.get_config().data, "train", limit=3)["x"]
    with torch.no_grad():
        mode = reference.encode(torch.from_numpy(imaging.as_float(images).transpose(0, 3, 1, 2))).latent_dist.mode()
    np.testing.assert_allclose(codec.encode(images), (mode.numpy().transpose(0, 2, 3, 1) - 0.25) * 0.5, atol=1e-4)

    config, workdir = _config(ae_dir, num_steps=2), str(tmp_path / "run")
    config.training.sample_every = 2
    assert int(train.train_and_evaluate(config, workdir).step) == 2
    assert checkpointing.read_meta(workdir)["latents"]["latent_mean"] == 0.25
    with np.load(sample.run(config, workdir)["npz"]) as f:
        assert f["samples"].shape == (8, 8, 8, 1) and np.isfinite(f["samples"]).all()
