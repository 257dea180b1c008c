"""FID, Inception Score and activation statistics against independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.evaluation import fid


def _acts(n, d, seed, offset=0.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + rng.normal(size=d) + offset


def _stats(x):
    return x.mean(0), np.cov(x, rowvar=False)


def _fid_by_eigenvalues(mu1, s1, mu2, s2):
    """Tr sqrt(Σ1 Σ2) = Σ sqrt(λ) of the symmetric PSD sqrt(Σ1) Σ2 sqrt(Σ1) (no sqrtm)."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(root1 @ s2 @ root1)
    tr_root = np.sqrt(np.clip(lam, 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_root)


@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")
def test_frechet_distance_matches_independent_and_pytorch_fid():
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    mu1, s1 = _stats(_acts(400, 64, 0))
    mu2, s2 = _stats(_acts(300, 64, 1, offset=0.3))
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    assert ours > 1.0
    np.testing.assert_allclose(ours, _fid_by_eigenvalues(mu1, s1, mu2, s2), rtol=1e-9)
    np.testing.assert_allclose(ours, fid_score.calculate_frechet_distance(mu1, s1, mu2, s2),
                               rtol=1e-12)
    # Symmetric, and the mean term alone when covariances agree.
    np.testing.assert_allclose(fid.frechet_distance(mu2, s2, mu1, s1), ours, rtol=1e-8)
    np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu1 + 0.5, s1),
                               64 * 0.25, rtol=1e-6)


