"""Tests of the DDPM U-Net (ddpm_jax.models.unet / layers): shapes, counts, init, modes, precision."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models import build_model, model_kwarg_names
from ddpm_jax.models.layers import AttnBlock, get_timestep_embedding
from ddpm_jax.models.unet import UNet

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
X_SHAPE = (2, 8, 8, 3)


def _shapes(model, shape):
    """Parameter shapes without running (or compiling) the initialisers."""
    x, t = jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape[:1], jnp.int32)
    return jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t), x, t)["params"]


def _random_params(model, shape, seed=1):
    """Every parameter random and non-zero at a sensible scale (zero-init layers too).

    NumPy draws: compiling the threefry initialisers costs far more CPU time than the test.
    """
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if s.ndim >= 2:
            return jnp.asarray(rng.normal(0.0, 1.0 / math.sqrt(np.prod(s.shape[:-1])), s.shape), s.dtype)
        base = 1.0 if "scale" in name else 0.0
        return jnp.asarray(base + rng.normal(0.0, 0.1, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(draw, _shapes(model, shape))


@functools.lru_cache(maxsize=None)
def _apply(model):
    """A jitted apply, compiled once per (hashable) model."""
    def f(params, x, t, train=False, seed=0):
        rngs = {"dropout": jax.random.key(seed)} if train else {}  # eval mode needs no rng
        return model.apply({"params": params}, x, t, train=train, rngs=rngs)
    return jax.jit(f, static_argnums=3)


def _inputs(shape, seed=2):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=shape), jnp.float32),
            jnp.asarray(rng.integers(0, 1000, shape[:1]), jnp.int32))


def _num_params(model, shape):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(_shapes(model, shape)))


@pytest.mark.parametrize("kwargs,shape,out_ch", [
    (TINY, X_SHAPE, 3),
    (dict(TINY, ch_mult=(1, 1, 2), attn_resolutions=(8, 2)), (3, 8, 16, 1), 2),
    (dict(TINY, resamp_with_conv=False, num_res_blocks=2), (1, 16, 16, 3), 6),
    (dict(TINY, remat=True, dtype="bfloat16"), (2, 4, 4, 4), 4),
])
def test_output_shapes(kwargs, shape, out_ch):
    model = UNet(out_ch=out_ch, **kwargs)
    x, t = _inputs(shape)
    params = _shapes(model, shape)
    y = jax.eval_shape(lambda p, x, t: model.apply({"params": p}, x, t), params, x, t)
    assert y.shape == shape[:3] + (out_ch,)
    assert y.dtype == jnp.float32


def test_forward_runs_and_is_finite():
    model = UNet(**TINY)
    x, t = _inputs(X_SHAPE)
    y = _apply(model)(_random_params(model, X_SHAPE), x, t)
    assert y.shape == X_SHAPE and bool(jnp.all(jnp.isfinite(y)))
    assert float(jnp.abs(y).max()) > 1e-3


def test_parameter_counts_match_paper():
    cifar = UNet(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1)
    assert _num_params(cifar, (1, 32, 32, 3)) == 35_746_307
    big = UNet(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0)
    assert _num_params(big, (1, 256, 256, 3)) == 113_673_219


def test_parameter_tree_names():
    params = _shapes(UNet(**TINY), X_SHAPE)
    assert set(params) == {"time_embedding", "conv_in", "down_blocks_0", "down_blocks_1", "mid_block",
                           "up_blocks_0", "up_blocks_1", "conv_norm_out", "conv_out"}
    # 1x1 shortcut only where the channel count changes.
    assert "conv_shortcut" not in params["down_blocks_0"]["resnets_0"]
    assert params["down_blocks_1"]["resnets_0"]["conv_shortcut"]["kernel"].shape == (1, 1, 32, 64)
    # Attention only at resolution 4 (level 1) and in the middle block.
    assert "attentions_0" not in params["down_blocks_0"] and "attentions_0" in params["down_blocks_1"]
    assert set(params["mid_block"]) == {"resnets_0", "attentions_0", "resnets_1"}
    # up_blocks_0 is the lowest resolution; num_res_blocks + 1 blocks per level.
    assert set(params["up_blocks_0"]) == {"resnets_0", "resnets_1", "attentions_0", "attentions_1",
                                          "upsamplers_0"}
    assert params["up_blocks_1"]["resnets_0"]["conv1"]["kernel"].shape == (3, 3, 64 + 32, 32)
    assert params["time_embedding"]["linear_1"]["kernel"].shape == (32, 128)
    remat_params = _shapes(UNet(remat=True, **TINY), X_SHAPE)
    assert jax.tree.structure(remat_params) == jax.tree.structure(params)


def test_fresh_model_outputs_exactly_zero():
    model = UNet(**TINY)
    x, t = _inputs(X_SHAPE)
    # The "rbg" key compiles the initialisers several times faster than threefry on CPU.
    params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x, t)["params"]
    # Zero-initialised: conv_out, the second conv of every res block, every attention projection.
    assert not np.any(params["conv_out"]["kernel"])
    assert not np.any(params["down_blocks_0"]["resnets_0"]["conv2"]["kernel"])
    assert not np.any(params["mid_block"]["attentions_0"]["to_out"]["kernel"])
    assert float(jnp.abs(params["conv_in"]["kernel"]).max()) > 0
    y = _apply(model)(params, x, t)
    assert y.shape == X_SHAPE
    assert bool(jnp.all(y == 0.0))


def test_dropout_only_in_train_mode():
    model = UNet(**dict(TINY, dropout=0.3))
    params = _random_params(model, X_SHAPE)
    x, t = _inputs(X_SHAPE)
    apply = _apply(model)
    y_eval = apply(params, x, t, False)
    y_train0, y_train1 = apply(params, x, t, True, 0), apply(params, x, t, True, 1)
    assert float(jnp.abs(y_train0 - y_eval).max()) > 1e-3
    assert float(jnp.abs(y_train0 - y_train1).max()) > 1e-3
    np.testing.assert_array_equal(y_train0, apply(params, x, t, True, 0))


def test_bf16_forward_close_to_fp32():
    model32 = UNet(**TINY)
    model16 = UNet(**dict(TINY, dtype=jnp.bfloat16))
    params = _random_params(model16, X_SHAPE)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    x, t = _inputs(X_SHAPE)
    y32 = _apply(model32)(params, x, t)
    y16 = _apply(model16)(params, x, t)
    assert y16.dtype == jnp.float32
    err = float(jnp.abs(y16 - y32).max())
    assert 0 < err < 0.05 * float(jnp.abs(y32).max()), err  # > 0: bf16 really was used


def test_remat_same_outputs_and_gradients():
    small = dict(TINY, ch_mult=(1,), attn_resolutions=(4,))
    shape = (1, 4, 4, 3)
    x, t = _inputs(shape)
    params = _random_params(UNet(**small), shape)

    @functools.partial(jax.jit, static_argnums=1)
    def grad(p, remat):
        loss = lambda p: jnp.mean(UNet(remat=remat, **small).apply({"params": p}, x, t) ** 2)  # noqa: E731
        return jax.grad(loss)(p)

    for a, b in zip(jax.tree.leaves(grad(params, False)), jax.tree.leaves(grad(params, True))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_scalar_t_broadcasts():
    model = UNet(**TINY)
    params = _random_params(model, X_SHAPE)
    x, _ = _inputs(X_SHAPE)
    np.testing.assert_allclose(_apply(model)(params, x, jnp.int32(7)),
                               _apply(model)(params, x, jnp.array([7, 7], jnp.int32)), atol=1e-6)
    with pytest.raises(ValueError, match="t must be a scalar"):
        jax.eval_shape(lambda p: model.apply({"params": p}, x, jnp.array([1, 2, 3])), params)


def test_input_size_error_names_size_and_fix():
    model = UNet(**dict(TINY, ch_mult=(1, 2, 2)))
    with pytest.raises(ValueError, match=r"divisible by 4, got 10x12.*resize"):
        _shapes(model, (1, 10, 12, 3))
    with pytest.raises(ValueError, match="NHWC"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((8, 8, 3)), jnp.zeros((1,), jnp.int32))


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="divisible by the 32 GroupNorm groups"):
        _shapes(UNet(**dict(TINY, ch=16)), X_SHAPE)
    with pytest.raises(ValueError, match="attention_impl"):
        _shapes(UNet(**dict(TINY, attention_impl="flash")), X_SHAPE)
    with pytest.raises(ValueError, match="cudnn.*bfloat16"):
        _shapes(UNet(**dict(TINY, attention_impl="cudnn")), X_SHAPE)


def test_timestep_embedding_matches_official_formula():
    t = np.array([0, 1, 17, 999])
    dim = 10
    half = dim // 2
    freqs = np.exp(-math.log(10000) / (half - 1) * np.arange(half, dtype=np.float64))
    ref = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
    np.testing.assert_allclose(get_timestep_embedding(jnp.asarray(t), dim), ref, atol=2e-4)
    odd = get_timestep_embedding(jnp.asarray(t), 11)
    assert odd.shape == (4, 11) and bool(jnp.all(odd[:, -1] == 0))


def test_attention_block_matches_reference():
    x = jax.random.normal(jax.random.key(3), (2, 4, 4, 32))
    block = AttnBlock()
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32),
                          jax.eval_shape(block.init, jax.random.key(0), x)["params"])
    y = np.asarray(jax.jit(block.apply)({"params": params}, x), np.float64)

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    xn = np.asarray(x, np.float64).reshape(2, 16, 32)
    g = xn.reshape(2, 16, 32, 1)  # GroupNorm(32) over 32 channels: per-channel over positions.
    mean, var = g.mean(axis=(1, 3), keepdims=True), g.var(axis=(1, 3), keepdims=True)
    h = ((g - mean) / np.sqrt(var + 1e-6)).reshape(2, 16, 32)
    h = h * p["group_norm"]["scale"] + p["group_norm"]["bias"]
    q, k, v = (h @ p[n]["kernel"] + p[n]["bias"] for n in ("to_q", "to_k", "to_v"))
    w = np.einsum("bic,bjc->bij", q, k) / math.sqrt(32)
    w = np.exp(w - w.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    ref = xn + np.einsum("bij,bjc->bic", w, v) @ p["to_out"]["kernel"] + p["to_out"]["bias"]
    np.testing.assert_allclose(y, ref.reshape(2, 4, 4, 32), atol=1e-4)


def test_build_model():
    model = build_model("unet", **dict(TINY, ch_mult=[1, 2]))
    assert isinstance(model, UNet) and model.ch_mult == (1, 2)
    assert "attention_impl" in model_kwarg_names("unet")
    with pytest.raises(ValueError, match=r"unknown unet arguments \['chanels'\]"):
        build_model("unet", chanels=64)
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet")
