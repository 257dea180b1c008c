"""Image conditioning: the low-resolution image to super-resolve, and its noise-conditioning level.

The condition kind of super-resolution (SR3, Saharia et al. 2021) and of the later stages of a
cascade (cascaded diffusion, Ho et al. 2021). With `data.low_res_factor` f > 0 a run is
conditioned on two kinds (`conditioning.Kind`):

    LowResImage(shape, f, abar)  "low_res"        float [B, h, w, C] in [−1, 1]: each image box-downsampled
                                                  by f (`imaging.box_downsample`); ∅ = zeros
    AugmentationLevel()          "low_res_level"  int [B], the low-res image's noise level s; ∅ = 0

Both derive their rows from a batch's images (`derive`), so no data source carries them, and
training noises the low-res image to a level drawn per example (`LowResImage.augment`).

This module is the whole kind but the network's input (the U-Net upsamples the low-res image,
concatenates it to x_t and embeds s like t: models/unet.py): what a config builds (`kinds`),
the low-res images that sampling reads (`low_res_images`: a split, a folder or an `.npz`), how
`config.sampling` asks for them (`SAMPLED`: `sampling.cond_images` at `sampling.low_res_level`,
shown as triples input | SR output | bicubic) and the checks of those fields (`check_sampling`).
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import conditioning, data, imaging
from ddpm_jax.conditioning import Cond
from ddpm_jax.data import folder
from ddpm_jax.run_meta import schedule_betas

FACTOR_FIELD = "data.low_res_factor"
NPZ_IMAGE_KEYS = ("samples", "images")  # what a low-res .npz holds: --mode=sample writes both


@dataclasses.dataclass(frozen=True)
class LowResImage(conditioning.KindDefaults):
    """The low-resolution image to super-resolve, [h, w, C] floats in [−1, 1].

    ∅ is the all-zero image: mid-grey, the mean of the data range and the expectation of a
    fully noised level, so it carries no picture; a zero image at level 0 is exactly the
    unconditional input. `abar` are ᾱ_1..ᾱ_{s_max} of the run's schedule: training draws a
    level s ~ U{0, ..., s_max} per example and gives the network z_s = √ᾱ_s y + √(1 − ᾱ_s) ε
    (ᾱ_0 = 1: s = 0 is the clean image), the non-truncated Gaussian conditioning augmentation of
    cascaded diffusion (Ho et al. 2021 §4.3, with their forward process q(z_s | z_0)); s goes to
    the network as `AugmentationLevel`. s_max = 0: no augmentation.
    """

    shape: tuple[int, int, int]  # (h, w, C), the low resolution
    factor: int
    abar: tuple[float, ...] = dataclasses.field(default=(), repr=False)  # ᾱ_1..ᾱ_{s_max} of the schedule
    key: ClassVar[str] = "low_res"
    field: ClassVar[str] = "sampling.cond_images"
    noun: ClassVar[str] = "low-resolution images"

    @property
    def null(self) -> np.ndarray:
        return np.zeros(self.shape, np.float32)

    def null_like(self, rows: jnp.ndarray) -> jnp.ndarray:
        return jnp.zeros_like(rows)

    def check(self, rows: Any, batch: int) -> None:
        dtype, shape = getattr(rows, "dtype", np.asarray(rows).dtype), tuple(np.shape(rows))
        if not jnp.issubdtype(dtype, jnp.floating) or shape != (batch, *self.shape):
            raise ValueError(f"cond[{self.key!r}] must be floats of shape {(batch, *self.shape)}, got "
                             f"{np.dtype(dtype).name} {shape}; pass images box-downsampled by {self.factor}.")

    def record(self) -> dict:
        return {"low_res_factor": int(self.factor), "low_res_max_level": len(self.abar)}

    def derive(self, x: Any) -> Any:
        """Each image of `x` [B, H, W, C] box-downsampled by the factor (after any flip: the same picture)."""
        return imaging.box_downsample(x, self.factor, FACTOR_FIELD)

    def network_kwargs(self) -> dict:
        return {"low_res_channels": int(self.shape[-1])}

    def augment(self, cond: Cond, key: jax.Array) -> Cond:
        """`cond` with its low-res rows noised to a level s per example and s under `AugmentationLevel.key`."""
        if self.key not in cond:
            return cond
        y = cond[self.key]
        level_key, noise_key = jax.random.split(key)
        s = jax.random.randint(level_key, (y.shape[0],), 0, len(self.abar) + 1)
        abar = jnp.concatenate([jnp.ones((1,), y.dtype), jnp.asarray(self.abar, y.dtype)])[s]
        abar = abar.reshape((-1,) + (1,) * (y.ndim - 1))
        z = jnp.sqrt(abar) * y + jnp.sqrt(1.0 - abar) * jax.random.normal(noise_key, y.shape, y.dtype)
        return {**cond, self.key: z, AugmentationLevel.key: s}

    def at_level(self, images: np.ndarray, level: int, seed: int) -> Cond:
        """Sampling's rows: `images` [K, h, w, C] noised to the fixed level s (0: as given), and s."""
        self.check(images, len(images))
        s = int(level)
        if not 0 <= s <= len(self.abar):
            raise ValueError(f"sampling.low_res_level={s} must lie in [0, {len(self.abar)}] "
                             "(training.low_res_max_level); use a level the model was trained on.")
        abar = 1.0 if s == 0 else self.abar[s - 1]
        noise = np.random.default_rng(int(seed)).standard_normal(np.shape(images)).astype(np.float32)
        z = np.sqrt(abar) * np.asarray(images, np.float32) + np.sqrt(1.0 - abar) * noise
        return {self.key: z.astype(np.float32), AugmentationLevel.key: np.full(len(images), s, np.int32)}


