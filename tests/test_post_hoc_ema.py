"""Post-hoc EMA (ddpm_jax/post_hoc_ema.py, the loop's profiles and snapshots, --mode=phema).

The power-function EMA against a float64 NumPy transcription of Karras et al. 2024 (eq. 3, 4, C.3);
the reconstruction of a profile that was also tracked; snapshots through a toy2d run (every step
traced by the loop's `compile_step`, so the autoencoder's trainer gets the same), resumed bitwise;
the reconstruction read back by `setup.load_run` as every mode reads it; the one-line errors.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_jax.main  # noqa: F401  (puts the repository root on sys.path for `configs`)
from configs import toy2d
from ddpm_jax import checkpointing, loop, post_hoc_ema, setup, train
from ddpm_jax.modes import phema


def _np_gamma(sigma_rel):
    """eq. 3 solved by bisection on γ ∈ (0, 1e4): σ_rel(γ) decreases there."""
    lo, hi = 0.0, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (mid + 1) / ((mid + 2) ** 2 * (mid + 3)) > sigma_rel ** 2 else (lo, mid)
    return lo


def _np_track(thetas, gamma):
    """eq. 4 in float64: θ̂_t = β_t θ̂_{t−1} + (1 − β_t) θ_t, β_t = (1 − 1/t)^(γ+1), t = 1, 2, ..."""
    ema = np.zeros_like(thetas[0])
    out = []
    for t, theta in enumerate(thetas, start=1):
        beta = (1 - 1 / t) ** (gamma + 1)
        ema = beta * ema + (1 - beta) * theta
        out.append(ema.copy())
    return out


def test_gamma_of_sigma_rel_is_eq3_and_edm2s_values():
    for s in (0.01, 0.05, 0.1, 0.2):
        assert post_hoc_ema.gamma_from_sigma_rel(s) == pytest.approx(_np_gamma(s), rel=1e-9)
        assert post_hoc_ema.sigma_rel_from_gamma(post_hoc_ema.gamma_from_sigma_rel(s)) == pytest.approx(s, rel=1e-12)
    assert post_hoc_ema.gamma_from_sigma_rel(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2's two profiles
    assert post_hoc_ema.gamma_from_sigma_rel(0.10) == pytest.approx(6.94, abs=0.01)
    assert post_hoc_ema.sigma_rel_of_decay(0.995, 3200) == pytest.approx(np.sqrt(0.995) / 0.005 / 3200)


def test_update_matches_float64_eq4_for_thousands_of_steps():
    rng = np.random.default_rng(0)
    thetas = np.cumsum(rng.normal(size=(3000, 5)), axis=0) * 0.01 + 1.0
    sigma_rels = (0.05, 0.1)
    profiles = post_hoc_ema.create({"w": jnp.zeros(5, jnp.float32)}, sigma_rels)
    step = jax.jit(post_hoc_ema.update)
    for t, theta in enumerate(thetas, start=1):
        profiles = step(profiles, {"w": jnp.asarray(theta, jnp.float32)}, jnp.int32(t))
    for i, s in enumerate(sigma_rels):
        want = _np_track(thetas, _np_gamma(s))[-1]
        np.testing.assert_allclose(np.asarray(profiles.ema_params[i]["w"]), want, rtol=2e-6)


def test_gram_is_the_integral_of_the_profiles():
    """eq. C.3 against the integral of p_{t_a,γ_a} p_{t_b,γ_b} (eq. C.1) by the midpoint rule."""
    tau = (np.arange(200_000) + 0.5) / 200_000 * 300

    def p(t, g):
        return np.where(tau <= t, (g + 1) * tau ** g / t ** (g + 1), 0.0)

    for (ta, ga), (tb, gb) in [((100, 7.0), (300, 17.0)), ((300, 2.0), (200, 7.0)), ((250, 6.9), (250, 6.9))]:
        numeric = np.sum(p(ta, ga) * p(tb, gb)) * (tau[1] - tau[0])
        assert post_hoc_ema.profile_dot(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-4)


def test_reconstruction_of_a_profile_tracked_beside_the_snapshots():
    """σ_rel 0.07 from snapshots of 0.05 and 0.1 every 50 of 2,000 steps matches the 0.07 tracked directly;
    a tracked σ_rel at the last snapshot is that snapshot itself."""
    rng = np.random.default_rng(1)
    thetas = np.cumsum(rng.normal(size=(2000, 3)), axis=0)
    gammas = [_np_gamma(s) for s in (0.05, 0.1)]
    tracks = [_np_track(thetas, g) for g in gammas]
    steps = list(range(50, 2001, 50))
    snap_t = [t for t in steps for _ in gammas]
    snap_g = [g for _ in steps for g in gammas]
    stored = np.stack([tracks[k][t - 1] for t in steps for k in range(2)])
    x, residual = post_hoc_ema.check_representable([0.07, 0.1], snap_t, snap_g, 2000, "a toy run")
    direct = _np_track(thetas, _np_gamma(0.07))[-1]
    spread = np.std(thetas[-400:], axis=0)
    np.testing.assert_allclose(x[:, 0] @ stored, direct, atol=0.02 * spread.max())
    assert residual[1] < 1e-6
    np.testing.assert_allclose(x[:, 1] @ stored, tracks[1][-1], rtol=1e-7)


def test_a_sigma_rel_the_snapshots_cannot_represent_is_one_line_naming_the_range():
    steps = [100, 200, 300, 400]
    gammas = [post_hoc_ema.gamma_from_sigma_rel(s) for s in (0.05, 0.1)]
    snap_t, snap_g = [t for t in steps for _ in gammas], [g for _ in steps for g in gammas]
    with pytest.raises(ValueError, match=r"^ema\.sigma_rel=0\.005: .* represent σ_rel in \[0\.0\d+, 0\.\d+\]: ") as e:
        post_hoc_ema.check_representable([0.005], snap_t, snap_g, 400, "RUN")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"^ema\.sigma_rel=0\.4: no power-function EMA"):
        post_hoc_ema.parse_sigma_rels("0.4", "ema.sigma_rel")
    with pytest.raises(ValueError, match=r"^ema\.sigma_rels='a,b' is not a list of numbers"):
        post_hoc_ema.parse_sigma_rels("a,b", "ema.sigma_rels")


# ---- through the loop and --mode=phema ------------------------------------------------------------


def _config(num_steps=6, **ema):
    config = toy2d.get_config()
    config.diffusion.num_timesteps = 10
    config.training.update(batch_size=32, num_steps=num_steps, log_every=2, checkpoint_every=2, sample_every=0,
                           keep_checkpoints=1, steps_per_dispatch=2)
    config.optim.warmup_steps = 2
    config.ema.update({"sigma_rels": (0.05, 0.1), "snapshot_every": 2, **ema})
    return config


def _snapshot(workdir, config, step):
    run = setup.create_run(config)
    params = setup.abstract_params(run.model, run.shape, run.mesh)
    template = post_hoc_ema.Snapshot(step=jax.ShapeDtypeStruct((), jnp.int32),
                                     **vars(post_hoc_ema.abstract(params, 2)))
    with checkpointing.Checkpointer(workdir, keep=None, async_save=False, subdir=checkpointing.SNAPSHOT_DIR) as c:
        return jax.device_get(c.restore_train(template, step).state)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("phema") / "run")
    state = jax.device_get(train.train_and_evaluate(_config(), workdir))
    return workdir, state


def test_snapshots_outlive_the_checkpoint_rotation_and_hold_the_tracked_profiles(run_dir):
    workdir, state = run_dir
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["6"]  # keep_checkpoints=1
    with checkpointing.Checkpointer(workdir, keep=None, subdir=checkpointing.SNAPSHOT_DIR) as snaps:
        assert snaps.all_steps() == [2, 4, 6]
        meta = snaps.read_meta(6)
    assert meta["step"] == 6 and meta["sigma_rels"] == [0.05, 0.1]
    assert meta["gammas"] == pytest.approx([16.97, 6.94], abs=0.01)
    last = _snapshot(workdir, _config(), 6)
    jax.tree.map(np.testing.assert_array_equal, last.ema_params, state.phema.ema_params)
    assert state.ema_params is not None and int(last.step) == 6


def test_resume_with_snapshots_is_bitwise(run_dir, tmp_path):
    """4 steps, then on to 6 from step 4's checkpoint: the state and every snapshot as one 6-step run."""
    workdir, straight = run_dir
    resumed = str(tmp_path / "resumed")
    train.train_and_evaluate(_config(num_steps=4), resumed)
    again = jax.device_get(train.train_and_evaluate(_config(), resumed))
    jax.tree.map(np.testing.assert_array_equal, again, straight)
    for step in (2, 4, 6):
        jax.tree.map(np.testing.assert_array_equal, _snapshot(resumed, _config(), step),
                     _snapshot(workdir, _config(), step))


