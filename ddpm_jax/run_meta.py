"""What a run is: the network, the example shape, the noise schedule and the prediction target.

`RunMeta` is built from a config (`RunMeta.from_config`), stored with every checkpoint
(trained here or converted from diffusers: the same fields), read back from one
(`RunMeta.from_dict`), and compared key by key (`check_matches`), so a workdir is never
resumed, sampled or evaluated with a network or schedule other than its own.

Only the *structural* fields are compared: the hyper-parameters that leave the params'
shapes and meaning unchanged (dropout, compute dtype, attention kernel, remat) may differ,
so a checkpoint trained with dropout 0.1 in bfloat16 samples without dropout in float32.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import ml_collections
import numpy as np

from ddpm_jax import data, diffusion, schedules
from ddpm_jax.data import captions
from ddpm_jax.data import latents as latent_data

# Model hyper-parameters that do not change the params' shapes: a checkpoint may be
# resumed or sampled with other values (e.g. dropout off, bfloat16 compute).
NON_STRUCTURAL_KWARGS = ("dropout", "dtype", "param_dtype", "attention_impl", "remat", "gate_init")


class CheckpointMismatchError(ValueError):
    """The workdir holds a checkpoint of a different model / data shape / schedule."""


def out_channels(data_channels: int, config: ml_collections.ConfigDict) -> int:
    """The network's output channels: the data's C, or 2C when `diffusion.var_type` is learned."""
    return diffusion.output_channels(data_channels, str(config.diffusion.get("var_type", "fixedlarge")))


def model_spec(config: ml_collections.ConfigDict, condition_kwargs: dict | None = None) -> tuple[str, dict]:
    """(name, JSON-able keyword hyper-parameters) of the configured network; a U-Net also takes
    `condition_kwargs`, what its condition kinds need (`Conditioning.network_kwargs`)."""
    m = config.model
    if m.name == "unet":
        # On latents the network's channels are the latents' (data.example_shape reads autoencoder.json).
        channels = data.example_shape(config.data)[-1] if data.latents_from(config.data) else config.data.num_channels
        kwargs = dict(
            ch=int(m.ch), out_ch=out_channels(int(channels), config),
            ch_mult=[int(c) for c in m.ch_mult],
            num_res_blocks=int(m.num_res_blocks), attn_resolutions=[int(r) for r in m.attn_resolutions],
            dropout=float(m.dropout), resamp_with_conv=bool(m.resamp_with_conv), dtype=str(m.dtype),
            attention_impl=str(m.attention_impl), remat=bool(m.remat),
        )
        # Only a conditional model names it: unconditional checkpoints keep their stored meta.
        if int(m.get("num_classes", 0)):
            kwargs["num_classes"] = int(m.num_classes)
        kwargs.update(condition_kwargs or {})
        if config.data.get("captions", False):  # text-conditional: the vocabulary is the training captions'
            kwargs.update(text_model_kwargs(config))
        return "unet", kwargs
    if m.name == "mlp":
        return "mlp", dict(num_timesteps=int(config.diffusion.num_timesteps), hidden=int(m.mlp_hidden),
                           out_dim=out_channels(2, config), dtype=str(m.dtype),
                           gate_init=str(m.get("mlp_gate_init", "ones")))
    raise ValueError(f"unknown model.name={m.name!r}; use unet or mlp (--config.model.name=unet).")


def text_model_kwargs(config: ml_collections.ConfigDict) -> dict:
    """The U-Net's cross-attention and text-encoder hyper-parameters of a captioned run (`data.captions`)."""
    m = config.model
    if int(m.get("context_dim", 0)) <= 0:
        raise ValueError("data.captions needs cross-attention: set --config.model.context_dim (e.g. 64) and "
                         "--config.model.transformer_resolutions (e.g. '(7,)'), or data.captions=False.")
    return dict(transformer_resolutions=[int(r) for r in m.transformer_resolutions], context_dim=int(m.context_dim),
                transformer_heads=int(m.transformer_heads), transformer_depth=int(m.transformer_depth),
                vocab_size=captions.tokenizer_for(config.data).vocab_size, context_length=int(m.context_length),
                text_layers=int(m.text_layers), text_heads=int(m.text_heads))


def schedule_spec(config: ml_collections.ConfigDict) -> dict:
    """The schedule's name and arguments (what `schedules.get_betas` takes)."""
    d = config.diffusion
    return dict(name=str(d.schedule), num_timesteps=int(d.num_timesteps),
                beta_start=float(d.beta_start), beta_end=float(d.beta_end))


