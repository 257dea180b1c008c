"""Import a diffusers `UNet2DModel` checkpoint (the ports of the released DDPM models) into `UNet`.

Reads a folder in the layout of `google/ddpm-cifar10-32` and `google/ddpm-{celebahq,church,
bedroom,cat}-256`: `config.json` plus `diffusion_pytorch_model.safetensors` (NumPy loader) or
`diffusion_pytorch_model.bin` (needs torch). A pipeline folder whose U-Net sits in `unet/` works too.

The mapping is a renaming (`down_blocks.0.resnets.1.conv1.weight` ->
`down_blocks_0/resnets_1/conv1/kernel`) plus layout changes: conv OIHW -> HWIO, Linear
(out, in) -> (in, out), GroupNorm weight -> scale. The conventions that make the two networks
the same function are checked on the config, not assumed: GroupNorm(32, eps=1e-6), swish,
sinusoidal embedding with flip_sin_to_cos=False and freq_shift=1 (= the official
`get_timestep_embedding`), single-head attention, downsample_padding=0 (pad right/bottom, as
TF 'SAME' with stride 2), [h, skip] concatenation (both do this).

Class-conditional models (`num_class_embeds=N`, `class_embed_type=None`: diffusers'
`nn.Embedding(N, 4ch)` added to the timestep embedding, the same function as `UNet`'s
`class_embedding`) import as `num_classes = N - 1`: `UNet` keeps its null class in the last
row, so a model trained with classifier-free guidance in that layout maps exactly; for a model
trained without a null class, row N - 1 is then simply its last class, and guidance
(guidance_scale > 0) has no meaning for it.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax.models.layers import NORM_EPS, NUM_GROUPS
from ddpm_jax.models.unet import UNet
from ddpm_jax.run_meta import RunMeta

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SCHEDULER_NAME = "scheduler_config.json"

# UNet2DModel.__init__ defaults (diffusers 0.42), used for fields a config.json leaves out.
DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type="positional", time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D",
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=1, downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu",
    attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5,
    resnet_time_scale_shift="default", add_attention=True, class_embed_type=None,
    num_class_embeds=None, num_train_timesteps=None,
)
# Fields this U-Net needs at exactly this value (the official DDPM network).
REQUIRED: dict[str, Any] = dict(
    center_input_sample=False, time_embedding_type="positional", freq_shift=1, flip_sin_to_cos=False,
    mid_block_type="UNetMidBlock2D", mid_block_scale_factor=1, downsample_padding=0,
    downsample_type="conv", upsample_type="conv", norm_num_groups=NUM_GROUPS,
    resnet_time_scale_shift="default", add_attention=True, class_embed_type=None,
)
# Deprecated attention names of early diffusers ports (diffusers renames them on load too).
_DEPRECATED_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_NUMBERED = re.compile(r"(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers)_(\d+)")


class ConversionError(ValueError):
    """The checkpoint is not one this U-Net can express, or its weights do not fit it."""


def find_model_dir(path: str) -> str:
    """The folder holding the U-Net's config.json: `path` itself or `path/unet` (a pipeline)."""
    for candidate in (path, os.path.join(path, "unet")):
        if os.path.isfile(os.path.join(candidate, CONFIG_NAME)):
            return candidate
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory; pass the downloaded diffusers model folder "
                                "(e.g. a local snapshot of google/ddpm-cifar10-32).")
    raise FileNotFoundError(f"no {CONFIG_NAME} in {path} or {path}/unet; pass the folder of a diffusers "
                            "UNet2DModel (config.json + diffusion_pytorch_model.safetensors).")


def read_diffusers_config(model_dir: str, class_name: str, defaults: Mapping[str, Any], what: str,
                          unchecked: str) -> dict:
    """`model_dir`'s config.json with `defaults` filled in for absent fields (`_`-fields dropped).

    ConversionError, one line naming the problem, for a config of another `_class_name` than
    `class_name` ("only {what} can be imported") or with a field `defaults` does not name
    ("it cannot check that {unchecked}"). A config without `_class_name` is taken as `class_name`.
    """
    with open(os.path.join(model_dir, CONFIG_NAME)) as f:
        raw = json.load(f)
    if raw.get("_class_name", class_name) != class_name:
        raise ConversionError(f"{model_dir}/{CONFIG_NAME} describes a {raw['_class_name']}; only "
                              f"{what} can be imported.")
    unknown = sorted(k for k in raw if not k.startswith("_") and k not in defaults)
    if unknown:
        raise ConversionError(f"{model_dir}/{CONFIG_NAME} has fields {unknown} this converter does not "
                              f"know; it cannot check that {unchecked}.")
    return {**defaults, **{k: v for k, v in raw.items() if not k.startswith("_")}}


