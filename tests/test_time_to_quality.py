"""The time-to-quality harness on a tiny budget: its rows for both sides, the exported peer's
architecture, the summary and the refusals. Nothing here asserts a time."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from bench import common, step_ratio, time_to_quality  # noqa: E402
from ddpm_jax import parallel, setup, train_state  # noqa: E402
from ddpm_jax.evaluation import classifier  # noqa: E402

TINY_OVERRIDES = ["model.ch_mult=(1,2)", "model.attn_resolutions=(4,)", "diffusion.num_timesteps=20",
                  "training.batch_size=8"]
TINY = ["--config=configs/digits.py", *(f"--config.{o}" for o in TINY_OVERRIDES)]


@pytest.fixture(scope="module")
def clf_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("clf") / "digits")
    classifier.load_or_train(common.load_config("configs/digits.py").data, path, log=None, steps=30)
    return path


@pytest.mark.parametrize("side", time_to_quality.SIDES)
def test_each_side_writes_a_row_per_mark_with_metrics_beside_their_floor(tmp_path, clf_path, side):
    out = tmp_path / "ttq"
    rows = time_to_quality.main([*TINY, f"--side={side}", "--budget_s=0.4", "--marks=0.2,0.4", "--num_samples=12",
                                 "--calls=3", "--sample_batch=6", f"--classifier_path={clf_path}", f"--out={out}",
                                 "--tag=tiny"])
    written = [json.loads(line) for line in (out / time_to_quality.RESULTS).read_text().splitlines()]
    assert [r["mark_s"] for r in written] == [0.2, 0.4] and written == json.loads(json.dumps(rows))
    for prev, r in zip([None, *written], written):
        assert r["side"] == side and r["tag"] == "tiny" and r["calls"] == 3
        assert r["train_s"] >= r["mark_s"] and r["steps"] >= 1 and r["images_seen"] == r["steps"] * r["batch"]
        assert prev is None or (r["steps"] >= prev["steps"] and r["train_s"] >= prev["train_s"])
        assert r["counts"]["generated"] == 12 and r["counts"]["held_out"] > 12
        for name in ("fd", "precision", "recall"):
            assert np.isfinite(r["metrics"][name]) and r["floor"][name] > 0
            assert r["ratio"][name] == pytest.approx(r["metrics"][name] / r["floor"][name])
        assert r["eval_s"] >= r["sample_s"] > 0 and r["first_step_s"] > 0
    assert written[0]["batch"] == (16 if side == "peer_diffusers" else 8)
    assert written[0]["impl"] == ("ddpm_jax" if side == "ours" else "diffusers")


def test_ours_scores_each_post_hoc_ema_profile_beside_the_fixed_decay(tmp_path, clf_path):
    out = tmp_path / "ttq"
    rows = time_to_quality.main([*TINY, "--side=ours", "--budget_s=0.4", "--marks=0.2,0.4", "--num_samples=12",
                                 "--calls=3", "--sample_batch=6", f"--classifier_path={clf_path}", f"--out={out}",
                                 "--tag=tiny", "--config.ema.sigma_rels=0.05,0.2"])
    averages = ["decay 0.995", "sigma_rel 0.05", "sigma_rel 0.2"]
    assert [(r["mark_s"], r["ema"]) for r in rows] == [(m, a) for m in (0.2, 0.4) for a in averages]
    assert list(time_to_quality.curves(rows)) == [f"ours (tiny, {a})" for a in averages]
    with pytest.raises(common.BenchError, match="tracks no post-hoc EMA"):
        time_to_quality.main([*TINY, "--side=peer_exact", "--config.ema.sigma_rels=0.05", f"--out={out}"])
    side = time_to_quality.Ours(common.load_config("configs/digits.py", [*TINY_OVERRIDES, "ema.sigma_rels=0.05,0.2"]))
    side.train(3)
    (_, fixed), (_, narrow), (_, wide) = side.averages()
    assert fixed is side.state.ema_params and narrow is side.state.phema.ema_params[0]
    assert max(float(jax.numpy.abs(a - b).max()) for a, b in zip(jax.tree.leaves(narrow), jax.tree.leaves(wide))) > 0
    side.close()


def test_the_exact_peer_is_the_projects_network_through_the_export():
    config = common.load_config("configs/digits.py", [a.removeprefix("--config.") for a in TINY[1:]])
    peer = time_to_quality.Peer(config, "peer_exact")
    run = setup.create_run(config, parallel.make_mesh())
    params = setup.init_params(run.model, run.shape, int(config.seed), run.mesh)
    assert peer.num_params == sum(x.size for x in jax.tree.leaves(params))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, *run.shape)).astype(np.float32)
    t = np.array([0, 7, 19], np.int32)
    ours = np.asarray(run.model.apply({"params": params}, x, t, {}, train=False))
    np.testing.assert_allclose(peer.trainer.forward(x, t), ours, atol=1e-4)
    recipe = peer.record["recipe"]
    assert recipe["batch_size"] == 8 and recipe["lr"] == config.optim.lr
    assert recipe["ema"]["decay"] == recipe["ema"]["min_decay"] == config.optim.ema_decay


def test_the_exact_peer_weights_its_loss_as_the_process_does():
    overrides = [a.removeprefix("--config.") for a in TINY[1:]] + ["diffusion.min_snr_gamma=2.0"]
    config = common.load_config("configs/digits.py", overrides)
    peer = time_to_quality.Peer(config, "peer_exact").trainer
    process = setup.create_diffusion(config, setup.create_schedule(config))
    t = np.arange(20, dtype=np.int32)
    rng = np.random.default_rng(0)
    prediction, noise = (rng.standard_normal((20, 1, 4, 4)).astype(np.float32) for _ in range(2))
    weighted = float(peer._loss(torch.from_numpy(prediction), torch.from_numpy(noise), torch.from_numpy(t).long()))
    expected = np.mean(np.asarray(process.min_snr_weight(t)) * ((prediction - noise) ** 2).mean(axis=(1, 2, 3)))
    assert 0 < weighted < float(((prediction - noise) ** 2).mean()) and weighted == pytest.approx(expected, rel=1e-5)
    v_config = common.load_config("configs/digits.py", overrides + ["diffusion.pred=v"])
    with pytest.raises(common.BenchError, match="epsilon target"):
        time_to_quality.Peer(v_config, "peer_exact")



@pytest.mark.parametrize("decay", ["constant", "linear", "cosine"])
def test_the_exact_peer_follows_the_projects_learning_rate_schedule(decay):
    overrides = [a.removeprefix("--config.") for a in TINY[1:]] + [
        f"optim.lr_decay={decay}", "optim.warmup_steps=4", "training.num_steps=24"]
    config = common.load_config("configs/digits.py", overrides)
    peer = time_to_quality.Peer(config, "peer_exact").trainer
    theirs = []
    for _ in range(25):  # updates 0..23, and 24 where the decays reach 0
        theirs.append(peer.optimizer.param_groups[0]["lr"])
        peer.optimizer.step()  # no gradients: a no-op that keeps torch's call order
        peer.lr_scheduler.step()
    ours = train_state.learning_rate_schedule(config)
    np.testing.assert_allclose(theirs, [float(ours(k)) for k in range(25)], rtol=1e-6, atol=1e-10)
    assert theirs[4] == pytest.approx(2e-3) and (theirs[-1] == 0) == (decay != "constant")

def _row(side, train_s, ratio, steps):
    return dict(bench="time_to_quality", side=side, tag="", config="c", num_samples=10, calls=20, train_s=train_s,
                images_seen=steps * 8, ratio={"fd": ratio}, metrics={"fd": ratio * 10}, train_images_per_s=1.0,
                sample_images_per_s=2.0)


def test_summary_gives_the_first_mark_under_each_threshold(tmp_path):
    rows = [_row("ours", 60, 4.0, 10), _row("ours", 120, 2.5, 20), _row("ours", 180, 1.9, 30),
            _row("peer_exact", 60, 5.0, 5), _row("peer_exact", 120, 3.5, 10)]
    runs = time_to_quality.curves(rows)
    assert time_to_quality.time_to(runs["ours"], 3.0)["train_s"] == 120
    assert time_to_quality.time_to(runs["ours"], 2.0)["images_seen"] == 240
    assert time_to_quality.time_to(runs["peer_exact"], 3.0) is None
    table = time_to_quality.summary(rows)
    assert "| ours | 2.0 min (160 images) | 3.0 min (240 images) |" in table and "not reached" in table
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    time_to_quality.main([f"--plot={tmp_path / 'p.png'}", str(path)])
    assert (tmp_path / "p.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--marks=60,30"], "must increase"),
    (["--budget_s=100", "--marks=50,200"], "end at most"),
    (["--marks=a,b"], "comma list"),
    (["--budget_s=0"], "must be > 0"),
    (["--plot=x.png"], "needs the JSON-lines files"),
    (["stray"], "unexpected arguments"),
])
def test_bad_arguments_are_one_line_errors(argv, message):
    with pytest.raises(common.BenchError, match=message):
        time_to_quality.parse_args(argv)


def test_step_ratio_times_both_trainers_in_turn_and_refuses_a_partial_dispatch():
    spd = ["--config.training.steps_per_dispatch=2"]
    [record] = step_ratio.main([*TINY, *spd, "--windows=3", "--steps_per_window=4", "--warmup=1"])
    ours, peer = record["ours_timing"], record["peer_timing"]
    assert record["peer"]["side"] == "peer_exact" and record["peer"]["recipe"]["batch_size"] == 8
    assert ours["batch"] == peer["batch"] == 8 and len(ours["windows_s"]) == len(peer["windows_s"]) == 3
    pairs = [(8 / a) / (8 / b) for a, b in zip(ours["windows_s"], peer["windows_s"])]
    np.testing.assert_allclose(record["pair_ratios"], pairs, rtol=1e-3)
    assert record["ratio"] == sorted(record["pair_ratios"])[1]
    np.testing.assert_allclose(ours["step_ms"], 1e3 * sorted(ours["windows_s"])[1] / 4, rtol=1e-3)
    with pytest.raises(common.BenchError, match="not a multiple of training.steps_per_dispatch=2"):
        step_ratio.measure(step_ratio.parse_args([*TINY, *spd, "--steps_per_window=3"]))
