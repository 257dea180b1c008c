"""The feature classifier (ddpm_jax/evaluation/classifier.py): training, caching, refusing, CLI."""

import json
import os
import pathlib

import numpy as np
import pytest

from ddpm_jax import data
from ddpm_jax.evaluation import classifier

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 60  # A few steps: far from the ~97% of the full 700, far above chance (10%).


def _config(**data_overrides):
    from ddpm_jax import config_loading

    config = config_loading.load_config(str(ROOT / "configs" / "digits.py"))
    for key, value in data_overrides.items():
        setattr(config.data, key, value)
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A digits classifier trained for STEPS steps and cached by load_or_train."""
    path = str(tmp_path_factory.mktemp("clf") / "digits_8")
    clf = classifier.load_or_train(_config().data, path, log=None, steps=STEPS)
    return clf, path


def test_a_few_steps_beat_chance_and_info_says_what_it_was_trained_on(trained):
    clf, path = trained
    info = json.loads(pathlib.Path(path, "info.json").read_text())
    assert info["test_accuracy"] > 0.5 and info["test_accuracy"] == clf.info["test_accuracy"]
    test = data.load_arrays(_config().data, "test")
    assert clf.accuracy(test["x"], test["cond"]["label"]) == pytest.approx(info["test_accuracy"])
    assert info["data"] == "digits:train:1500" and info["source"] == "digits"
    assert (info["image_size"], info["num_channels"], info["num_classes"]) == (8, 1, 10)
    assert info["steps"] == STEPS and info["test_examples"] == 297 and info["test_split"] == "test"
    assert os.path.isfile(os.path.join(path, "params.msgpack"))
    assert not [f for f in os.listdir(path) if f.endswith(".tmp")]  # Atomic writes left nothing behind.


def test_features_and_logits_are_batched_and_take_uint8_or_float(trained):
    clf, _ = trained
    images = data.load_arrays(_config().data, "test", limit=23)["x"]
    feats, logits = clf.features_and_logits(images)
    assert feats.shape == (23, classifier.FEATURE_DIM) and logits.shape == (23, 10)
    assert feats.dtype == np.float32 and np.isfinite(feats).all() and feats.std() > 0
    as_float = images.astype(np.float32) / 127.5 - 1.0  # The data pipeline's [-1, 1] scale.
    np.testing.assert_allclose(clf.features(as_float), feats, rtol=1e-5, atol=1e-5)
    small = classifier.Classifier(clf.params, clf.info, batch_size=5)  # 5 batches, the last padded.
    np.testing.assert_allclose(small.logits(images), logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"shape \[N, 8, 8, 1\]"):
        clf.features(np.zeros((2, 28, 28, 1), np.uint8))


def test_training_is_deterministic(trained):
    clf, _ = trained
    again = classifier.train(_config().data, steps=STEPS)
    import jax

    for a, b in zip(jax.tree.leaves(clf.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_or_train_caches_and_refuses_other_data(trained, monkeypatch):
    clf, path = trained

    def no_training(*args, **kwargs):
        raise AssertionError("load_or_train trained again although a classifier is cached")

    monkeypatch.setattr(classifier, "train", no_training)
    cached = classifier.load_or_train(_config().data, path, log=None)
    images = data.load_arrays(_config().data, "test", limit=10)["x"]
    np.testing.assert_array_equal(cached.features(images), clf.features(images))
    assert cached.info["test_accuracy"] == clf.info["test_accuracy"]
    for other in (dict(image_size=16), dict(num_channels=3), dict(source="mnist", image_size=8)):
        with pytest.raises(ValueError) as info:
            classifier.load_or_train(_config(**other).data, path, log=None)
        message = str(info.value)
        assert "\n" not in message and path in message and "python -m ddpm_jax.evaluation.classifier" in message
        assert "trained on other data" in message


def test_damaged_params_are_refused(trained, tmp_path):
    _, path = trained
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("info.json", "params.msgpack"):
        (copy / name).write_bytes(pathlib.Path(path, name).read_bytes())
    blob = bytearray((copy / "params.msgpack").read_bytes())
    blob[-1] ^= 1
    (copy / "params.msgpack").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="damaged"):
        classifier.load_or_train(_config().data, str(copy), log=None)
    with pytest.raises(ValueError, match="no readable classifier"):
        classifier.load(str(tmp_path / "missing"))


def test_cli_reports_a_cached_classifier_and_bad_input(trained, capsys):
    _, path = trained
    assert classifier.main(["--config=configs/digits.py", f"--out={path}"]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "cached" in out and path in out
    assert classifier.main(["--config=configs/digits.py", "--config.data.image_size=16", f"--out={path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained on other data" in err
    assert classifier.main(["--config=configs/digits.py", "--config.data.imagesize=16"]) == 2
    assert "unknown config key 'data.imagesize'" in capsys.readouterr().err
    assert classifier.main(["--config=configs/toy2d.py", "--out=unused"]) == 2
    assert "no class labels" in capsys.readouterr().err


def test_default_and_configured_paths():
    config = _config()
    assert classifier.resolve_path(config) == os.path.join("workdirs", "classifiers", "digits_8")
    config.data.source, config.data.image_size = "mnist", 32
    assert classifier.resolve_path(config) == os.path.join("workdirs", "classifiers", "mnist_32")
    config.data.source, config.data.tfds_name, config.data.num_channels = "tfds", "cifar10", 3
    assert classifier.default_path(config.data) == os.path.join("workdirs", "classifiers", "cifar10_32_rgb")
    config.eval.classifier_path = "/elsewhere/clf"
    assert classifier.resolve_path(config) == "/elsewhere/clf"


@pytest.mark.parametrize("size, sides", [(8, [8, 8, 4, 4]), (28, [14, 7, 4]), (32, [16, 8, 4])])
def test_layers_reduce_to_4x4(size, sides):
    got, side = [], size
    for _, stride in classifier.default_layers(size):
        side = -(-side // stride)
        got.append(side)
    assert got == sides
