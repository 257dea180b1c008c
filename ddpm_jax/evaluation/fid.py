"""FID and Inception Score from Inception activations, as the reference codes compute them.

* ``ActivationStats`` streams pool_3 features into float64 running statistics
  (mean and unbiased covariance, equal to ``np.mean`` / ``np.cov(rowvar=False)``
  of all rows), so 50k × 2048 features never have to be held at once.
* ``frechet_distance`` is pytorch-fid's ``calculate_frechet_distance`` (the TTUR
  formula ``‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)`` with ``scipy.linalg.sqrtm``,
  the ε-offset retry when the product is singular, the imaginary-part check).
* ``save_stats`` / ``load_stats`` use pytorch-fid's ``.npz`` layout (``mu``, ``sigma``),
  so statistics files are interchangeable with ``python -m pytorch_fid``.
* ``inception_score`` is the improved-gan IS (Salimans et al. 2016) with 10 splits;
  ``InceptionScoreAccumulator`` computes the same number from rows fed in pieces
  (any order, several hosts), without holding all the logits.
* ``make_inception_fn`` runs the Inception over batches, jit-compiled and,
  given a ``('data',)`` mesh, data-parallel over its devices.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import numpy as np
from absl import logging
from scipy import linalg, special

from ddpm_jax import files


class ActivationStats:
    """Streaming float64 mean / covariance of activation rows (Chan et al.'s pairwise update).

    ``update(acts)`` adds rows ``acts [n, D]`` (``mask [n]`` drops padded rows);
    ``mu`` is their mean and ``sigma`` their unbiased covariance, as
    ``np.mean(all, 0)`` and ``np.cov(all, rowvar=False)``.
    """

    def __init__(self, dim: int | None = None):
        self.count = 0
        self.dim = dim
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None   # Σ (x − mean)(x − mean)ᵀ

    def update(self, acts, mask=None) -> "ActivationStats":
        acts = np.asarray(acts, dtype=np.float64)
        if acts.ndim != 2:
            raise ValueError(f"activations must be [n, D], got shape {acts.shape}; "
                             f"reshape to (-1, D) first")
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != acts.shape[:1]:
                raise ValueError(f"mask shape {mask.shape} does not match {acts.shape[0]} rows")
            acts = acts[mask]
        if self.dim is None:
            self.dim = acts.shape[1]
        if acts.shape[1] != self.dim:
            raise ValueError(f"activations have dimension {acts.shape[1]}, these statistics "
                             f"{self.dim}; feed the same Inception layer throughout")
        n = acts.shape[0]
        if n == 0:
            return self
        mean_b = acts.mean(axis=0)
        centred = acts - mean_b
        m2_b = centred.T @ centred
        self._merge(n, mean_b, m2_b)
        return self

    def merge(self, other: "ActivationStats") -> "ActivationStats":
        """Add another set's statistics (e.g. another host's), as if its rows were fed here."""
        if other.count:
            if self.dim is not None and other.dim != self.dim:
                raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
            self.dim = other.dim
            self._merge(other.count, other._mean, other._m2)
        return self

    def _merge(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        if self.count == 0:
            self.count, self._mean, self._m2 = n_b, mean_b.copy(), m2_b.copy()
            return
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The running state as arrays (to send to another process, or to a file)."""
        dim = self.dim or 0
        mean = self._mean if self.count else np.zeros(dim)
        m2 = self._m2 if self.count else np.zeros((dim, dim))
        return dict(count=np.asarray(self.count, np.int64), mean=mean, m2=m2)

    @classmethod
    def from_arrays(cls, arrays) -> "ActivationStats":
        """Inverse of ``to_arrays``."""
        mean = np.asarray(arrays["mean"], np.float64)
        stats = cls(dim=int(mean.shape[0]) or None)
        count = int(arrays["count"])
        if count:
            stats._merge(count, mean, np.asarray(arrays["m2"], np.float64))
        return stats

    @property
    def mu(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("no activations were added; call update() first")
        return self._mean.copy()

    @property
    def sigma(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"the covariance needs at least 2 activations, got {self.count}")
        return self._m2 / (self.count - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), as pytorch-fid computes it.

    d² = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 sqrtm(Σ1 Σ2)); if sqrtm of the product is not
    finite, ``eps`` is added to both diagonals and it is retried; an imaginary part
    above 1e-3 on the diagonal of the root raises ValueError.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different shapes {mu1.shape} and {mu2.shape}; "
                         f"compare statistics of the same Inception layer")
    if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"covariances {sigma1.shape}, {sigma2.shape} do not match means "
                         f"{mu1.shape}; compare statistics of the same Inception layer")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))   # the product may be almost singular
    if not np.isfinite(covmean).all():
        logging.warning("FID: singular product; adding %g to the diagonal of the covariances", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):   # numerical error may give a slight imaginary component
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise ValueError(f"FID: imaginary component {m} in sqrtm(sigma1 @ sigma2); the "
                             f"covariances are ill-conditioned, use more samples")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def save_stats(path: str | os.PathLike, mu, sigma) -> None:
    """Write ``mu``, ``sigma`` as pytorch-fid's statistics ``.npz`` (exactly at ``path``)."""
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise ValueError(f"expected mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    files.write_npz(os.fspath(path), compressed=True, mu=mu, sigma=sigma)


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(mu, sigma)`` from a pytorch-fid statistics ``.npz`` (ours or theirs)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID statistics file {path!r} not found; compute it with "
                                f"--mode=fid_stats or `python -m pytorch_fid --save-stats DIR {path}`")
    with np.load(path, allow_pickle=False) as f:
        if "mu" not in f.files or "sigma" not in f.files:
            raise ValueError(f"{path!r} has arrays {sorted(f.files)}, expected 'mu' and 'sigma' "
                             f"(pytorch-fid's statistics format)")
        mu, sigma = f["mu"][:], f["sigma"][:]
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise ValueError(f"{path!r}: mu {mu.shape} and sigma {sigma.shape} are not [D] and [D, D]")
    return mu, sigma


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) ‖ p(y)), mean and std over splits.

    As improved-gan's ``get_inception_score``: ``p(y|x)`` is the softmax over all
    1008 logits of the 2015-12-05 graph (its 1008-way ``softmax/logits`` head, no
    slicing to 1000 classes), the N rows are cut into ``splits`` consecutive parts
    ``[i N // splits, (i + 1) N // splits)``, and ``p(y)`` is each part's mean.
    improved-gan builds that softmax from ``pool_3 @ W`` without the fc bias; feed
    ``logits_unbiased`` from the Inception to reproduce it, ``logits`` for the
    graph's own biased head (TF-GAN's ``logits``). Computed in float64 in log space.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, classes], got shape {logits.shape}")
    n = logits.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"inception_score needs at least splits={splits} >= 1 rows, got {n}; "
                         f"pass more samples or fewer splits")
    log_p = special.log_softmax(logits, axis=1)
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        part_p = p[i * n // splits:(i + 1) * n // splits]
        part_log_p = log_p[i * n // splits:(i + 1) * n // splits]
        # log p(y) = log mean_x p(y|x), in log space: the mean of subnormal probabilities can
        # round to 0 while one of them is not (logits ~700 apart), and p log 0 would be −∞.
        log_p_y = special.logsumexp(part_log_p, axis=0, keepdims=True) - np.log(len(part_p))
        # KL(p(y|x) ‖ p(y)) = Σ_y p (log p − log p(y)); every log is finite.
        kl = np.sum(part_p * (part_log_p - log_p_y), axis=1)
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores)), float(np.std(scores))


