"""The Flax FID Inception against pytorch-fid's, with random weights (no download)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
pfi = pytest.importorskip("pytorch_fid.inception")
F = torch.nn.functional

from ddpm_jax.evaluation import convert_inception, inception  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


def _random_state_dict(seed: int = 0) -> dict:
    """Every parameter and BatchNorm running statistic of the FID Inception, randomised."""
    template = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                               init_weights=False).state_dict()
    g = torch.Generator().manual_seed(seed)

    def uniform(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    out = {}
    for key, v in template.items():
        if key.endswith("num_batches_tracked"):
            out[key] = v
        elif key.endswith("conv.weight"):     # He-scaled, so activations stay O(1) over 94 convs
            out[key] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
        elif key.endswith("bn.weight"):
            out[key] = uniform(v.shape, 0.75, 1.25)
        elif key.endswith(("bn.bias", "running_mean")):
            out[key] = 0.1 * torch.randn(v.shape, generator=g)
        elif key.endswith("running_var"):
            out[key] = uniform(v.shape, 0.75, 1.25)
        elif key == "fc.weight":
            out[key] = torch.randn(v.shape, generator=g) / v.shape[1] ** 0.5
        elif key == "fc.bias":
            out[key] = 0.1 * torch.randn(v.shape, generator=g)
        else:
            raise KeyError(key)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, monkeypatch_module):
    """pytorch-fid's own networks built on a random state dict, and our converted copy."""
    state_dict = _random_state_dict()
    # pytorch-fid would download the real weights here; hand it ours instead (strict load).
    monkeypatch_module.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state_dict)
    torch.manual_seed(0)
    features_net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    full_net = pfi.fid_inception_v3().eval()

    tmp = tmp_path_factory.mktemp("inception")
    pth, npz = str(tmp / "fid_random.pth"), str(tmp / "fid_random.npz")
    torch.save(state_dict, pth)
    # The documented command, as a user runs it.
    proc = subprocess.run([sys.executable, "-m", "ddpm_jax.evaluation.convert_inception",
                           "--pth", pth, "--out", npz], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr
    apply_fn, variables = inception.load_inception(npz)
    return dict(state_dict=state_dict, features_net=features_net, full_net=full_net, pth=pth,
                npz=npz, apply_fn=apply_fn, variables=variables)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.parametrize("in_hw", [(32, 32), (320, 320), (8, 40), (600, 299), (299, 299)])
def test_resize_matches_torch_interpolate(in_hw):
    rng = np.random.default_rng(in_hw[0])
    x = rng.uniform(-1, 1, (2, *in_hw, 3)).astype(np.float32)
    ours = np.asarray(inception.resize_bilinear(jax.numpy.asarray(x), 299))
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299),
                        mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_grayscale_is_repeated_to_rgb():
    gray = np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(inception.preprocess(gray)),
                                  np.asarray(inception.preprocess(np.repeat(gray, 3, -1))))


def _errors(ours, ref):
    d = np.abs(ours - ref)
    return d.max(), d.max() / np.abs(ref).max()


@pytest.mark.parametrize("size", [32, 320], ids=["upsample32", "downsample320"])
def test_features_and_logits_match_pytorch_fid(setup, size):
    rng = np.random.default_rng(size)
    x = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)      # our convention: [-1, 1]
    x01 = torch.from_numpy((x + 1) / 2).permute(0, 3, 1, 2)             # pytorch-fid's: [0, 1]
    with torch.no_grad():
        pool_ref = setup["features_net"](x01)[0][:, :, 0, 0].numpy()   # resize + 2x-1 inside
        x299 = 2 * F.interpolate(x01, size=(299, 299), mode="bilinear", align_corners=False) - 1
        logits_ref = setup["full_net"](x299).numpy()
    out = jax.tree_util.tree_map(np.asarray, setup["apply_fn"](setup["variables"], x))

    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert np.abs(pool_ref).max() > 0.5 and pool_ref.std() > 0.1       # a non-degenerate network
    pool_abs, pool_rel = _errors(out["pool"], pool_ref)
    logit_abs, logit_rel = _errors(out["logits"], logits_ref)
    print(f"[{size}x{size}] pool: max abs {pool_abs:.2e}, rel {pool_rel:.2e}; "
          f"logits: max abs {logit_abs:.2e}, rel {logit_rel:.2e}")
    assert pool_abs <= TOL and logit_abs <= TOL
    w = setup["state_dict"]["fc.weight"].numpy()
    np.testing.assert_allclose(out["logits_unbiased"], pool_ref @ w.T, rtol=0, atol=TOL)


