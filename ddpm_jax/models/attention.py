"""Cross-attention conditioning: LDM's SpatialTransformer (Rombach et al. 2022, §3.3, eq. (3)).

A U-Net feature map z [B, H, W, C] attends to a context sequence c [B, L, D] (the text
encoder's output, `models/text.py`):

    SpatialTransformer(z, c) = z + proj_out(Block^depth(proj_in(GroupNorm(z)), c))
    Block(h, c) = h' + MLP(LN(h')),  h' = h'' + CrossAttn(LN(h''), c),  h'' = h + SelfAttn(LN(h))

with Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V over `heads` heads (Vaswani et al. 2017),
Q = W_Q h, K = W_K c, V = W_V c for the cross-attention (LDM eq. (3)), and a GEGLU MLP
(Shazeer 2020; LDM's `FeedForward(glu=True)`, 4x wide). proj_in / proj_out are 1x1 convs as in
LDM's SpatialTransformer; proj_out is zero-initialised (LDM's `zero_module`), so a fresh block
is the identity. Module names follow diffusers' `Transformer2DModel` / `BasicTransformerBlock`
(`norm`, `proj_in`, `transformer_blocks_0/{norm1,attn1,norm2,attn2,norm3,ff}`, `proj_out`).

The null context (a decision, tested in tests/test_text.py). `context_mask` [B, L] marks the
real context entries. A query with NO visible key gets an attention output of exactly zero
(after `to_out`, bias included) instead of softmax's uniform average over padding: so with
every key masked, or `context=None`, the cross-attention branch adds exactly 0.0 and the block
equals the same block without cross-attention (self-attention + MLP), bit for bit. This is the
"no conditioning information" path. Classifier-free guidance does NOT use it: its null is the
empty caption "" (one learned `<null>` token through the text encoder, `text.Tokenizer`), which
caption dropout trains, as LDM's text-to-image model trains on empty captions.

Precision: LayerNorm and GroupNorm statistics and the attention softmax are float32; the rest
computes in `dtype`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models.layers import default_init, group_norm

Dtype = Any
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, as LDM's transformer blocks.


def layer_norm(name: str, param_dtype: Dtype, dtype: Dtype) -> nn.LayerNorm:
    """LayerNorm over the last axis, statistics in float32 (two-pass variance)."""
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, param_dtype=param_dtype,
                        use_fast_variance=False, name=name)


class MultiHeadAttention(nn.Module):
    """Multi-head (self- or cross-) attention with an optional key mask; `to_out` has the bias.

    `x` [B, T, Dx] gives the queries, `context` [B, S, Dc] (default `x`) the keys and values;
    `mask` bool [B, S] marks visible keys. A query row with no visible key returns exactly 0.
    """

    heads: int
    head_dim: int
    out_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray | None = None,
                 mask: jnp.ndarray | None = None) -> jnp.ndarray:
        context = x if context is None else context
        inner = self.heads * self.head_dim
        # No bias on q, k, v, as LDM's CrossAttention (to_q/to_k/to_v bias=False).
        dense = functools.partial(nn.Dense, inner, use_bias=False, kernel_init=default_init(),
                                  dtype=self.dtype, param_dtype=self.param_dtype)
        split = lambda a: a.reshape(a.shape[0], a.shape[1], self.heads, self.head_dim)  # noqa: E731
        q = split(dense(name="to_q")(x))
        k = split(dense(name="to_k")(context))
        v = split(dense(name="to_v")(context))
        # A boolean mask needs the XLA path (the cuDNN kernel takes sequence lengths only).
        impl = self.attention_impl if mask is None else "xla"
        attn_mask = None if mask is None else mask[:, None, None, :]
        h = jax.nn.dot_product_attention(q, k, v, mask=attn_mask, scale=1.0 / math.sqrt(self.head_dim),
                                         implementation=impl)
        h = nn.Dense(self.out_dim, kernel_init=default_init(), dtype=self.dtype, param_dtype=self.param_dtype,
                     name="to_out")(h.reshape(x.shape[0], x.shape[1], inner))
        if mask is not None:
            # Nothing to attend to: contribute nothing (softmax would average the padding instead).
            h = jnp.where(jnp.any(mask, axis=-1)[:, None, None], h, jnp.zeros((), h.dtype))
        return h


class GEGLU(nn.Module):
    """Dense(2 * inner) -> a * GELU(gate) -> Dense(dim) (Shazeer 2020; LDM FeedForward(glu=True))."""

    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        dense = functools.partial(nn.Dense, kernel_init=default_init(), dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        a, gate = jnp.split(dense(2 * self.mult * self.dim, name="proj")(x), 2, axis=-1)
        # Exact (erf) GELU, as torch's F.gelu in LDM's GEGLU.
        return dense(self.dim, name="proj_out")(a * nn.gelu(gate, approximate=False))


class BasicTransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention to the context, GEGLU MLP; each residual."""

    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, h: jnp.ndarray, context: jnp.ndarray, context_mask: jnp.ndarray) -> jnp.ndarray:
        dim = h.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = functools.partial(MultiHeadAttention, self.heads, self.head_dim, dim,
                                 attention_impl=self.attention_impl, **kw)
        h = h + attn(name="attn1")(layer_norm("norm1", **kw)(h))
        h = h + attn(name="attn2")(layer_norm("norm2", **kw)(h), context, context_mask)
        return h + GEGLU(dim, name="ff", **kw)(layer_norm("norm3", **kw)(h))


class SpatialTransformer(nn.Module):
    """z [B, H, W, C] attends to `context` [B, L, context_dim]; returns z + the zero-init'ed update.

    `context=None` is the fully masked context (every key hidden): the cross-attention adds
    exactly zero (see the module docstring). `context_mask` bool [B, L] (default: all visible).
    """

    heads: int
    context_dim: int
    depth: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray | None = None,
                 context_mask: jnp.ndarray | None = None) -> jnp.ndarray:
        b, height, width, c = x.shape
        if c % self.heads:
            raise ValueError(f"SpatialTransformer: {c} channels are not divisible by {self.heads} heads; "
                             "set model.transformer_heads to a divisor of every level's channel count.")
        if context is None:
            # A one-entry, fully masked context: the parameters exist (init without captions works)
            # and the cross-attention contributes exactly 0.
            context = jnp.zeros((b, 1, self.context_dim), self.dtype)
            context_mask = jnp.zeros((b, 1), bool)
        elif context_mask is None:
            context_mask = jnp.ones(context.shape[:2], bool)
        if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != self.context_dim:
            raise ValueError(f"context must have shape [{b}, L, {self.context_dim}] (batch, length, "
                             f"model.context_dim), got {context.shape}.")
        if context_mask.shape != context.shape[:2]:
            raise ValueError(f"context_mask must have shape {context.shape[:2]} (the context's batch and "
                             f"length), got {context_mask.shape}.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv = functools.partial(nn.Conv, c, (1, 1), **kw)
        h = group_norm("norm", self.param_dtype, self.dtype)(x)
        h = conv(kernel_init=default_init(), name="proj_in")(h).reshape(b, height * width, c)
        context = context.astype(self.dtype)
        for d in range(self.depth):
            h = BasicTransformerBlock(self.heads, c // self.heads, attention_impl=self.attention_impl,
                                      name=f"transformer_blocks_{d}", **kw)(h, context, context_mask)
        h = conv(kernel_init=default_init(0.0), name="proj_out")(h.reshape(b, height, width, c))
        return (x + h).astype(self.dtype)
