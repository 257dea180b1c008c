"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, "LDM", Sec. 3.1, App. G).

The "KL-f4 / KL-f8" first stage: an encoder E maps an image x [H, W, C] to a diagonal Gaussian
posterior q(z|x) over latents z [H/f, W/f, c] (f = 2**(levels - 1)), and a decoder D maps z back
to an image. Training pulls q(z|x) slightly towards N(0, I) (a KL weight ~1e-6), so the latent
space stays well scaled without the VAE's full prior matching.

Layout = diffusers' `AutoencoderKL` (the Stable Diffusion VAE):

    encoder: conv_in; down_blocks_i = layers_per_block ResnetBlocks (+ a stride-2 downsample
             except at the last level); mid_block = resnet, attention, resnet; GroupNorm, swish,
             conv_out to 2c channels (mean and log-variance)
    quant_conv (1x1, 2c -> 2c)                 post_quant_conv (1x1, c -> c)
    decoder: conv_in (c -> last width); mid_block; up_blocks_i = layers_per_block + 1 ResnetBlocks
             (+ nearest x2 and conv except at the last), widths reversed; GroupNorm, swish, conv_out

Parameter names are diffusers' with `.i` written `_i` (`encoder/down_blocks_0/resnets_1/conv1`,
`decoder/mid_block/attentions_0/to_q`, `quant_conv`), so importing a diffusers checkpoint is a
renaming plus layout changes (`ddpm_jax.convert.autoencoder_kl`). The blocks are the U-Net's
(`layers.py`) without a timestep embedding.

```python
ae = AutoencoderKL(block_out_channels=(64, 128, 128), latent_channels=4)   # f = 4
params = ae.init(key, x)["params"]
posterior = ae.apply({"params": params}, x, method="encode")      # DiagonalGaussian
z = posterior.sample(key)                                          # or posterior.mode()
x_rec = ae.apply({"params": params}, z, method="decode")
kl = posterior.kl()                                                # [B], KL(q(z|x) || N(0, I))
```
"""

from __future__ import annotations

from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models.layers import AttnBlock, Downsample, ResnetBlock, Upsample, default_init, group_norm

Dtype = Any
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # LDM's `DiagonalGaussianDistribution` clamp (exp stays finite)


@flax.struct.dataclass
class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))) over latents [B, h, w, c]; logvar clipped to [-30, 20]."""

    mean: jnp.ndarray
    logvar: jnp.ndarray

    @classmethod
    def from_moments(cls, moments: jnp.ndarray) -> "DiagonalGaussian":
        """Splits the encoder's 2c channels into (mean, logvar), as LDM and diffusers (mean first)."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

    @property
    def std(self) -> jnp.ndarray:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jnp.ndarray:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jnp.ndarray:
        """z = mean + std * eps, eps ~ N(0, I) from `key` (the reparameterisation trick)."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jnp.ndarray:
        return self.mean

    def kl(self) -> jnp.ndarray:
        """KL(q || N(0, I)) per example, summed over the latent, in nats [B].

        Kingma & Welling 2014, App. B: -KL = 1/2 sum(1 + log s^2 - m^2 - s^2).
        """
        terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        return 0.5 * jnp.sum(terms.astype(jnp.float32), axis=tuple(range(1, terms.ndim)))


class MidBlock(nn.Module):
    """resnet, single-head self-attention (optional), resnet at the lowest resolution."""

    add_attention: bool
    num_groups: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, h: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, num_groups=self.num_groups)
        c = h.shape[-1]
        h = ResnetBlock(c, name="resnets_0", **kw)(h, None)
        if self.add_attention:
            h = AttnBlock(name="attentions_0", **kw)(h)
        return ResnetBlock(c, name="resnets_1", **kw)(h, None)


class _Level(nn.Module):
    """`num_layers` ResnetBlocks of `out_ch` channels, then a down- or upsample (or neither)."""

    out_ch: int
    num_layers: int
    resample: str  # "down" | "up" | ""
    num_groups: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, h: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            h = ResnetBlock(self.out_ch, num_groups=self.num_groups, name=f"resnets_{j}", **kw)(h, None)
        if self.resample == "down":  # stride 2, padded right/bottom (diffusers' downsample_padding=0)
            h = Downsample(True, name="downsamplers_0", **kw)(h)
        elif self.resample == "up":
            h = Upsample(True, name="upsamplers_0", **kw)(h)
        return h


