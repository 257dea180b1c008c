"""The condition kinds and the pytree helpers of ddpm_jax/conditioning.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import conditioning

LABEL = conditioning.ClassLabel(10)
TOKENS = conditioning.CaptionTokens((1, 0, 0, 0, 0, 0))  # the null caption's row, padded to 6
BOTH = conditioning.Conditioning((LABEL, TOKENS))


def test_null_values_are_shaped_like_the_rows_and_a_token_row_is_cut():
    cond = {"label": jnp.array([3, 4], jnp.int32), "tokens": jnp.full((2, 4), 7, jnp.int32)}
    null = BOTH.null_like(cond)
    np.testing.assert_array_equal(null["label"], [10, 10])
    np.testing.assert_array_equal(null["tokens"], [[1, 0, 0, 0]] * 2)  # cut to the batch's length L = 4
    assert jax.tree.map(lambda a: (a.shape, a.dtype), null) == jax.tree.map(lambda a: (a.shape, a.dtype), cond)
    assert BOTH.null()["label"] == 10 and BOTH.null()["tokens"].tolist() == [1, 0, 0, 0, 0, 0]
    assert BOTH.record() == {"num_classes": 10, "context_length": 6}


def test_dropout_draws_one_mask_per_example_for_every_entry():
    n = 4096
    cond = {"label": jnp.arange(n, dtype=jnp.int32) % 10, "tokens": jnp.full((n, 3), 5, jnp.int32)}
    key = jax.random.key(7)
    out = conditioning.dropout(cond, BOTH.null_like(cond), key, 0.3)
    dropped = np.asarray(out["label"]) == 10
    np.testing.assert_array_equal(np.all(np.asarray(out["tokens"]) == [1, 0, 0], axis=1), dropped)
    np.testing.assert_array_equal(dropped, np.asarray(jax.random.uniform(key, (n,)) < 0.3))  # the one draw
    assert conditioning.dropout({}, {}, key, 0.3) == {}
    assert conditioning.dropout(cond, BOTH.null_like(cond), key, 0.0) is cond
    with pytest.raises(ValueError, match=r"training.label_dropout=-0.1 must lie in \[0, 1\]"):
        conditioning.dropout(cond, cond, key, -0.1)


def test_cycle_and_repeat_follow_the_image_index():
    table = {"label": np.array([2, 5, 7], np.int32), "tokens": np.arange(6, dtype=np.int32).reshape(3, 2)}
    rows = conditioning.cycle(table, np.array([4, 0, 8]))
    np.testing.assert_array_equal(rows["label"], [5, 2, 7])
    np.testing.assert_array_equal(rows["tokens"], [[2, 3], [0, 1], [4, 5]])
    assert conditioning.cycle(None, np.arange(3)) is None
    np.testing.assert_array_equal(conditioning.repeat({"label": 10}, 3)["label"], [10, 10, 10])
    assert conditioning.batch_size(rows) == 3 and conditioning.batch_size({}) is None


def test_of_batch_and_check_name_the_entry_and_the_fix():
    batch = {"label": np.zeros(2, np.int32), "tokens": np.zeros((2, 3), np.int32)}
    of = {"x": np.zeros((2, 8, 8, 1), np.float32), "cond": batch}
    assert set(conditioning.Conditioning((TOKENS,)).of_batch(of)) == {"tokens"}  # the labels beside stay out
    assert conditioning.Conditioning().of_batch(of) == {}
    with pytest.raises(ValueError, match=r"the batch has no cond\['tokens'\] \(it has \['label'\]\)"):
        conditioning.Conditioning((TOKENS,)).of_batch({"x": of["x"], "cond": {"label": batch["label"]}})
    BOTH.check(batch, 2)
    with pytest.raises(ValueError, match=r"cond\['label'\] must be integers of shape \[3\]"):
        LABEL.check(np.zeros(2, np.int32), 3)
    with pytest.raises(ValueError, match=r"cond\['tokens'\] must be integers of shape \[2, L <= 6\], got float32"):
        TOKENS.check(np.zeros((2, 3), np.float32), 2)
    with pytest.raises(ValueError, match="this model is conditioned on"):
        BOTH.check({"label": batch["label"]}, 2)
    with pytest.raises(ValueError, match="model.num_classes=0 must be >= 1"):
        conditioning.ClassLabel(0)
