"""Tests of the 2-D toy network ddpm_jax.models.mlp.GatedMLP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models import build_model
from ddpm_jax.models.mlp import GatedMLP


def test_shapes_and_parameters():
    model = GatedMLP(num_timesteps=50, hidden=128, out_dim=2, gate_init="uniform")
    x = jax.random.normal(jax.random.key(0), (16, 2))
    t = jnp.arange(16) % 50
    params = model.init(jax.random.key(1), x, t)["params"]
    y = model.apply({"params": params}, x, t)
    assert y.shape == (16, 2) and y.dtype == jnp.float32
    assert params["linear_0"]["kernel"].shape == (2, 128)
    assert params["linear_2"]["kernel"].shape == (128, 128)
    assert params["gate_0"]["embedding"].shape == (50, 128)
    assert params["linear_out"]["kernel"].shape == (128, 2)
    gates = np.asarray(params["gate_1"]["embedding"])
    assert gates.min() >= 0.0 and gates.max() < 1.0  # uniform [0, 1) gates, as the tutorial
    n = sum(p.size for p in jax.tree.leaves(params))
    assert n == (2 * 128 + 128) + 2 * (128 * 128 + 128) + 3 * 50 * 128 + (128 * 2 + 2)


def test_output_depends_on_timestep_through_the_gates():
    model = GatedMLP(num_timesteps=10, hidden=32, gate_init="uniform")
    x = jnp.ones((4, 2))
    params = model.init(jax.random.key(0), x, jnp.zeros((4,), jnp.int32))["params"]
    y0 = model.apply({"params": params}, x, 0)
    y5 = model.apply({"params": params}, x, jnp.full((4,), 5))
    assert float(jnp.abs(y0 - y5).max()) > 1e-4
    # Same gates -> same function: copying gate row 0 into row 5 makes t=5 behave as t=0.
    copied = jax.tree.map(lambda a: a, params)
    for i in range(3):
        emb = params[f"gate_{i}"]["embedding"]
        copied[f"gate_{i}"] = {"embedding": emb.at[5].set(emb[0])}
    np.testing.assert_allclose(model.apply({"params": copied}, x, 5), y0, atol=1e-6)


def test_bad_input_and_build_model():
    model = build_model("mlp", num_timesteps=10, hidden=16)
    assert isinstance(model, GatedMLP)
    with pytest.raises(ValueError, match=r"points \[B, D\]"):
        model.init(jax.random.key(0), jnp.zeros((4, 2, 1)), jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="unknown mlp arguments"):
        build_model("mlp", ch=3)


def test_gate_init_ones_starts_as_a_plain_softplus_mlp():
    x = jax.random.normal(jax.random.key(0), (8, 2))
    t = jnp.arange(8) % 10
    ones = GatedMLP(num_timesteps=10, hidden=16)  # gate_init="ones" is the default
    params = ones.init(jax.random.key(1), x, t)["params"]
    for i in range(3):
        np.testing.assert_array_equal(params[f"gate_{i}"]["embedding"], 1.0)
    # Independent forward pass: gates of 1 leave softplus(x W + b) layers, the same at every t.
    h = np.asarray(x, np.float64)
    for name in ("linear_0", "linear_1", "linear_2"):
        p = params[name]
        h = np.logaddexp(0.0, h @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"]))
    expected = h @ np.asarray(params["linear_out"]["kernel"]) + np.asarray(params["linear_out"]["bias"])
    np.testing.assert_allclose(ones.apply({"params": params}, x, t), expected, rtol=1e-5, atol=1e-5)
    # Same parameter tree as the tutorial's init: a checkpoint fits either.
    uniform = GatedMLP(num_timesteps=10, hidden=16, gate_init="uniform")
    uniform = uniform.init(jax.random.key(1), x, t)["params"]
    assert jax.tree.map(np.shape, uniform) == jax.tree.map(np.shape, params)
    with pytest.raises(ValueError, match="gate_init='normal' is unknown"):
        GatedMLP(gate_init="normal").init(jax.random.key(0), x, t)
