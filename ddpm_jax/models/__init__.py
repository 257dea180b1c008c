"""Networks: the DDPM U-Net and the 2-D toy GatedMLP, built by name with `build_model`."""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from ddpm_jax.models.mlp import GatedMLP
from ddpm_jax.models.unet import UNet

MODELS: dict[str, type[nn.Module]] = {"unet": UNet, "mlp": GatedMLP}


def model_kwarg_names(name: str) -> tuple[str, ...]:
    """The hyper-parameter keywords the model `name` accepts."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; use one of {sorted(MODELS)}.")
    return tuple(f.name for f in dataclasses.fields(MODELS[name])
                 if f.init and f.name not in ("parent", "name"))


def build_model(name: str, **kwargs) -> nn.Module:
    """Builds model `name` ("unet" | "mlp") from explicit keyword hyper-parameters."""
    allowed = model_kwarg_names(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {name} arguments {unknown}; accepted: {list(allowed)}.")
    for key in ("ch_mult", "attn_resolutions", "transformer_resolutions"):  # hashable: a module field
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return MODELS[name](**kwargs)


__all__ = ["GatedMLP", "UNet", "build_model", "model_kwarg_names", "MODELS"]