def test_phema_writes_a_checkpoint_every_mode_reads(run_dir, tmp_path):
    workdir, state = run_dir
    config = _config(sigma_rel="0.1", out_workdir=str(tmp_path / "out"))
    (rec,) = phema.run(config, workdir)
    assert rec["workdir"] == str(tmp_path / "out" / "sigma_rel_0.1") and rec["snapshot_steps"] == [2, 4, 6]
    loaded = setup.load_run(config, rec["workdir"])
    assert loaded.step == 6
    # σ_rel 0.1 is tracked: its reconstruction is the profile at step 6, to float32 rounding.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.device_get(loaded.params), state.phema.ema_params[1])
    source = checkpointing.read_meta(rec["workdir"])["source"]["post_hoc_ema"]
    assert source["sigma_rel"] == 0.1 and source["snapshot_steps"] == [2, 4, 6] and source["run"] == workdir
    assert phema.run(config, workdir)[0]["workdir"] == rec["workdir"]  # the same reconstruction is kept


def test_phema_errors_are_one_line_before_any_work(run_dir, tmp_path):
    workdir, _ = run_dir
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    with pytest.raises(FileNotFoundError, match=r"^no post-hoc EMA snapshots in .*--config\.ema\.sigma_rels="):
        phema.run(_config(sigma_rel="0.05"), empty)
    with pytest.raises(ValueError, match=r"^ema\.sigma_rel is empty"):
        phema.run(_config(), workdir)
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"^ema\.sigma_rel=0\.005: .* represent σ_rel in "):
        phema.run(_config(sigma_rel="0.005", out_workdir=out), workdir)
    assert not os.path.exists(out)


