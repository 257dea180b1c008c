"""Export a ddpm_jax U-Net to diffusers: `config.json` + `diffusion_pytorch_model.safetensors`.

    python -m ddpm_jax.convert --to-diffusers WORKDIR --out DIR

writes a folder that `diffusers.UNet2DModel.from_pretrained(DIR)` loads (no torch needed to
write it: safetensors' NumPy writer), plus `scheduler_config.json` for `DDPMScheduler` (the
run's β schedule, prediction type and reverse variance), so a model trained here runs in
diffusers' pipelines and schedulers (e.g. `DDPMPipeline(unet, DDPMScheduler.from_pretrained(DIR))`,
or any scheduler made `from_config` of it).

It is the inverse of the importer (`convert/diffusers.py`), with its key mapping
(`_torch_key`) and its checked conventions (`REQUIRED`): Flax HWIO conv kernels -> OIHW,
Dense (in, out) -> Linear (out, in), GroupNorm scale -> weight, the class embedding table as is
(`num_class_embeds = num_classes + 1`, the null class in the last row, as the importer reads it).
The scheduler is the run's: its `config.json` gives the reverse variance (`diffusion.var_type`,
unless `--var-type` says otherwise) and the clipping (`sampling.clip_denoised`); a DDPM on
latents is refused (the folder would hold no decoder).
Importing the export gives back the same params, and exporting an import the same tensors
(tests/test_export_diffusers.py).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from ddpm_jax import checkpoint_recovery, checkpointing, files, parallel, schedules, setup
from ddpm_jax.convert.diffusers import CONFIG_NAME, REQUIRED, SCHEDULER_NAME, ConversionError, _torch_key
from ddpm_jax.models.layers import NORM_EPS
from ddpm_jax.run_meta import RunMeta

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_PRED = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
_VARIANCE = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small", "learned": "learned",
             "learned_range": "learned_range"}
_KNOWN_KWARGS = {"ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv",
                 "num_classes", "dtype", "param_dtype", "attention_impl", "remat"}


def diffusers_config(unet_kwargs: dict, data_shape: tuple[int, ...]) -> dict:
    """The UNet2DModel config.json of a `UNet(**unet_kwargs)` on images `data_shape` (H, W, C)."""
    unknown = sorted(set(unet_kwargs) - _KNOWN_KWARGS)
    if unknown:
        raise ConversionError(f"U-Net arguments {unknown} have no diffusers UNet2DModel equivalent.")
    if not unet_kwargs.get("resamp_with_conv", True):
        raise ConversionError("resamp_with_conv=False (resampling without convolutions) has no UNet2DModel "
                              "equivalent; diffusers' DDPM blocks always convolve.")
    h, w, c = (int(s) for s in data_shape)
    ch, mult = int(unet_kwargs["ch"]), [int(m) for m in unet_kwargs["ch_mult"]]
    attn = {int(r) for r in unet_kwargs["attn_resolutions"]}
    down = ["AttnDownBlock2D" if h // 2 ** i in attn else "DownBlock2D" for i in range(len(mult))]
    up = ["AttnUpBlock2D" if kind == "AttnDownBlock2D" else "UpBlock2D" for kind in reversed(down)]
    classes = int(unet_kwargs.get("num_classes", 0))
    config: dict[str, Any] = dict(REQUIRED)
    config.update(
        _class_name="UNet2DModel", sample_size=h if h == w else [h, w], in_channels=c,
        out_channels=int(unet_kwargs.get("out_ch", c)), down_block_types=down, up_block_types=up,
        block_out_channels=[ch * m for m in mult], layers_per_block=int(unet_kwargs["num_res_blocks"]),
        dropout=float(unet_kwargs.get("dropout", 0.0)), act_fn="silu", attention_head_dim=None,
        norm_eps=NORM_EPS, attn_norm_num_groups=None, time_embedding_dim=None,
        num_class_embeds=classes + 1 if classes else None)
    return config


def export_state_dict(params: Any) -> dict[str, np.ndarray]:
    """diffusers state-dict tensors (float32, contiguous) of the U-Net params."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = _torch_key(tuple(p.key for p in path))
        value = np.asarray(leaf, np.float32)
        if key == "class_embedding.weight":  # nn.Embedding (num, dim): the table as is
            pass
        elif value.ndim == 4:  # Conv2d HWIO -> OIHW
            value = value.transpose(3, 2, 0, 1)
        elif value.ndim == 2:  # Dense (in, out) -> Linear (out, in)
            value = value.T
        out[key] = np.ascontiguousarray(value)
    return out