@dataclasses.dataclass(frozen=True)
class AugmentationLevel(conditioning.KindDefaults):
    """The noise-conditioning level s of the low-res image per example (see `LowResImage`); ∅ = 0.

    Derived from a batch as 0 (the clean image): training overwrites it with the drawn level.
    """

    key: ClassVar[str] = "low_res_level"
    field: ClassVar[str] = "sampling.low_res_level"
    noun: ClassVar[str] = "augmentation levels"

    @property
    def null(self) -> np.ndarray:
        return np.int32(0)

    def null_like(self, rows: jnp.ndarray) -> jnp.ndarray:
        return jnp.zeros_like(rows)

    def check(self, rows: Any, batch: int) -> None:
        conditioning.check_int(self, rows, f"[{batch}]", tuple(np.shape(rows)) == (batch,))

    def record(self) -> dict:
        return {}

    def derive(self, x: Any) -> np.ndarray:
        return np.zeros(np.shape(x)[:1], np.int32)


def factor(config: ml_collections.ConfigDict) -> int:
    """`data.low_res_factor`: 0 for a model without image conditioning."""
    return int(config.data.get("low_res_factor", 0))


def kinds(config: ml_collections.ConfigDict) -> tuple:
    """The low-res image and its level when `data.low_res_factor` f > 0 (f must divide the image
    size), with ᾱ_1..ᾱ_{s_max} of the schedule for s_max = `training.low_res_max_level`; else ()."""
    if not factor(config):
        return ()
    abar = np.cumprod(1.0 - schedule_betas(config))[:int(config.training.get("low_res_max_level", 0))]
    return LowResImage(low_res_shape(config.data), factor(config), tuple(float(a) for a in abar)), AugmentationLevel()


def is_image_files(spec: str) -> bool:
    """Whether `sampling.cond_images` names files (a folder or an `.npz`) rather than a split."""
    return str(spec).lower().endswith(".npz") or os.sep in str(spec) or os.path.isdir(str(spec))


def low_res_shape(data_cfg: Any) -> tuple[int, int, int]:
    """(H/f, W/f, C): the low-resolution images of `data.low_res_factor` f (checked by `box_downsample`)."""
    zeros = np.zeros(data.example_shape(data_cfg))
    return tuple(imaging.box_downsample(zeros, int(data_cfg.low_res_factor), FACTOR_FIELD).shape)


