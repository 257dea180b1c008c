"""Text conditioning: the word tokenizer, the text encoder, the SpatialTransformer and the U-Net's
cross-attention (ddpm_jax/models/text.py, attention.py, unet.py).

The null-context statement tested here: with every key masked (or no context at all) the
cross-attention adds exactly 0.0, so a block equals the same block with its cross-attention
removed, bit for bit; and a U-Net whose SpatialTransformers are fresh (zero proj_out) is exactly
the U-Net without them. With the defaults the U-Net is today's network.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.models import text
from ddpm_jax.models.attention import MultiHeadAttention, SpatialTransformer
from ddpm_jax.models.text import NULL_ID, PAD_ID, UNK_ID, TextEncoder, Tokenizer
from ddpm_jax.models.unet import UNet

CAPTIONS = ["a thick seven", "A thin ONE, slanted left!", "a small thick seven", "an upright eight"]
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
XATTN = dict(TINY, transformer_resolutions=(8,), context_dim=32, transformer_heads=2, context_length=6,
             text_layers=1, text_heads=2)
X_SHAPE = (2, 8, 8, 3)


def _random(tree, seed=1):
    """Every leaf random and non-zero (zero-initialised layers too), NumPy draws (no init compile)."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if s.ndim >= 2:
            return jnp.asarray(rng.normal(0.0, 1.0 / math.sqrt(np.prod(s.shape[:-1])), s.shape), s.dtype)
        base = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
        return jnp.asarray(base + rng.normal(0.0, 0.1, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(draw, tree)


def _shapes(module, *args, **kwargs):
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))["params"]


def _inputs(shape=X_SHAPE, seed=2):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=shape), jnp.float32),
            jnp.asarray(rng.integers(0, 1000, shape[:1]), jnp.int32))


# ---- Tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_vocabulary_is_deterministic_and_order_free():
    tok = Tokenizer.build(CAPTIONS)
    assert tok.vocab[:3] == ["<pad>", "<unk>", "<null>"] and (PAD_ID, UNK_ID, NULL_ID) == (0, 1, 2)
    # By decreasing count, ties alphabetically; lower-cased, punctuation and case dropped.
    assert tok.vocab[3:] == ["a", "seven", "thick", "an", "eight", "left", "one", "slanted", "small", "thin",
                             "upright"]
    assert Tokenizer.build(reversed(CAPTIONS)) == tok
    assert text.words("A thick,slanted 7-seven!") == ["a", "thick", "slanted", "seven"]
    assert Tokenizer.build(CAPTIONS, max_words=2).vocab[3:] == ["a", "seven"]


def test_encode_pads_masks_and_maps_unknown_and_empty_captions():
    tok = Tokenizer.build(CAPTIONS)
    ids, mask = tok.encode(["a thick seven", "a purple seven", "", "!!"], 5)
    assert ids.dtype == np.int32 and ids.shape == (4, 5) and mask.dtype == bool
    a, thick, seven = (tok.vocab.index(w) for w in ("a", "thick", "seven"))
    assert ids.tolist() == [[a, thick, seven, 0, 0], [a, UNK_ID, seven, 0, 0],
                            [NULL_ID, 0, 0, 0, 0], [NULL_ID, 0, 0, 0, 0]]
    assert mask.tolist() == (ids != PAD_ID).tolist()
    np.testing.assert_array_equal(text.null_tokens(4, 5), tok.encode([""] * 4, 5)[0])
    assert tok.decode(ids[0]) == "a thick seven" and tok.decode(ids[2]) == ""


def test_too_long_caption_is_a_one_line_error_naming_it():
    tok = Tokenizer.build(CAPTIONS)
    with pytest.raises(ValueError, match=r"^caption 'a small thick seven' has 4 words, more than "
                                         r"model\.context_length=3; [^\n]*$"):
        tok.encode(["a thick seven", "a small thick seven"], 3)
    with pytest.raises(ValueError, match="list of captions"):
        tok.encode("a thick seven", 3)


def test_tokenizer_json_round_trip_and_bad_files():
    tok = Tokenizer.build(CAPTIONS)
    again = Tokenizer.from_json(tok.to_json())
    assert again == tok and again.vocab_size == len(tok.vocab) == 14
    np.testing.assert_array_equal(again.encode(CAPTIONS, 6)[0], tok.encode(CAPTIONS, 6)[0])
    with pytest.raises(ValueError, match="not a ddpm_jax tokenizer"):
        Tokenizer.from_json('{"vocab": ["a"]}')
    with pytest.raises(ValueError, match="reserved tokens"):
        Tokenizer(["a", "b", "c"])


