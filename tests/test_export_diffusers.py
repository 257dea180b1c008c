"""Export to diffusers (convert/export_diffusers.py): the round trip diffusers -> ours -> diffusers is
exact (tensors and config), our U-Net's outputs in diffusers' UNet2DModel within 1e-4 (also with a
class embedding), the CLI on a workdir, bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import checkpointing
from ddpm_jax.convert import __main__ as cli
from ddpm_jax.convert import export_diffusers as ex
from ddpm_jax.convert.diffusers import load_diffusers_unet
from ddpm_jax.models.unet import UNet
from ddpm_jax.run_meta import RunMeta
from tests.test_convert import TINY_CONFIG, _diffusers_unet, _save

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from safetensors.numpy import load_file  # noqa: E402

SCHEDULE = dict(name="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02)


def test_round_trip_diffusers_ours_diffusers_is_exact(tmp_path):
    src = _save(_diffusers_unet(TINY_CONFIG), tmp_path / "src")
    kwargs, params = load_diffusers_unet(src)
    out = str(tmp_path / "out")
    ex.export_params(params, RunMeta("unet", kwargs, (8, 8, 3), SCHEDULE, "eps"), out)
    a, b = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors")), load_file(os.path.join(out, ex.WEIGHTS_NAME))
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    loaded = {k: v for k, v in diffusers.UNet2DModel.from_pretrained(out).config.items() if not k.startswith("_")}
    want = {k: v for k, v in diffusers.UNet2DModel.from_pretrained(src).config.items() if not k.startswith("_")}
    assert json.loads(json.dumps(loaded)) == json.loads(json.dumps(want))
    # ... and back again: the same params.
    _, again = load_diffusers_unet(out)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def _random_params(model, shape, seed=0):
    """Init, then every leaf replaced by a non-zero random tensor of a sensible scale."""
    params = model.init(jax.random.key(0), jnp.zeros((1, *shape)), jnp.zeros((1,), jnp.int32), train=False)["params"]
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree.flatten(params)
    new = [jnp.asarray(rng.standard_normal(p.shape) / np.sqrt(max(1, int(np.prod(p.shape[:-1])))), jnp.float32)
           for p in leaves]
    return jax.tree.unflatten(tree, new)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_ours_in_diffusers_within_1e4(tmp_path, num_classes):
    kwargs = dict(ch=32, out_ch=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                  **({"num_classes": num_classes} if num_classes else {}))
    model, shape = UNet(**kwargs), (8, 8, 1)
    params = _random_params(model, shape)
    out = str(tmp_path / "out")
    meta = RunMeta("unet", dict(kwargs, ch_mult=[1, 2], attn_resolutions=[4]), shape, SCHEDULE, "eps")
    ex.export_params(params, meta, out, var_type="fixedsmall")
    theirs_model = diffusers.UNet2DModel.from_pretrained(out).eval()
    x = np.random.default_rng(1).standard_normal((3, *shape)).astype(np.float32)
    t = np.array([0, 17, 999], np.int32)
    y = np.array([0, 2, num_classes], np.int32) if num_classes else None  # the last: the null class
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t),
                                  {"label": jnp.asarray(y)} if num_classes else None, train=False))
    with torch.no_grad():
        theirs = theirs_model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t.astype(np.int64)),
                              class_labels=None if y is None else torch.from_numpy(y.astype(np.int64))).sample
    theirs = theirs.numpy().transpose(0, 2, 3, 1)
    assert np.max(np.abs(ours)) > 0.1
    assert np.max(np.abs(ours - theirs)) <= 1e-4 * max(1.0, np.max(np.abs(ours)))
    with open(os.path.join(out, "scheduler_config.json")) as f:
        sched = diffusers.DDPMScheduler.from_config(json.load(f))
    assert sched.config.variance_type == "fixed_small" and sched.config.prediction_type == "epsilon"
    np.testing.assert_allclose(sched.betas.numpy()[[0, -1]], [1e-4, 0.02], rtol=1e-6)


def test_cli_exports_a_workdir(tmp_path, capsys):
    kwargs = dict(ch=32, out_ch=1, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4], dropout=0.0)
    model = UNet(**{**kwargs, "ch_mult": (1, 2), "attn_resolutions": (4,)})
    params = _random_params(model, (8, 8, 1), seed=3)
    cosine = dict(name="cosine", num_timesteps=100, beta_start=1e-4, beta_end=0.02)
    workdir = str(tmp_path / "wd")
    checkpointing.save_pretrained(workdir, params, RunMeta("unet", kwargs, (8, 8, 1), cosine, "eps").to_dict())
    out = str(tmp_path / "out")
    assert cli.main(["--to-diffusers", workdir, "--out", out, "--var-type", "fixedsmall"]) == 0
    assert "diffusion_pytorch_model.safetensors" in capsys.readouterr().out
    state = load_file(os.path.join(out, ex.WEIGHTS_NAME))
    np.testing.assert_array_equal(state["conv_in.weight"], np.asarray(params["conv_in"]["kernel"]).transpose(3, 2, 0, 1))
    with open(os.path.join(out, "scheduler_config.json")) as f:
        sched = diffusers.DDPMScheduler.from_config(json.load(f))
    assert len(sched.betas) == 100  # the cosine β as trained_betas
    # An output folder that is not empty is refused, with one line.
    assert cli.main(["--to-diffusers", workdir, "--out", out]) == 1
    assert "not empty" in capsys.readouterr().err


def test_inexpressible_model_refused(tmp_path):
    meta = RunMeta("unet", dict(ch=32, out_ch=1, ch_mult=[1], num_res_blocks=1, attn_resolutions=[],
                                resamp_with_conv=False), (8, 8, 1), SCHEDULE, "eps")
    with pytest.raises(ValueError, match="resamp_with_conv=False"):
        ex.export_params({}, meta, str(tmp_path / "o"))
    with pytest.raises(ValueError, match="only UNet2DModel"):
        ex.export_params({}, RunMeta("mlp", {}, (2,), SCHEDULE, "eps"), str(tmp_path / "o"))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_exported_files_are_readable_per_the_umask(tmp_path, capsys, umask, mode):
    kwargs = dict(ch=32, out_ch=1, ch_mult=[1], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    model = UNet(**{**kwargs, "ch_mult": (1,), "attn_resolutions": ()})
    schedule = dict(name="linear", num_timesteps=10, beta_start=1e-4, beta_end=0.02)
    workdir, out = str(tmp_path / "wd"), str(tmp_path / "out")
    checkpointing.save_pretrained(workdir, _random_params(model, (8, 8, 1)),
                                  RunMeta("unet", kwargs, (8, 8, 1), schedule, "eps").to_dict())
    old = os.umask(umask)
    try:
        assert cli.main(["--to-diffusers", workdir, "--out", out]) == 0
    finally:
        os.umask(old)
    written = {name: os.stat(os.path.join(out, name)).st_mode & 0o777 for name in os.listdir(out)}
    assert written == {name: mode for name in (ex.WEIGHTS_NAME, "config.json", "scheduler_config.json")}


def _tiny_digits():
    import ddpm_jax.main  # noqa: F401  (puts the repository root on sys.path for `configs`)
    from configs import digits

    config = digits.get_config()  # diffusion.var_type fixedsmall
    config.model.ch, config.model.ch_mult, config.model.num_res_blocks, config.model.attn_resolutions = 32, (1,), 1, ()
    config.diffusion.num_timesteps = 10
    config.training.update(num_steps=2, sample_every=0, checkpoint_every=2, eval_bpd_after=False)
    config.sampling.update(num_samples=4, batch_size=4)
    return config


def test_a_fixedsmall_run_exports_its_own_scheduler_and_diffusers_reproduces_its_samples(tmp_path, monkeypatch,
                                                                                         capsys):
    """The export reads the run's config.json (no --var-type): DDPMScheduler with the run's fixed_small
    variance and clipping, fed the sampler's own x_T and per-step noise, gives `--mode=sample`'s images."""
    from diffusers.schedulers import scheduling_ddpm

    from ddpm_jax import sampling, train
    from ddpm_jax.modes import sample

    config, workdir, out = _tiny_digits(), str(tmp_path / "run"), str(tmp_path / "out")
    train.train_and_evaluate(config, workdir)
    with np.load(sample.run(config, workdir)["npz"]) as f:
        ours = f["samples"]
    assert cli.main(["--to-diffusers", workdir, "--out", out]) == 0
    with open(os.path.join(out, "scheduler_config.json")) as f:
        stored = json.load(f)
    assert (stored["variance_type"], stored["clip_sample"]) == ("fixed_small", True)

    unet = diffusers.UNet2DModel.from_pretrained(out).eval()
    scheduler = diffusers.DDPMScheduler.from_pretrained(out)
    scheduler.set_timesteps(10)
    keys = sampling.image_keys(int(config.sampling.seed), jnp.arange(4))

    def noise_of(t):
        return torch.from_numpy(np.asarray(sampling.image_noise(keys, t, (8, 8, 1))).transpose(0, 3, 1, 2).copy())

    step_t = {}
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: noise_of(step_t["t"]))
    x = noise_of(10)
    with torch.no_grad():
        for t in scheduler.timesteps:
            step_t["t"] = int(t)
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    theirs = np.clip(x.numpy().transpose(0, 2, 3, 1), -1, 1)
    assert float(np.abs(theirs - ours).max()) < 1e-4 and float(np.abs(ours).max()) > 0.1


def test_a_latent_run_is_not_exported_and_a_conditional_export_names_its_null_class(tmp_path, capsys):
    kwargs = dict(ch=32, out_ch=1, ch_mult=[1], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    model = UNet(**{**kwargs, "ch_mult": (1,), "attn_resolutions": ()})
    schedule = dict(name="linear", num_timesteps=10, beta_start=1e-4, beta_end=0.02)
    latent = str(tmp_path / "latent")
    checkpointing.save_pretrained(latent, _random_params(model, (8, 8, 1)), RunMeta(
        "unet", kwargs, (8, 8, 1), schedule, "eps", latents=dict(autoencoder="workdirs/ae")).to_dict())
    assert cli.main(["--to-diffusers", latent, "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {latent} is a DDPM on the latents of autoencoder 'workdirs/ae'; a diffusers UNet2DModel folder "
        "samples images, not latents to decode, so it is not exported."]
    assert not (tmp_path / "out").exists()
    cond = dict(kwargs, num_classes=10)
    model = UNet(**{**cond, "ch_mult": (1,), "attn_resolutions": ()})
    workdir = str(tmp_path / "cond")
    checkpointing.save_pretrained(workdir, _random_params(model, (8, 8, 1)),
                                  RunMeta("unet", cond, (8, 8, 1), schedule, "eps").to_dict())
    assert cli.main(["--to-diffusers", workdir, "--out", str(tmp_path / "cond_out")]) == 0
    assert ("class labels 0..9; label 10 is the null class (unconditional, for classifier-free guidance), hence "
            "num_class_embeds 11.") in capsys.readouterr().out
