"""Sample quality in a classifier's features, each metric beside its noise floor.

In the features (penultimate layer) and class probabilities of the classifier trained
on the data set (``classifier.py``):

* ``fd`` — Fréchet distance of the features, with FID's streaming statistics and
  Fréchet function (``fid.ActivationStats``, ``fid.frechet_distance``); lower is better.
* ``precision`` / ``recall`` — Kynkäänniemi et al. 2019 (k = 3): the fraction of
  generated features inside the real manifold (the union of balls around each real
  feature reaching its k-th nearest real neighbour), and of real features inside the
  generated manifold. Distances are computed in row chunks, never as one N×M matrix.
* ``classifier_score`` — exp E_x KL(p(y|x) ‖ p(y)), the Inception Score formula with
  one split (``fid.inception_score``); at most the number of classes.
* ``confident`` — fraction of images whose most likely class has probability > 0.9.
* ``label_accuracy`` (class-conditional samples, ``labels`` given) — the fraction of samples
  the classifier assigns to the class they were asked for, overall and per class; beside it,
  the classifier's accuracy on the real held-out images with their true labels (what samples
  indistinguishable from real ones of the asked class would score). Not a ratio to a floor:
  higher is better up to that real-image accuracy.
* the class histogram — the fraction of images predicted as each class, for the
  generated, held-out and reference images. (No single number with a floor: mnist's
  stratified test split has exactly 100 digits per class, so its histogram lacks the
  sampling noise that any i.i.d. set of images has.)

**Noise floor.** The same metrics for real held-out images (``data.eval_split``, e.g.
"test") against the same real reference set (``data.train_split``), with the same
count: what a model whose samples were fresh draws of the data would score. Metrics
whose value depends on the count (fd, precision, recall, classifier_score) are computed
on blocks of ``n = min(#generated, #held-out)`` images against the whole reference set
and averaged over the disjoint consecutive blocks of each side (``counts`` says how many);
``confident`` and the histograms use every image. Which split is the floor
matters: mnist's test split is a stratified random draw (an i.i.d. floor), while
scikit-learn's digits are ordered by writer, so the digits floor (the last 297, other
writers, against the first 1,500) is larger than two random halves would give, and a
model can score below it.

```python
clf = classifier.load_or_train(config.data, classifier.resolve_path(config))
result = sample_quality.evaluate_samples(clf, config.data, samples)   # samples uint8 or [-1, 1]
print(sample_quality.format_report(result))      # "fd 1.23 (floor 0.45, 2.7x floor)" ...
```
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy import special

from ddpm_jax import data
from ddpm_jax.evaluation import fid

K = 3  # Nearest neighbour of the manifold radii (Kynkäänniemi et al. 2019).
CONFIDENT = 0.9  # Max class probability above which an image counts as confidently classified.
BLOCK_METRICS = ("fd", "precision", "recall", "classifier_score")  # depend on the image count
ALL_METRICS = BLOCK_METRICS + ("confident",)
_CHUNK_ELEMENTS = 1 << 23  # Distance entries per chunk (float64: 64 MiB).


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    """Classifier features [N, D] and logits [N, K] of one set of images."""

    features: np.ndarray
    logits: np.ndarray

    @classmethod
    def of(cls, clf: Any, images: Any) -> "FeatureSet":
        """The features and logits of ``images`` (uint8, or float in [-1, 1]) under ``clf``."""
        feats, logits = clf.features_and_logits(images)
        return cls(np.asarray(feats, np.float64), np.asarray(logits, np.float64))

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, part: slice) -> "FeatureSet":
        return FeatureSet(self.features[part], self.logits[part])


# ---- single metrics ------------------------------------------------------------------------


def statistics(features: np.ndarray, chunk: int = 4096) -> fid.ActivationStats:
    """FID's streaming float64 mean / covariance of ``features`` [N, D], fed in chunks."""
    stats = fid.ActivationStats()
    for start in range(0, len(features), chunk):
        stats.update(features[start:start + chunk])
    return stats


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (``fid.frechet_distance``)."""
    a, b = statistics(features_a), statistics(features_b)
    return fid.frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def _squared_distances(rows: np.ndarray, cols: np.ndarray, cols_sq: np.ndarray) -> np.ndarray:
    d = np.sum(rows * rows, axis=1)[:, None] + cols_sq[None, :] - 2.0 * rows @ cols.T
    return np.maximum(d, 0.0)


def _row_chunks(num_rows: int, num_cols: int):
    step = max(1, _CHUNK_ELEMENTS // max(num_cols, 1))
    return (slice(s, min(s + step, num_rows)) for s in range(0, num_rows, step))


def knn_radii(features: np.ndarray, k: int = K) -> np.ndarray:
    """Squared distance from each row to its k-th nearest other row (float64 [N])."""
    x = np.asarray(features, np.float64)
    if len(x) <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} feature rows, got {len(x)}")
    sq = np.sum(x * x, axis=1)
    radii = np.empty(len(x))
    for rows in _row_chunks(len(x), len(x)):
        # Column 0 of the sorted row is the point itself (distance 0): index k is the k-th other.
        radii[rows] = np.partition(_squared_distances(x[rows], x, sq), k, axis=1)[:, k]
    return radii


def manifold_fraction(points: np.ndarray, manifold: np.ndarray, radii: np.ndarray) -> float:
    """Fraction of ``points`` within ``radii`` (squared) of at least one row of ``manifold``."""
    p, m = np.asarray(points, np.float64), np.asarray(manifold, np.float64)
    m_sq = np.sum(m * m, axis=1)
    inside = 0
    for rows in _row_chunks(len(p), len(m)):
        inside += int(np.any(_squared_distances(p[rows], m, m_sq) <= radii[None, :], axis=1).sum())
    return inside / len(p)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = K,
                     real_radii: np.ndarray | None = None) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019: (fake in the real manifold, real in the fake manifold)."""
    real_radii = knn_radii(real, k) if real_radii is None else real_radii
    precision = manifold_fraction(fake, real, real_radii)
    recall = manifold_fraction(real, fake, knn_radii(fake, k))
    return precision, recall