def test_a_resume_with_other_profiles_or_snapshots_without_profiles_is_refused(run_dir, tmp_path):
    workdir, _ = run_dir
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    with pytest.raises(ValueError, match=r"tracks post-hoc EMA profiles ema\.sigma_rels=\(0\.05, 0\.1\)"):
        train.train_and_evaluate(_config(num_steps=8, sigma_rels=(0.05,), snapshot_every=0), copy)
    config = _config()
    config.ema.sigma_rels = ()
    with pytest.raises(ValueError, match=r"^ema\.snapshot_every=2 needs ema\.sigma_rels"):
        loop.Settings.from_config(config, "training")


def test_the_profiles_change_no_training_number_and_off_means_absent(run_dir, tmp_path):
    workdir, tracked = run_dir
    plain_dir = str(tmp_path / "plain")
    plain = jax.device_get(train.train_and_evaluate(_config(sigma_rels=(), snapshot_every=0), plain_dir))
    assert plain.phema is None and not os.path.exists(os.path.join(plain_dir, checkpointing.SNAPSHOT_DIR))
    jax.tree.map(np.testing.assert_array_equal, plain, tracked.replace(phema=None))
    assert "post_hoc_ema" not in checkpointing.read_meta(plain_dir)
    assert checkpointing.read_meta(workdir)["post_hoc_ema"] == {"sigma_rels": [0.05, 0.1]}
    saved = {}
    for name, d in (("plain", plain_dir), ("tracked", workdir)):
        with open(os.path.join(d, "checkpoints", "6", "info", "metadata")) as f:
            saved[name] = set(json.load(f)["checksums"])  # the state's saved parts
    assert saved["tracked"] - saved["plain"] == {"phema"} and "phema" not in saved["plain"]


