"""Import a diffusers `AutoencoderKL` (e.g. the Stable Diffusion VAE) into `models.autoencoder`.

Users bring the weights: a folder with `config.json` and `diffusion_pytorch_model.safetensors`
(or `.bin`, needs torch), as a local snapshot of `stabilityai/sd-vae-ft-mse`; a pipeline folder
whose VAE sits in `vae/` works too. The mapping is the U-Net import's (`convert/diffusers.py`):
a renaming (`encoder.down_blocks.0.resnets.1.conv1.weight` ->
`encoder/down_blocks_0/resnets_1/conv1/kernel`) plus layout changes (conv OIHW -> HWIO, Linear
(out, in) -> (in, out), GroupNorm weight -> scale). What the Flax module cannot represent
(another block type or activation) is refused on the config with one line naming the field.

    python -m ddpm_jax.convert --autoencoder-kl DIR --out AE_WORKDIR

writes a params-only checkpoint and `autoencoder.json` (the hyper-parameters and the config's
`scaling_factor`) that `--mode=train_autoencoder`'s readers use like a trained one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import checkpointing, files
from ddpm_jax.convert.diffusers import (CONFIG_NAME, ConversionError, _to_flax, _torch_key, load_state_dict,
                                       read_diffusers_config)
from ddpm_jax.models.autoencoder import AutoencoderKL

# AutoencoderKL.__init__ defaults (diffusers 0.42) for fields a config.json leaves out.
DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,), layers_per_block=1, act_fn="silu",
    latent_channels=4, norm_num_groups=32, sample_size=32, scaling_factor=0.18215, shift_factor=None,
    latents_mean=None, latents_std=None, force_upcast=True, use_quant_conv=True, use_post_quant_conv=True,
    mid_block_add_attention=True,
)
INFO_FILE = "autoencoder.json"  # written beside the checkpoint (the same name as the training mode's)
MODEL_NAME = "autoencoder_kl"


def find_model_dir(path: str) -> str:
    """The folder holding the VAE's config.json: `path` itself or `path/vae` (a pipeline)."""
    for candidate in (path, os.path.join(path, "vae")):
        if os.path.isfile(os.path.join(candidate, CONFIG_NAME)):
            return candidate
    raise FileNotFoundError(f"no {CONFIG_NAME} in {path} or {path}/vae; pass the folder of a diffusers "
                            "AutoencoderKL (config.json + diffusion_pytorch_model.safetensors).")


def read_config(model_dir: str) -> dict:
    """config.json with diffusers' defaults for absent fields; ConversionError for another class."""
    return read_diffusers_config(model_dir, "AutoencoderKL", DIFFUSERS_DEFAULTS, "AutoencoderKL",
                                 "the autoencoder is the AutoencoderKL it can represent")


def autoencoder_kwargs_from_config(config: dict) -> dict:
    """`AutoencoderKL` keyword arguments (JSON-able) of a diffusers config; ConversionError if inexpressible."""
    levels = len(config["block_out_channels"])
    for field, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        kinds = list(config[field])
        if len(kinds) != levels:
            raise ConversionError(f"config {field} has {len(kinds)} entries for {levels} block_out_channels; "
                                  "they must match.")
        for i, kind in enumerate(kinds):
            if kind != want:
                raise ConversionError(f"config {field}[{i}]={kind!r} is not supported; the Flax AutoencoderKL "
                                      f"has only {want!r} blocks.")
    if config["act_fn"] not in ("silu", "swish"):
        raise ConversionError(f"config act_fn={config['act_fn']!r} is not supported; the Flax AutoencoderKL "
                              "uses silu (swish).")
    return dict(in_channels=int(config["in_channels"]), out_channels=int(config["out_channels"]),
                block_out_channels=[int(c) for c in config["block_out_channels"]],
                layers_per_block=int(config["layers_per_block"]), latent_channels=int(config["latent_channels"]),
                norm_num_groups=int(config["norm_num_groups"]),
                mid_block_add_attention=bool(config["mid_block_add_attention"]),
                use_quant_conv=bool(config["use_quant_conv"]),
                use_post_quant_conv=bool(config["use_post_quant_conv"]))


def _rename_attention(key: str) -> str:
    """Early VAE ports name the mid-block attention query/key/value/proj_attn (diffusers renames too)."""
    for old, new in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0")):
        key = key.replace(f".attentions.0.{old}.", f".attentions.0.{new}.")
    return key


def convert_state_dict(state_dict: dict[str, np.ndarray], kwargs: dict) -> dict:
    """Maps every diffusers weight onto the Flax params; every key must be used exactly once."""
    state = {_rename_attention(k): v for k, v in state_dict.items()}
    model = AutoencoderKL(**kwargs)
    size = 2 * model.downsampling_factor
    template = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, size, size, model.in_channels), jnp.float32)))["params"]
    flat = jax.tree_util.tree_flatten_with_path(template)[0]
    leaves = []
    for path, leaf in flat:
        key = _torch_key(tuple(p.key for p in path))
        if key not in state:
            raise ConversionError(f"weight {key} is missing from the checkpoint; it does not match its config.json.")
        leaves.append(jnp.asarray(_to_flax(key, state.pop(key), leaf.shape), leaf.dtype))
    if state:
        names = sorted(state)
        raise ConversionError(f"unknown weight keys {names[:5]}{' ...' if len(names) > 5 else ''} "
                              f"({len(names)} in all) have no place in the Flax AutoencoderKL.")
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


def load_diffusers_autoencoder(path: str) -> tuple[dict, dict, dict]:
    """(AutoencoderKL keyword arguments, params, the diffusers config) of a diffusers folder."""
    model_dir = find_model_dir(path)
    config = read_config(model_dir)
    kwargs = autoencoder_kwargs_from_config(config)
    return kwargs, convert_state_dict(load_state_dict(model_dir), kwargs), config


def convert_autoencoder_kl(src: str, out: str) -> dict:
    """Writes the diffusers AutoencoderKL at `src` as an autoencoder workdir `out`; returns its info.

    The info (`out/autoencoder.json`) has the model kwargs, the config's sample size as the image
    shape, the latent shape and the normalisation `data.latents` applies, z = (mode - latent_mean) *
    scale_factor: diffusers encodes (mode - shift_factor) * scaling_factor and decodes
    D(z / scaling_factor + shift_factor), so `scale_factor` is the config's `scaling_factor`
    (0.18215 for SD) and `latent_mean` its `shift_factor` (0 where it has none).
    """
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"--out {out} exists and is not empty; pass a new or empty directory.")
    kwargs, params, config = load_diffusers_autoencoder(src)
    size = config["sample_size"]
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    image_shape = [int(height), int(width), kwargs["in_channels"]]
    latent_shape = list(AutoencoderKL(**kwargs).latent_shape(image_shape))
    meta = dict(model=MODEL_NAME, model_kwargs=kwargs, image_shape=image_shape, latent_shape=latent_shape,
                source=dict(format="diffusers", path=os.path.abspath(src)))
    os.makedirs(out, exist_ok=True)
    checkpointing.save_pretrained(out, params, meta)
    shift = config.get("shift_factor")
    info = dict(meta, step=0, scale_factor=float(config["scaling_factor"]),
                latent_mean=0.0 if shift is None else float(shift),
                scale_source="diffusers config.json scaling_factor and shift_factor")
    files.write_json(os.path.join(out, INFO_FILE), info)
    return info


__all__ = ["autoencoder_kwargs_from_config", "convert_autoencoder_kl", "load_diffusers_autoencoder"]
