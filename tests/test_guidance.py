"""Classifier-free guidance (ddpm_jax/guidance.py), the condition of sampling.sample and its dropout.

The guided prediction is checked against an independent float64 implementation written here
from Ho & Salimans 2022, eq. (6), in ε-space, for networks that predict ε, x0 or v; a toy
network whose output depends on the label makes every branch visible.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import conditioning, diffusion, guidance, sampling, schedules
from ddpm_jax.schedules import Schedule

T = 50
NUM_CLASSES = 4
SHAPE = (4, 4, 1)


@pytest.fixture(scope="module")
def betas():
    return schedules.get_betas("linear", T, beta_start=1e-4, beta_end=0.2)


@pytest.fixture(scope="module")
def sched(betas):
    return Schedule.from_betas(betas)


def _toy_params(seed=0):
    rng = np.random.default_rng(seed)
    return dict(table=jnp.asarray(rng.normal(size=(NUM_CLASSES + 1,) + SHAPE), jnp.float32),
                scale=jnp.asarray(rng.uniform(0.5, 1.5, size=SHAPE), jnp.float32))


LABELS = conditioning.Conditioning((conditioning.ClassLabel(NUM_CLASSES),))


def _cond(y):
    """The condition pytree of class labels y, and its null aligned with it."""
    cond = {"label": jnp.asarray(y, jnp.int32)}
    return dict(cond=cond, null_cond=LABELS.null_like(cond))


def _toy_apply(params, x, t, cond=None):
    """A label-dependent network: out = scale·x·(1 + t/T) + table[y] (no label: the null row)."""
    y = (cond or {}).get("label")
    if y is None:
        y = jnp.full((x.shape[0],), NUM_CLASSES, jnp.int32)
    tt = jnp.asarray(t, jnp.float32).reshape(-1, 1, 1, 1)
    return params["scale"] * x * (1.0 + tt / T) + params["table"][y]


def _np_toy(params, x, t, y):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    return p["scale"] * x * (1.0 + np.asarray(t, np.float64).reshape(-1, 1, 1, 1) / T) + p["table"][y]


def _np_eps(betas, out, x, t, pred):
    """ε implied by a network output, float64, written from the definitions (not from ddpm_jax)."""
    abar = np.cumprod(1.0 - betas)[t].reshape(-1, 1, 1, 1)
    if pred == "eps":
        return out
    if pred == "x0":  # x_t = √ᾱ x0 + √(1−ᾱ) ε
        return (x - np.sqrt(abar) * out) / np.sqrt(1.0 - abar)
    return np.sqrt(abar) * out + np.sqrt(1.0 - abar) * x  # v = √ᾱ ε − √(1−ᾱ) x0


def _inputs(seed=1, batch=6):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch,) + SHAPE)
    t = rng.integers(0, T, batch)
    y = rng.integers(0, NUM_CLASSES, batch)
    return x, t, y


@pytest.mark.parametrize("pred", ["eps", "x0", "v"])
@pytest.mark.parametrize("w", [0.5, 2.0, 4.0])
def test_guided_eps_matches_an_independent_implementation(sched, betas, pred, w):
    params = _toy_params()
    x, t, y = _inputs()
    fn = guidance.model_fn(_toy_apply, params, guidance_scale=w, **_cond(y))
    out = np.asarray(fn(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.int32)), np.float64)
    # Reference: each branch to ε, then (1 + w) ε_c − w ε_∅ (eq. (6)).
    eps_c = _np_eps(betas, _np_toy(params, x, t, y), x, t, pred)
    eps_u = _np_eps(betas, _np_toy(params, x, t, np.full_like(y, NUM_CLASSES)), x, t, pred)
    want = (1 + w) * eps_c - w * eps_u
    got = _np_eps(betas, out, x, t, pred)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * (1 + w))
    # and the library's own conversion of the guided output gives the same ε
    _, lib_eps = diffusion.GaussianDiffusion(sched, pred=pred).x0_and_eps(
        jnp.asarray(out, jnp.float32), jnp.asarray(x, jnp.float32), jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(lib_eps, np.float64), want, rtol=1e-3, atol=2e-3 * (1 + w))


def test_w0_is_the_plain_conditional_model_and_no_labels_the_unconditional():
    params = _toy_params()
    x, t, y = (jnp.asarray(a) for a in _inputs())
    x = x.astype(jnp.float32)
    cond = guidance.model_fn(_toy_apply, params, guidance_scale=0.0, **_cond(y))
    np.testing.assert_array_equal(np.asarray(cond(x, t)), np.asarray(_toy_apply(params, x, t, {"label": y})))
    plain = guidance.model_fn(_toy_apply, params)
    np.testing.assert_array_equal(np.asarray(plain(x, t)), np.asarray(_toy_apply(params, x, t)))
    # a traced w = 0 (guided path) gives the conditional output too
    traced = jax.jit(lambda w: guidance.model_fn(_toy_apply, params, guidance_scale=w, **_cond(y))(x, t))(0.0)
    np.testing.assert_allclose(np.asarray(traced), np.asarray(_toy_apply(params, x, t, {"label": y})), rtol=1e-6)


def test_both_branches_in_one_batched_call():
    calls = []

    def spy(params, x, t, cond=None):
        calls.append((x.shape[0], np.asarray(cond["label"])))
        return _toy_apply(params, x, t, cond)

    x, t, y = _inputs(batch=3)
    fn = guidance.model_fn(spy, _toy_params(), guidance_scale=1.0, **_cond(y))
    fn(jnp.asarray(x, jnp.float32), jnp.asarray(t))
    assert len(calls) == 1 and calls[0][0] == 6
    np.testing.assert_array_equal(calls[0][1], np.concatenate([y, np.full(3, NUM_CLASSES)]))


def test_sample_with_guidance_equals_a_loop_of_guided_steps(sched, betas):
    """sampling.sample(cond, guidance_scale) == DDIM steps on the independently guided ε."""
    params, w, n = _toy_params(), 2.0, 3
    indices = np.arange(5, 5 + n)
    y = np.array([0, 3, 1])
    process = diffusion.GaussianDiffusion(sched, clip_x0=False)
    out = sampling.sample(_toy_apply, params, process, shape=SHAPE, indices=jnp.asarray(indices), seed=7,
                          method="ddim", num_steps=5, guidance_scale=w, **_cond(y))
    keys = sampling.image_keys(7, jnp.asarray(indices))
    x = sampling.image_noise(keys, T, SHAPE)
    ts = sampling.ddim_timesteps(T, 5)
    for t, t_prev in zip(ts, list(ts[1:]) + [-1]):
        tb = np.full(n, t)
        xn = np.asarray(x, np.float64)
        eps = (1 + w) * _np_toy(params, xn, tb, y) - w * _np_toy(params, xn, tb, np.full(n, NUM_CLASSES))
        x, _ = sampling.ddim_step(process, jnp.asarray(eps, jnp.float32), x, jnp.asarray(tb), int(t_prev),
                                  jnp.zeros_like(x))
    np.testing.assert_allclose(np.asarray(out.samples), np.asarray(x), rtol=1e-4, atol=1e-4)


def _drop(labels, key, p, null=10):
    cond = {"label": labels}
    kinds = conditioning.Conditioning((conditioning.ClassLabel(null),))
    return conditioning.dropout(cond, kinds.null_like(cond), key, p)["label"]


def test_drop_labels_replaces_the_intended_fraction():
    labels = jnp.asarray(np.random.default_rng(0).integers(0, 10, 100_000), jnp.int32)
    key = jax.random.key(3)
    for p in (0.1, 0.5):
        dropped = np.asarray(_drop(labels, key, p))
        is_null = dropped == 10
        # Binomial(n, p): 5 standard deviations
        assert abs(is_null.mean() - p) < 5 * np.sqrt(p * (1 - p) / labels.size)
        np.testing.assert_array_equal(dropped[~is_null], np.asarray(labels)[~is_null])
    np.testing.assert_array_equal(np.asarray(_drop(labels, key, 0.0)), np.asarray(labels))
    assert np.all(np.asarray(_drop(labels, key, 1.0)) == 10)
    # a different key drops other labels
    a = np.asarray(_drop(labels, jax.random.key(4), 0.5)) == 10
    b = np.asarray(_drop(labels, key, 0.5)) == 10
    assert (a != b).mean() > 0.4


@pytest.mark.parametrize("kwargs,match", [
    (dict(guidance_scale=-1.0, **_cond([0, 0])), "guidance_scale=-1 must be a finite number >= 0"),
    (dict(guidance_scale=2.0), "guidance_scale=2 needs a condition"),
    (dict(guidance_scale=2.0, cond={"label": jnp.zeros(2, jnp.int32)}), "needs null_cond"),
])
def test_bad_guidance_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        guidance.model_fn(_toy_apply, _toy_params(), **kwargs)


def test_bad_label_shapes_and_dropout_are_refused(sched):
    with pytest.raises(ValueError, match=r"cond must hold rows aligned with indices, \[3, ...\]"):
        sampling.sample(_toy_apply, _toy_params(), diffusion.GaussianDiffusion(sched), shape=SHAPE, indices=jnp.arange(3),
                        seed=0, **_cond([0, 0]))
    with pytest.raises(ValueError, match="training.label_dropout=1.5"):
        _drop(jnp.zeros(3, jnp.int32), jax.random.key(0), 1.5, 4)


def test_a_learned_variance_is_taken_from_the_conditional_branch(sched):
    """2C outputs (var_type learned_range): the mean channels are guided, the variance is c's."""
    params = _toy_params()

    def apply2(params, x, t, cond=None):
        out = _toy_apply(params, x, t, cond)
        return jnp.concatenate([out, 0.1 * out + 1.0], axis=-1)

    x, t, y = _inputs()
    x = jnp.asarray(x, jnp.float32)
    fn = guidance.model_fn(apply2, params, guidance_scale=3.0, **_cond(y),
                           process=diffusion.GaussianDiffusion(sched, var_type="learned_range", loss="hybrid"))
    out = np.asarray(fn(x, jnp.asarray(t)))
    cond = np.asarray(apply2(params, x, jnp.asarray(t), {"label": jnp.asarray(y)}))
    uncond = np.asarray(apply2(params, x, jnp.asarray(t), {"label": jnp.full(len(y), NUM_CLASSES)}))
    np.testing.assert_allclose(out[..., :1], 4.0 * cond[..., :1] - 3.0 * uncond[..., :1], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[..., 1:], cond[..., 1:])


def test_guidance_on_a_model_trained_without_label_dropout_warns(tmp_path, capsys):
    import ddpm_jax.main  # noqa: F401  (puts the repository root on sys.path for `configs`)
    from configs import digits_cond
    from ddpm_jax import train
    from ddpm_jax.modes import sample

    config = digits_cond.get_config()
    config.model.ch, config.model.ch_mult, config.model.num_res_blocks, config.model.attn_resolutions = 32, (1,), 1, ()
    config.diffusion.num_timesteps = 10
    config.training.update(num_steps=1, sample_every=0, checkpoint_every=1, eval_bpd_after=False, label_dropout=0.0)
    config.sampling.update(num_samples=2, batch_size=2)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    config.sampling.guidance_scale = 1.0
    capsys.readouterr()
    sample.run(config, workdir)
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: sampling.guidance_scale=1 mixes in the unconditional prediction, but {workdir} was trained with "
        "training.label_dropout=0 (never unconditioned): its null condition is untrained; sample with "
        "guidance_scale=0 or train with label_dropout > 0."]
