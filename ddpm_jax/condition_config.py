"""A run's condition kinds and what its sampling asks of each, read from the config.

`create_conditioning(config)` builds the kinds of `conditioning.py` that the config's model takes
(class labels, caption tokens, a low-res image and its noise level); the rest says what
`config.sampling` asks each kind for: the tables the sampler cycles over image indices, the
file-name tag, what a samples directory records, and the caption or class each image was asked for.
One entry per kind in `_SAMPLED`: a new kind adds its class here and nothing generic changes.
"""

from __future__ import annotations

import zlib

import ml_collections
import numpy as np

from ddpm_jax import conditioning, data
from ddpm_jax.data import captions
from ddpm_jax.models import text
from ddpm_jax.run_meta import schedule_betas


def num_classes(config: ml_collections.ConfigDict) -> int:
    """`model.num_classes`: 0 for an unconditional model."""
    return int(config.model.get("num_classes", 0))


def text_conditioned(config: ml_collections.ConfigDict) -> bool:
    """A captioned run (`data.captions`): the U-Net reads caption tokens through its text encoder."""
    return bool(config.data.get("captions", False))


def create_conditioning(config: ml_collections.ConfigDict) -> conditioning.Conditioning:
    """The condition kinds of the config's model: caption tokens (`data.captions`), class labels (`model.num_classes`
    > 0) or none; with `data.low_res_factor` > 0 also the low-res image and its level."""
    null = text.null_tokens(1, int(config.model.context_length))[0] if text_conditioned(config) else None
    kinds = ((conditioning.CaptionTokens(tuple(int(i) for i in null)),) if null is not None
             else (conditioning.ClassLabel(num_classes(config)),) if num_classes(config) else ())
    f = int(config.data.get("low_res_factor", 0))
    if f:  # box_downsample checks that f divides the image size
        shape = data.low_res_shape(config.data)
        abar = np.cumprod(1.0 - schedule_betas(config))[:int(config.training.get("low_res_max_level", 0))]
        kinds += (conditioning.LowResImage(shape, f, tuple(float(a) for a in abar)), conditioning.AugmentationLevel())
    return conditioning.Conditioning(kinds)


def guidance_options(config: ml_collections.ConfigDict) -> dict:
    """`sampling.sample`'s guidance_scale and null_cond (one example's ∅, JSON-able: the eval meta
    stores it) for a conditional model; {} otherwise."""
    conds = create_conditioning(config)
    if not conds:
        return {}
    null = {key: np.asarray(value).tolist() for key, value in conds.null().items()}
    return dict(guidance_scale=float(config.sampling.get("guidance_scale", 0.0)), null_cond=null)


def sampler_labels(config: ml_collections.ConfigDict) -> tuple[int, ...] | None:
    """The classes cycled over image indices from `sampling.labels`: '' -> None (the null class:
    unconditional samples), 'all' -> 0..num_classes-1, '3,5' -> (3, 5).
    Ranges are checked by `checks.check_labels`."""
    spec = str(config.sampling.get("labels", "")).strip()
    if not spec:
        return None
    if spec == "all":
        return tuple(range(num_classes(config)))
    try:
        return tuple(int(c) for c in spec.split(","))
    except ValueError:
        raise ValueError(f"sampling.labels={spec!r} is not 'all' or a comma-separated list of class "
                         "indices; use e.g. --config.sampling.labels=3,5") from None


class _SampledLabels:
    """`sampling.labels` of a class-conditional run: its table, tag part, meta and classes."""

    @staticmethod
    def table(config: ml_collections.ConfigDict) -> np.ndarray | None:
        labels = sampler_labels(config)
        return None if labels is None else np.asarray(labels, np.int32)

    @staticmethod
    def tag(config: ml_collections.ConfigDict) -> str:
        labels = str(config.sampling.get("labels", "")).strip()
        return "_null" if not labels else "_y" + labels.replace(",", "-").replace(" ", "")

    @staticmethod
    def meta(config: ml_collections.ConfigDict) -> dict:
        return {"labels": sampler_labels(config)}

    @staticmethod
    def captions(config: ml_collections.ConfigDict, indices: np.ndarray) -> None:
        return None

    @staticmethod
    def classes(config: ml_collections.ConfigDict, indices: np.ndarray) -> np.ndarray | None:
        table = _SampledLabels.table(config)
        return None if table is None else conditioning.cycle({"label": table}, indices)["label"]