def read_config(model_dir: str) -> dict:
    """The UNet2DModel's config.json with diffusers' defaults filled in for absent fields."""
    return read_diffusers_config(model_dir, "UNet2DModel", DIFFUSERS_DEFAULTS, "UNet2DModel (the DDPM U-Net)",
                                 "the U-Net is the DDPM one")


def image_shape(config: dict) -> tuple[int, int, int]:
    """(H, W, C) of the images the checkpoint was trained on."""
    size = config["sample_size"]
    if size is None:
        raise ConversionError("config.json has no sample_size; the attention resolutions depend on it.")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(h), int(w), int(config["in_channels"])


def unet_kwargs_from_config(config: dict) -> dict:
    """`UNet` keyword arguments (JSON-able) for a diffusers config; ConversionError if inexpressible."""
    for key, want in REQUIRED.items():
        if config[key] != want:
            raise ConversionError(f"config {key}={config[key]!r}, but the DDPM U-Net needs {key}={want!r}; "
                                  "this checkpoint is a different architecture.")
    if config["act_fn"] not in ("silu", "swish"):
        raise ConversionError(f"config act_fn={config['act_fn']!r}; the DDPM U-Net uses swish (silu).")
    if not math.isclose(float(config["norm_eps"]), NORM_EPS, rel_tol=1e-3):
        raise ConversionError(f"config norm_eps={config['norm_eps']}; the DDPM U-Net uses GroupNorm "
                              f"eps={NORM_EPS}.")
    if config["attn_norm_num_groups"] not in (None, NUM_GROUPS):
        raise ConversionError(f"config attn_norm_num_groups={config['attn_norm_num_groups']}; "
                              f"the DDPM U-Net needs None or {NUM_GROUPS}.")
    channels = [int(c) for c in config["block_out_channels"]]
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ConversionError(f"block_out_channels={channels} are not multiples of the first ({ch}).")
    if config["time_embedding_dim"] not in (None, 4 * ch):
        raise ConversionError(f"config time_embedding_dim={config['time_embedding_dim']}; the DDPM U-Net "
                              f"uses 4 * block_out_channels[0] = {4 * ch}.")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    if len(down) != len(channels) or len(up) != len(channels):
        raise ConversionError(f"{len(down)} down / {len(up)} up block types for {len(channels)} levels.")
    height = image_shape(config)[0]
    if height % 2 ** (len(channels) - 1):
        raise ConversionError(f"sample_size {height} is not divisible by 2**{len(channels) - 1}.")
    attn_resolutions = []
    for i, kind in enumerate(down):
        mirror = up[len(up) - 1 - i]
        if kind not in ("DownBlock2D", "AttnDownBlock2D"):
            raise ConversionError(f"down_block_types[{i}]={kind!r}; only DownBlock2D / AttnDownBlock2D.")
        want_up = "AttnUpBlock2D" if kind == "AttnDownBlock2D" else "UpBlock2D"
        if mirror != want_up:
            raise ConversionError(f"up_block_types[{len(up) - 1 - i}]={mirror!r} does not mirror "
                                  f"down_block_types[{i}]={kind!r}; the DDPM U-Net needs {want_up!r}.")
        if kind == "AttnDownBlock2D":
            attn_resolutions.append(height // 2**i)
    head_dim = config["attention_head_dim"]
    attn_channels = [channels[i] for i, k in enumerate(down) if k == "AttnDownBlock2D"] + [channels[-1]]
    if head_dim is not None and any(c != head_dim for c in attn_channels):
        raise ConversionError(f"attention_head_dim={head_dim} gives multi-head attention on {attn_channels} "
                              "channels; the DDPM U-Net has single-head attention (attention_head_dim None).")
    kwargs = dict(ch=ch, out_ch=int(config["out_channels"]), ch_mult=[c // ch for c in channels],
                  num_res_blocks=int(config["layers_per_block"]), attn_resolutions=attn_resolutions,
                  dropout=float(config["dropout"]), resamp_with_conv=True)
    embeds = config.get("num_class_embeds")
    if embeds is not None:  # nn.Embedding(N, 4ch): N - 1 classes and the null class (module docstring)
        if int(embeds) < 2:
            raise ConversionError(f"config num_class_embeds={embeds}: the conditional U-Net needs at least "
                                  "2 rows (one class and the null class).")
        kwargs["num_classes"] = int(embeds) - 1
    return kwargs


def load_state_dict(model_dir: str) -> dict[str, np.ndarray]:
    """The weights as float32 NumPy arrays (safetensors preferred, else the torch .bin)."""
    for name in WEIGHTS_NAMES:
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            break
    else:
        raise FileNotFoundError(f"no {' or '.join(WEIGHTS_NAMES)} in {model_dir}; download the weights "
                                "file next to config.json.")
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError as err:
            raise ImportError(f"reading {path} needs the safetensors package; "
                              "`pip install -r requirements.txt` installs it.") from err
        try:
            state = load_file(path)
        except (KeyError, TypeError) as err:  # dtypes NumPy lacks (bfloat16)
            raise ConversionError(f"{path} holds tensors NumPy cannot read ({err}); "
                                  "save the model in float32.") from err
    else:
        try:
            import torch
        except ImportError as err:
            raise ImportError(f"{path} is a torch pickle and torch is not installed; `pip install torch` "
                              "or use the .safetensors file.") from err
        raw = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v.float().numpy() for k, v in raw.items()}
    return {k: np.asarray(v, np.float32) for k, v in state.items()}


def _torch_key(path: tuple[str, ...]) -> str:
    """Flax param path -> diffusers state-dict key."""
    *modules, leaf = path
    parts = []
    for name in modules:
        m = _NUMBERED.fullmatch(name)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m else "to_out.0" if name == "to_out" else name)
    parts.append("bias" if leaf == "bias" else "weight")  # kernel / scale -> weight
    return ".".join(parts)


