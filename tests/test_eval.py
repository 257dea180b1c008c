"""--mode=eval / fid_stats / bpd end to end on a tiny digits run, with random FID Inception weights."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import ddpm_jax.main  # noqa: F401  (puts the repository root on sys.path for `configs`)
from configs import digits
from ddpm_jax import parallel, train
from ddpm_jax.evaluation import chunked_generation, classifier, fid, inception
from ddpm_jax.evaluation import inception_metrics as im
from ddpm_jax.modes import evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(ch_mult=(1,), num_res_blocks=1, attn_resolutions=())
TINY_FLAGS = ["--config.model.ch_mult=(1,)", "--config.model.num_res_blocks=1",
              "--config.model.attn_resolutions=()", "--config.diffusion.num_timesteps=10"]


def _config(**eval_fields):
    config = digits.get_config()
    config.model.update(**TINY)
    config.diffusion.num_timesteps = 10
    config.training.update(num_steps=2, batch_size=16, log_every=1, sample_every=0, checkpoint_every=2,
                           eval_bpd_after=False)
    config.eval.update(**{**dict(num_samples=12, chunk_size=5, batch_size=8, inception_batch_size=8, metric="inception"),
                          **eval_fields})
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Two training steps of a tiny digits U-Net (checkpoint at step 2)."""
    path = str(tmp_path_factory.mktemp("digits_eval") / "run")
    train.train_and_evaluate(_config(), path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random FID Inception weights in the converted .npz format (He-scaled, BatchNorm near 1)."""
    rng = np.random.default_rng(0)
    flat = {}
    for key, shape in inception.variable_shapes().items():
        if key.endswith("conv/kernel"):
            flat[key] = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:3]))
        elif key.endswith(("bn/scale", "bn/var")):
            flat[key] = rng.uniform(0.75, 1.25, shape)
        elif key.endswith(("bn/bias", "bn/mean", "fc/bias")):
            flat[key] = 0.1 * rng.normal(size=shape)
        else:   # fc/kernel, large: the random network's features differ little between images
            flat[key] = 10.0 * rng.normal(size=shape) / np.sqrt(shape[0])
    path = str(tmp_path_factory.mktemp("inception") / "inception_random.npz")
    with open(path, "wb") as f:
        np.savez(f, format=np.asarray(inception.FORMAT_TAG), **{k: v.astype(np.float32) for k, v in flat.items()})
    return path


def _copy(workdir, tmp_path):
    """A private copy of the trained workdir (each test makes its own samples)."""
    dst = str(tmp_path / "run")
    shutil.copytree(workdir, dst)
    return dst


def _direct_features(weights_path, images_uint8):
    """The network on all images at once (pieces of 8: the shape the evaluation compiled)."""
    run_fn = im.inception_runner(weights_path, parallel.make_mesh(jax.local_devices()))
    x = images_uint8.astype(np.float32) / 127.5 - 1.0
    pad = -len(x) % 8
    out = [run_fn(b) for b in np.split(np.concatenate([x, np.repeat(x[-1:], pad, 0)]), (len(x) + pad) // 8)]
    return {k: np.concatenate([o[k] for o in out])[:len(x)] for k in ("pool", "logits")}


# 12 samples in 2048 dimensions: a singular covariance, as expected here.
@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_eval_mode_fid_and_inception_score_end_to_end(workdir, weights, tmp_path):
    workdir = _copy(workdir, tmp_path)
    results = evaluate.run_eval(_config(inception_weights=weights), workdir)
    step_dir = os.path.join(workdir, "eval", "step_2_ddpm_seed0")
    assert results["step"] == 2 and results["generation"]["chunks_generated"] == 3
    assert "fid" not in results and "eval.fid_stats is not set" in results["not_computed"]
    # IS and the samples' statistics equal a direct computation on the uint8 chunk files.
    images = np.concatenate([im for _, im in chunked_generation.read_chunks(
        os.path.join(step_dir, "samples"), range(3), num_samples=12, chunk_size=5)])
    assert images.shape == (12, 8, 8, 1) and images.dtype == np.uint8
    feats = _direct_features(weights, images)
    is_mean, is_std = fid.inception_score(feats["logits"], splits=10)
    # 12 rows in 10 splits: only the two splits of 2 rows lift the score above 1.
    assert is_mean - 1 > 1e-4
    np.testing.assert_allclose(results["inception_score"] - 1, is_mean - 1, rtol=1e-2)
    np.testing.assert_allclose(results["inception_score_std"], is_std, rtol=1e-2)
    mu, sigma = fid.load_stats(os.path.join(step_dir, "sample_stats.npz"))
    np.testing.assert_allclose(mu, feats["pool"].mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sigma, np.cov(feats["pool"], rowvar=False), rtol=1e-3, atol=1e-5)
    with open(os.path.join(step_dir, "results_inception.json")) as f:
        assert json.load(f)["inception_score"] == results["inception_score"]

    # Against the samples' own statistics: FID ≈ 0; the finished chunks are not regenerated.
    again = evaluate.run_eval(_config(inception_weights=weights, fid_stats=os.path.join(step_dir, "sample_stats.npz")),
                              workdir)
    assert again["generation"]["chunks_skipped"] == 3 and again["generation"]["images_generated"] == 0
    assert abs(again["fid"]) < 1e-3 * np.trace(sigma)
    assert "not_computed" not in again
    with open(os.path.join(step_dir, "results_inception.json")) as f:
        assert json.load(f)["fid"] == again["fid"]
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(workdir, "tb")))


def _main(workdir, *args):
    cmd = [sys.executable, "-m", "ddpm_jax.main", "--config=configs/digits.py", f"--workdir={workdir}",
           *TINY_FLAGS, *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_eval_command_without_weights_stops_before_sampling(workdir, tmp_path, checksums):
    workdir = _copy(workdir, tmp_path)
    before = checksums(workdir)
    args = ["--mode=eval", "--config.eval.metric=inception", "--config.eval.num_samples=7", "--config.eval.chunk_size=4",
            "--config.eval.batch_size=8", "--config.sampling.seed=11"]
    proc = _main(workdir, *args)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "eval.inception_weights is not set" in lines[0]
    assert "convert_inception" in lines[0]
    assert checksums(workdir) == before  # no sample made, nothing written

    # An explicit but missing path: the same, as one line.
    missing = str(tmp_path / "nope.npz")
    config = _config(num_samples=7, chunk_size=4, inception_weights=missing)
    with pytest.raises(ValueError, match="convert_inception") as err:
        evaluate.run_eval(config, workdir)
    assert missing in str(err.value) and "\n" not in str(err.value)
    assert checksums(workdir) == before


def test_eval_mode_classifier_metrics_beside_their_floors(workdir, tmp_path):
    workdir = _copy(workdir, tmp_path)
    clf_path = str(tmp_path / "classifier")
    config = _config(num_samples=20, chunk_size=10, metric="classifier", classifier_path=clf_path)
    classifier.save(classifier.train(config.data, steps=30), clf_path)
    results = evaluate.run_eval(config, workdir)
    step_dir = os.path.join(workdir, "eval", "step_2_ddpm_seed0")
    with open(os.path.join(step_dir, "results_classifier.json")) as f:
        assert json.load(f)["metrics"] == results["metrics"]
    assert results["counts"]["generated"] == 20 and results["counts"]["held_out"] == 297
    for name in ("fd", "precision", "recall", "classifier_score", "confident"):
        if results["floor"][name] > 0:  # (a 30-step classifier may be confident about nothing)
            assert results["ratio"][name] == pytest.approx(results["metrics"][name] / results["floor"][name])
    # Two training steps make noise, not digits: farther from the training digits than real test
    # digits are, and less often inside their manifold.
    assert results["metrics"]["fd"] > 2 * results["floor"]["fd"]
    assert results["metrics"]["precision"] < 0.5 * results["floor"]["precision"]
    assert results["classifier"]["path"] == clf_path
    # DDIM samples of the same checkpoint go to their own folder; nothing is overwritten.
    config.sampling.update(method="ddim", steps=5)
    evaluate.run_eval(config, workdir)
    assert os.path.isfile(os.path.join(workdir, "eval", "step_2_ddim5_seed0", "results_classifier.json"))
    assert os.path.isfile(os.path.join(step_dir, "results_classifier.json"))


def test_bpd_command_writes_json_and_plot(workdir, tmp_path):
    workdir = _copy(workdir, tmp_path)
    proc = _main(workdir, "--mode=bpd", "--config.eval.bpd_num_examples=16", "--config.eval.bpd_batch_size=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "eval", "bpd_2.json")) as f:
        result = json.load(f)
    assert result["step"] == 2 and result["num_examples"] == 16 and result["split"] == "test"
    assert len(result["terms_bpd"]) == len(result["mse"]) == 10
    assert result["total_bpd"] == pytest.approx(result["prior_bpd"] + result["decoder_bpd"] + result["kl_bpd"])
    assert 0 < result["total_bpd"] < 100
    assert Image.open(os.path.join(workdir, "eval", "bpd_2.png")).format == "PNG"
    assert "bits/dim on test (16 examples)" in proc.stdout


def test_fid_stats_mode_equals_direct_computation(tmp_path, weights):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    pictures = rng.integers(0, 256, (5, 8, 8), dtype=np.uint8)
    for i, picture in enumerate(pictures):
        Image.fromarray(picture).save(folder / f"{i}.png")
    config = _config(inception_weights=weights)
    config.data.update(source="folder", path=str(folder))
    out = evaluate.run_fid_stats(config, str(tmp_path / "work"))
    assert out == str(tmp_path / "work" / "fid_stats_folder_images_train.npz")
    mu, sigma = fid.load_stats(out)
    feats = _direct_features(weights, pictures[..., None])["pool"]
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-3, atol=1e-5)
    with np.load(out) as f:   # pytorch-fid's layout
        assert sorted(f.files) == ["mu", "sigma"]


def test_fid_stats_needs_weights_and_eval_needs_images(tmp_path):
    with pytest.raises(ValueError, match="eval.inception_weights is not set"):
        evaluate.run_fid_stats(_config(), str(tmp_path))
    config = _config()
    config.data.source = "toy2d"
    with pytest.raises(ValueError, match="needs image data"):
        evaluate.run_eval(config, str(tmp_path))