# ---- Text encoder ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _encoder_setup():
    tok = Tokenizer.build(CAPTIONS)
    enc = TextEncoder(tok.vocab_size, context_length=6, width=32, layers=2, heads=4)
    ids, _ = tok.encode(CAPTIONS, 6)
    params = jax.jit(enc.init)(jax.random.key(0), ids)["params"]
    return tok, enc, params, jax.jit(lambda p, ids: enc.apply({"params": p}, ids))


def test_text_encoder_shapes_mask_and_determinism():
    tok, enc, params, apply = _encoder_setup()
    ids, mask = tok.encode(CAPTIONS + ["a purple seven", ""], 6)
    ctx, got_mask = apply(params, ids)
    assert ctx.shape == (6, 6, 32) and ctx.dtype == jnp.float32
    np.testing.assert_array_equal(got_mask, mask)
    assert bool(jnp.all(ctx[~mask] == 0.0)) and bool(jnp.all(jnp.isfinite(ctx)))
    # Same seed, same parameters; same parameters, same context.
    again = jax.jit(enc.init)(jax.random.key(0), ids)["params"]
    assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)))
    np.testing.assert_array_equal(apply(params, ids)[0], ctx)
    # Another caption, another context; an unknown word is the <unk> row, not an error.
    assert float(jnp.abs(ctx[0] - ctx[2]).max()) > 1e-3
    assert float(jnp.abs(ctx[0] - ctx[4]).max()) > 1e-3


def test_text_encoder_ignores_padding_and_refuses_long_input():
    tok, enc, params, apply = _encoder_setup()
    short, mask = tok.encode(CAPTIONS, 5)
    long, _ = tok.encode(CAPTIONS, 6)
    np.testing.assert_allclose(apply(params, short)[0], apply(params, long)[0][:, :5], atol=1e-6)
    with pytest.raises(ValueError, match="context_length=6"):
        jax.eval_shape(enc.apply, {"params": params}, tok.encode(CAPTIONS, 7)[0])


# ---- Attention and the SpatialTransformer -----------------------------------------------------


def test_masked_multi_head_attention_matches_reference():
    rng = np.random.default_rng(0)
    x, ctx = rng.normal(size=(2, 5, 8)), rng.normal(size=(2, 3, 6))
    mask = np.array([[True, False, True], [False, False, False]])
    attn = MultiHeadAttention(heads=2, head_dim=4, out_dim=8)
    params = _random(_shapes(attn, x, ctx, mask))
    got = np.asarray(jax.jit(attn.apply)({"params": params}, jnp.asarray(x, jnp.float32), jnp.asarray(ctx, jnp.float32),
                                jnp.asarray(mask)), np.float64)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    q, k, v = (a @ p[n]["kernel"] for a, n in ((x, "to_q"), (ctx, "to_k"), (ctx, "to_v")))
    heads = lambda a: a.reshape(2, a.shape[1], 2, 4)  # noqa: E731
    logits = np.einsum("bthd,bshd->bhts", heads(q)[:1], heads(k)[:1]) / 2.0  # Example 0 (head_dim 4).
    logits = np.where(mask[:1, None, None, :], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshd->bthd", w, heads(v)[:1]).reshape(1, 5, 8)
    ref = out @ p["to_out"]["kernel"] + p["to_out"]["bias"]
    np.testing.assert_allclose(got[:1], ref, atol=1e-5)
    # Every key of example 1 masked: exactly zero, bias included.
    assert np.all(got[1] == 0.0)


@functools.lru_cache(maxsize=None)
def _block_setup():
    block = SpatialTransformer(heads=2, context_dim=16, depth=2)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 4, 4, 32)), jnp.float32)
    ctx = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    params = _random(_shapes(block, x, ctx))
    return block, x, ctx, params, jax.jit(lambda p, c, m: block.apply({"params": p}, x, c, m))


def test_spatial_transformer_shapes_and_fresh_identity():
    block, x, ctx, _, _ = _block_setup()
    params = jax.jit(block.init)(jax.random.key(0), x, ctx)["params"]
    assert set(params) == {"norm", "proj_in", "transformer_blocks_0", "transformer_blocks_1", "proj_out"}
    assert set(params["transformer_blocks_0"]) == {"norm1", "attn1", "norm2", "attn2", "norm3", "ff"}
    assert params["transformer_blocks_0"]["attn2"]["to_k"]["kernel"].shape == (16, 32)
    y = jax.jit(block.apply)({"params": params}, x, ctx)
    assert y.shape == x.shape
    np.testing.assert_array_equal(y, x)  # proj_out is zero-initialised (LDM zero_module).
    with pytest.raises(ValueError, match=r"context must have shape \[2, L, 16\]"):
        jax.eval_shape(block.apply, {"params": params}, x, ctx[..., :8])


