"""The benchmark scripts in a tiny mode (tiny U-Net, a few steps): their JSON lines and fields.

Nothing here asserts a time: only that each script runs the real code path, records
what it measured with the fields docs/benchmarks.md and bench.report rely on, and
refuses bad arguments with a one-line message.
"""

import functools
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import bf16_quality, common, peer_diffusers, report, run_all, sample_speed, train_throughput

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config=configs/digits.py", "--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()",
        "--config.diffusion.num_timesteps=20"]
ENV_FIELDS = ("schema", "impl", "bench", "device", "versions", "host")


def _check_env(r, impl="ddpm_jax"):
    assert all(k in r for k in ENV_FIELDS), sorted(r)
    assert r["impl"] == impl and r["schema"] == common.SCHEMA_VERSION
    assert r["device"]["platform"] == "cpu" and r["device"]["count"] >= 1
    assert json.loads(json.dumps(r)) == r  # plain JSON


# The JAX scripts run in one subprocess whose XLA compiles without LLVM optimisation (the
# tests time nothing, and compiling is most of their cost); the peer runs beside it in
# another one, with JAX and ddpm_jax made unimportable: it must need only torch + diffusers.
JAX_RUNS = {
    "train": [*TINY, "--data=synthetic", "--batch=16", "--windows=2", "--steps_per_window=2", "--warmup=1",
              "--peak_flops=1e12", "--tag=t"],
    "sample": [*TINY, "--method=ddpm,ddim", "--steps=5", "--batch=8", "--runs=1"],
    "sample_once": [*TINY, "--method=ddim", "--steps=3", "--batch=8", "--runs=0", "--tag=once"],
    "quality": [*TINY, "--config.training.batch_size=8", "--steps=3", "--smooth=2", "--eval_draws=1",
                "--no_reference", "--plot={plot}"],
}
JAX_CODE = """
import json, sys
from bench import bf16_quality, sample_speed, train_throughput
runs = json.loads(sys.argv[1])
train_throughput.main(runs["train"])
sample_speed.main(runs["sample"])
sample_speed.main(runs["sample_once"])
bf16_quality.main(runs["quality"])
"""
PEER_CODE = """
import sys
for m in ('jax', 'jaxlib', 'flax', 'optax', 'ddpm_jax', 'ml_collections', 'grain'):
    sys.modules[m] = None
from bench import peer_diffusers
peer_diffusers.main(['--model=tiny', '--device=cpu', '--batch=4', '--windows=1', '--steps_per_window=1',
                     '--warmup=0', '--precision=bf16'])
peer_diffusers.main(['--mode=sample', '--model=tiny', '--device=cpu', '--batch=2', '--timesteps=10',
                     '--method=ddpm,ddim', '--steps=3', '--runs=1'])
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"jax": [records], "peer": [records] or None, "plot": path}: both subprocesses at once."""
    plot = str(tmp_path_factory.mktemp("bench") / "loss.png")
    jax_runs = {k: [a.replace("{plot}", plot) for a in v] for k, v in JAX_RUNS.items()}
    flags = os.environ.get("XLA_FLAGS", "")
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{flags} --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    procs = {"jax": subprocess.Popen([sys.executable, "-c", JAX_CODE, json.dumps(jax_runs)], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)}
    if importlib.util.find_spec("diffusers") is not None:
        procs["peer"] = subprocess.Popen([sys.executable, "-c", PEER_CODE], cwd=REPO, env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {"plot": plot, "peer": None}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {stderr[-3000:]}"
        out[name] = common.read_records(stdout)
    return out


@functools.lru_cache(maxsize=None)
def _tiny_forward_flops_per_image(batch=8):
    """XLA's FLOPs of one forward pass of the tiny U-Net, per image (lowered from shapes only)."""
    from ddpm_jax import data, setup

    config = common.load_config(TINY[0][len("--config="):], [a[len("--config."):] for a in TINY[1:]])
    model = setup.create_model(config)
    x = jax.ShapeDtypeStruct((batch, 8, 8, 1), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    params = jax.eval_shape(lambda x, t: model.init({"params": jax.random.key(0)}, x, t), x, t)["params"]
    assert data.example_shape(config.data) == (8, 8, 1)
    return common.xla_flops(jax.jit(setup.model_apply_fn(model)).lower(params, x, t).cost_analysis()) / batch


def test_train_throughput_records_step_pipeline_and_data_on_8_devices(runs):
    records = [r for r in runs["jax"] if r["bench"] in ("train_step", "train", "data")]
    assert [r["bench"] for r in records] == ["train_step", "train", "data"]
    for r in records:
        _check_env(r)
        assert r["device"]["count"] == 8 and r["batch"] == 16 and r["image_shape"] == [8, 8, 1]
        assert r["dtype"] == "float32" and r["steps_per_dispatch"] == 1 and r["prefetch"] == 2
        assert r["data"].startswith("synthetic stand-in") and r["model"]["ch_mult"] == [1] and r["tag"] == "t"
        assert r["peak_flops_per_device"] == 1e12 and r["peak_source"] == "flag --peak_flops"
        assert r["paper_flops_per_image"] is None and r["images_per_sec"] > 0 and len(r["windows_s"]) == 2
    for r in records[:2]:
        assert r["images_per_sec"] == pytest.approx(r["steps_per_sec"] * 16)
        assert r["all_finite"] and np.isfinite(r["last_loss"]) and r["memory"] is None
        assert r["xla_flops_source"] == "compiled step" and r["compile_s"] > 0
        assert r["mfu_xla"] == pytest.approx(r["xla_flops_per_image"] * r["images_per_sec"] / (8 * 1e12))
    # The SPMD program's cost is per device: scaled back, a training image costs forward +
    # backward, about 3 forward passes (2x..4.5x allows for the norms, softmax, Adam, EMA).
    ratio = records[0]["xla_flops_per_image"] / _tiny_forward_flops_per_image()
    assert 2.0 < ratio < 4.5, ratio
    assert records[2]["batches_per_sec"] * 16 == pytest.approx(records[2]["images_per_sec"])


def test_flops_of_a_multi_step_dispatch_come_from_one_step():
    """XLA counts a loop body once: with steps_per_dispatch > 1 the count is of one lowered step."""
    from ddpm_jax import parallel

    d, batch = 16, 8
    w = jnp.ones((d, d))

    def step_fn(state, batches):  # n steps of one [batch, d] x [d, d] matmul each, in a scan
        return jax.lax.scan(lambda s, b: (s + jnp.sum(b["x"] @ w), None), state, batches)

    for n, devices in ((4, 1), (1, 8)):
        mesh = parallel.make_mesh(jax.devices()[:devices])
        fn = jax.jit(step_fn, in_shardings=(parallel.replicated(mesh), parallel.data_sharded(mesh, 1)))
        batches = {"x": jnp.ones((n, batch, d))}
        compiled = fn.lower(jnp.zeros(()), batches).compile()
        flops, source = train_throughput._flops_per_image(compiled, fn, jnp.zeros(()), batches, n, batch, mesh)
        assert source == ("compiled step" if n == 1 else "lowered 1-step HLO")
        assert flops == pytest.approx(2 * d * d, rel=0.15), (n, devices, flops)


def test_sample_speed_ddpm_and_ddim(runs):
    """--method=ddpm,ddim --steps=5 --runs=1: one record per method, of the whole chain.

    Nothing here compares two times: they are noise on a shared CPU. The record must say what
    ran (method, network calls, shapes, model) and carry finite positive times from which its
    derived fields follow."""
    records = [r for r in runs["jax"] if r["bench"] == "sample" and r["tag"] != "once"]
    # DDPM runs every step of the T = 20 chain, DDIM the --steps=5: one network call per step.
    assert [(r["method"], r["num_steps"]) for r in records] == [("ddpm", 20), ("ddim", 5)]
    forward = _tiny_forward_flops_per_image()
    for r in records:
        _check_env(r)
        assert r["device"]["count"] == 8 and r["batch"] == 8 and r["image_shape"] == [8, 8, 1]
        assert r["config"] == "configs/digits.py" and r["overrides"] == [a[len("--config."):] for a in TINY[1:]]
        assert r["model"]["ch_mult"] == [1] and r["model"]["attn_resolutions"] == []
        assert r["var_type"] == "fixedsmall" and r["dtype"] == "float32"  # the digits config's
        assert r["all_finite"] and -1.0 <= r["sample_range"][0] < r["sample_range"][1] <= 1.0
        times = [r["first_call_s"], r["median_s"], *r["runs_s"]]
        assert len(r["runs_s"]) == 1 and all(np.isfinite(s) and s > 0 for s in times)
        assert r["median_s"] == pytest.approx(r["runs_s"][0], abs=1e-4)  # runs_s: rounded to 0.1 ms
        assert r["compile_s"] == pytest.approx(max(r["first_call_s"] - r["median_s"], 0.0))
        assert r["run_spread"] == 0.0  # one timed run
        assert r["images_per_sec"] == pytest.approx(8 / r["median_s"])
        assert r["ms_per_step"] == pytest.approx(1e3 * r["median_s"] / r["num_steps"])
        # FLOPs of one network call; no peak for a CPU, hence no MFU.
        assert r["xla_forward_flops_per_image"] == pytest.approx(forward, rel=0.05)
        assert r["peak_flops_per_device"] is None and "--peak_flops" in r["peak_source"]
        assert r["mfu_xla"] is None and r["mfu_paper"] is None and r["paper_forward_flops_per_image"] is None
        assert r["memory"] is None


def test_sample_speed_can_time_only_the_first_call(runs):
    """--runs=0, for chains too long to run twice on a CPU: the compiling call is the measurement."""
    (r,) = [r for r in runs["jax"] if r["bench"] == "sample" and r["tag"] == "once"]
    assert r["num_steps"] == 3 and r["runs_s"] == [] and r["median_s"] is None and r["compile_s"] is None
    assert r["images_per_sec"] == pytest.approx(8 / r["first_call_s"])
    assert r["ms_per_step"] == pytest.approx(1e3 * r["first_call_s"] / 3) and r["all_finite"]
    with pytest.raises(common.BenchError, match="--runs=-1"):
        sample_speed.parse_args(["--runs=-1"])


def test_random_params_have_the_model_shapes_and_no_zeros():
    from ddpm_jax import parallel, setup

    config = common.load_config(TINY[0][len("--config="):], [a[len("--config."):] for a in TINY[1:]])
    model = setup.create_model(config)
    params = sample_speed.random_params(model, (8, 8, 1), parallel.make_mesh(jax.devices()[:1]))
    x = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    shapes = jax.eval_shape(lambda x, t: model.init({"params": jax.random.key(0)}, x, t), x, t)["params"]
    assert jax.tree.structure(params) == jax.tree.structure(shapes)
    assert all(p.shape == s.shape and bool((np.asarray(p) != 0).all())
               for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(shapes)))


def test_peer_runs_without_jax_or_ddpm_jax(runs):
    if runs["peer"] is None:
        pytest.skip("diffusers is not installed")
    train, ddpm, ddim = runs["peer"]
    for r in (train, ddpm, ddim):
        _check_env(r, impl="diffusers")
        assert r["versions"]["torch"] and r["versions"]["diffusers"] and r["all_finite"]
    assert train["bench"] == "peer_train" and train["precision"] == "bf16" and train["batch"] == 4
    assert train["images_per_sec"] == pytest.approx(4 * train["steps_per_sec"])
    assert train["model"]["num_params"] > 0 and np.isfinite(train["last_loss"])
    assert (ddpm["method"], ddpm["num_steps"], ddim["method"], ddim["num_steps"]) == ("ddpm", 10, "ddim", 3)
    assert ddpm["bench"] == "peer_sample" and -1.0 <= ddpm["sample_range"][0] <= ddpm["sample_range"][1] <= 1.0


def test_bf16_quality_compares_same_seed_runs(runs):
    (r,) = [r for r in runs["jax"] if r["bench"] == "bf16_quality"]
    _check_env(r)
    assert r["steps"] == 3 and r["batch"] == 8 and set(r["runs"]) == {"float32", "bfloat16"}
    assert r["runs"]["bfloat16"]["dtype"] == "bfloat16" and r["runs"]["float32"]["seed"] == 0
    for run in r["runs"].values():
        assert run["all_finite"] and np.isfinite(run["final_loss"]) and np.isfinite(run["heldout_loss"])
    # Same seed, same batches and noise: after 3 steps only the compute precision differs.
    d = r["bf16_vs_fp32"]
    assert 0 <= d["mean_abs_diff_smoothed"] <= d["max_abs_diff_smoothed"] < 0.05
    assert len(r["curves"]["float32"]) == len(r["curves"]["bfloat16"]) == 2
    assert r["plot"] == runs["plot"] and os.path.getsize(runs["plot"]) > 1000


def test_smooth_and_compare():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(bf16_quality.smooth(a, 2), [1.5, 2.5, 3.5])
    c = bf16_quality.compare(a, a + np.array([0.0, 0.0, 0.0, 2.0]), 2)
    assert c == {"max_abs_diff_smoothed": 1.0, "mean_abs_diff_smoothed": pytest.approx(1 / 3)}


def test_overrides_are_typed_and_bad_input_is_one_line():
    config = common.load_config("configs/cifar10.py", [
        "model.dtype=bfloat16", "model.remat=True", "model.ch_mult=(1,2)", "model.attn_resolutions=()",
        "training.steps_per_dispatch=4", "optim.lr=1e-3", "sampling.eta=1.0"])
    assert config.model.dtype == "bfloat16" and config.model.remat is True and config.sampling.eta == 1.0
    assert tuple(config.model.ch_mult) == (1, 2) and tuple(config.model.attn_resolutions) == ()
    assert config.training.steps_per_dispatch == 4 and config.optim.lr == 1e-3
    assert common.is_paper_cifar10_model(common.load_config("configs/cifar10.py"))
    assert not common.is_paper_cifar10_model(config)
    for bad, words in ((["model.dtyp=bfloat16"], "unknown config key 'model.dtyp'"),
                       (["model.remat=maybe"], "expected True or False"),
                       (["training.batch_size=big"], "expected an integer")):
        with pytest.raises(common.BenchError, match=words):
            common.load_config("configs/cifar10.py", bad)
    with pytest.raises(common.BenchError, match="no such config file"):
        common.load_config("configs/nope.py")
    with pytest.raises(common.BenchError, match="multiple of training.steps_per_dispatch=4"):
        train_throughput.configure(train_throughput.parse_args(
            ["--config.training.steps_per_dispatch=4", "--steps_per_window=6"]))
    with pytest.raises(common.BenchError, match="--modes"):
        train_throughput.parse_args(["--modes=fast"])
    with pytest.raises(common.BenchError, match="--steps is for --method=ddim"):
        sample_speed.parse_args(["--method=ddpm", "--steps=50"])
    with pytest.raises(common.BenchError, match="give a value"):
        common.split_overrides(["--config.model.remat"])


# Dense tensor-core peaks per JAX device from the vendors' datasheets, keyed by the device kind
# JAX reports. NVIDIA quotes the 2:4-sparse figures (BF16 / TF32): dense is half.
DATASHEET_PEAKS = {
    "NVIDIA H100 80GB HBM3": (1979e12 / 2, 989e12 / 2),  # H100 SXM5
    "NVIDIA H100 PCIe": (1513e12 / 2, 756e12 / 2),
    "NVIDIA H100 NVL": (1671e12 / 2, 835e12 / 2),
    "NVIDIA H200": (1979e12 / 2, 989e12 / 2),  # H200 SXM: H100 SXM's compute
    "NVIDIA GH200 480GB": (1979e12 / 2, 989e12 / 2),
    "NVIDIA A100-SXM4-80GB": (624e12 / 2, 312e12 / 2),
    "NVIDIA A100-SXM4-40GB": (624e12 / 2, 312e12 / 2),
    "NVIDIA A100 80GB PCIe": (624e12 / 2, 312e12 / 2),
    "TPU v3": (123e12 / 2, None),  # 123 TFLOP/s a chip, one JAX device per core (2 a chip)
    "TPU v4": (275e12, None),  # one JAX device per chip (megacore)
    "TPU v5 lite": (197e12, None),  # v5e
    "TPU v5": (459e12, None),  # v5p
    "TPU v6 lite": (918e12, None),  # v6e
}


@pytest.mark.parametrize("kind", sorted(DATASHEET_PEAKS))
def test_peak_table_matches_the_datasheets(kind):
    bf16, tf32 = DATASHEET_PEAKS[kind]
    peak, source = common.peak_flops(kind)
    assert peak == pytest.approx(bf16, rel=2e-3) and source.startswith("table: ")  # 3 significant digits
    assert common.tf32_peak(kind) == (None if tf32 is None else pytest.approx(tf32, rel=2e-3))
    assert common.peak_flops(kind.lower())[0] == peak  # the kind is matched case-insensitively


def test_peak_flag_unknown_devices_and_mfu_by_hand():
    assert common.peak_flops("NVIDIA H100 80GB HBM3", 5e14) == (5e14, "flag --peak_flops")  # the flag wins
    for kind in ("cpu", "NVIDIA L4", "NVIDIA GeForce RTX 4090"):
        peak, source = common.peak_flops(kind)
        assert peak is None and "--peak_flops" in source and common.tf32_peak(kind) is None
    assert common.peak_flops("cpu", 2e12) == (2e12, "flag --peak_flops")
    # 4 devices of 1 TFLOP/s, 1,500 images/s of 2 GFLOP each: 3 TFLOP/s useful of 4.
    assert common.mfu(2e9, 1500.0, 1e12, 4) == pytest.approx(0.75)
    # A 100-step sampler, 1 GFLOP a call, 50 images/s on 2 devices of 100 TFLOP/s: 2.5%.
    assert common.mfu(100 * 1e9, 50.0, 1e14, 2) == pytest.approx(0.025)
    # The paper's CIFAR-10 U-Net trains at 37.3 GFLOP an image: 8,000 images/s on one H100 SXM
    # (989.5 TFLOP/s dense bf16) is 30.2%.
    h100 = common.peak_flops("NVIDIA H100 80GB HBM3")[0]
    assert common.mfu(37.3e9, 8000.0, h100, 1) == pytest.approx(0.3016, rel=2e-3)
    assert common.mfu(None, 1.0, 1.0, 1) is None and common.mfu(1e9, 1.0, None, 1) is None
    # XLA's cost analysis: a dict, or (older JAX) a list of one dict; no count is None.
    assert common.xla_flops({"flops": 5.0, "bytes accessed": 3.0}) == 5.0
    assert common.xla_flops([{"flops": 5.0}]) == 5.0
    assert common.xla_flops({}) is None and common.xla_flops(None) is None and common.xla_flops([]) is None


def _rec(**kw):
    base = dict(schema=1, device=dict(platform="gpu", kind="NVIDIA H100 80GB HBM3", count=1), host={})
    return {**base, **kw}


def test_report_pairs_same_device_batch_and_precision():
    ours = _rec(impl="ddpm_jax", bench="train_step", dtype="bfloat16", batch=128, image_shape=[32, 32, 3],
                images_per_sec=8000.0, steps_per_sec=62.5, overrides=["model.dtype=bfloat16"],
                paper_flops_per_image=37.3e9, config="configs/cifar10.py")
    ours32 = dict(ours, dtype="float32", images_per_sec=3300.0, overrides=[])
    peer = _rec(impl="diffusers", bench="peer_train", precision="bf16", batch=128, image_shape=[32, 32, 3],
                images_per_sec=2000.0, steps_per_sec=15.6, compile=False)
    peer32 = dict(peer, precision="tf32", images_per_sec=2200.0)
    other = dict(peer, batch=64)
    s_ours = _rec(impl="ddpm_jax", bench="sample", dtype="bfloat16", batch=256, image_shape=[32, 32, 3],
                  method="ddpm", num_steps=1000, median_s=5.0, images_per_sec=51.2, ms_per_step=5.0,
                  overrides=[], paper_forward_flops_per_image=12.44e9, config="configs/cifar10.py")
    s_peer = _rec(impl="diffusers", bench="peer_sample", precision="bf16", batch=256, image_shape=[32, 32, 3],
                  method="ddpm", num_steps=1000, median_s=15.0, images_per_sec=17.1, ms_per_step=15.0)
    records = [ours, ours32, peer, peer32, other, s_ours, s_peer]
    got = {(r["kind"], r["ours"], r["peer"]): r["ratio"] for r in report.ratios(records)}
    assert got == {("train (train_step)", "ddpm_jax bf16", "diffusers bf16"): 4.0,
                   ("train (train_step)", "ddpm_jax tf32", "diffusers tf32"): 1.5,
                   ("sample ddpm-1000", "ddpm_jax bf16", "diffusers bf16"): 3.0}
    text = report.markdown(records + [dict(bench="skipped", name="x", reason="budget")])
    assert "| 4.00x |" in text and "### Not measured" in text
    assert "training bf16, batch 128: 8,000 images/s" in text and ": met" in text
    assert "sampling ddpm-1000, 256 images (ddpm_jax bf16): 5.000 s vs target <= 7.0 s: met" in text
    cpu = dict(ours32, device=dict(platform="cpu", kind="cpu", count=1))
    assert report.precision_class(cpu) == "fp32" and report.targets([cpu]) == []


@pytest.mark.parametrize("plan", ["gpu1", "gpu2", "cpu"])
def test_plans_parse_and_a_zero_budget_skips_everything(plan, tmp_path):
    items = run_all.plan_items(plan)
    parsers = {"train_throughput": train_throughput.parse_args, "sample_speed": sample_speed.parse_args,
               "peer_diffusers": peer_diffusers.parse_args, "bf16_quality": bf16_quality.parse_args}
    for item in items:  # every planned command is accepted by its script
        args = parsers[item.module](item.command(str(tmp_path))[3:])
        if item.module == "train_throughput":
            train_throughput.configure(args)
    records = run_all.run_plan(items, str(tmp_path), budget_s=0)
    assert records[0]["bench"] == "env" and records[0]["packages"]["jax"] == jax.__version__
    assert [r["name"] for r in records[1:]] == [i.name for i in items]
    assert all(r["bench"] == "skipped" for r in records[1:])
    with open(tmp_path / "results.jsonl") as f:
        assert [json.loads(line)["bench"] for line in f] == [r["bench"] for r in records]
    with pytest.raises(common.BenchError, match="--plan=nope"):
        run_all.plan_items("nope")
