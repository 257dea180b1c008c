"""Sample quality of 2-D toy models: energy distance and sliced Wasserstein-2, with a noise floor.

Both are distances between two point clouds, computed exactly on the empirical measures
in NumPy float64:

* energy distance D² (Székely & Rizzo 2013) for points in any dimension:
  ``2 E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖`` over the empirical distributions (V-statistics:
  every pair, the zero diagonal included, so D² >= 0). It is 0 only for equal
  distributions. `scipy.stats.energy_distance` is its square root, for 1-D data only. The
  n × m distances are summed in row chunks (10k × 10k points never sit in memory at once).
* sliced Wasserstein-2: ``sqrt(mean_θ W2²(θ·X, θ·Y))`` over random unit directions θ,
  each 1-D W2 exact from the sorted projections (the quantile functions).

D² is a squared distance and SW2 a distance: a ratio of 10 to the noise floor is
stricter for D² (a standard Gaussian against the standardised swiss roll is ~100x the
floor in D², ~15x in SW2).

A score means little alone: two independent draws of the same distribution are not at
distance 0 either. `evaluate` therefore reports the samples' distance to fresh data (the
toy2d "test" split, drawn with its own seed) next to the distance of another fresh draw
to the same test split, the noise floor that a perfect model would get with as many
points. Everything is in the standardised coordinates the model sees.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ddpm_jax.data import sources

DEFAULT_PROJECTIONS = 1000
FLOOR_SPLIT = "noise_floor"  # seed name of the floor's fresh draw (sources.toy_points: CRC32 of it)


def _as_points(x: Any, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must be points [N, D] with N >= 1, got shape {x.shape}.")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} holds NaN or Inf; the model diverged or the samples are broken.")
    return x


def mean_distance(x: np.ndarray, y: np.ndarray, *, chunk: int = 1024) -> float:
    """E‖X − Y‖ over all n × m pairs (float64, `chunk` rows of x at a time)."""
    x, y = _as_points(x, "x"), _as_points(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y differ in dimension: {x.shape[1]} vs {y.shape[1]}.")
    yy = np.sum(y * y, axis=1)
    total = 0.0
    for lo in range(0, x.shape[0], int(chunk)):
        a = x[lo:lo + int(chunk)]
        # ‖a − y‖² = ‖a‖² + ‖y‖² − 2 a·y (one matrix product); rounding can make it
        # slightly negative for (near-)equal points: clip at 0.
        d2 = np.sum(a * a, axis=1)[:, None] + yy[None, :] - 2.0 * (a @ y.T)
        total += float(np.sqrt(np.maximum(d2, 0.0)).sum())
    return total / (x.shape[0] * y.shape[0])


def energy_distance(x: np.ndarray, y: np.ndarray, *, chunk: int = 1024) -> float:
    """D² = 2 E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖ between the empirical distributions of x, y.

    x [n, D] and y [m, D] may differ in size. For D = 1 this is `scipy.stats.energy_distance(x[:, 0], y[:, 0]) ** 2`.
    """
    return _energy(mean_distance(x, y, chunk=chunk), mean_distance(x, x, chunk=chunk),
                   mean_distance(y, y, chunk=chunk))


def _energy(xy: float, xx: float, yy: float) -> float:
    return float(max(2.0 * xy - xx - yy, 0.0))


def wasserstein2_1d(a: np.ndarray, b: np.ndarray) -> float:
    """W2 between the empirical distributions of 1-D samples a [n] and b [m] (any n, m).

    W2² = ∫_0^1 (F_a⁻¹(u) − F_b⁻¹(u))² du with both quantile functions piecewise constant:
    the integral is a sum over the merged breakpoints {i/n} ∪ {j/m}.
    """
    return float(np.sqrt(_w2_squared_sorted(np.sort(np.asarray(a, np.float64).ravel())[:, None],
                                            np.sort(np.asarray(b, np.float64).ravel())[:, None])[0]))


def _w2_squared_sorted(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """W2² per column of column-wise sorted a [n, L] and b [m, L]."""
    n, m = a.shape[0], b.shape[0]
    if n == m:
        return np.mean((a - b) ** 2, axis=0)
    u = np.union1d(np.arange(1, n + 1) / n, np.arange(1, m + 1) / m)
    widths = np.diff(np.concatenate([[0.0], u]))
    mids = u - widths / 2
    ia = np.minimum((mids * n).astype(np.int64), n - 1)
    ib = np.minimum((mids * m).astype(np.int64), m - 1)
    return np.einsum("k,kl->l", widths, (a[ia] - b[ib]) ** 2)


def random_directions(num: int, dim: int, seed: int = 0) -> np.ndarray:
    """`num` unit vectors [num, dim], uniform on the sphere (normalised Gaussians)."""
    if int(num) < 1:
        raise ValueError(f"num_projections={num} must be >= 1.")
    v = np.random.default_rng(seed).standard_normal((int(num), int(dim)))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def sliced_wasserstein(x: np.ndarray, y: np.ndarray, *, num_projections: int = DEFAULT_PROJECTIONS,
                       seed: int = 0, directions: np.ndarray | None = None) -> float:
    """sqrt(mean over directions θ of W2²(θ·x, θ·y)): the sliced Wasserstein-2 distance.

    `directions` [L, D] (unit vectors) replaces the `num_projections` random ones of `seed`.
    """
    x, y = _as_points(x, "x"), _as_points(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y differ in dimension: {x.shape[1]} vs {y.shape[1]}.")
    theta = random_directions(num_projections, x.shape[1], seed) if directions is None \
        else np.asarray(directions, np.float64)
    w2 = _w2_squared_sorted(np.sort(x @ theta.T, axis=0), np.sort(y @ theta.T, axis=0))
    return float(np.sqrt(np.mean(w2)))


def scores(samples: np.ndarray, reference: np.ndarray, *, num_projections: int = DEFAULT_PROJECTIONS,
           seed: int = 0) -> dict[str, float]:
    """{"energy_distance", "sliced_w2"} of samples against reference points."""
    return dict(energy_distance=energy_distance(samples, reference),
                sliced_w2=sliced_wasserstein(samples, reference, num_projections=num_projections, seed=seed))


def fresh_points(data_cfg: Any, split: str, num_points: int | None = None) -> np.ndarray:
    """`num_points` (default data.toy_num_points) points of a fresh draw named `split`, standardised
    with the training split's statistics, as the model sees its data."""


    sources.validate_config(data_cfg)
    if data_cfg.source != "toy2d":
        raise ValueError(f"toy2d scores need data.source='toy2d', got {data_cfg.source!r}.")
    n = int(num_points or data_cfg.toy_num_points)
    stats = sources.toy2d_statistics(data_cfg)
    raw = sources.toy_points(data_cfg.toy_name, n, split)
    return (raw - stats["mean"]) / stats["std"]


