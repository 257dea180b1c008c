"""Tests of the diffusers import (ddpm_jax.convert): parity with diffusers' UNet2DModel, errors, CLI.

Parity: a diffusers UNet2DModel in the layout of the released DDPM ports, with every weight
random (none zero), saved with `save_pretrained`, converted, and run on the same inputs.
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

from ddpm_jax.convert import convert_diffusers
from ddpm_jax.convert.__main__ import main as cli_main
from ddpm_jax.convert.diffusers import ConversionError, load_diffusers_unet
from ddpm_jax.models.unet import UNet
from tests.torch_weights import randomize_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# config.json of google/ddpm-cifar10-32 (the fields the released port sets).
CIFAR10_CONFIG = dict(
    _class_name="UNet2DModel", sample_size=32, in_channels=3, out_channels=3,
    block_out_channels=[128, 256, 256, 256],
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    layers_per_block=2, attention_head_dim=None, norm_eps=1e-6, norm_num_groups=32, act_fn="silu",
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, center_input_sample=False,
    time_embedding_type="positional", mid_block_scale_factor=1,
)
# google/ddpm-church-256 (and celebahq / bedroom / cat): six levels, attention at 16x16.
CHURCH_CONFIG = dict(
    CIFAR10_CONFIG, sample_size=256, block_out_channels=[128, 128, 256, 256, 512, 512],
    down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
)
TINY_CONFIG = dict(
    CIFAR10_CONFIG, sample_size=8, block_out_channels=[32, 64], layers_per_block=1,
    down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
)


def _diffusers_unet(config: dict, seed: int = 0):
    """A diffusers UNet2DModel with every parameter random at a sensible scale (none zero)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    randomize_weights(model)
    return model


def _save(model, directory, **kwargs) -> str:
    model.save_pretrained(str(directory), **kwargs)
    return str(directory)


def _max_parity_error(model, folder, batch, timesteps, seed=1) -> float:
    import torch

    kwargs, params = load_diffusers_unet(folder)
    size = model.config.sample_size
    x = torch.from_numpy(np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32))
    t = torch.tensor(timesteps)
    with torch.no_grad():
        ref = model(x, t).sample.numpy().transpose(0, 2, 3, 1)
    unet = UNet(**kwargs)
    out = jax.jit(lambda p, x, t: unet.apply({"params": p}, x, t))(
        params, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(t.numpy(), jnp.int32))
    assert out.shape == ref.shape
    assert np.abs(ref).max() > 0.1  # a non-trivial function is being compared
    return float(np.abs(np.asarray(out) - ref).max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = _diffusers_unet(TINY_CONFIG)
    return model, _save(model, tmp_path_factory.mktemp("tiny"))


def test_tiny_parity(tiny):
    model, folder = tiny
    kwargs, _ = load_diffusers_unet(folder)
    assert kwargs == dict(ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4],
                          dropout=0.0, resamp_with_conv=True)
    err = _max_parity_error(model, folder, batch=3, timesteps=[0, 417, 999])
    assert err <= 1e-4, err


def test_cifar10_parity_and_parameter_count(tmp_path):
    model = _diffusers_unet(CIFAR10_CONFIG)
    folder = _save(model, tmp_path / "cifar10")
    kwargs, params = load_diffusers_unet(folder)
    assert kwargs == dict(ch=128, out_ch=3, ch_mult=[1, 2, 2, 2], num_res_blocks=2, attn_resolutions=[16],
                          dropout=0.0, resamp_with_conv=True)
    n = sum(p.size for p in jax.tree.leaves(params))
    assert n == sum(p.numel() for p in model.parameters()) == 35_746_307
    err = _max_parity_error(model, folder, batch=2, timesteps=[3, 998])
    assert err <= 1e-4, err


def test_church256_parity(tmp_path):
    model = _diffusers_unet(CHURCH_CONFIG)
    folder = _save(model, tmp_path / "church")
    kwargs, params = load_diffusers_unet(folder)
    assert kwargs["ch_mult"] == [1, 1, 2, 2, 4, 4] and kwargs["attn_resolutions"] == [16]
    assert sum(p.size for p in jax.tree.leaves(params)) == 113_673_219
    err = _max_parity_error(model, folder, batch=1, timesteps=[500])
    assert err <= 1e-4, err


def test_bin_and_deprecated_attention_names_give_the_same_params(tiny, tmp_path):
    model, folder = tiny
    _, ref = load_diffusers_unet(folder)
    # The torch pickle (.bin).
    _, from_bin = load_diffusers_unet(_save(model, tmp_path / "bin", safe_serialization=False))
    # Early ports name the attention Linear layers query/key/value/proj_attn.
    from safetensors.numpy import load_file, save_file

    old = tmp_path / "old"
    shutil.copytree(folder, old)
    state = load_file(str(old / "diffusion_pytorch_model.safetensors"))
    renamed = {}
    for k, v in state.items():
        for new, dep in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{dep}.")
        renamed[k] = v
    assert any(".proj_attn." in k for k in renamed)
    save_file(renamed, str(old / "diffusion_pytorch_model.safetensors"))
    _, from_old = load_diffusers_unet(str(old))
    for other in (from_bin, from_old):
        jax.tree.map(np.testing.assert_array_equal, ref, other)


