"""Building blocks of the DDPM U-Net (Ho et al. 2020, Appendix B; official `diffusion_tf/nn.py`).

Module and parameter names follow the diffusers `UNet2DModel` layout (`resnets_0/conv1`,
`attentions_0/to_q`, ...), so a released checkpoint maps onto these modules by a fixed renaming
(see `ddpm_jax.convert.diffusers`). The official TF names are given in comments.

Mixed precision: every layer computes in `dtype` (e.g. bfloat16) with `param_dtype` (float32)
parameters; GroupNorm statistics and the attention softmax are always computed in float32.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models.group_norm import GroupNorm

Dtype = Any

NUM_GROUPS = 32  # GroupNorm groups in every normalisation layer (official `nn.normalize`).
NORM_EPS = 1e-6  # GroupNorm epsilon of the official code (diffusers `norm_eps=1e-6`).
ATTENTION_IMPLS = ("xla", "cudnn")


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
    """The official initialiser: variance scaling, fan_avg, uniform; `scale == 0` gives zeros.

    The official code uses scale 1e-10 for its "zero" layers; exact zeros make a fresh
    model output exactly 0, which is what the paper's init intends.
    """
    if scale == 0.0:
        return nn.initializers.zeros_init()
    return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def get_timestep_embedding(t: jnp.ndarray, dim: int) -> jnp.ndarray:
    """Sinusoidal embedding of (0-based) timesteps, float32 [B, dim].

    As the official `get_timestep_embedding`: frequencies exp(-log(10000) * i / (half - 1)),
    i = 0..half-1, then [sin, cos] concatenated (diffusers: flip_sin_to_cos=False, freq_shift=1);
    an odd `dim` is zero-padded by one column.
    """
    if dim < 4:
        raise ValueError(f"timestep embedding dim must be >= 4, got {dim}; use a larger ch.")
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * (-math.log(10000.0) / (half - 1)))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def group_norm(name: str, param_dtype: Dtype, dtype: Dtype, num_groups: int = NUM_GROUPS) -> GroupNorm:
    """GroupNorm(32, eps=1e-6): statistics in float32 (two-pass variance), output in `dtype`.

    `num_groups` other than 32 serves the autoencoder (diffusers' `norm_num_groups`).
    """
    return GroupNorm(num_groups=num_groups, epsilon=NORM_EPS, dtype=dtype, param_dtype=param_dtype, name=name)


class TimestepEmbedding(nn.Module):
    """t -> sinusoid(ch) -> Dense(4ch) -> swish -> Dense(4ch) (official `dense0`, `dense1`)."""

    ch: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jnp.ndarray) -> jnp.ndarray:
        dense = functools.partial(nn.Dense, 4 * self.ch, kernel_init=default_init(), dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        emb = dense(name="linear_1")(get_timestep_embedding(t, self.ch))
        return dense(name="linear_2")(nn.swish(emb))


class ClassEmbedding(nn.Module):
    """Class label -> learned 4ch vector; row `num_classes` is the null class (Ho & Salimans 2022).

    As improved-diffusion's `label_emb` (nn.Embedding) and diffusers' `class_embedding`
    (num_class_embeds): the vector is added to the timestep embedding. `y=None` is the null class
    for the whole batch. A label outside 0..num_classes gives NaN (jnp.take's fill), never
    another class's row; `checks.py` refuses such labels before sampling.
    """

    num_classes: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, y: jnp.ndarray | None, batch: int) -> jnp.ndarray:
        if y is None:
            y = jnp.full((batch,), self.num_classes, jnp.int32)
        y = jnp.asarray(y)
        if not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(f"class labels y must be integers, got dtype {y.dtype}; pass int32 labels.")
        if y.ndim == 0:
            y = jnp.broadcast_to(y, (batch,))
        if y.shape != (batch,):
            raise ValueError(f"class labels y must be a scalar or have shape [{batch}] (the batch), "
                             f"got {y.shape}.")
        # N(0, 1): torch.nn.Embedding's init, as diffusers and improved-diffusion.
        table = self.param("embedding", nn.initializers.normal(1.0), (self.num_classes + 1, self.features),
                           self.param_dtype)
        emb = jnp.take(table, y.astype(jnp.int32), axis=0, mode="fill", fill_value=jnp.nan)
        return emb.astype(self.dtype)


class ResnetBlock(nn.Module):
    """Residual block: norm, swish, conv3x3, + Dense(swish(temb)), norm, swish, dropout, conv3x3.

    The second conv is zero-initialised, so a fresh block is the identity on its shortcut.
    When the channel count changes the shortcut is a 1x1 conv (official `nin_shortcut`,
    diffusers `conv_shortcut`). `temb=None` leaves out the timestep projection (the
    autoencoder's blocks: diffusers' `temb_channels=None`).
    """

    out_ch: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    num_groups: int = NUM_GROUPS

    @nn.compact
    def __call__(self, x: jnp.ndarray, temb: jnp.ndarray | None, train: bool = False) -> jnp.ndarray:
        conv = functools.partial(nn.Conv, self.out_ch, padding="SAME", dtype=self.dtype,
                                 param_dtype=self.param_dtype)
        h = nn.swish(group_norm("norm1", self.param_dtype, self.dtype, self.num_groups)(x))
        h = conv((3, 3), kernel_init=default_init(), name="conv1")(h)
        if temb is not None:
            temb = nn.Dense(self.out_ch, kernel_init=default_init(), dtype=self.dtype,
                            param_dtype=self.param_dtype, name="time_emb_proj")(nn.swish(temb))
            h = h + temb[:, None, None, :]
        h = nn.swish(group_norm("norm2", self.param_dtype, self.dtype, self.num_groups)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv((3, 3), kernel_init=default_init(0.0), name="conv2")(h)
        if x.shape[-1] != self.out_ch:
            x = conv((1, 1), kernel_init=default_init(), name="conv_shortcut")(x)
        return (x + h).astype(self.dtype)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection.

    q, k, v and the output projection are per-pixel linear maps (official `nin`, diffusers
    Linear `to_q/to_k/to_v/to_out.0`); weights softmax(q k^T / sqrt(C)) in float32; the
    output projection is zero-initialised.
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    num_groups: int = NUM_GROUPS

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b, height, width, c = x.shape
        dense = functools.partial(nn.Dense, c, dtype=self.dtype, param_dtype=self.param_dtype)
        h = group_norm("group_norm", self.param_dtype, self.dtype, self.num_groups)(x)
        # [B, H*W, 1 head, C]: the layout jax.nn.dot_product_attention expects.
        h = h.reshape(b, height * width, 1, c)
        q, k, v = (dense(kernel_init=default_init(), name=n)(h) for n in ("to_q", "to_k", "to_v"))
        # The XLA path computes logits and softmax in float32 for bf16 inputs; cuDNN's fused
        # kernel accumulates in float32 too.
        h = jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(c),
                                         implementation=self.attention_impl)
        h = dense(kernel_init=default_init(0.0), name="to_out")(h).reshape(b, height, width, c)
        return (x + h).astype(self.dtype)


class Downsample(nn.Module):
    """Halve H and W: conv3x3 stride 2 padded only right/bottom (TF 'SAME'), or 2x2 average pool."""

    with_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.with_conv:
            # The official conv2d pads 'SAME' with stride 2 on even sizes: (0, 1) per spatial axis
            # (diffusers: downsample_padding=0 with F.pad (0, 1, 0, 1)).
            return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)),
                           kernel_init=default_init(), dtype=self.dtype,
                           param_dtype=self.param_dtype, name="conv")(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then (optionally) conv3x3."""

    with_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if self.with_conv:
            x = nn.Conv(x.shape[-1], (3, 3), padding="SAME", kernel_init=default_init(),
                        dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
        return x