class _SampledCaptions:
    """`sampling.captions` of a captioned run: its token table, tag part, meta and named classes."""

    @staticmethod
    def table(config: ml_collections.ConfigDict) -> np.ndarray:
        spec = captions.sampling_captions(config.sampling.get("captions", ""), config.data)
        return captions.tokenizer_for(config.data).encode(spec, int(config.model.context_length))[0]

    @staticmethod
    def tag(config: ml_collections.ConfigDict) -> str:  # literal captions by a checksum: a short file name
        spec = str(config.sampling.get("captions", "")).strip()
        if not spec:
            return "_cnull"
        return "_cevalsplit" if spec == captions.EVAL_SPLIT_CAPTIONS else f"_c{zlib.crc32(spec.encode()):08x}"

    @staticmethod
    def meta(config: ml_collections.ConfigDict) -> dict:  # the spec names them, with the data
        return {"captions": str(config.sampling.get("captions", "")).strip()}

    @staticmethod
    def captions(config: ml_collections.ConfigDict, indices: np.ndarray) -> list[str]:
        spec = captions.sampling_captions(config.sampling.get("captions", ""), config.data)
        return [spec[int(i) % len(spec)] for i in indices]

    @staticmethod
    def classes(config: ml_collections.ConfigDict, indices: np.ndarray) -> np.ndarray | None:
        named = [captions.named_class(c) for c in _SampledCaptions.captions(config, indices)]
        return None if None in named else np.asarray(named, np.int32)


class _SampledLowRes:
    """`sampling.cond_images` of a super-resolution run: that split's first images box-downsampled (or the
    first low-res images of a folder or an .npz, `data.low_res_images`) and noised to `sampling.low_res_level`
    (`LowResImage.at_level`), '' the null image; the level's table is s."""

    @staticmethod
    def table(config: ml_collections.ConfigDict) -> np.ndarray | None:
        s = config.sampling
        kind = next(k for k in create_conditioning(config).kinds if isinstance(k, conditioning.LowResImage))
        images = data.low_res_images(config.data, str(s.cond_images), int(s.num_samples)) if s.cond_images else None
        return None if images is None else kind.at_level(images, int(s.low_res_level), int(s.seed))[kind.key]

    @staticmethod
    def tag(config: ml_collections.ConfigDict) -> str:  # files by a checksum of their path: a short file name
        spec, level = str(config.sampling.cond_images), int(config.sampling.low_res_level)
        name = f"f{zlib.crc32(spec.encode()):08x}" if data.is_image_files(spec) else spec
        return f"_sr{name}_s{level}" if spec else "_srnull"

    meta = staticmethod(lambda c: {"cond_images": c.sampling.cond_images, "low_res_level": c.sampling.low_res_level})
    captions = classes = staticmethod(lambda config, indices: None)


class _SampledLevel(_SampledLowRes):
    table = staticmethod(lambda config: np.asarray([int(config.sampling.low_res_level)], np.int32))
    tag, meta = staticmethod(lambda config: ""), staticmethod(lambda config: {})


# How `config.sampling` asks each condition kind for its samples.
_SAMPLED = {conditioning.ClassLabel: _SampledLabels, conditioning.CaptionTokens: _SampledCaptions,
            conditioning.LowResImage: _SampledLowRes, conditioning.AugmentationLevel: _SampledLevel}


def _sampled(config: ml_collections.ConfigDict) -> list:
    return [_SAMPLED[type(kind)] for kind in create_conditioning(config).kinds]


def sampler_conditions(config: ml_collections.ConfigDict) -> dict | None:
    """What the sampler cycles over image indices: {kind key: table [K, ...]} (classes of
    `sampling.labels`, a captioned run's `sampling.captions` as tokens int32 [K, context_length]:
    a caption longer than the context is a one-line error); None: unconditional samples (an
    unconditional model, or `sampling.labels` '': the null class)."""
    kinds = create_conditioning(config).kinds
    tables = {kind.key: _SAMPLED[type(kind)].table(config) for kind in kinds}
    return None if not tables or any(t is None for t in tables.values()) else tables


def sampled_captions(config: ml_collections.ConfigDict, indices: np.ndarray) -> list[str] | None:
    """The caption of each image `indices` of a captioned run (`sampling.captions` cycled); None otherwise."""
    found = [c for c in (s.captions(config, indices) for s in _sampled(config)) if c is not None]
    return found[0] if found else None


def asked_classes(config: ml_collections.ConfigDict, indices: np.ndarray) -> np.ndarray | None:
    """The class each image `indices` was asked for: its label, or the digit its caption names
    (MNIST captions); None when unconditional or when a caption names no single digit."""
    found = [c for c in (s.classes(config, indices) for s in _sampled(config)) if c is not None]
    return found[0] if found else None


def sampled_meta(config: ml_collections.ConfigDict) -> dict:
    """What the samples were asked for, as a samples directory records it ({}: unconditional)."""
    return {key: value for s in _sampled(config) for key, value in s.meta(config).items()}