def _head(h: jnp.ndarray, out_ch: int, num_groups: int, param_dtype: Dtype) -> jnp.ndarray:
    """GroupNorm, swish, conv3x3: the last layers of the encoder and the decoder, in float32."""
    h = nn.swish(group_norm("conv_norm_out", param_dtype, jnp.float32, num_groups)(h))
    return nn.Conv(out_ch, (3, 3), padding="SAME", kernel_init=default_init(), dtype=jnp.float32,
                   param_dtype=param_dtype, name="conv_out")(h)


class Encoder(nn.Module):
    """x [B, H, W, C] -> moments [B, H/f, W/f, 2 * latent_channels]."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    latent_channels: int
    num_groups: int
    mid_block_add_attention: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(num_groups=self.num_groups, dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Conv(self.block_out_channels[0], (3, 3), padding="SAME", kernel_init=default_init(),
                    dtype=self.dtype, param_dtype=self.param_dtype, name="conv_in")(x)
        last = len(self.block_out_channels) - 1
        for i, ch in enumerate(self.block_out_channels):
            h = _Level(ch, self.layers_per_block, "down" if i < last else "", name=f"down_blocks_{i}", **kw)(h)
        h = MidBlock(self.mid_block_add_attention, name="mid_block", **kw)(h)
        return _head(h, 2 * self.latent_channels, self.num_groups, self.param_dtype)


class Decoder(nn.Module):
    """z [B, h, w, latent_channels] -> image [B, h*f, w*f, out_channels]."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int
    num_groups: int
    mid_block_add_attention: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
        kw = dict(num_groups=self.num_groups, dtype=self.dtype, param_dtype=self.param_dtype)
        widths = tuple(reversed(self.block_out_channels))
        h = nn.Conv(widths[0], (3, 3), padding="SAME", kernel_init=default_init(), dtype=self.dtype,
                    param_dtype=self.param_dtype, name="conv_in")(z.astype(self.dtype))
        h = MidBlock(self.mid_block_add_attention, name="mid_block", **kw)(h)
        last = len(widths) - 1
        for i, ch in enumerate(widths):  # up_blocks_0 is the lowest resolution, as in diffusers
            h = _Level(ch, self.layers_per_block + 1, "up" if i < last else "", name=f"up_blocks_{i}", **kw)(h)
        return _head(h, self.out_channels, self.num_groups, self.param_dtype)


class AutoencoderKL(nn.Module):
    """The KL autoencoder: `apply(v, x, key)` -> (reconstruction, posterior); methods encode / decode.

    `__call__` decodes a posterior sample (needs `key`) or, with `key=None`, its mode. Images are
    NHWC in [-1, 1], H and W divisible by `downsampling_factor`; every width in
    `block_out_channels` divisible by `norm_num_groups`. Outputs of encode / decode are float32.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        """(h, w, c) of the latents of images (H, W, C); ValueError if H, W are not divisible by f."""
        height, width = int(image_shape[0]), int(image_shape[1])
        f = self.downsampling_factor
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} is not divisible by the autoencoder's downsampling "
                             f"factor f={f} (2**(len(block_out_channels)-1)); resize the images or use fewer "
                             "levels.")
        return height // f, width // f, self.latent_channels

    def _check(self, x: jnp.ndarray, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"AutoencoderKL.{what} takes NHWC arrays [B, H, W, {channels}], got shape "
                             f"{x.shape}; add the batch axis / move channels last.")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {list(bad)} are not divisible by norm_num_groups="
                             f"{self.norm_num_groups}; use multiples of it (or fewer groups).")

    def setup(self) -> None:
        kw = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                  num_groups=self.norm_num_groups, mid_block_add_attention=self.mid_block_add_attention,
                  dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(latent_channels=self.latent_channels, **kw)
        self.decoder = Decoder(out_channels=self.out_channels, **kw)
        conv = dict(kernel_size=(1, 1), kernel_init=default_init(), dtype=jnp.float32,
                    param_dtype=self.param_dtype)
        if self.use_quant_conv:
            self.quant_conv = nn.Conv(2 * self.latent_channels, **conv)
        if self.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(self.latent_channels, **conv)

    def encode(self, x: jnp.ndarray) -> DiagonalGaussian:
        """q(z|x) of images x [B, H, W, in_channels]."""
        self._check(x, self.in_channels, "encode")
        self.latent_shape(x.shape[1:])
        moments = self.encoder(jnp.asarray(x, self.dtype))
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

    def decode(self, z: jnp.ndarray) -> jnp.ndarray:
        """Images [B, h*f, w*f, out_channels] of latents z [B, h, w, latent_channels]."""
        self._check(z, self.latent_channels, "decode")
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jnp.ndarray, key: jax.Array | None = None) -> tuple[jnp.ndarray, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z), posterior