class InceptionScoreAccumulator:
    """``inception_score`` of N rows fed in any order, in pieces, on several hosts.

    Row ``i`` (its index among the N) belongs to split ``s`` with
    ``s N // splits <= i < (s + 1) N // splits``, as in ``inception_score``. Per split
    it keeps Σ_x Σ_y p log p and Σ_x p(y|x) (float64), since
    E_x KL(p(y|x) ‖ p(y)) = E_x Σ_y p log p − Σ_y p(y) log p(y) with p(y) = E_x p(y|x);
    so pieces merge by addition and ``result()`` equals ``inception_score`` of all rows.
    """

    def __init__(self, num_rows: int, splits: int = 10):
        if splits < 1 or num_rows < splits:
            raise ValueError(f"the Inception Score needs at least splits={splits} >= 1 rows, got "
                             f"{num_rows}; pass more samples or fewer splits")
        self.num_rows, self.splits = int(num_rows), int(splits)
        self.count = np.zeros(splits, np.int64)
        self.neg_entropy = np.zeros(splits)       # Σ_x Σ_y p log p
        self.p_sum: np.ndarray | None = None      # [splits, classes], Σ_x p(y|x)

    def split_of(self, indices) -> np.ndarray:
        """The split of each row index (the inverse of ``[s N // splits, (s + 1) N // splits)``)."""
        i = np.asarray(indices, np.int64)
        if i.size and (i.min() < 0 or i.max() >= self.num_rows):
            raise ValueError(f"row indices must be in [0, {self.num_rows}), got "
                             f"[{i.min()}, {i.max()}]")
        # The largest s with s N // splits ≤ i, i.e. s N < (i + 1) splits: ⌈(i + 1) splits / N⌉ − 1.
        return (i * self.splits + self.splits - 1) // self.num_rows

    def update(self, logits, indices) -> "InceptionScoreAccumulator":
        logits = np.asarray(logits, np.float64)
        if logits.ndim != 2 or logits.shape[0] != np.shape(indices)[0]:
            raise ValueError(f"logits must be [n, classes] with one index per row, got logits "
                             f"{logits.shape} and {np.shape(indices)[0]} indices")
        if self.p_sum is None:
            self.p_sum = np.zeros((self.splits, logits.shape[1]))
        log_p = special.log_softmax(logits, axis=1)
        p = np.exp(log_p)
        split = self.split_of(indices)
        np.add.at(self.count, split, 1)
        np.add.at(self.neg_entropy, split, np.sum(special.xlogy(p, p), axis=1))
        np.add.at(self.p_sum, split, p)
        return self

    def to_arrays(self) -> dict[str, np.ndarray]:
        p_sum = self.p_sum if self.p_sum is not None else np.zeros((self.splits, 0))
        return dict(num_rows=np.asarray(self.num_rows), count=self.count,
                    neg_entropy=self.neg_entropy, p_sum=p_sum)

    @classmethod
    def from_arrays(cls, arrays) -> "InceptionScoreAccumulator":
        acc = cls(int(arrays["num_rows"]), splits=len(arrays["count"]))
        acc.count = np.asarray(arrays["count"], np.int64).copy()
        acc.neg_entropy = np.asarray(arrays["neg_entropy"], np.float64).copy()
        p_sum = np.asarray(arrays["p_sum"], np.float64)
        acc.p_sum = p_sum.copy() if p_sum.shape[1] else None
        return acc

    def merge(self, other: "InceptionScoreAccumulator") -> "InceptionScoreAccumulator":
        if (other.num_rows, other.splits) != (self.num_rows, self.splits):
            raise ValueError(f"cannot merge Inception Score sums over {other.num_rows} rows / "
                             f"{other.splits} splits into {self.num_rows} / {self.splits}")
        if other.p_sum is not None:
            self.p_sum = other.p_sum.copy() if self.p_sum is None else self.p_sum + other.p_sum
        self.count = self.count + other.count
        self.neg_entropy = self.neg_entropy + other.neg_entropy
        return self

    def result(self) -> tuple[float, float]:
        """(mean, std) over the splits, as ``inception_score``; every row must have been fed."""
        want = np.diff([s * self.num_rows // self.splits for s in range(self.splits + 1)])
        if not np.array_equal(self.count, want):
            raise ValueError(f"the Inception Score got {int(self.count.sum())} of {self.num_rows} "
                             f"rows (per split {self.count.tolist()}, expected {want.tolist()})")
        p_y = self.p_sum / self.count[:, None]
        kl = self.neg_entropy / self.count - np.sum(special.xlogy(p_y, p_y), axis=1)
        scores = np.exp(kl)
        return float(np.mean(scores)), float(np.std(scores))


def make_inception_fn(apply_fn: Callable, variables, *, mesh: jax.sharding.Mesh | None = None
                      ) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """Jit-compiled, data-parallel Inception over host batches.

    Returns ``run(images) -> dict of np.ndarray`` (``pool``, ``logits``, ...) for
    this host's ``images`` [b, H, W, C] in [-1, 1]. With a ``('data',)`` mesh the
    variables are replicated and the batch is split over the mesh's devices
    (padded to a multiple of this host's device count; padding rows are dropped
    from the result). Keep ``b`` fixed between calls: each new shape compiles.
    """
    if mesh is None:
        run_jit = jax.jit(apply_fn)

        def run(images) -> dict[str, np.ndarray]:
            return jax.tree_util.tree_map(np.asarray, run_jit(variables, images))

        return run

    if "data" not in mesh.axis_names:
        raise ValueError(f"mesh axes {mesh.axis_names} have no 'data' axis; build it with "
                         f"parallel.make_mesh()")
    spec = jax.sharding.PartitionSpec
    replicated = jax.sharding.NamedSharding(mesh, spec())
    data = jax.sharding.NamedSharding(mesh, spec("data"))
    variables = jax.device_put(variables, replicated)
    run_jit = jax.jit(apply_fn, in_shardings=(replicated, data), out_shardings=data)
    local_devices = mesh.local_mesh.size

    def run(images) -> dict[str, np.ndarray]:
        images = np.asarray(images)
        b = images.shape[0]
        pad = -b % local_devices
        if pad:
            images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)], axis=0)
        out = run_jit(variables, jax.make_array_from_process_local_data(data, images))
        return jax.tree_util.tree_map(lambda a: _host_rows(a)[:b], out)

    return run


def _host_rows(x: jax.Array) -> np.ndarray:
    """This host's rows of a batch-sharded global array, in order."""
    if jax.process_count() == 1:
        return np.asarray(x)
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards], axis=0)