def _to_flax(key: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if key == "class_embedding.weight":  # nn.Embedding (num, dim): already the table's layout
        pass
    elif len(shape) == 4:  # Conv2d weight OIHW -> HWIO
        value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    elif len(shape) == 2:  # Linear (out, in) -> (in, out); a 1x1 conv (out, in, 1, 1) also fits
        if value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]
        value = value.T if value.ndim == 2 else value
    if value.shape != tuple(shape):
        raise ConversionError(f"weight {key} has shape {value.shape} after conversion, the U-Net needs "
                              f"{tuple(shape)}; the config.json does not match the weights.")
    return value


def convert_state_dict(state_dict: dict[str, np.ndarray], unet_kwargs: dict,
                       shape: tuple[int, int, int]) -> dict:
    """Maps every diffusers weight onto the UNet's params; every key must be used exactly once."""
    state = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)", key)
        state[f"{m.group(1)}.{_DEPRECATED_ATTN[m.group(2)]}.{m.group(3)}" if m else key] = value
    model = UNet(**unet_kwargs)
    template = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, *shape), jnp.float32), jnp.zeros((1,), jnp.int32)))["params"]
    flat = jax.tree_util.tree_flatten_with_path(template)[0]
    leaves = []
    for path, leaf in flat:
        key = _torch_key(tuple(p.key for p in path))
        if key not in state:
            raise ConversionError(f"weight {key} is missing from the checkpoint; it does not match its "
                                  "config.json (or is not a DDPM U-Net).")
        leaves.append(jnp.asarray(_to_flax(key, state.pop(key), leaf.shape), leaf.dtype))
    if state:
        names = sorted(state)
        raise ConversionError(f"unknown weight keys {names[:5]}{' ...' if len(names) > 5 else ''} "
                              f"({len(names)} in all) have no place in the DDPM U-Net.")
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


