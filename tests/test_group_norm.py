"""The U-Net's GroupNorm: Flax's layer in value, gradient and tangent, with its own derivative."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models.group_norm import GroupNorm, group_normalize

EPS = 1e-6


def reference(x, scale, bias, groups):
    """float64 NumPy GroupNorm of an NHWC array: two-pass statistics over each group's positions and channels."""
    b, h, w, c = x.shape
    g = x.astype(np.float64).reshape(b, h * w, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    return ((g - mean) / np.sqrt(var + EPS)).reshape(b, h, w, c) * scale + bias


def inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = (rng.normal(size=shape) * 3 + 1.5).astype(np.float32)  # an offset mean: the two-pass variance matters
    return x, (1 + 0.1 * rng.normal(size=c)).astype(np.float32), (0.1 * rng.normal(size=c)).astype(np.float32)


@pytest.mark.parametrize("shape,groups", [((2, 5, 4, 32), 32), ((2, 4, 4, 96), 32), ((3, 3, 2, 8), 2)])
def test_value_matches_float64_reference_and_flax(shape, groups):
    x, scale, bias = inputs(shape)
    y = jax.jit(group_normalize, static_argnums=(3, 4))(x, scale, bias, groups, EPS)
    np.testing.assert_allclose(np.asarray(y, np.float64), reference(x, scale, bias, groups), atol=2e-5)
    flax_y = nn.GroupNorm(num_groups=groups, epsilon=EPS, use_fast_variance=False).apply(
        {"params": {"scale": scale, "bias": bias}}, x)
    np.testing.assert_allclose(y, flax_y, atol=2e-5)


def test_gradient_and_tangent_match_autodiff_of_flax():
    x, scale, bias = inputs((2, 4, 4, 64), seed=1)
    cotangent = np.random.default_rng(2).normal(size=x.shape).astype(np.float32)
    flax_norm = nn.GroupNorm(num_groups=32, epsilon=EPS, use_fast_variance=False)

    def ours(x, scale, bias):
        return group_normalize(x, scale, bias, 32, EPS)

    def theirs(x, scale, bias):
        return flax_norm.apply({"params": {"scale": scale, "bias": bias}}, x)

    def loss(f):
        return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * cotangent), argnums=(0, 1, 2)))

    for mine, ref in zip(loss(ours)(x, scale, bias), loss(theirs)(x, scale, bias)):
        np.testing.assert_allclose(mine, ref, rtol=1e-4, atol=1e-5)
    tangents = tuple(np.random.default_rng(3).normal(size=a.shape).astype(np.float32) for a in (x, scale, bias))
    _, mine = jax.jvp(ours, (x, scale, bias), tangents)
    _, ref = jax.jvp(theirs, (x, scale, bias), tangents)
    np.testing.assert_allclose(mine, ref, rtol=1e-4, atol=1e-5)


def test_module_parameters_dtype_and_refusal():
    x, _, _ = inputs((2, 4, 4, 64))
    layer = GroupNorm(num_groups=32, epsilon=EPS, dtype=jnp.bfloat16)
    params = layer.init(jax.random.key(0), x)["params"]
    assert {k: (v.shape, v.dtype) for k, v in params.items()} == {
        "scale": ((64,), jnp.float32), "bias": ((64,), jnp.float32)}
    y = layer.apply({"params": params}, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), reference(x, 1.0, 0.0, 32), atol=0.05)
    with pytest.raises(ValueError, match="48 channels in 32 groups"):
        GroupNorm(num_groups=32, epsilon=EPS).init(jax.random.key(0), jnp.zeros((1, 2, 2, 48)))