def test_the_sweeps_table_and_plot_mark_the_fixed_decay(tmp_path):
    from bench import phema_sweep

    floor = dict(fd=0.5, precision=0.9, recall=0.9)
    records = [dict(ema="post-hoc", sigma_rel=s, gamma=post_hoc_ema.gamma_from_sigma_rel(s), residual=0.01, seed=0,
                    fd=fd, precision=0.8, recall=0.7, floor=floor) for s, fd in ((0.05, 2.0), (0.1, 1.5))]
    records.append(dict(ema=phema_sweep.FIXED, decay=0.995, sigma_rel=post_hoc_ema.sigma_rel_of_decay(0.995, 2000),
                        gamma=None, residual=None, seed=0, fd=1.7, precision=0.8, recall=0.7, floor=floor))
    text = phema_sweep.table(records)
    assert "| fixed | 0.09975 |  |  | 0 | 1.7 | 0.8 | 0.7 |" in text and "Floor (real vs real): fd 0.5" in text
    assert phema_sweep.quality({"metric": "inception", "fid": 3.0}) == {"fid": 3.0, "inception_score": None}
    phema_sweep.plot(str(tmp_path / "sweep.png"), records)
    assert os.path.getsize(tmp_path / "sweep.png") > 1000


def test_the_autoencoders_trainer_gets_the_same_profiles_and_snapshots(tmp_path):
    """The second trainer of the loop: no code of its own for post-hoc EMA."""
    from ddpm_jax.modes import autoencoder
    from tests.test_autoencoder import _tiny_config

    config = _tiny_config()
    config.autoencoder.update(num_steps=4, log_every=2, checkpoint_every=2, eval_batch_size=100)
    config.ema.update(sigma_rels=(0.1,), snapshot_every=2)
    workdir = str(tmp_path / "ae")
    autoencoder.run(config, workdir)
    with checkpointing.Checkpointer(workdir, keep=None, subdir=checkpointing.SNAPSHOT_DIR) as snaps:
        assert snaps.all_steps() == [2, 4] and snaps.read_meta(4)["sigma_rels"] == [0.1]


def test_the_sweeps_holdout_reconstructs_a_tracked_profile_from_the_others(tmp_path):
    from bench import common, phema_sweep

    config = _config(num_steps=8, sigma_rels=(0.05, 0.07, 0.1))
    workdir = str(tmp_path / "three")
    tracked = jax.device_get(train.train_and_evaluate(config, workdir))
    (record,) = phema_sweep.measure([f"--workdir={workdir}", "--config=configs/toy2d.py", "--holdout=0.07",
                                     "--config.diffusion.num_timesteps=10"])
    assert record["step"] == 8 and record["profiles"] == pytest.approx([0.05, 0.07, 0.1])
    # 4 snapshots of 8 steps: the measurement's plumbing (the math's accuracy: the float64 test above).
    assert 0 < record["relative_error"] < 0.05 and np.isfinite(record["error_over_profile_difference"])
    assert tracked.phema is not None
    with pytest.raises(common.BenchError, match=r"--holdout=0\.06 is not one of the run's ema\.sigma_rels"):
        phema_sweep.holdout_error(config, workdir, 0.06)
