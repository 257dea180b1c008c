"""Import of released checkpoints (diffusers layout) into ddpm_jax checkpoints.

    python -m ddpm_jax.convert --diffusers DIR --out DIR

writes an Orbax params-only checkpoint (`checkpointing.save_pretrained`) plus
`model_kwargs.json`, so `--mode=sample/eval --workdir=OUT` samples from the released weights.
"""

from __future__ import annotations

import json
import os

MODEL_KWARGS_FILE = "model_kwargs.json"


def convert_diffusers(src: str, out: str) -> dict:
    """Converts the diffusers UNet2DModel folder `src` into the checkpoint folder `out`; returns its meta.

    Refuses (FileExistsError) an `out` that exists and is not empty.
    """
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"--out {out} exists and is not empty; pass a new or empty directory.")
    # Imported here: the pure conversion does not need Orbax.
    from ddpm_jax import checkpointing
    from ddpm_jax.convert.diffusers import checkpoint_meta, load_diffusers_unet

    kwargs, params = load_diffusers_unet(src)
    meta = checkpoint_meta(src, kwargs)
    os.makedirs(out, exist_ok=True)
    checkpointing.save_pretrained(out, params, meta)
    with open(os.path.join(out, MODEL_KWARGS_FILE), "w") as f:
        json.dump({"name": "unet", "kwargs": kwargs}, f, indent=2)
    return meta


__all__ = ["convert_diffusers", "MODEL_KWARGS_FILE"]
