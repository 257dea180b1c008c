"""The DDPM U-Net (Ho et al. 2020, Appendix B): a PixelCNN++ backbone with timestep embedding.

As the official `diffusion_tf/models/unet.py`: conv_in; per resolution level `num_res_blocks`
residual blocks (self-attention after each block at the resolutions in `attn_resolutions`),
then a stride-2 downsample except at the last level; a middle block (res, attn, res); the
mirrored up path with `num_res_blocks + 1` blocks per level, each fed `concat([h, skip])`,
nearest x2 upsampling; GroupNorm, swish, zero-initialised conv_out. Images are NHWC.

Parameter tree (diffusers `UNet2DModel` names with `.i` written `_i`):
`time_embedding/linear_{1,2}`, `conv_in`, `down_blocks_i/{resnets_j,attentions_j,downsamplers_0}`,
`mid_block/{resnets_0,attentions_0,resnets_1}`, `up_blocks_i/{resnets_j,attentions_j,upsamplers_0}`
(up_blocks_0 is the lowest resolution, as in diffusers), `conv_norm_out`, `conv_out`.

Class conditioning (`num_classes > 0`): a learned embedding `class_embedding` (nn.Embed of
num_classes + 1 rows, 4ch wide; row `num_classes` is the null class of classifier-free guidance,
Ho & Salimans 2022) is added to the timestep embedding, as improved-diffusion's `label_emb` and
diffusers' `class_embedding` (num_class_embeds). With `num_classes = 0` the network, its
parameter tree and its outputs are exactly the unconditional ones.

Text / context conditioning (`context_dim > 0`; Rombach et al. 2022, LDM §3.3): a
`SpatialTransformer` (`models/attention.py`: self-attention, cross-attention to a context
[B, L, context_dim], GEGLU MLP) follows each residual block (after its self-attention, if any)
at the resolutions in `transformer_resolutions`, named `transformers_j`, and one follows the
middle block's self-attention (`mid_block/transformers_0`, as LDM's middle block always has one).
With `vocab_size > 0` the context comes from a `TextEncoder` inside the network (`text_encoder`,
width context_dim, trained jointly, `models/text.py`) applied to `tokens` int32 [B, L]; with
`vocab_size = 0` a precomputed `context` (and `context_mask`) can be passed instead. No tokens
and no context is the fully masked context: every cross-attention adds exactly zero. With the
defaults (`context_dim = 0`, `transformer_resolutions = ()`) nothing of this exists: the
parameter tree and the outputs are exactly those of the network above.

Image conditioning (`low_res_channels > 0`; super-resolution, SR3, Saharia et al. 2021):
`cond["low_res"]` [B, h, w, low_res_channels], H and W multiples of h and w, is upsampled to
x_t's size by nearest neighbour (pixel repetition) and concatenated to x_t before `conv_in`,
whose input channels grow by low_res_channels. SR3 upsamples bicubically; nearest is chosen
because it is the exact right inverse of the data's box downsampling (downsampling the
upsampled image gives the input back), adds no ringing outside [−1, 1], and the first
convolution can learn any interpolation from it. Its noise-conditioning level
`cond["low_res_level"]` int [B] (cascaded diffusion, Ho et al. 2021 §4.3) is embedded like t
(`low_res_level_embedding`, a `TimestepEmbedding`) and added to temb. Missing entries are the
null condition (a zero image at level 0). With the default 0 none of this exists.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ddpm_jax.models.attention import SpatialTransformer
from ddpm_jax.models.layers import (ATTENTION_IMPLS, NUM_GROUPS, AttnBlock, ClassEmbedding, Downsample,
                                    ResnetBlock, TimestepEmbedding, Upsample, default_init, group_norm)
from ddpm_jax.models.text import NULL_ID, TextEncoder

Dtype = Any
# The condition entries the network reads: a class index, caption tokens, or a precomputed
# cross-attention context with its mask, a low-resolution image with its augmentation level.
COND_KEYS = ("label", "tokens", "context", "context_mask", "low_res", "low_res_level")


def size_multiple(ch_mult) -> int:
    """What H and W must be multiples of: each of the len(ch_mult) - 1 downsamplings halves them."""
    return 2 ** (len(ch_mult) - 1)


def _resnet_cls(remat: bool) -> type[nn.Module]:
    # static_argnums counts `self` as 0: (self, x, temb, train) -> `train` is static.
    return nn.remat(ResnetBlock, static_argnums=(3,)) if remat else ResnetBlock


def _transformer(block: nn.Module, name: str, h: jnp.ndarray, ctx) -> jnp.ndarray:
    """h -> SpatialTransformer(h, *ctx) inside `block` when it has them, else h unchanged."""
    if not block.use_transformer:
        return h
    return SpatialTransformer(block.transformer_heads, block.context_dim, block.transformer_depth,
                              dtype=block.dtype, param_dtype=block.param_dtype,
                              attention_impl=block.attention_impl, name=name)(h, *ctx)


class DownBlock(nn.Module):
    """One resolution level of the contracting path; returns (h, outputs kept for the skips)."""

    out_ch: int
    num_res_blocks: int
    use_attn: bool
    add_downsample: bool
    dropout: float
    resamp_with_conv: bool
    dtype: Dtype
    param_dtype: Dtype
    attention_impl: str
    remat: bool
    # SpatialTransformers after each block (none with the default False).
    use_transformer: bool = False
    transformer_heads: int = 8
    transformer_depth: int = 1
    context_dim: int = 0

    @nn.compact
    def __call__(self, h, temb, train: bool, ctx=(None, None)):
        resnet = _resnet_cls(self.remat)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        outputs = []
        for j in range(self.num_res_blocks):
            h = resnet(self.out_ch, self.dropout, name=f"resnets_{j}", **kw)(h, temb, train)
            if self.use_attn:
                h = AttnBlock(attention_impl=self.attention_impl, name=f"attentions_{j}", **kw)(h)
            h = _transformer(self, f"transformers_{j}", h, ctx)
            outputs.append(h)
        if self.add_downsample:
            h = Downsample(self.resamp_with_conv, name="downsamplers_0", **kw)(h)
            outputs.append(h)
        return h, outputs


class MidBlock(nn.Module):
    """The bottleneck: res block, self-attention, (SpatialTransformer,) res block."""

    dropout: float
    dtype: Dtype
    param_dtype: Dtype
    attention_impl: str
    remat: bool
    # SpatialTransformers after each block (none with the default False).
    use_transformer: bool = False
    transformer_heads: int = 8
    transformer_depth: int = 1
    context_dim: int = 0

    @nn.compact
    def __call__(self, h, temb, train: bool, ctx=(None, None)):
        resnet = _resnet_cls(self.remat)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = h.shape[-1]
        h = resnet(c, self.dropout, name="resnets_0", **kw)(h, temb, train)
        h = AttnBlock(attention_impl=self.attention_impl, name="attentions_0", **kw)(h)
        h = _transformer(self, "transformers_0", h, ctx)
        return resnet(c, self.dropout, name="resnets_1", **kw)(h, temb, train)


class UpBlock(nn.Module):
    """One resolution level of the expanding path: `num_res_blocks + 1` blocks on [h, skip]."""

    out_ch: int
    num_res_blocks: int
    use_attn: bool
    add_upsample: bool
    dropout: float
    resamp_with_conv: bool
    dtype: Dtype
    param_dtype: Dtype
    attention_impl: str
    remat: bool
    # SpatialTransformers after each block (none with the default False).
    use_transformer: bool = False
    transformer_heads: int = 8
    transformer_depth: int = 1
    context_dim: int = 0

    @nn.compact
    def __call__(self, h, skips: Sequence[jnp.ndarray], temb, train: bool, ctx=(None, None)):
        """`skips` in consumption order (the most recent down-path output first)."""
        resnet = _resnet_cls(self.remat)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_res_blocks + 1):
            # Official order: concat([h, hs.pop()]) (diffusers: torch.cat([h, res], dim=1)).
            h = jnp.concatenate([h, skips[j].astype(h.dtype)], axis=-1)
            h = resnet(self.out_ch, self.dropout, name=f"resnets_{j}", **kw)(h, temb, train)
            if self.use_attn:
                h = AttnBlock(attention_impl=self.attention_impl, name=f"attentions_{j}", **kw)(h)
            h = _transformer(self, f"transformers_{j}", h, ctx)
        if self.add_upsample:
            h = Upsample(self.resamp_with_conv, name="upsamplers_0", **kw)(h)
        return h


class UNet(nn.Module):
    """The DDPM U-Net: `apply({"params": p}, x [B,H,W,C], t [B] or scalar, cond=None, train=False)` -> [B,H,W,out_ch].

    `cond` is the condition pytree (a dict, `conditioning.py`; None or {}: unconditional) and the
    network decides what each entry means (`COND_KEYS`). `num_classes > 0` makes it
    class-conditional: `cond["label"]` int [B] (or a scalar) in 0..num_classes, where
    `num_classes` is the null (unconditional) class, as is a missing label. With
    `num_classes = 0` (the default) a label is an error.

    `dtype` is the compute dtype (float32 or bfloat16); parameters are `param_dtype`. GroupNorm
    statistics, the attention softmax, the output norm/conv and the returned array are float32.
    `attention_impl` selects `jax.nn.dot_product_attention`'s implementation ("xla" everywhere,
    "cudnn" for the fused GPU kernel: bfloat16/float16 compute, per-head dim <= 128, or <= 256 on
    Hopper). `remat=True` rematerialises every residual block in the backward pass.
    Dropout is active only with `train=True` and then needs the "dropout" rng.

    Context conditioning (see the module docstring): `context_dim > 0` adds SpatialTransformers
    (`transformer_heads` heads, `transformer_depth` blocks each) at `transformer_resolutions` and in
    the middle block. `vocab_size > 0` adds the jointly trained `text_encoder` (`text_layers`
    blocks of `text_heads` heads, position table of `context_length`): `cond["tokens"]` int32
    [B, L <= context_length] (`text.Tokenizer.encode`). Otherwise `cond["context"]` [B, L,
    context_dim] with an optional bool `cond["context_mask"]` [B, L]. Neither: the fully masked
    (null) context.
    """

    ch: int = 128
    out_ch: int = 3
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    remat: bool = False
    num_classes: int = 0
    transformer_resolutions: Sequence[int] = ()
    context_dim: int = 0
    transformer_heads: int = 8
    transformer_depth: int = 1
    vocab_size: int = 0
    context_length: int = 16
    text_layers: int = 2
    text_heads: int = 4
    low_res_channels: int = 0

    def _check(self, x: jnp.ndarray, dtype: jnp.dtype) -> None:
        if x.ndim != 4:
            raise ValueError(f"UNet expects NHWC images [B, H, W, C], got shape {x.shape}; "
                             "add the batch axis / move channels last.")
        factor = size_multiple(self.ch_mult)
        height, width = x.shape[1], x.shape[2]
        if height % factor or width % factor:
            raise ValueError(
                f"UNet with {len(self.ch_mult)} levels (ch_mult={tuple(self.ch_mult)}) needs H and W "
                f"divisible by {factor}, got {height}x{width}; resize/crop the images or use fewer levels.")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % NUM_GROUPS]
        if bad:
            raise ValueError(f"channel counts {bad} (ch={self.ch}, ch_mult={tuple(self.ch_mult)}) are not "
                             f"divisible by the {NUM_GROUPS} GroupNorm groups; use ch a multiple of 32.")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r} is unknown; "
                             f"use one of {ATTENTION_IMPLS}.")
        if self.attention_impl == "cudnn" and dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"attention_impl='cudnn' needs a bfloat16/float16 compute dtype, got {dtype}; "
                             "set dtype='bfloat16' or attention_impl='xla'.")
        if self.transformer_resolutions and not self.context_dim:
            raise ValueError(f"transformer_resolutions={tuple(self.transformer_resolutions)} needs a context: "
                             "set model.context_dim > 0 (the text encoder's width).")
        if self.vocab_size and not self.context_dim:
            raise ValueError(f"vocab_size={self.vocab_size} (a text encoder) needs model.context_dim > 0, "
                             "its width.")
        if self.vocab_size and self.context_length < 1:
            raise ValueError(f"context_length={self.context_length} must be >= 1 for a text encoder: "
                             "set model.context_length to the longest caption's word count.")

    def _context(self, tokens, context, context_mask, batch: int, dtype, param_dtype):
        """(context, mask) for the SpatialTransformers: from the text encoder, as given, or (None, None)."""
        if not self.context_dim:
            if tokens is not None or context is not None:
                raise ValueError("tokens / context were given to a U-Net without cross-attention "
                                 "(context_dim=0); set model.context_dim > 0 or pass neither.")
            return None, None
        if tokens is not None and context is not None:
            raise ValueError("pass tokens (the U-Net's own text encoder) or a precomputed context, not both.")
        if tokens is not None:
            if not self.vocab_size:
                raise ValueError("tokens were given but the U-Net has no text encoder (vocab_size=0); "
                                 "set model.vocab_size to the tokenizer's vocab_size or pass a context.")
            tokens = jnp.asarray(tokens)
            if tokens.ndim != 2 or tokens.shape[0] != batch:
                raise ValueError(f"tokens must have shape [{batch}, L] (the batch, the context length), "
                                 f"got {tokens.shape}.")
            return TextEncoder(self.vocab_size, self.context_length, self.context_dim, self.text_layers,
                               self.text_heads, dtype=dtype, param_dtype=param_dtype, name="text_encoder")(tokens)
        if self.vocab_size and self.is_initializing():
            # Initialised without captions: create the encoder's parameters (from the null caption);
            # the transformers still see the fully masked context below.
            null = jnp.full((batch, 1), NULL_ID, jnp.int32)
            TextEncoder(self.vocab_size, self.context_length, self.context_dim, self.text_layers,
                        self.text_heads, dtype=dtype, param_dtype=param_dtype, name="text_encoder")(null)
        return context, context_mask

    def _with_low_res(self, x: jnp.ndarray, low_res, level) -> tuple[jnp.ndarray, jnp.ndarray]:
        """(x_t with the nearest-upsampled low-res image concatenated, its level [B]); None: ∅."""
        batch, height, width = x.shape[:3]
        if low_res is None:
            low_res = jnp.zeros((batch, height, width, self.low_res_channels), x.dtype)
        low_res = jnp.asarray(low_res)
        h, w = low_res.shape[1:3] if low_res.ndim == 4 else (0, 0)
        if (low_res.shape[0], low_res.shape[-1]) != (batch, self.low_res_channels) or not h or height % h or width % w:
            raise ValueError(f"cond['low_res'] has shape {low_res.shape}, x_t {x.shape}: it must be [{batch}, h, w, "
                             f"{self.low_res_channels}] with h, w dividing {height}, {width}.")
        up = jnp.repeat(jnp.repeat(low_res, height // h, axis=1), width // w, axis=2)
        level = jnp.zeros((batch,), jnp.int32) if level is None else jnp.broadcast_to(jnp.asarray(level), (batch,))
        return jnp.concatenate([x, up.astype(x.dtype)], axis=-1), level

    @nn.compact
    def __call__(self, x: jnp.ndarray, t: jnp.ndarray, cond: dict | None = None,
                 train: bool = False) -> jnp.ndarray:
        dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
        self._check(x, dtype)
        cond = {} if cond is None else dict(cond)
        unknown = sorted(set(cond) - set(COND_KEYS))
        if unknown:
            raise ValueError(f"cond[{unknown[0]!r}] is not read by the UNet; its entries are {COND_KEYS}.")
        y, tokens = cond.get("label"), cond.get("tokens")
        context, context_mask = cond.get("context"), cond.get("context_mask")
        batch = x.shape[0]
        t = jnp.asarray(t)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (batch,))
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or have shape [{batch}] (the batch), got {t.shape}.")
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        blk = dict(dropout=self.dropout, attention_impl=self.attention_impl, remat=self.remat, **kw)
        num_levels = len(self.ch_mult)

        temb = TimestepEmbedding(self.ch, name="time_embedding", **kw)(t)
        if self.num_classes:
            temb = temb + ClassEmbedding(self.num_classes, 4 * self.ch, name="class_embedding", **kw)(y, batch)
        elif y is not None:
            raise ValueError("cond['label'] was given to an unconditional UNet (num_classes=0); "
                             "set model.num_classes > 0 or leave the label out.")
        ctx = self._context(tokens, context, context_mask, batch, dtype, param_dtype)
        if self.low_res_channels:
            x, level = self._with_low_res(x, cond.get("low_res"), cond.get("low_res_level"))
            temb = temb + TimestepEmbedding(self.ch, name="low_res_level_embedding", **kw)(level)
        elif cond.get("low_res") is not None:
            raise ValueError("cond['low_res'] was given to a UNet without image conditioning "
                             "(low_res_channels=0); set data.low_res_factor > 0 or leave it out.")
        if self.context_dim:
            blk.update(transformer_heads=self.transformer_heads, transformer_depth=self.transformer_depth,
                       context_dim=self.context_dim)
        use_transformer = lambda h: bool(self.context_dim) and h.shape[1] in self.transformer_resolutions  # noqa: E731
        h = nn.Conv(self.ch, (3, 3), padding="SAME", kernel_init=default_init(), name="conv_in", **kw)(x)
        skips = [h]
        for i, mult in enumerate(self.ch_mult):
            h, outputs = DownBlock(
                self.ch * mult, self.num_res_blocks, use_attn=h.shape[1] in self.attn_resolutions,
                add_downsample=i != num_levels - 1, resamp_with_conv=self.resamp_with_conv,
                use_transformer=use_transformer(h), name=f"down_blocks_{i}", **blk)(h, temb, train, ctx)
            skips.extend(outputs)

        h = MidBlock(use_transformer=bool(self.context_dim), name="mid_block", **blk)(h, temb, train, ctx)

        for k, i in enumerate(reversed(range(num_levels))):
            level_skips = tuple(skips.pop() for _ in range(self.num_res_blocks + 1))
            h = UpBlock(
                self.ch * self.ch_mult[i], self.num_res_blocks,
                use_attn=h.shape[1] in self.attn_resolutions, add_upsample=i != 0,
                resamp_with_conv=self.resamp_with_conv, use_transformer=use_transformer(h),
                name=f"up_blocks_{k}", **blk,
            )(h, level_skips, temb, train, ctx)
        assert not skips, "every skip connection must be consumed"

        # Output head in float32: the returned eps (and the loss built on it) stay full precision.
        h = nn.swish(group_norm("conv_norm_out", param_dtype, jnp.float32)(h))
        return nn.Conv(self.out_ch, (3, 3), padding="SAME", kernel_init=default_init(0.0),
                       dtype=jnp.float32, param_dtype=param_dtype, name="conv_out")(h)
