"""A learned-variance diffusers UNet2DModel (out_channels = 6, scheduler variance_type learned_range)
converts with parity: the U-Net's 6 outputs, and the reverse variance diffusers' scheduler derives."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, schedules
from ddpm_jax.convert import convert_diffusers
from ddpm_jax.convert.diffusers import ConversionError, checkpoint_meta, load_diffusers_unet
from ddpm_jax.models.unet import UNet

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

CONFIG = dict(sample_size=8, in_channels=3, out_channels=6, block_out_channels=[32, 64], layers_per_block=1,
              down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
              act_fn="silu", norm_eps=1e-6, norm_num_groups=32, attention_head_dim=None, dropout=0.0,
              freq_shift=1, flip_sin_to_cos=False, downsample_padding=0, center_input_sample=False,
              time_embedding_type="positional", resnet_time_scale_shift="default", add_attention=True,
              mid_block_scale_factor=1)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                 variance_type="learned_range", prediction_type="epsilon", clip_sample=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(**CONFIG).eval()
    with torch.no_grad():  # every parameter random and non-zero (the zero-initialised output too)
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / float(np.sqrt(p[0].numel())) if p.ndim > 1 else 0.1 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("learned")
    model.save_pretrained(str(root / "unet"))
    os.makedirs(root / "scheduler")
    with open(root / "scheduler" / "scheduler_config.json", "w") as f:
        json.dump(dict(SCHEDULER, _class_name="DDPMScheduler"), f)
    return model, str(root)


def test_six_channel_unet_converts_with_parity(folder, tmp_path):
    model, root = folder
    kwargs, params = load_diffusers_unet(os.path.join(root, "unet"))
    assert kwargs["out_ch"] == 6
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
    t = np.array([3, 700])
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy().transpose(0, 2, 3, 1)
    out = np.asarray(jax.jit(lambda p, x, t: UNet(**kwargs).apply({"params": p}, x, t))(
        params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t, jnp.int32)))
    assert out.shape == (2, 8, 8, 6) and np.abs(ref).max() > 0.1
    np.testing.assert_allclose(out, ref, atol=2e-4, rtol=1e-4)
    meta = convert_diffusers(os.path.join(root, "unet"), str(tmp_path / "out"))
    assert meta.source["var_type"] == "learned_range" and meta.model_kwargs["out_ch"] == 6

    # The reverse variance from the variance channels equals diffusers' DDPMScheduler's (t ≥ 1;
    # at t = 0 diffusers logs β̃_0 clamped at 1e-20, ddpm_jax clips to β̃_1, and no noise is added).
    scheduler = diffusers.DDPMScheduler(**SCHEDULER)
    sched = schedules.Schedule.from_betas(schedules.get_betas("linear", 1000))
    process = diffusion.GaussianDiffusion(sched, var_type="learned_range", loss="hybrid")
    _, var_out = process.split_output(jnp.asarray(ref))
    for i, ti in enumerate(t):
        want = scheduler._get_variance(int(ti), predicted_variance=torch.from_numpy(
            ref[i:i + 1, ..., 3:].transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
        got = process.reverse_variance(jnp.asarray([ti]), 4, var_out[i:i + 1])[1]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_channels_that_do_not_fit_the_variance_are_refused(folder, tmp_path):
    _, root = folder
    sched_dir = tmp_path / "scheduler"
    os.makedirs(sched_dir)
    with open(sched_dir / "scheduler_config.json", "w") as f:
        json.dump(dict(SCHEDULER, variance_type="fixed_large"), f)
    shutil.copytree(os.path.join(root, "unet"), tmp_path / "unet")
    with pytest.raises(ConversionError, match="out_channels=6 with in_channels=3"):
        checkpoint_meta(str(tmp_path / "unet"), {})
