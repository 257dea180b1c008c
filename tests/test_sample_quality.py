"""Classifier-feature metrics (ddpm_jax/evaluation/sample_quality.py) and their noise floors."""

import pathlib
import re

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from ddpm_jax import data
from ddpm_jax.evaluation import classifier, fid
from ddpm_jax.evaluation import sample_quality as sq

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _gaussian(n, dim=6, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(dim, dim))  # The same correlations for every seed.
    return rng.normal(size=(n, dim)) @ mixing + shift


# ---- single metrics against independent implementations -------------------------------------


def test_frechet_distance_is_fids_on_the_same_features(monkeypatch):
    a, b = _gaussian(700, seed=1), _gaussian(500, seed=2, shift=0.3)
    expected = fid.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert sq.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    stats = sq.statistics(a, chunk=64)  # Streaming in chunks: the same statistics as np.cov.
    np.testing.assert_allclose(stats.sigma, np.cov(a, rowvar=False), rtol=1e-10)
    assert expected > 0.3 ** 2 * 6 * 0.5  # The shifted set is measurably away.


def _brute_radii(x, k):
    d = cdist(x, x)
    return np.sort(d, axis=1)[:, k]  # Column 0: the point itself.


def _brute_precision_recall(real, fake, k):
    real_r, fake_r = _brute_radii(real, k), _brute_radii(fake, k)
    d = cdist(fake, real)  # [fake, real]
    precision = np.mean([any(d[j, i] <= real_r[i] for i in range(len(real))) for j in range(len(fake))])
    recall = np.mean([any(d[j, i] <= fake_r[j] for j in range(len(fake))) for i in range(len(real))])
    return precision, recall


@pytest.mark.parametrize("chunk_elements", [1 << 23, 1000])  # One chunk, or many small ones.
def test_precision_recall_match_a_brute_force_implementation(monkeypatch, chunk_elements):
    monkeypatch.setattr(sq, "_CHUNK_ELEMENTS", chunk_elements)
    real, fake = _gaussian(300, dim=4, seed=3), _gaussian(200, dim=4, seed=4, shift=0.8)
    np.testing.assert_allclose(np.sqrt(sq.knn_radii(real, 3)), _brute_radii(real, 3), rtol=1e-9, atol=1e-9)
    precision, recall = sq.precision_recall(real, fake, k=3)
    want_precision, want_recall = _brute_precision_recall(real, fake, 3)
    assert precision == pytest.approx(want_precision) and recall == pytest.approx(want_recall)
    assert 0.05 < precision < 0.95 and 0.05 < recall < 0.95  # Not a trivial 0 or 1.


def test_classifier_score_confident_fraction_and_histogram():
    logits = np.log(np.array([[0.95, 0.05, 0.0 + 1e-12], [0.2, 0.7, 0.1], [0.1, 0.05, 0.85], [0.02, 0.96, 0.02]]))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    p_y = p.mean(0)
    kl = np.sum(p * (np.log(p) - np.log(p_y)), axis=1)
    assert sq.classifier_score(logits) == pytest.approx(np.exp(kl.mean()))
    assert sq.confident_fraction(logits) == 0.5  # 0.95 and 0.96 exceed 0.9; 0.7 and 0.85 do not.
    np.testing.assert_allclose(sq.class_histogram(logits), [0.25, 0.5, 0.25])
    one_class = np.tile([[5.0, 0.0, 0.0]], (10, 1))
    assert sq.classifier_score(one_class) == pytest.approx(1.0)  # A single mode scores 1.


# ---- compare(): blocks, floor, report -------------------------------------------------------


def _set(features, seed):
    logits = np.random.default_rng(seed).normal(size=(len(features), 10)) * 3
    return sq.FeatureSet(features, logits)


