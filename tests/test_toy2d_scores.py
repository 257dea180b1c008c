"""Tests of ddpm_jax.evaluation.toy2d against independent computations."""

import itertools

import numpy as np
import pytest
import scipy.optimize
import scipy.spatial.distance
import scipy.stats

from configs import toy2d as toy2d_config
from ddpm_jax.data import sources
from ddpm_jax.evaluation import toy2d


def _energy_brute(x, y):
    """D² from full scipy distance matrices (V-statistics), no chunking, no BLAS trick."""
    cd = scipy.spatial.distance.cdist
    return 2 * cd(x, y).mean() - cd(x, x).mean() - cd(y, y).mean()


def test_energy_distance_1d_is_scipy_squared():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=300), rng.gamma(2.0, size=170)
    ours = toy2d.energy_distance(x[:, None], y[:, None])
    assert ours == pytest.approx(scipy.stats.energy_distance(x, y) ** 2, rel=1e-10)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_energy_distance_2d_matches_full_distance_matrices(chunk):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(211, 2)) * [1.0, 3.0]
    y = rng.normal(size=(157, 2)) + [0.5, -1.0]
    ours = toy2d.energy_distance(x, y, chunk=chunk)
    assert ours == pytest.approx(_energy_brute(x, y), rel=1e-9)
    assert toy2d.mean_distance(x, y, chunk=chunk) == pytest.approx(
        scipy.spatial.distance.cdist(x, y).mean(), rel=1e-12)


def test_energy_distance_zero_for_equal_sets_and_grows_with_a_shift():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 2))
    assert toy2d.energy_distance(x, x.copy()) == pytest.approx(0.0, abs=1e-9)
    d = [toy2d.energy_distance(x, x + [s, 0.0]) for s in (0.1, 0.5, 2.0)]
    assert 0 < d[0] < d[1] < d[2]


def _w2_assignment(a, b):
    """Exact W2 between equal-weight empirical measures by optimal assignment: each point of a
    copied len(b) / g times and each of b len(a) / g times (g = gcd), so both have lcm points."""
    g = np.gcd(len(a), len(b))
    aa, bb = np.repeat(a, len(b) // g), np.repeat(b, len(a) // g)
    cost = (aa[:, None] - bb[None, :]) ** 2
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    return np.sqrt(cost[rows, cols].mean())


@pytest.mark.parametrize("n,m", [(12, 12), (12, 8), (5, 9), (1, 4)])
def test_wasserstein2_1d_matches_optimal_assignment(n, m):
    rng = np.random.default_rng(n * 100 + m)
    a, b = rng.normal(size=n), rng.exponential(size=m) - 0.3
    assert toy2d.wasserstein2_1d(a, b) == pytest.approx(_w2_assignment(a, b), rel=1e-10)


def test_sliced_wasserstein_averages_squared_w2_over_the_given_directions():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(30, 2)), rng.normal(size=(20, 2)) * 2.0
    angles = np.array([0.1, 1.0, 2.5])
    theta = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    expected = np.sqrt(np.mean([_w2_assignment(x @ d, y @ d) ** 2 for d in theta]))
    assert toy2d.sliced_wasserstein(x, y, directions=theta) == pytest.approx(expected, rel=1e-10)


def test_sliced_wasserstein_of_a_shifted_gaussian():
    # Population value: projections differ by θ·m, so SW2² = E_θ (θ·m)² = ‖m‖² / 2 in 2-D.
    rng = np.random.default_rng(4)
    x = rng.normal(size=(20_000, 2))
    m = np.array([1.5, -2.0])
    sw = toy2d.sliced_wasserstein(x, x + m, num_projections=2000, seed=1)
    assert sw == pytest.approx(np.linalg.norm(m) / np.sqrt(2), rel=0.03)
    directions = toy2d.random_directions(5, 3, seed=0)
    assert directions.shape == (5, 3) and np.allclose(np.linalg.norm(directions, axis=1), 1.0)