def test_fid_of_a_set_with_itself_is_zero():
    mu, sigma = _stats(_acts(300, 64, 2))
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_singular_product_retries_with_eps_offset(monkeypatch):
    calls = []
    real_sqrtm = fid.linalg.sqrtm

    def flaky_sqrtm(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(fid.linalg, "sqrtm", flaky_sqrtm)
    mu1, s1 = _stats(_acts(200, 16, 3))
    mu2, s2 = _stats(_acts(200, 16, 4))
    eps = 1e-3
    got = fid.frechet_distance(mu1, s1, mu2, s2, eps=eps)
    off = np.eye(16) * eps
    np.testing.assert_allclose(calls[1], (s1 + off) @ (s2 + off))
    want = _fid_by_eigenvalues(mu1, s1 + off, mu2, s2 + off) - 2 * 16 * eps
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_imaginary_root_and_shape_mismatch_raise():
    eye = np.eye(4)
    with pytest.raises(ValueError, match="imaginary component"):
        fid.frechet_distance(np.zeros(4), eye, np.zeros(4), -eye)   # sqrtm(-I) = iI
    with pytest.raises(ValueError, match="different shapes"):
        fid.frechet_distance(np.zeros(4), eye, np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="do not match means"):
        fid.frechet_distance(np.zeros(4), eye, np.zeros(4), np.eye(5))


def test_streaming_statistics_equal_whole_set():
    x = _acts(257, 32, 5, offset=1e3)          # a large mean: naive Σx² would lose digits
    stats = fid.ActivationStats()
    start = 0
    for size in (1, 0, 50, 7, 128, 71):
        stats.update(x[start:start + size])
        start += size
    assert start == len(x) and stats.count == len(x)
    np.testing.assert_allclose(stats.mu, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-11)
    # Merging per-host statistics equals feeding all rows here; padded rows are masked out.
    a, b = fid.ActivationStats(), fid.ActivationStats()
    a.update(x[:100])
    padded = np.concatenate([x[100:], np.full((3, 32), 1e6)])
    b.update(padded, mask=np.arange(len(padded)) < len(x) - 100)
    a.merge(b)
    np.testing.assert_allclose(a.mu, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(a.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-11)


def test_streaming_statistics_errors():
    stats = fid.ActivationStats()
    with pytest.raises(ValueError, match="no activations"):
        stats.mu
    stats.update(np.ones((1, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        stats.sigma
    with pytest.raises(ValueError, match="dimension 5"):
        stats.update(np.ones((2, 5)))
    with pytest.raises(ValueError, match=r"\[n, D\]"):
        stats.update(np.ones(4))


def test_stats_files_interchangeable_with_pytorch_fid(tmp_path):
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    mu, sigma = _stats(_acts(100, 8, 6))
    ours = tmp_path / "ours_stats"                # no suffix: written exactly at this path
    fid.save_stats(ours, mu, sigma)
    assert ours.is_file()
    theirs_path = str(tmp_path / "ours.npz")
    ours.rename(theirs_path)
    m, s = fid_score.compute_statistics_of_path(theirs_path, None, 50, 8, "cpu")  # np.load path
    np.testing.assert_array_equal(m, mu)
    np.testing.assert_array_equal(s, sigma)
    # pytorch-fid's own writer (save_fid_stats) → our reader.
    theirs = tmp_path / "theirs.npz"
    np.savez_compressed(theirs, mu=mu * 2, sigma=sigma * 3)
    m, s = fid.load_stats(theirs)
    np.testing.assert_array_equal(m, mu * 2)
    np.testing.assert_array_equal(s, sigma * 3)


def test_load_stats_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--mode=fid_stats"):
        fid.load_stats(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, mean=np.zeros(3))
    with pytest.raises(ValueError, match="expected 'mu' and 'sigma'"):
        fid.load_stats(bad)


def _is_reference(logits, splits):
    """improved-gan's get_inception_score, written out with probabilities."""
    e = np.exp(logits - logits.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)
    scores = []
    n = len(preds)
    for i in range(splits):
        part = preds[i * n // splits:(i + 1) * n // splits]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return np.mean(scores), np.std(scores)


def test_inception_score_uniform_confident_and_reference():
    mean, std = fid.inception_score(np.zeros((50, 1008)))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    # Confident, distinct predictions: each split of 10 rows covers 10 classes → IS = 10.
    labels = np.arange(100) % 10
    one_hot = 1000.0 * np.eye(1008)[labels]       # underflows a naive softmax; log-space is exact
    mean, std = fid.inception_score(one_hot, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    mean, _ = fid.inception_score(30.0 * np.eye(1008)[np.arange(100) % 5], splits=10)
    assert mean == pytest.approx(5.0, rel=1e-6)
    # Random logits, N not divisible by the splits: the reference formula.
    logits = np.random.default_rng(7).normal(scale=3.0, size=(105, 1008))
    np.testing.assert_allclose(fid.inception_score(logits), _is_reference(logits, 10), rtol=1e-10)
    with pytest.raises(ValueError, match="at least splits=10"):
        fid.inception_score(np.zeros((9, 1008)))


def test_inception_score_with_extreme_logits_stays_finite():
    # Class 1 has p ≈ e^-744 (subnormal) in row 0 and underflows to 0 in row 1: their mean
    # rounds to 0, so p log mean(p) in linear space would be −∞ (IS = inf).
    logits = np.array([[744.0, 0.0, 744.0], [744.0, -800.0, 744.0]])
    mean, _ = fid.inception_score(logits, splits=1)
    assert mean == pytest.approx(1.0, abs=1e-12)
    acc = fid.InceptionScoreAccumulator(2, splits=1).update(logits, [0, 1])
    assert acc.result()[0] == pytest.approx(1.0, abs=1e-12)


def _fake_apply(variables, x):
    flat = x.reshape(x.shape[0], -1)
    return dict(pool=flat @ variables["w"], logits=jnp.tanh(flat[:, :5]))


@pytest.mark.parametrize("num_devices", [None, 1, 8])
def test_inception_runner_batches_over_a_data_mesh(num_devices):
    rng = np.random.default_rng(8)
    variables = {"w": jnp.asarray(rng.normal(size=(4 * 4 * 3, 6)), jnp.float32)}
    mesh = None if num_devices is None else jax.sharding.Mesh(
        np.array(jax.devices()[:num_devices]), ("data",))
    run = fid.make_inception_fn(_fake_apply, variables, mesh=mesh)
    for b in (13, 16):                          # 13 rows are padded to 16 on 8 devices
        x = rng.uniform(-1, 1, (b, 4, 4, 3)).astype(np.float32)
        out = run(x)
        ref = _fake_apply(variables, x)
        assert isinstance(out["pool"], np.ndarray) and out["pool"].shape == (b, 6)
        np.testing.assert_allclose(out["pool"], ref["pool"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out["logits"], ref["logits"], rtol=1e-6, atol=1e-6)


def test_inception_runner_needs_a_data_axis():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("model",))
    with pytest.raises(ValueError, match="no 'data' axis"):
        fid.make_inception_fn(_fake_apply, {}, mesh=mesh)


def test_inception_score_accumulator_equals_inception_score_in_any_order():
    rng = np.random.default_rng(9)
    logits = rng.normal(scale=3.0, size=(107, 1008))
    order = rng.permutation(len(logits))
    # Three "hosts" feed shuffled pieces; their sums merge (also through to_arrays / from_arrays).
    parts = np.array_split(order, 3)
    accs = []
    for part in parts:
        acc = fid.InceptionScoreAccumulator(len(logits), splits=10)
        for piece in np.array_split(part, 4):
            acc.update(logits[piece], piece)
        accs.append(fid.InceptionScoreAccumulator.from_arrays(acc.to_arrays()))
    total = accs[0].merge(accs[1]).merge(accs[2])
    np.testing.assert_allclose(total.result(), fid.inception_score(logits, splits=10), rtol=1e-10)
    # Every row lands in the split inception_score puts it in.
    n, k = 107, 10
    want = np.concatenate([np.full((s + 1) * n // k - s * n // k, s) for s in range(k)])
    np.testing.assert_array_equal(total.split_of(np.arange(n)), want)


def test_inception_score_accumulator_errors():
    acc = fid.InceptionScoreAccumulator(20, splits=10)
    acc.update(np.zeros((19, 5)), np.arange(19))
    with pytest.raises(ValueError, match="got 19 of 20 rows"):
        acc.result()
    with pytest.raises(ValueError, match=r"row indices must be in \[0, 20\)"):
        acc.update(np.zeros((1, 5)), [20])
    with pytest.raises(ValueError, match="at least splits=10"):
        fid.InceptionScoreAccumulator(9, splits=10)
    with pytest.raises(ValueError, match="cannot merge"):
        acc.merge(fid.InceptionScoreAccumulator(30, splits=10))


def test_activation_stats_round_trip_through_arrays():
    x = _acts(50, 8, 10)
    stats = fid.ActivationStats().update(x)
    back = fid.ActivationStats.from_arrays(stats.to_arrays())
    assert back.count == 50
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    empty = fid.ActivationStats.from_arrays(fid.ActivationStats(dim=8).to_arrays())
    assert empty.count == 0 and empty.merge(back).count == 50