def schedule_betas(config: ml_collections.ConfigDict) -> np.ndarray:
    """The float64 β_1..β_T of `config.diffusion` (its `schedule_spec`): the one config → β path."""
    spec = schedule_spec(config)
    return schedules.get_betas(spec.pop("name"), spec.pop("num_timesteps"), **spec)


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples as lists), so stored and built metas compare equal."""
    return json.loads(json.dumps(value))


@dataclasses.dataclass(frozen=True)
class RunMeta:
    """The identity of a run's params: stored with every checkpoint as JSON."""

    model_name: str
    model_kwargs: dict
    data_shape: tuple[int, ...]
    schedule: dict
    pred: str
    source: dict = dataclasses.field(default_factory=dict)  # where converted params came from (not compared)
    latents: dict = dataclasses.field(default_factory=dict)  # the autoencoder of a latent run ({}: pixels)
    # The condition kinds' records (`Conditioning.record`: e.g. the low-res factor and augmentation of a
    # super-resolution run); {}: unconditional, or a checkpoint that records none (converted weights).
    condition: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, condition: dict | None = None,
                    condition_kwargs: dict | None = None) -> "RunMeta":
        """The config's meta; `condition` is its `Conditioning.record()` and `condition_kwargs` its
        `Conditioning.network_kwargs()` (the kinds are built a layer above, in setup)."""
        name, kwargs = model_spec(config, condition_kwargs)
        return cls(name, kwargs, tuple(data.example_shape(config.data)), schedule_spec(config),
                   str(config.diffusion.pred), latents=latent_data.latent_meta(config.data),
                   condition=dict(condition or {}))

    @classmethod
    def from_dict(cls, meta: dict, where: str = "the workdir") -> "RunMeta":
        """The meta as a checkpoint stores it (`to_dict`); `where` names the workdir in errors."""
        if latent_data.is_autoencoder_meta(meta):
            raise CheckpointMismatchError(
                f"{where} holds an autoencoder (--mode=train_autoencoder or convert --autoencoder-kl), not a DDPM; "
                f"continue it with --mode=train_autoencoder, or train a DDPM on its latents with "
                f"--config.data.latents_from={where} and a new --workdir.")
        try:
            return cls(str(meta["model"]["name"]), dict(meta["model"]["kwargs"]),
                       tuple(int(s) for s in meta["data_shape"]), dict(meta["schedule"]),
                       str(meta.get("pred", "eps")), dict(meta.get("source", {})), dict(meta.get("latents", {})),
                       dict(meta.get("condition", {})))
        except (KeyError, TypeError) as err:
            raise CheckpointMismatchError(
                f"the checkpoint's meta lacks {err}; it was not written by ddpm_jax (convert released "
                "weights with python -m ddpm_jax.convert).") from err

    def to_dict(self) -> dict:
        out = dict(model=dict(name=self.model_name, kwargs=_plain(self.model_kwargs)),
                   data_shape=list(self.data_shape), schedule=_plain(self.schedule), pred=self.pred)
        if self.source:
            out["source"] = _plain(self.source)
        if self.latents:  # only a latent run names it: pixel checkpoints keep their stored meta
            out["latents"] = _plain(self.latents)
        if self.condition:  # only a conditional run names it
            out["condition"] = _plain(self.condition)
        return out

    def structural(self) -> dict:
        """`to_dict()` without the source and the kwargs that leave the params unchanged."""
        out = self.to_dict()
        out.pop("source", None)
        for key in NON_STRUCTURAL_KWARGS:
            out["model"]["kwargs"].pop(key, None)
        return out

    def check_matches(self, stored: "RunMeta", where: str) -> None:
        """Raises CheckpointMismatchError naming the first structural entry where `stored` differs."""
        # The autoencoder first: another one changes the data shape too, and its name says more. The
        # condition last (the network's kwargs name a missing input better), and only where the
        # checkpoint records one: converted weights carry no record.
        theirs, mine = stored.structural(), self.structural()
        stored_condition, my_condition = theirs.pop("condition", {}), mine.pop("condition", {})
        found = (_first_difference({"latents": stored.latents}, {"latents": self.latents})
                 or _first_difference(theirs, mine)
                 or (stored_condition and _first_difference({"condition": stored_condition},
                                                            {"condition": my_condition})))
        if found:
            key, a, b = found
            if key.startswith("latents"):  # the autoencoder: name both, whatever field differs
                on = (f"the latents of autoencoder {stored.latents['autoencoder']!r}" if stored.latents
                      else "pixels (no data.latents_from)")
                raise CheckpointMismatchError(
                    f"{where} holds a DDPM trained on {on}, but the config gives data.latents_from="
                    f"{self.latents.get('autoencoder', '')!r} ({key}: {json.dumps(a)} there, {json.dumps(b)} here); "
                    "set --config.data.latents_from to the autoencoder it was trained on, or use a fresh --workdir.")
            raise CheckpointMismatchError(
                f"{where} holds a checkpoint with {key}={json.dumps(a)}, but the config gives "
                f"{key}={json.dumps(b)}; use a fresh --workdir or the config it was trained with.")


def _first_difference(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """(dotted key, stored value, current value) of the first difference, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None
    a, b = _plain(a), _plain(b)
    return None if a == b else (path, a, b)