def test_bad_points_are_refused():
    with pytest.raises(ValueError, match=r"points \[N, D\]"):
        toy2d.energy_distance(np.zeros(5), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        toy2d.sliced_wasserstein(np.full((3, 2), np.nan), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="differ in dimension"):
        toy2d.energy_distance(np.zeros((3, 2)), np.zeros((3, 3)))


def test_evaluate_separates_fresh_data_from_a_gaussian():
    cfg = toy2d_config.get_config().data
    cfg.toy_name = "moons"
    n = 3000
    fresh = toy2d.iid_points(cfg, "some_other_draw", n, seed=7)
    # The test split of the pipeline, standardised with the training statistics.
    assert np.allclose(toy2d.fresh_points(cfg, "test"), np.asarray(sources.load_source(cfg, "test").array),
                       atol=1e-6)
    good = toy2d.evaluate(fresh, cfg)
    bad = toy2d.evaluate(np.random.default_rng(0).normal(size=(n, 2)), cfg)
    assert good["num_points"] == n and good["noise_floor"] == bad["noise_floor"]
    for key in ("energy_distance", "sliced_w2"):
        assert good["ratio"][key] < 2.0  # another fresh draw is at the noise floor
        assert bad["ratio"][key] > 3.0 * good["ratio"][key]
    with pytest.raises(ValueError, match="data.source='toy2d'"):
        cfg2 = toy2d_config.get_config().data
        cfg2.source = "digits"
        toy2d.fresh_points(cfg2, "test")


def test_noise_floor_draw_differs_from_test_and_train():
    cfg = toy2d_config.get_config().data
    draws = [toy2d.fresh_points(cfg, s, 100) for s in ("train", "test", toy2d.FLOOR_SPLIT)]
    for a, b in itertools.combinations(draws, 2):
        assert not np.allclose(a, b)


def _iid_moons(rng, n, stats):
    """n i.i.d. points of scikit-learn's two-moons distribution, standardised as the model sees them.

    make_moons puts n/2 points at evenly spaced angles on each half circle (outer: (cos θ, sin θ),
    inner: (1 − cos θ, 1/2 − sin θ), θ ∈ [0, π]) and adds N(0, 0.1²) noise (sources' moons
    noise, the tutorial's); here each point picks its moon by a coin flip and its angle uniformly.
    """
    theta = rng.uniform(0.0, np.pi, n)
    outer = rng.random(n) < 0.5
    points = np.stack([np.where(outer, np.cos(theta), 1.0 - np.cos(theta)),
                       np.where(outer, np.sin(theta), 0.5 - np.sin(theta))], axis=1)
    points += 0.1 * rng.standard_normal((n, 2))
    return (points - stats["mean"]) / stats["std"]


def test_noise_floor_is_drawn_iid_even_for_sklearn_moons():
    # make_moons spaces its points evenly (only the noise is random): two such draws are far
    # closer than two i.i.d. samples, so the floor must be an i.i.d. draw, or no sampler reaches it.
    cfg = toy2d_config.get_config().data
    cfg.toy_name = "moons"
    stats = sources.toy2d_statistics(cfg)
    rng = np.random.default_rng(0)
    # One floor's D² fluctuates by ~50% (a few large-scale modes dominate it), so take the
    # floors of 16 sizes (each size draws another floor, against its own test split) and compare
    # their mean with the mean D² of 320 i.i.d. draws from an independent sampler.
    sizes = range(500, 516)
    floors, null, stratified = [], [], []
    for n in sizes:
        test = toy2d.fresh_points(cfg, "test", n)
        null.append([_energy_brute(_iid_moons(rng, n, stats), test) for _ in range(20)])
        stratified.append(_energy_brute(toy2d.fresh_points(cfg, "other", n), test))
        out = toy2d.evaluate(_iid_moons(rng, n, stats), cfg, num_projections=10)
        assert out["num_points"] == n
        floors.append(out["noise_floor"]["energy_distance"])
    expected = np.mean(null)
    tol = 3 * np.std(null) / np.sqrt(len(sizes))  # 3 sd of a mean of 16 i.i.d. floors: ~0.5 expected
    assert np.mean(floors) == pytest.approx(expected, abs=tol)
    assert np.mean(stratified) < (expected - tol) / 2  # a make_moons floor (~0.13 expected) fails