def test_null_context_adds_exactly_zero_cross_attention():
    block, x, ctx, params, apply = _block_setup()
    none = jax.jit(lambda p: block.apply({"params": p}, x))(params)
    masked = apply(params, ctx, jnp.zeros((2, 5), bool))
    # The same block with its cross-attention removed (to_out weight and bias zero: adds 0.0).
    no_xattn = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.zeros_like(a) if "attn2" in jax.tree_util.keystr(path) and "to_out" in
        jax.tree_util.keystr(path) else a, params)
    removed = apply(no_xattn, ctx, jnp.ones((2, 5), bool))
    np.testing.assert_array_equal(none, masked)
    np.testing.assert_array_equal(masked, removed)
    full = apply(params, ctx, jnp.ones((2, 5), bool))
    assert float(jnp.abs(full - masked).max()) > 1e-3  # With a visible context the output moves.


def test_masked_context_entries_do_not_matter():
    block, x, ctx, params, apply = _block_setup()
    mask = jnp.array([[True, True, False, False, False], [True, False, True, False, True]])
    changed = jnp.where(mask[..., None], ctx, 100.0 * ctx + 7.0)
    np.testing.assert_allclose(apply(params, ctx, mask), apply(params, changed, mask), atol=1e-6)


# ---- The U-Net ---------------------------------------------------------------------------------

# TINY's output on its seeded inputs (the parameter draw of tests/test_unet.py, seed 1; inputs seed 2),
# recorded from the U-Net before cross-attention existed (commit 4d61755), which the new code
# matched bit for bit on the same machine; a tolerance here leaves room for other XLA versions.
REF_SUM_ABS = 172.4154815673828
REF_FIRST = [0.66681385, 0.75467455, -0.23506148, 0.3167987]


@functools.lru_cache(maxsize=None)
def _unet_apply(model):
    def f(params, x, t, tokens=None, context=None, context_mask=None):
        cond = dict(tokens=tokens, context=context, context_mask=context_mask)
        return model.apply({"params": params}, x, t, {k: v for k, v in cond.items() if v is not None})
    return jax.jit(f)


