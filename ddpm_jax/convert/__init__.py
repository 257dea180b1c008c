"""Import of released checkpoints (diffusers layout) into ddpm_jax checkpoints.

    python -m ddpm_jax.convert --diffusers DIR --out DIR

writes an Orbax params-only checkpoint (`checkpointing.save_pretrained`) whose meta is the
same `RunMeta` a trained checkpoint carries (model, image shape, schedule, prediction
target), so `--mode=sample/eval/bpd --workdir=OUT` samples from the released weights.
"""

from __future__ import annotations

import os

from ddpm_jax import checkpointing
from ddpm_jax.convert.diffusers import checkpoint_meta, load_diffusers_unet
from ddpm_jax.run_meta import RunMeta


def convert_diffusers(src: str, out: str) -> RunMeta:
    """Converts the diffusers UNet2DModel folder `src` into the checkpoint folder `out`; returns its meta.

    Refuses (FileExistsError) an `out` that exists and is not empty.
    """
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"--out {out} exists and is not empty; pass a new or empty directory.")
    kwargs, params = load_diffusers_unet(src)
    meta = checkpoint_meta(src, kwargs)
    os.makedirs(out, exist_ok=True)
    checkpointing.save_pretrained(out, params, meta.to_dict())
    return meta


__all__ = ["convert_diffusers"]