def test_compare_averages_equal_size_blocks_and_reports_the_floor():
    reference = _set(_gaussian(800, seed=10), 0)
    held_out = _set(_gaussian(250, seed=11), 1)
    generated = _set(_gaussian(760, seed=12, shift=0.5), 2)  # 3 blocks of 250 (10 rows left over).
    result = sq.compare(generated, reference, held_out)
    counts = result["counts"]
    assert (counts["block"], counts["blocks"], counts["floor_blocks"]) == (250, 3, 1)
    blocks = [generated[b * 250:(b + 1) * 250] for b in range(3)]
    want_fd = np.mean([sq.frechet_distance(g.features, reference.features) for g in blocks])
    want_pr = np.mean([sq.precision_recall(reference.features, g.features) for g in blocks], axis=0)
    assert result["metrics"]["fd"] == pytest.approx(want_fd)
    assert (result["metrics"]["precision"], result["metrics"]["recall"]) == pytest.approx(tuple(want_pr))
    assert result["floor"]["fd"] == pytest.approx(sq.frechet_distance(held_out.features, reference.features))
    assert result["metrics"]["confident"] == sq.confident_fraction(generated.logits)  # All 760 rows.
    assert result["ratio"]["fd"] == pytest.approx(result["metrics"]["fd"] / result["floor"]["fd"])
    assert result["metrics"]["fd"] > 2 * result["floor"]["fd"]
    assert result["splits"] == {"reference": "train", "floor": "test"} and result["k"] == 3

    report = sq.format_report(result)
    fd_line = re.search(r"^fd (\S+) \(floor (\S+), (\S+)x floor\)$", report, re.M)
    assert fd_line and float(fd_line.group(3)) == pytest.approx(result["ratio"]["fd"], abs=0.01)
    for name in ("precision", "recall", "classifier_score", "confident"):
        assert re.search(rf"^{name} \S+ \(floor \S+, \S+x floor\)$", report, re.M)
    assert "250 real test images" in report and "3 generated, 1 floor" in report
    assert re.search(r"^classes \(generated\) 0:\d+% .* 9:\d+%$", report, re.M)


def test_floor_is_near_its_expectation_and_a_perfect_model_scores_it():
    dim = 32  # Enough dimensions that one FD of 500 rows is within ~10% of its mean.
    reference = _set(_gaussian(3000, dim=dim, seed=20), 0)
    held_out = _set(_gaussian(500, dim=dim, seed=21), 1)
    result = sq.compare(_set(_gaussian(500, dim=dim, seed=22), 2), reference, held_out)
    # The expectation of real-vs-real FD at this count, by Monte Carlo over fresh draws.
    expected = np.mean([sq.frechet_distance(_gaussian(500, dim=dim, seed=s), reference.features)
                        for s in range(100, 110)])
    assert 0.7 < result["floor"]["fd"] / expected < 1.3
    fresh = result["ratio"]  # Samples from the data distribution itself: at the floor.
    assert 0.6 < fresh["fd"] < 1.6 and all(0.9 < fresh[m] < 1.1 for m in ("precision", "recall"))
    shifted = sq.compare(_set(_gaussian(500, dim=dim, seed=22, shift=3.0), 2), reference, held_out)["ratio"]
    assert shifted["fd"] > 10 and shifted["precision"] < 0.5


def test_too_few_images_is_a_clear_error():
    reference = _set(_gaussian(50, seed=1), 0)
    with pytest.raises(ValueError, match="more than 3 images"):
        sq.compare(_set(_gaussian(3, seed=2), 1), reference, _set(_gaussian(40, seed=3), 2))


# ---- real digits through a classifier trained here ------------------------------------------


@pytest.fixture(scope="module")
def digits():
    from ddpm_jax import config_loading

    cfg = config_loading.load_config(str(ROOT / "configs" / "digits.py")).data
    clf = classifier.train(cfg, steps=60)
    return cfg, clf


def test_floor_of_real_digits_is_far_below_shuffled_or_noised_images(digits):
    cfg, clf = digits
    test = data.load_arrays(cfg, "test")["x"]
    exact = sq.evaluate_samples(clf, cfg, test)  # The held-out images themselves: exactly the floor.
    assert all(exact["ratio"][m] == pytest.approx(1.0) for m in sq.ALL_METRICS)
    assert exact["counts"]["reference"] == 1500 and exact["counts"]["held_out"] == 297
    rng = np.random.default_rng(0)
    shuffled = np.stack([rng.permutation(x.reshape(-1)).reshape(x.shape) for x in test])
    noised = np.clip(test / 127.5 - 1.0 + 0.8 * rng.standard_normal(test.shape), -1, 1).astype(np.float32)
    for bad in (shuffled, noised):
        result = sq.evaluate_samples(clf, cfg, bad)
        assert result["metrics"]["fd"] > 3 * result["floor"]["fd"]
        assert result["metrics"]["precision"] < 0.5 * result["floor"]["precision"]
        assert result["metrics"]["confident"] < result["floor"]["confident"]