def class_probabilities(logits: np.ndarray) -> np.ndarray:
    return np.exp(special.log_softmax(np.asarray(logits, np.float64), axis=1))


def classifier_score(logits: np.ndarray) -> float:
    """exp E_x KL(p(y|x) ‖ p(y)) over all rows (the Inception Score, one split)."""
    return fid.inception_score(logits, splits=1)[0]


def confident_fraction(logits: np.ndarray, threshold: float = CONFIDENT) -> float:
    """Fraction of rows whose largest class probability exceeds ``threshold``."""
    return float(np.mean(class_probabilities(logits).max(axis=1) > threshold))


def label_accuracy(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Fraction of rows whose argmax is the asked ``labels`` [N], overall and per asked class."""
    labels = np.asarray(labels, np.int64)
    if labels.shape != (len(logits),):
        raise ValueError(f"labels must be [N] = [{len(logits)}] (one per sample), got {labels.shape}")
    hit = np.argmax(np.asarray(logits), axis=1) == labels
    per_class = [float(hit[labels == c].mean()) if np.any(labels == c) else None for c in range(num_classes)]
    return {"accuracy": float(hit.mean()), "per_class": per_class}


def class_histogram(logits: np.ndarray) -> np.ndarray:
    """Fraction of rows predicted as each class (argmax), float64 [num_classes]."""
    logits = np.asarray(logits)
    return np.bincount(np.argmax(logits, axis=1), minlength=logits.shape[1]) / len(logits)


# ---- against a reference, with the floor ---------------------------------------------------


def _block_metrics(sample: FeatureSet, reference: FeatureSet, ref_radii: np.ndarray) -> dict[str, float]:
    precision, recall = precision_recall(reference.features, sample.features, real_radii=ref_radii)
    return {"fd": frechet_distance(sample.features, reference.features), "precision": precision,
            "recall": recall, "classifier_score": classifier_score(sample.logits)}


def _metrics(sample: FeatureSet, reference: FeatureSet, ref_radii: np.ndarray, block: int
             ) -> tuple[dict[str, float], int]:
    """Every metric of ``sample`` (count-dependent ones averaged over blocks of ``block``)."""
    blocks = len(sample) // block
    values = [_block_metrics(sample[b * block:(b + 1) * block], reference, ref_radii) for b in range(blocks)]
    out = {name: float(np.mean([v[name] for v in values])) for name in BLOCK_METRICS}
    out["confident"] = confident_fraction(sample.logits)
    return out, blocks


def compare(generated: FeatureSet, reference: FeatureSet, held_out: FeatureSet, *,
            reference_split: str = "train", held_out_split: str = "test") -> dict[str, Any]:
    """Metrics of ``generated`` against ``reference``, and their floor from ``held_out`` (JSON-able).

    Returns ``{"metrics", "floor", "ratio" (metric / floor), "histogram" {"generated",
    "floor", "reference"}, "counts" {"generated", "held_out", "reference", "block",
    "blocks", "floor_blocks"}, "splits" {"reference", "floor"}, "k"}``.
    """
    block = min(len(generated), len(held_out))
    if block <= K or len(reference) <= K:
        raise ValueError(f"the classifier metrics need more than {K} images in each set, got "
                         f"{len(generated)} generated, {len(held_out)} held-out, {len(reference)} reference")
    radii = knn_radii(reference.features)
    metrics, blocks = _metrics(generated, reference, radii, block)
    floor, floor_blocks = _metrics(held_out, reference, radii, block)
    ratio = {name: metrics[name] / floor[name] if floor[name] else float("inf") for name in ALL_METRICS}
    return {
        "metrics": metrics, "floor": floor, "ratio": ratio,
        "histogram": {"generated": class_histogram(generated.logits).tolist(),
                      "floor": class_histogram(held_out.logits).tolist(),
                      "reference": class_histogram(reference.logits).tolist()},
        "counts": {"generated": len(generated), "held_out": len(held_out), "reference": len(reference),
                   "block": block, "blocks": blocks, "floor_blocks": floor_blocks},
        "splits": {"reference": reference_split, "floor": held_out_split},
        "k": K,
    }


def evaluate_samples(clf: Any, data_cfg: Any, samples: Any, labels: Any = None) -> dict[str, Any]:
    """``compare`` for ``samples`` (uint8 or [-1, 1] NHWC), with the data's train split as the
    reference and its eval split as the floor; the whole of both splits is loaded.

    ``labels`` [N] (the classes a conditional model was asked for) adds ``"conditional"``:
    ``label_accuracy`` of the samples and, for reference, of the held-out real images."""
    reference = data.load_arrays(data_cfg, data_cfg.train_split)
    held_out = data.load_arrays(data_cfg, data_cfg.eval_split)
    generated, held = FeatureSet.of(clf, samples), FeatureSet.of(clf, held_out["x"])
    out = compare(generated, FeatureSet.of(clf, reference["x"]), held,
                  reference_split=str(data_cfg.train_split), held_out_split=str(data_cfg.eval_split))
    if labels is not None:
        k = generated.logits.shape[1]
        out["conditional"] = {"generated": label_accuracy(generated.logits, labels, k),
                              "real": label_accuracy(held.logits, held_out["cond"]["label"], k)}
    return out


def format_report(result: dict[str, Any]) -> str:
    """Readable lines: a header with the counts and splits, then ``fd 1.23 (floor 0.45, 2.7x floor)``..."""
    c, s = result["counts"], result["splits"]
    lines = [f"classifier metrics: {c['generated']} generated vs {c['reference']} real {s['reference']} images; "
             f"floor: {c['held_out']} real {s['floor']} images vs the same {s['reference']} images "
             f"(fd, precision, recall, classifier_score on blocks of {c['block']}: "
             f"{c['blocks']} generated, {c['floor_blocks']} floor)"]
    for name in ALL_METRICS:
        value, floor, ratio = result["metrics"][name], result["floor"][name], result["ratio"][name]
        lines.append(f"{name} {_num(value)} (floor {_num(floor)}, {ratio:.2f}x floor)")
    if "conditional" in result:
        gen, real = result["conditional"]["generated"], result["conditional"]["real"]
        per = " ".join(f"{i}:{100 * a:.0f}%" for i, a in enumerate(gen["per_class"]) if a is not None)
        lines.append(f"label_accuracy {gen['accuracy']:.3f} (real {result['splits']['floor']} images: "
                     f"{real['accuracy']:.3f}); per asked class {per}")
    for name in ("generated", "floor", "reference"):
        hist = " ".join(f"{i}:{100 * p:.0f}%" for i, p in enumerate(result["histogram"][name]))
        lines.append(f"classes ({name}) {hist}")
    return "\n".join(lines)


def _num(value: float) -> str:
    return f"{value:.3g}" if abs(value) >= 1 else f"{value:.3f}"
