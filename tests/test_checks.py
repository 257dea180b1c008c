"""Pre-run checks: each bad input is refused with its one line before any work; good input passes.

Two of them also through `python -m ddpm_jax.main`: non-zero exit, one line on stderr,
and the workdir's files unchanged (checksums).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import ddpm_jax.main  # noqa: F401  (puts the repository root on sys.path for `configs`)
from configs import digits, toy2d
from ddpm_jax import checks, parallel
from ddpm_jax.evaluation import fid, inception

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh()


def _refused(config, mode, mesh, match):
    with pytest.raises(ValueError, match=match) as err:
        checks.check_config(config, mode, mesh)
    assert "\n" not in str(err.value)
    return str(err.value)


def _toy(**diffusion):
    config = toy2d.get_config()
    config.diffusion.update(diffusion)
    return config


# ---- the schedule -------------------------------------------------------------------------------

@pytest.mark.parametrize("diffusion,match", [
    (dict(beta_end=1.0), r"^diffusion\.beta_end=1\.0 must lie strictly between 0 and 1 .*beta_end=0\.02"),
    (dict(beta_end=1.5), r"^diffusion\.beta_end=1\.5 must lie strictly between 0 and 1"),
    (dict(beta_start=0.0), r"^diffusion\.beta_start=0\.0 must lie strictly between 0 and 1 .*beta_start=0\.0001"),
    (dict(beta_start=-1e-4), r"^diffusion\.beta_start=-0\.0001 must lie"),
    (dict(schedule="const", beta_end=1.0), r"^diffusion\.beta_end=1\.0 must lie"),
    (dict(schedule="jsd"), r"^diffusion\.schedule='jsd' reaches β = 1 at t=99 \(of T=100\)"),
    (dict(schedule="const", beta_end=0.9, num_timesteps=1000),
     r"^diffusion: schedule 'const' .* non-finite sqrt_recip_alphas_cumprod .* smaller --config\.diffusion\.beta_end"),
    (dict(beta_start=1e-20, beta_end=1e-20), r"non-finite .* larger --config\.diffusion\.beta_start"),
    (dict(num_timesteps=0), r"^diffusion\.num_timesteps=0 must be an integer >= 1"),
    (dict(schedule="cosinus"), r"^diffusion\.schedule='cosinus' is unknown; use one of linear,"),
])
def test_bad_schedules_are_refused_in_every_mode_that_uses_one(diffusion, match, mesh):
    for mode in ("train", "sample", "bpd"):
        _refused(_toy(**diffusion), mode, mesh, match)


def test_good_schedules_pass(mesh):
    for diffusion in (dict(), dict(schedule="cosine"), dict(schedule="quadratic"), dict(schedule="warmup10"),
                      dict(beta_end=0.999), dict(num_timesteps=1)):
        checks.check_config(_toy(**diffusion), "train", mesh)


def test_fid_stats_mode_does_not_look_at_the_schedule(tmp_path, mesh):
    config = _toy(beta_end=1.0)
    config.eval.inception_weights = _weights(tmp_path)
    checks.check_config(config, "fid_stats", mesh)


# ---- training -----------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size", [0, -8])
def test_batch_size_below_one_is_refused_as_such(batch_size, mesh):
    config = toy2d.get_config()
    config.training.batch_size = batch_size
    message = _refused(config, "train", mesh, "batch_size")
    assert f"training.batch_size={batch_size} " in message and ">= 1" in message  # field, value, the fix
    with pytest.raises(ValueError, match="must be >= 1"):  # validate_config, the training mode's checks alone
        checks.validate_config(config, mesh)


def test_training_checks_the_grid_sampler_only_when_it_samples(mesh):
    config = toy2d.get_config()
    config.sampling.update(method="ddim", steps=-1)
    config.training.sample_every = 100
    _refused(config, "train", mesh, r"^sampling\.steps=-1 must lie in 0\.\.T=100")
    config.training.sample_every = 0
    checks.check_config(config, "train", mesh)


# ---- sampling -----------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [-1, 101, 5000])
def test_ddim_steps_outside_0_to_T_are_refused_not_clamped(steps, mesh):
    config = toy2d.get_config()  # T = 100
    config.sampling.update(method="ddim", steps=steps)
    for mode in ("sample", "eval"):
        message = _refused(config, mode, mesh, rf"^sampling\.steps={steps} must lie in 0\.\.T=100")
        assert "--config.sampling.steps=50" in message and "method=ddpm" in message


def test_ddim_steps_in_range_pass_and_ddpm_ignores_them(mesh):
    config = toy2d.get_config()
    for steps in (0, 1, 100):  # 0: the method's default (ddim: 50)
        config.sampling.update(method="ddim", steps=steps)
        checks.check_config(config, "sample", mesh)
    config.sampling.update(method="ddpm", steps=0)
    checks.check_config(config, "sample", mesh)
    config.sampling.update(method="ddpm", steps=10)  # Alg. 2 runs every step
    _refused(config, "sample", mesh, r"^sampling\.steps=10 with sampling\.method=ddpm")


def test_unknown_sampler_settings_are_refused(mesh):
    config = toy2d.get_config()
    config.sampling.method = "dpm"
    _refused(config, "sample", mesh, r"^sampling\.method='dpm' is unknown; use one of ddpm, ddim")
    config.sampling.update(method="ddim", spacing="uniform")
    _refused(config, "sample", mesh, r"^unknown sampling\.spacing='uniform' for method='ddim'")
    config = toy2d.get_config()
    config.sampling.batch_size = 0
    _refused(config, "sample", mesh, r"^sampling\.batch_size=0 must be >= 1")


def _digits(init_image, start_step=10):
    config = digits.get_config()
    config.sampling.update(init_image=str(init_image), start_step=start_step)
    return config


def test_init_image_that_is_not_an_image_is_one_line_naming_the_file(tmp_path, mesh):
    text = tmp_path / "notes.txt"
    text.write_text("not a picture\n")
    message = _refused(_digits(text), "sample", mesh, r"^sampling\.init_image=.* is not a readable image")
    assert str(text) in message
    png = tmp_path / "cut.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 100).save(png)
    png.write_bytes(png.read_bytes()[:-40])  # truncated: opens, fails to decode
    _refused(_digits(png), "sample", mesh, r"^sampling\.init_image=.*cut\.png' is not a readable image")
    _refused(_digits(tmp_path / "nope.png"), "sample", mesh,
             r"^sampling\.init_image=.*nope\.png' not found: give an image file or one of .*astronaut")
    _refused(_digits(tmp_path), "sample", mesh, r"^sampling\.init_image=.* is a directory")


def test_readable_init_images_pass_and_need_a_start_step(tmp_path, mesh):
    png = tmp_path / "ok.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(png)
    for picture in (png, "camera"):
        checks.check_config(_digits(picture), "sample", mesh)
    _refused(_digits(png, start_step=0), "sample", mesh, r"^sampling\.start_step=0 must lie in 1\.\.T=100 when")
    config = toy2d.get_config()
    config.sampling.update(init_image=str(png), start_step=10)
    _refused(config, "sample", mesh, r"^sampling\.init_image needs an image model")


# ---- evaluation ---------------------------------------------------------------------------------

def _weights(tmp_path, tag=inception.FORMAT_TAG):
    path = tmp_path / f"weights_{tag}.npz"
    np.savez(path, format=np.asarray(tag), w=np.zeros(2))
    return str(path)


def _eval(weights="", stats=""):
    config = digits.get_config()
    config.eval.update(metric="inception", inception_weights=str(weights), fid_stats=str(stats))
    return config


def test_eval_without_usable_inception_weights_is_refused_up_front(tmp_path, mesh):
    _refused(_eval(), "eval", mesh, r"^--mode=eval needs the FID Inception: eval\.inception_weights is not "
                                    r"set: download .*convert_inception")
    missing = tmp_path / "inception_fid.npz"
    message = _refused(_eval(missing), "eval", mesh, "FID Inception weights not found at")
    assert str(missing) in message and "python -m ddpm_jax.evaluation.convert_inception" in message
    pth = tmp_path / inception.FID_WEIGHTS_PTH
    pth.write_bytes(b"torch")
    _refused(_eval(pth), "eval", mesh, r"is the PyTorch state dict; convert it first")
    text = tmp_path / "w.npz"
    text.write_text("hello")
    _refused(_eval(text), "eval", mesh, r"w\.npz' is not an \.npz file")
    _refused(_eval(_weights(tmp_path, "something-else")), "eval", mesh, "is not a converted FID Inception file")
    _refused(_eval(), "fid_stats", mesh, r"^--mode=fid_stats needs the FID Inception")


def test_eval_with_fid_stats_set_checks_them_up_front(tmp_path, mesh):
    weights = _weights(tmp_path)
    checks.check_config(_eval(weights), "eval", mesh)  # no fid_stats: the Inception Score alone
    _refused(_eval(weights, tmp_path / "stats.npz"), "eval", mesh,
             r"^--mode=eval cannot compute FID: eval\.fid_stats=.*stats\.npz' not found: compute them with "
             r"--mode=fid_stats")
    small = tmp_path / "small.npz"
    fid.save_stats(small, np.zeros(64), np.eye(64))
    _refused(_eval(weights, small), "eval", mesh, r"holds 64-d statistics, not the 2048-d pool_3")
    other = tmp_path / "other.npz"
    np.savez(other, mean=np.zeros(3))
    _refused(_eval(weights, other), "eval", mesh, r"other\.npz' cannot be read .*expected 'mu' and 'sigma'")
    good = tmp_path / "good.npz"
    fid.save_stats(good, np.zeros(2048), np.eye(2048))
    checks.check_config(_eval(weights, good), "eval", mesh)


def test_eval_and_bpd_sizes(tmp_path, mesh):
    config = _eval(_weights(tmp_path))
    config.eval.num_samples = 0
    _refused(config, "eval", mesh, r"^eval\.num_samples=0 must be >= 1")
    config = digits.get_config()
    config.eval.bpd_batch_size = 0
    _refused(config, "bpd", mesh, r"^eval\.bpd_batch_size=0 must be >= 1")
    config = digits.get_config()
    config.eval.bpd_num_examples = -1
    _refused(config, "bpd", mesh, r"^eval\.bpd_num_examples=-1 must be >= 0")


def test_unknown_mode(mesh):
    _refused(digits.get_config(), "evaluate", mesh, r"^unknown mode 'evaluate'")


# ---- through the command line -------------------------------------------------------------------

@pytest.mark.parametrize("config,override,line", [
    ("configs/digits.py", "--config.training.batch_size=0", "error: training.batch_size=0 must be >= 1."),
    ("configs/toy2d.py", "--config.diffusion.beta_end=1.0",
     "error: diffusion.beta_end=1.0 must lie strictly between 0 and 1"),
])
def test_cli_refuses_with_one_line_and_leaves_the_workdir_alone(tmp_path, checksums, config, override, line):
    workdir = tmp_path / "run"  # a run that already holds files
    (workdir / "checkpoints" / "200").mkdir(parents=True)
    (workdir / "checkpoints" / "200" / "state").write_bytes(os.urandom(256))
    (workdir / "config.json").write_text('{"training": {"batch_size": 128}}\n')
    (workdir / "metrics.jsonl").write_text('{"step": 100, "loss": 0.5}\n{"step": 200, "loss": 0.4}\n')
    before = checksums(workdir)
    proc = subprocess.run([sys.executable, "-m", "ddpm_jax.main", f"--config={config}", f"--workdir={workdir}",
                           override], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    assert proc.stderr.startswith(line)
    assert checksums(workdir) == before