def _write_config(folder, config) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return str(folder)


@pytest.mark.parametrize("change,match", [
    (dict(flip_sin_to_cos=True), "flip_sin_to_cos"),
    (dict(freq_shift=0), "freq_shift"),
    (dict(norm_eps=1e-5), "norm_eps"),
    (dict(norm_num_groups=16), "norm_num_groups"),
    (dict(downsample_padding=1), "downsample_padding"),
    (dict(act_fn="gelu"), "act_fn"),
    (dict(attention_head_dim=8), "single-head"),
    (dict(up_block_types=["UpBlock2D", "UpBlock2D"]), r"up_block_types\[0\].*mirror"),
    (dict(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"]), "CrossAttnDownBlock2D"),
    (dict(block_out_channels=[32, 48]), "multiples"),
    (dict(class_embed_type="timestep"), "class_embed_type"),
    (dict(time_embedding_type="fourier"), "time_embedding_type"),
    (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift"),
    (dict(mystery_option=1), "mystery_option"),
    (dict(_class_name="UNet2DConditionModel"), "UNet2DConditionModel"),
])
def test_unsupported_config_is_refused(tmp_path, change, match):
    folder = _write_config(tmp_path / "m", dict(TINY_CONFIG, **change))
    with pytest.raises(ConversionError, match=match):
        load_diffusers_unet(folder)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_diffusers_unet(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_diffusers_unet(str(tmp_path / "empty"))
    folder = _write_config(tmp_path / "noweights", TINY_CONFIG)
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_diffusers_unet(folder)


def _rewrite_weights(src, dst, edit) -> str:
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    path = os.path.join(dst, "diffusion_pytorch_model.safetensors")
    state = dict(load_file(path))
    edit(state)
    save_file(state, path)
    return str(dst)


def test_weight_key_errors_name_the_key(tiny, tmp_path):
    _, folder = tiny
    extra = _rewrite_weights(folder, tmp_path / "extra",
                             lambda s: s.update({"class_embedding.weight": np.ones((4, 4), np.float32)}))
    with pytest.raises(ConversionError, match=r"unknown weight keys \['class_embedding.weight'\]"):
        load_diffusers_unet(extra)
    missing = _rewrite_weights(folder, tmp_path / "missing",
                               lambda s: s.pop("down_blocks.1.attentions.0.to_k.bias"))
    with pytest.raises(ConversionError, match=r"down_blocks\.1\.attentions\.0\.to_k\.bias is missing"):
        load_diffusers_unet(missing)
    bad = _rewrite_weights(folder, tmp_path / "shape", lambda s: s.update(
        {"mid_block.resnets.0.conv1.weight": np.ones((64, 64, 1, 1), np.float32)}))
    with pytest.raises(ConversionError, match=r"mid_block\.resnets\.0\.conv1\.weight has shape"):
        load_diffusers_unet(bad)


def test_cli_end_to_end(tiny, tmp_path):
    from ddpm_jax import checkpointing

    _, folder = tiny
    # A pipeline folder: the U-Net in unet/, the DDPMScheduler config in scheduler/.
    pipeline = tmp_path / "pipeline"
    shutil.copytree(folder, pipeline / "unet")
    _write_config(pipeline / "scheduler", {})
    os.rename(pipeline / "scheduler" / "config.json", pipeline / "scheduler" / "scheduler_config.json")
    with open(pipeline / "scheduler" / "scheduler_config.json", "w") as f:
        json.dump(dict(_class_name="DDPMScheduler", beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                       num_train_timesteps=1000, variance_type="fixed_small", prediction_type="epsilon"), f)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "ddpm_jax.convert", "--diffusers", str(pipeline),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout

    assert sorted(os.listdir(out)) == ["checkpoints"]  # the meta lives in the checkpoint, nowhere else
    kwargs, params = load_diffusers_unet(folder)
    meta = checkpointing.read_meta(str(out))
    assert meta["source"]["format"] == "diffusers" and meta["source"]["scheduler"]["beta_end"] == 0.02
    assert meta["model"] == {"name": "unet", "kwargs": kwargs}
    assert meta["data_shape"] == [8, 8, 3] and meta["pred"] == "eps"
    assert meta["schedule"] == dict(name="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02)

    template = jax.eval_shape(lambda: UNet(**kwargs).init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32))["params"])
    with checkpointing.Checkpointer(str(out), async_save=False) as ckpt:
        restored = ckpt.restore_ema_params(template)
    jax.tree.map(np.testing.assert_array_equal, params, restored)

    # A second conversion into the (now non-empty) folder is refused, naming the flag.
    with pytest.raises(FileExistsError, match="--out .* not empty"):
        convert_diffusers(folder, str(out))
    assert cli_main(["--diffusers", folder, "--out", str(out)]) == 1
    assert cli_main(["--diffusers", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2")]) == 1
    assert not os.path.exists(tmp_path / "o2")