def low_res_images(data_cfg: Any, spec: str, limit: int | None = None) -> np.ndarray:
    """The first `limit` low-resolution images of `spec` (`sampling.cond_images`), float32 in [-1, 1]
    [N, H/f, W/f, C] for `data.low_res_factor` f: a split's images box-downsampled by f, or a
    folder of images or an `.npz` (its `samples` in [-1, 1], else its uint8 `images`: a
    `--mode=sample` output) already at that size, else a one-line error."""
    f, want = int(data_cfg.low_res_factor), low_res_shape(data_cfg)
    if not is_image_files(spec):
        images = imaging.as_float(data.load_arrays(data_cfg, spec, limit)["x"])
        return imaging.box_downsample(images, f, FACTOR_FIELD).astype(np.float32)
    if not os.path.exists(spec):
        raise ValueError(f"sampling.cond_images={spec!r} does not exist; give a split, a folder of images or "
                         "an .npz.")
    if os.path.isdir(spec):
        src = folder.load_folder(spec, want[0], want[2], field="sampling.cond_images")
        n = len(src) if limit is None else min(int(limit), len(src))
        shapes = [(src.files[i], src.native_shape(i)) for i in range(n)]
        path, got = next(((p, g) for p, g in shapes if g != want), (spec, want))
        images = np.stack([src[i] for i in range(n)]) if got == want else None
    else:
        with np.load(spec) as arrays:
            key = next((k for k in NPZ_IMAGE_KEYS if k in arrays), None)
            if key is None:
                raise ValueError(f"sampling.cond_images={spec!r} holds {sorted(arrays)}, no "
                                 f"{' or '.join(NPZ_IMAGE_KEYS)}; give an .npz written by --mode=sample or with "
                                 "images [N, h, w, C].")
            images = arrays[key][:limit]
        path, got = spec, tuple(images.shape[1:])
    if got != want:
        raise ValueError(f"sampling.cond_images image {path!r} has shape {got}, but this model super-resolves {want} "
                         f"(data.low_res_factor={f} of {tuple(data.example_shape(data_cfg))}); give images of {want}.")
    return imaging.as_float(images).astype(np.float32)


def check_sampling(config: ml_collections.ConfigDict) -> None:
    """`sampling.cond_images` only for a super-resolution model, readable and of its low-res shape."""
    spec = str(config.sampling.get("cond_images", ""))
    if spec and not factor(config):
        raise ValueError(f"sampling.cond_images={spec!r} needs a super-resolution model (data.low_res_factor > 0); "
                         "set --config.sampling.cond_images=''.")
    if spec:
        low_res_images(config.data, spec, int(config.sampling.num_samples))


def sample_views(config: ml_collections.ConfigDict, samples: np.ndarray) -> dict[str, np.ndarray]:
    """Sample i's low-res input (`sampling.cond_images`, cycled as the sampler cycles it), its
    bicubic upsampling, and the picture of triples input (nearest) | SR output | bicubic."""
    low = low_res_images(config.data, str(config.sampling.cond_images), len(samples))
    low = low[np.arange(len(samples)) % len(low)]
    f = factor(config)
    bicubic = np.clip(np.asarray(jax.image.resize(low, samples.shape, "bicubic")), -1.0, 1.0)
    nearest = np.repeat(np.repeat(low, f, axis=1), f, axis=2)
    triples = np.stack([nearest, samples, bicubic], axis=1).reshape(-1, *samples.shape[1:])
    grid = imaging.make_grid(triples, ncol=3 * min(8, len(samples)))
    return {"picture": imaging.upscale(grid, max(1, 512 // max(grid.shape[:2]))), "low_res": low,
            "bicubic": bicubic.astype(np.float32)}


class _SampledLowRes:
    """`sampling.cond_images` of a super-resolution run: that split's first images box-downsampled (or the
    first low-res images of a folder or an .npz, `low_res_images`) and noised to `sampling.low_res_level`
    (`LowResImage.at_level`), '' the null image; the samples shown beside their inputs."""

    @staticmethod
    def table(config: ml_collections.ConfigDict) -> np.ndarray | None:
        s, kind = config.sampling, kinds(config)[0]
        images = low_res_images(config.data, str(s.cond_images), int(s.num_samples)) if s.cond_images else None
        return None if images is None else kind.at_level(images, int(s.low_res_level), int(s.seed))[kind.key]

    @staticmethod
    def tag(config: ml_collections.ConfigDict) -> str:  # files by a checksum of their path: a short file name
        spec, level = str(config.sampling.cond_images), int(config.sampling.low_res_level)
        name = f"f{zlib.crc32(spec.encode()):08x}" if is_image_files(spec) else spec
        return f"_sr{name}_s{level}" if spec else "_srnull"

    @staticmethod
    def views(config: ml_collections.ConfigDict, samples: np.ndarray) -> dict:
        return sample_views(config, samples) if config.sampling.get("cond_images") else {}

    meta = staticmethod(lambda c: {"cond_images": c.sampling.cond_images, "low_res_level": c.sampling.low_res_level})
    captions = classes = staticmethod(lambda config, indices: None)


class _SampledLevel(_SampledLowRes):
    table = staticmethod(lambda config: np.asarray([int(config.sampling.low_res_level)], np.int32))
    tag, meta = staticmethod(lambda config: ""), staticmethod(lambda config: {})
    views = staticmethod(lambda config, samples: {})


# How `config.sampling` asks for each kind (`condition_config`'s protocol of sampled kinds).
SAMPLED = {LowResImage: _SampledLowRes, AugmentationLevel: _SampledLevel}