def iid_points(data_cfg: Any, split: str, num_points: int, oversample: int = 16, seed: int = 0) -> np.ndarray:
    """`num_points` independent draws from the toy distribution (standardised as `fresh_points`).

    scikit-learn's moons are not i.i.d.: their angles are evenly spaced (a linspace) and
    only the small noise is random, so two such draws are much closer to each other than
    two i.i.d. samples (by ~10x in D² at 10,000 points), and a floor made of them would be
    out of reach of any sampler. A random subset of a draw `oversample` times larger is
    i.i.d. to a very good approximation (for swiss roll and S-curve it changes nothing).
    """
    pool = fresh_points(data_cfg, split, int(num_points) * int(oversample))
    pick = np.random.default_rng(seed).choice(pool.shape[0], int(num_points), replace=False)
    return pool[pick]


def evaluate(samples: np.ndarray, data_cfg: Any, *, num_projections: int = DEFAULT_PROJECTIONS,
             seed: int = 0) -> dict[str, Any]:
    """Scores of `samples` against the test split, next to the noise floor (fresh vs test).

    The reference and the floor draw have as many points as `samples`, so the floor is
    what a perfect sampler, drawing i.i.d. points (`iid_points`), would score. Returns
    {"samples": {...}, "noise_floor": {...}, "ratio": {...} (samples / floor), "num_points"}.
    """
    samples = _as_points(samples, "samples")
    n = samples.shape[0]
    test = fresh_points(data_cfg, str(data_cfg.eval_split), n)
    floor_draw = iid_points(data_cfg, FLOOR_SPLIT, n)
    test_test = mean_distance(test, test)  # shared by both energy distances
    ours, floor = {}, {}
    for out, x in ((ours, samples), (floor, floor_draw)):
        out["energy_distance"] = _energy(mean_distance(x, test), mean_distance(x, x), test_test)
        out["sliced_w2"] = sliced_wasserstein(x, test, num_projections=num_projections, seed=seed)
    return dict(samples=ours, noise_floor=floor, ratio={k: ours[k] / floor[k] for k in ours},
                num_points=n, reference_split=str(data_cfg.eval_split), toy_name=str(data_cfg.toy_name))