def load_diffusers_unet(path: str) -> tuple[dict, dict]:
    """(UNet keyword arguments, params) of a diffusers UNet2DModel folder."""
    model_dir = find_model_dir(path)
    config = read_config(model_dir)
    kwargs = unet_kwargs_from_config(config)
    params = convert_state_dict(load_state_dict(model_dir), kwargs, image_shape(config))
    return kwargs, params


def read_scheduler(path: str) -> dict | None:
    """The DDPMScheduler config next to the model (scheduler_config.json or scheduler/), if any."""
    model_dir = find_model_dir(path)
    for candidate in (os.path.join(model_dir, SCHEDULER_NAME),
                      os.path.join(path, "scheduler", SCHEDULER_NAME),
                      os.path.join(model_dir, os.pardir, "scheduler", SCHEDULER_NAME)):
        if os.path.isfile(candidate):
            with open(candidate) as f:
                return json.load(f)
    return None


# The released DDPM models' schedule (Ho et al. 2020), when the folder holds no scheduler config.
PAPER_SCHEDULE = dict(name="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
_PRED = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# DDPMScheduler's variance_type -> diffusion.var_type (its *_log variants are the same variances).
_VAR_TYPE = {"fixed_small": "fixedsmall", "fixed_small_log": "fixedsmall", "fixed_large": "fixedlarge",
             "fixed_large_log": "fixedlarge", "learned": "learned", "learned_range": "learned_range"}


def checkpoint_meta(path: str, unet_kwargs: dict) -> RunMeta:
    """The RunMeta of a converted checkpoint: model, data shape, and the scheduler's schedule / target.

    A folder without a scheduler config gets the released models' linear schedule and ε target,
    and says so in `source`. A learned variance (out_channels = 2 in_channels; the scheduler's
    variance_type learned / learned_range, Nichol & Dhariwal) is named in `source["var_type"]`:
    sample it with --config.diffusion.var_type=<that>.
    """
    config = read_config(find_model_dir(path))
    source: dict[str, Any] = dict(format="diffusers", path=os.path.abspath(path))
    scheduler = read_scheduler(path)
    schedule, pred = dict(PAPER_SCHEDULE), "eps"
    if scheduler is None:
        source["schedule"] = "no scheduler config: the released DDPM schedule assumed"
    else:
        source["scheduler"] = scheduler
        if scheduler.get("beta_schedule", "linear") != "linear" or scheduler.get("trained_betas") is not None:
            raise ConversionError(
                f"{path}: the scheduler's beta_schedule={scheduler.get('beta_schedule')!r} (or trained_betas) "
                "has no ddpm_jax schedule name; only the linear schedule of the released models converts.")
        schedule = dict(name="linear", num_timesteps=int(scheduler.get("num_train_timesteps", 1000)),
                        beta_start=float(scheduler.get("beta_start", 1e-4)),
                        beta_end=float(scheduler.get("beta_end", 0.02)))
        kind = scheduler.get("prediction_type", "epsilon")
        if kind not in _PRED:
            raise ConversionError(f"{path}: prediction_type={kind!r} is unknown; use one of {sorted(_PRED)}.")
        pred = _PRED[kind]
    source["var_type"] = _var_type(path, scheduler, int(config["in_channels"]), int(config["out_channels"]))
    return RunMeta("unet", dict(unet_kwargs), tuple(image_shape(config)), schedule, pred, source)


def _var_type(path: str, scheduler: dict | None, in_channels: int, out_channels: int) -> str:
    """The reverse variance of a converted model; refuses output channels that do not fit it."""
    learned = out_channels == 2 * in_channels
    if scheduler is None:
        return "learned_range" if learned else "fixedlarge"  # improved-diffusion's / the released models'
    kind = str(scheduler.get("variance_type", "fixed_small"))  # DDPMScheduler's default
    if kind not in _VAR_TYPE:
        raise ConversionError(f"{path}: the scheduler's variance_type={kind!r} is unknown; use one of "
                              f"{sorted(_VAR_TYPE)}.")
    var_type = _VAR_TYPE[kind]
    if learned != (var_type in diffusion.LEARNED_VAR_TYPES):
        raise ConversionError(
            f"{path}: out_channels={out_channels} with in_channels={in_channels} does not fit the scheduler's "
            f"variance_type={kind!r}: a learned variance needs out_channels = 2 * in_channels, a fixed one "
            "out_channels = in_channels.")
    return var_type
