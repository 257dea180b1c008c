"""A run's condition kinds and what its sampling asks of each, read from the config.

`create_conditioning(config)` builds the kinds that the config's model takes: class labels or
caption tokens (`conditioning.py`), then those of each module of `KIND_MODULES` (the low-res image
and its noise level of `super_resolution`). The rest says what `config.sampling` asks each kind
for, one entry per kind class in `_SAMPLED`: the tables the sampler cycles over image indices, the
file-name tag, what a samples directory records, the caption or class each image was asked for,
and the views written beside the samples (`sample_views`: the grid's picture and extra arrays).

A kind module gives `kinds(config)`, `SAMPLED` (its classes' entries) and `check_sampling(config)`
(the checks of its sampling fields); adding one to `KIND_MODULES` is all it takes here.
"""

from __future__ import annotations

import zlib

import ml_collections
import numpy as np

from ddpm_jax import conditioning, imaging, super_resolution
from ddpm_jax.data import captions
from ddpm_jax.models import text


def num_classes(config: ml_collections.ConfigDict) -> int:
    """`model.num_classes`: 0 for an unconditional model."""
    return int(config.model.get("num_classes", 0))


def text_conditioned(config: ml_collections.ConfigDict) -> bool:
    """A captioned run (`data.captions`): the U-Net reads caption tokens through its text encoder."""
    return bool(config.data.get("captions", False))


# The modules of the condition kinds beside labels and captions (see the module docstring).
KIND_MODULES = (super_resolution,)


def create_conditioning(config: ml_collections.ConfigDict) -> conditioning.Conditioning:
    """The condition kinds of the config's model: caption tokens (`data.captions`), class labels (`model.num_classes`
    > 0) or none, then each of `KIND_MODULES`' kinds (e.g. the low-res image when `data.low_res_factor` > 0)."""
    null = text.null_tokens(1, int(config.model.context_length))[0] if text_conditioned(config) else None
    kinds = ((conditioning.CaptionTokens(tuple(int(i) for i in null)),) if null is not None
             else (conditioning.ClassLabel(num_classes(config)),) if num_classes(config) else ())
    return conditioning.Conditioning(kinds + tuple(k for module in KIND_MODULES for k in module.kinds(config)))


def check_sampling(config: ml_collections.ConfigDict) -> None:
    """The checks of `KIND_MODULES`' sampling fields (class labels and captions: `checks.check_labels`)."""
    for module in KIND_MODULES:
        module.check_sampling(config)


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

    @staticmethod
    def views(config: ml_collections.ConfigDict, samples: np.ndarray) -> dict:  # one row per class
        labels = _SampledLabels.classes(config, np.arange(len(samples)))
        return {} if labels is None else {"picture": imaging.class_grid(samples, labels), "labels": labels}


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

    @staticmethod
    def views(config: ml_collections.ConfigDict, samples: np.ndarray) -> dict:  # one row per caption, written beside it
        index = np.arange(len(samples))
        shown = _SampledCaptions.captions(config, index)
        labels = _SampledCaptions.classes(config, index)
        return {"picture": imaging.caption_grid(samples, shown), "captions": np.asarray(shown),
                **({} if labels is None else {"labels": labels})}


# How `config.sampling` asks each condition kind for its samples.
_SAMPLED = {conditioning.ClassLabel: _SampledLabels, conditioning.CaptionTokens: _SampledCaptions,
            **{kind: sampled for module in KIND_MODULES for kind, sampled in module.SAMPLED.items()}}


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


def sample_views(config: ml_collections.ConfigDict, samples: np.ndarray) -> dict:
    """What a samples directory shows and stores beside the samples: every kind's views merged in kind
    order ({"picture": the grid, when a kind draws one; arrays such as the labels}), {} when none."""
    return {key: value for s in _sampled(config) for key, value in s.views(config, samples).items()}


def sampled_meta(config: ml_collections.ConfigDict) -> dict:
    """What the samples were asked for, as a samples directory records it ({}: unconditional)."""
    return {key: value for s in _sampled(config) for key, value in s.meta(config).items()}