def test_converted_file_holds_every_variable(setup):
    with np.load(setup["npz"]) as f:
        kernel = f["params/Mixed_7c/branch_pool/conv/kernel"]
        var = f["batch_stats/Conv2d_1a_3x3/bn/var"]
        n = sum(f[k].size for k in f.files if k.startswith("params/"))
    sd = setup["state_dict"]
    np.testing.assert_array_equal(kernel, sd["Mixed_7c.branch_pool.conv.weight"].numpy()
                                  .transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(var, sd["Conv2d_1a_3x3.bn.running_var"].numpy())
    assert n == sum(v.numel() for k, v in sd.items() if not k.endswith(
        ("running_mean", "running_var", "num_batches_tracked")))


def test_converter_rejects_a_wrong_state_dict():
    sd = _random_state_dict(1)
    flat = convert_inception.convert_state_dict(sd)
    inception.check_variables(flat, "ok")
    missing = dict(flat)
    del missing["params/Mixed_6b/branch7x7_2/conv/kernel"]
    with pytest.raises(ValueError, match="1 missing"):
        inception.check_variables(missing, "x")
    wrong = dict(flat, **{"params/fc/bias": np.zeros(1000, np.float32)})
    with pytest.raises(ValueError, match="params/fc/bias has shape"):
        inception.check_variables(wrong, "x")
    with pytest.raises(ValueError, match="unexpected key 'features.0.weight'"):
        convert_inception.convert_state_dict({"features.0.weight": np.zeros(3)})


def test_missing_weights_error_says_where_and_how(tmp_path):
    path = str(tmp_path / "nowhere" / "inception_fid.npz")
    with pytest.raises(inception.MissingWeightsError) as e:
        inception.load_inception(path)
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError) and "\n" not in msg
    assert inception.FID_WEIGHTS_URL in msg and path in msg
    assert ("python -m ddpm_jax.evaluation.convert_inception --pth "
            "pt_inception-2015-12-05-6726825d.pth --out " + path) in msg


def test_load_rejects_a_pth_and_foreign_npz(setup, tmp_path):
    with pytest.raises(ValueError, match="convert it first"):
        inception.load_inception(setup["pth"])
    other = tmp_path / "other.npz"
    np.savez(other, mu=np.zeros(3))
    with pytest.raises(ValueError, match="not a converted FID Inception file"):
        inception.load_inception(other)


def test_convert_without_torch_is_a_clear_error(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)      # `import torch` now raises ImportError
    out = str(tmp_path / "x.npz")
    with pytest.raises(ImportError, match="pip install torch"):
        convert_inception.convert(setup["pth"], out)
    assert convert_inception.main(["--pth", setup["pth"], "--out", out]) == 2
    assert "needs PyTorch" in capsys.readouterr().err and not os.path.exists(out)


def test_bad_images_are_rejected(setup):
    apply_fn, variables = setup["apply_fn"], setup["variables"]
    with pytest.raises(ValueError, match="1 or 3 channels"):
        apply_fn(variables, np.zeros((1, 32, 32, 4), np.float32))
    with pytest.raises(ValueError, match="x / 127.5 - 1"):
        apply_fn(variables, np.zeros((1, 32, 32, 3), np.uint8))