def scheduler_config(meta: RunMeta, var_type: str, clip_sample: bool = True) -> dict:
    """DDPMScheduler config of the run: its β (named when diffusers has the schedule, else listed)."""
    spec = dict(meta.schedule)
    name, T = str(spec.pop("name")), int(spec.pop("num_timesteps"))
    if meta.pred not in _PRED:
        raise ConversionError(f"pred={meta.pred!r} has no diffusers prediction_type; export an eps, x0 or v model.")
    config: dict[str, Any] = dict(_class_name="DDPMScheduler", num_train_timesteps=T,
                                  prediction_type=_PRED[meta.pred], variance_type=_VARIANCE[var_type],
                                  clip_sample=bool(clip_sample), clip_sample_range=1.0)
    if name == "linear":
        config.update(beta_schedule="linear", beta_start=float(spec["beta_start"]), beta_end=float(spec["beta_end"]))
    else:  # the exact float64 β: diffusers takes any schedule as trained_betas
        config.update(beta_schedule="linear", trained_betas=schedules.get_betas(name, T, **spec).tolist())
    return config


def export_params(params: Any, meta: RunMeta, out: str, *, var_type: str | None = None,
                  clip_sample: bool = True) -> dict:
    """Writes the diffusers folder `out` (new or empty) for U-Net params of `meta`; returns its config."""
    if meta.model_name != "unet":
        raise ConversionError(f"model {meta.model_name!r} is not the U-Net; only UNet2DModel exports.")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"--out {out} exists and is not empty; pass a new or empty directory.")
    try:
        from safetensors.numpy import save  # noqa: PLC0415
    except ImportError as err:
        raise ImportError("writing diffusion_pytorch_model.safetensors needs the safetensors package; "
                          "`pip install -r requirements.txt` installs it.") from err
    config = diffusers_config(meta.model_kwargs, meta.data_shape)
    var_type = var_type or str(meta.source.get("var_type", "")) or (
        "learned_range" if config["out_channels"] == 2 * config["in_channels"] else "fixedlarge")
    blob = save(export_state_dict(params), metadata={"format": "pt"})
    files.write_bytes(os.path.join(out, WEIGHTS_NAME), lambda f: f.write(blob))
    files.write_json(os.path.join(out, CONFIG_NAME), config)
    files.write_json(os.path.join(out, SCHEDULER_NAME), scheduler_config(meta, var_type, clip_sample))
    return config


def export_workdir(workdir: str, out: str, *, var_type: str | None = None,
                   step: int = checkpoint_recovery.NEWEST) -> tuple[int, RunMeta]:
    """Exports the EMA params of the workdir's newest valid checkpoint (or of `step`); returns (step, meta)."""
    stored = checkpointing.read_meta(workdir)
    if stored is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}; train first (--mode=train).")
    meta = RunMeta.from_dict(stored, workdir)
    if meta.latents:
        raise ConversionError(
            f"{workdir} is a DDPM on the latents of autoencoder {meta.latents.get('autoencoder')!r}; a diffusers "
            "UNet2DModel folder samples images, not latents to decode, so it is not exported.")
    trained = run_config(workdir)
    if var_type is None and trained is not None:
        var_type = str(trained.diffusion.var_type)
    clip = True if trained is None else setup.clips_x0(trained, bool(trained.sampling.clip_denoised))
    model = setup.build_from_spec(meta.model_name, meta.model_kwargs)
    template = setup.abstract_params(model, meta.data_shape, parallel.make_mesh(jax.local_devices()[:1]))
    with checkpointing.Checkpointer(workdir, async_save=False) as ckpt:
        step, params = checkpoint_recovery.newest_valid_ema(ckpt, template, step=step)
    export_params(parallel.to_host(params), meta, out, var_type=var_type, clip_sample=clip)
    return int(step), meta


def run_config(workdir: str) -> ml_collections.ConfigDict | None:
    """The config the workdir was trained with (its `config.json`), or None (a converted checkpoint)."""
    path = os.path.join(str(workdir), "config.json")
    return ml_collections.ConfigDict(files.read_json(path)) if os.path.isfile(path) else None
