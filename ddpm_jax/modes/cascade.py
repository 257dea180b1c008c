"""`--mode=cascade`: a base model's samples super-resolved, as one command (cascaded diffusion, Ho et al. 2021).

Run on a super-resolution workdir (`data.low_res_factor` > 0). It samples the base model of
`cascade.base_config` / `cascade.base_workdir` as `--mode=sample` does (its files under its own
workdir), then super-resolves that sample .npz as `sampling.cond_images` (the SR files here, tagged
`_srf<crc32>`). Both stages sample with this run's `CASCADE_SAMPLING` fields. The cascade is two
sample runs, so this is the one mode that composes another (`modes.sample.run`).
"""

from __future__ import annotations

import copy

import ml_collections

from ddpm_jax import checks, config_loading, data, super_resolution
from ddpm_jax.modes import sample

CASCADE_SAMPLING = ("method", "steps", "spacing", "eta", "num_samples", "batch_size", "seed")  # both stages'


def base_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The base stage's config: `cascade.base_config` with `cascade.base_overrides`, sampling with this run's
    `CASCADE_SAMPLING` fields."""
    base = config_loading.load_config(str(config.cascade.base_config), str(config.cascade.base_overrides).split())
    with base.unlocked():
        base.sampling.update({key: config.sampling[key] for key in CASCADE_SAMPLING if key in config.sampling})
    return base


def check_cascade(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`--mode=cascade`'s checks before any work: an SR model with `cascade.base_*` given, a base model whose
    images are the SR model's low-res input, both stages' sample checks; returns the base stage's config."""
    c = config.cascade
    if not super_resolution.factor(config) or not str(c.base_config) or not str(c.base_workdir):
        raise ValueError("--mode=cascade needs a super-resolution config (data.low_res_factor > 0) with "
                         "--config.cascade.base_config and --config.cascade.base_workdir (the base model).")
    base = base_config(config)
    want, got = super_resolution.low_res_shape(config.data), tuple(data.example_shape(base.data))
    if got != want:
        raise ValueError(f"cascade.base_config={c.base_config!r} makes images {got}, but this model "
                         f"super-resolves {want}; give a base model of the low resolution.")
    checks.check_config(base, "sample")
    sr = config.copy_and_resolve_references()
    sr.sampling.cond_images = ""  # the base samples, written by the first stage
    checks.check_config(sr, "sample")
    return base


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Samples the base model, then super-resolves its samples with this workdir's model; the paths of
    both stages (the base stage's keys prefixed `base_`)."""
    checks.check_config(config, "cascade")
    base = check_cascade(config)
    base_paths = sample.run(base, str(config.cascade.base_workdir))
    sr = copy.deepcopy(config)
    sr.sampling.cond_images = base_paths["npz"]
    return {**{f"base_{kind}": path for kind, path in base_paths.items()}, **sample.run(sr, workdir)}