def test_default_unet_is_unchanged():
    cifar = UNet(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1)
    x32 = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    tree = jax.eval_shape(lambda x: cifar.init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32)), x32)["params"]
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree)) == 35_746_307
    names = {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
    assert not [n for n in names if "transformers" in n or "text_encoder" in n]
    model = UNet(**TINY)
    x, t = _inputs()
    params = _random(_shapes(model, x, t))
    y = np.asarray(_unet_apply(model)(params, x, t))
    np.testing.assert_allclose(float(np.abs(y).sum()), REF_SUM_ABS, rtol=1e-5)
    np.testing.assert_allclose(y.ravel()[:4], REF_FIRST, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="without cross-attention"):
        jax.eval_shape(lambda p: model.apply({"params": p}, x, t, {"tokens": jnp.zeros((2, 3), jnp.int32)}), params)


@functools.lru_cache(maxsize=None)
def _xattn_setup():
    tok = Tokenizer.build(CAPTIONS)
    model = UNet(**XATTN, vocab_size=tok.vocab_size)
    x, t = _inputs()
    ids, _ = tok.encode(CAPTIONS[:2], 6)
    params = _random(_shapes(model, x, t, {"tokens": ids}))
    return tok, model, x, t, params


def test_unet_parameter_tree_with_cross_attention():
    tok, model, x, t, params = _xattn_setup()
    plain = _shapes(UNet(**TINY), x, t)
    assert set(params) == set(plain) | {"text_encoder"}
    # SpatialTransformers at 8x8 (level 0, down and up) and in the middle block, not at 4x4.
    assert set(params["down_blocks_0"]) == {"resnets_0", "transformers_0", "downsamplers_0"}
    assert "transformers_0" not in params["down_blocks_1"] and "transformers_0" not in params["up_blocks_0"]
    assert {"transformers_0", "transformers_1"} <= set(params["up_blocks_1"])
    assert set(params["mid_block"]) == {"resnets_0", "attentions_0", "transformers_0", "resnets_1"}
    assert params["text_encoder"]["token_embedding"]["embedding"].shape == (tok.vocab_size, 32)
    # Initialised without tokens: the same tree.
    assert jax.tree.structure(_shapes(model, x, t)) == jax.tree.structure(params)
    with pytest.raises(ValueError, match="needs a context"):
        _shapes(UNet(**dict(XATTN, context_dim=0)), x, t)


def test_unet_output_depends_on_the_caption_and_null_context_is_exact():
    tok, model, x, t, params = _xattn_setup()
    apply = _unet_apply(model)
    seven, eight = tok.encode(["a thick seven"] * 2, 6)[0], tok.encode(["an upright eight"] * 2, 6)[0]
    y7, y8 = apply(params, x, t, seven), apply(params, x, t, eight)
    assert y7.shape == X_SHAPE and bool(jnp.all(jnp.isfinite(y7)))
    assert float(jnp.abs(y7 - y8).max()) > 1e-3
    np.testing.assert_array_equal(y7, apply(params, x, t, seven))  # Deterministic.
    # No tokens == every context key masked (cross-attention adds exactly 0).
    ctx = jnp.ones((2, 3, 32))
    no_encoder = {k: v for k, v in params.items() if k != "text_encoder"}
    np.testing.assert_array_equal(apply(params, x, t), _unet_apply(UNet(**XATTN))(
        no_encoder, x, t, context=ctx, context_mask=jnp.zeros((2, 3), bool)))
    null = apply(params, x, t, jnp.asarray(text.null_tokens(2, 6)))
    assert float(jnp.abs(null - y7).max()) > 1e-3  # The null caption is a learned context, not "none".


def test_fresh_transformers_leave_the_unconditional_unet_exactly():
    tok, model, x, t, params = _xattn_setup()
    # proj_out zero (as initialised) in every SpatialTransformer: the block is the identity ...
    fresh = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.zeros_like(a) if "transformers_" in jax.tree_util.keystr(path) and "proj_out']" in
        jax.tree_util.keystr(path) else a, params)
    cond = _unet_apply(model)(fresh, x, t, tok.encode(["a thick seven"] * 2, 6)[0])
    # ... so the network is the plain U-Net on the shared parameters, bit for bit.
    plain = UNet(**TINY)
    shared = jax.tree.map(lambda s, p: p, _shapes(plain, x, t), _prune(fresh, _shapes(plain, x, t)))
    np.testing.assert_array_equal(cond, _unet_apply(plain)(shared, x, t))


def _prune(tree, like):
    """`tree` restricted to the keys of `like` (nested dicts)."""
    return {k: _prune(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}


def test_unet_context_errors():
    tok, model, x, t, params = _xattn_setup()
    ids = tok.encode(CAPTIONS[:2], 6)[0]
    trace = lambda m, **cond: jax.eval_shape(lambda p: m.apply({"params": p}, x, t, cond), params)  # noqa: E731
    with pytest.raises(ValueError, match="not both"):
        trace(model, tokens=ids, context=jnp.ones((2, 3, 32)))
    with pytest.raises(ValueError, match=r"tokens must have shape \[2, L\]"):
        trace(model, tokens=ids[:1])
    with pytest.raises(ValueError, match="no text encoder"):
        trace(UNet(**XATTN), tokens=ids)
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        _shapes(UNet(**dict(XATTN, transformer_heads=3)), x, t)


def test_gradients_reach_the_text_encoder_and_bf16_is_close():
    tok = Tokenizer.build(CAPTIONS)
    small = dict(XATTN, ch_mult=(1,), attn_resolutions=(), vocab_size=tok.vocab_size)  # One level: fast compile.
    model = UNet(**small)
    x, t = _inputs((2, 4, 4, 3))
    ids = jnp.asarray(tok.encode(["a thick seven", "an upright eight"], 6)[0])
    params = _random(_shapes(model, x, t, {"tokens": ids}))

    @jax.jit
    def grads(p):
        return jax.grad(lambda p: jnp.mean(model.apply({"params": p}, x, t, {"tokens": ids}) ** 2))(p)

    g = grads(params)["text_encoder"]
    assert float(jnp.abs(g["token_embedding"]["embedding"]).max()) > 0  # Trained jointly, end to end.
    assert float(jnp.abs(g["blocks_0"]["attn"]["to_q"]["kernel"]).max()) > 0
    y16 = _unet_apply(UNet(**small, dtype=jnp.bfloat16))(params, x, t, ids)
    y32 = _unet_apply(model)(params, x, t, ids)
    assert y16.dtype == jnp.float32
    err = float(jnp.abs(y16 - y32).max())
    assert 0 < err < 0.05 * float(jnp.abs(y32).max()), err
