"""XLA's view of the train step (bench/xla_analysis.py) and a steady-state step without host transfers.

A tiny U-Net (ch 32, ch_mult (1,), one res block, attention at 8x8, 8x8 images), batch 8.
"""

import jax
import numpy as np
import pytest

from bench import common
from bench import xla_analysis as xa
# The trainer's setup, all in one place (as in bench/xla_analysis.py).
from ddpm_jax.data import example_shape
from ddpm_jax.parallel import host_to_global, make_mesh
from ddpm_jax.setup import create_model, create_schedule, create_train_state
from ddpm_jax.train import make_train_step

BATCH = 8


def _tiny_config(dtype: str):
    return common.load_config("configs/cifar10.py", [
        "model.ch=32", "model.ch_mult=(1,)", "model.num_res_blocks=1", "model.attn_resolutions=(8,)",
        "data.image_size=8", f"model.dtype={dtype}"])


@pytest.fixture(scope="module")
def bf16_analysis():
    return xa.analyze(_tiny_config("bfloat16"), BATCH)


def test_steady_state_train_step_makes_no_host_transfer():
    config = _tiny_config("float32")
    mesh = make_mesh()  # the 8 fake devices
    assert mesh.devices.size == 8
    model, sched, shape = create_model(config), create_schedule(config), example_shape(config.data)
    state, tx = create_train_state(config, model, shape, mesh)
    step = make_train_step(config, model, sched, tx, mesh)
    host = {"x": np.random.default_rng(0).uniform(-1, 1, (1, BATCH, *shape)).astype(np.float32)}
    batch = host_to_global(host, mesh, batch_axis=1)  # as the trainer does, outside the guard
    state, _ = step(state, batch)  # warm-up: compiles
    with jax.transfer_guard("disallow"):
        for _ in range(2):
            state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
    assert int(state.step) == 3 and bool(np.all(np.asarray(metrics["finite"])))
    # The guard does fire here: a computation that takes the host batch implicitly is refused.
    with jax.transfer_guard("disallow"), pytest.raises(Exception, match="[Dd]isallowed host-to-device"):
        batch["x"] + host["x"]


def test_bf16_compute_runs_convolutions_and_dots_in_bf16_with_float32_state(bf16_analysis):
    convs, dots = bf16_analysis["lowered_ops"]["convolution"], bf16_analysis["lowered_ops"]["dot_general"]
    # Only the float32 output head (its conv, input gradient and kernel gradient) is not bf16.
    assert convs.get("bf16", 0) > 10 and convs.get("f32", 0) <= 3 and set(convs) <= {"bf16", "f32"}
    assert dots.get("bf16", 0) > dots.get("f32", 0)
    state = bf16_analysis["state_dtypes"]
    assert set(state["params"]) == {"float32"} and set(state["ema_params"]) == {"float32"}
    assert "float32" in state["opt_state"] and set(state["opt_state"]) <= {"float32", "int32"}


def test_float32_compute_has_no_bf16_convolutions_or_dots():
    lowered, state = xa.lower_train_step(_tiny_config("float32"), BATCH)
    ops = xa.lowered_op_dtypes(lowered.as_text())
    assert ops["convolution"].get("f32", 0) > 10 and ops["dot_general"].get("f32", 0) > 0
    assert not any("bf16" in k for counts in ops.values() for k in counts)
    assert set(xa.state_dtypes(state)["params"]) == {"float32"}


def test_analysis_gives_flops_memory_and_fusions(bf16_analysis):
    r = bf16_analysis
    assert r["num_params"] > 0 and r["flops"] > 0
    assert r["flops_per_image"] == pytest.approx(r["flops"] / BATCH)
    assert r["bytes_accessed"] > 0 and r["fusions"]["total"] > 0
    # Arguments: params, EMA and two Adam moments (4 x 4 bytes per parameter) plus the batch.
    assert r["memory"]["argument_bytes"] >= 16 * r["num_params"] and r["memory"]["temp_bytes"] > 0
    config = _tiny_config("bfloat16")
    forward = xa.forward_flops_per_image(create_model(config), config)
    # A train step is a forward and a backward pass (about twice the forward): about 3x forward.
    assert 2.0 < r["lowered_flops_per_image"] / forward < 5.0
    table = xa.format_table([dict(r, model="tiny", forward_flops_per_image=forward, paper_ratio=None)])
    head, rule, row = table.splitlines()
    assert head.count("|") == rule.count("|") == row.count("|")
    assert row.startswith("| tiny | 8 | bfloat16 | no |") and f"| {r['fusions']['total']} |" in row


def test_hlo_parsers_and_table():
    mlir = ('%1 = stablehlo.convolution(%a, %b) dim_numbers = [b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f] '
            ': (tensor<8x8x8x3xbf16>, tensor<3x3x3x32xbf16>) -> tensor<8x8x8x32xbf16>\n'
            '%2 = stablehlo.dot_general %c, %d, contracting_dims = [1] x [0] '
            ': (tensor<8x16xf32>, tensor<16x4xbf16>) -> tensor<8x4xf32>')
    assert xa.lowered_op_dtypes(mlir) == {"convolution": {"bf16": 1}, "dot_general": {"f32*bf16": 1}}
    hlo = ("  %fusion.1 = f32[8]{0} fusion(f32[8]{0} %p), kind=kLoop, calls=%fused_computation\n"
           "  %convolution.2 = f32[8,4]{1,0} convolution(%a, %b), window={size=3x3}\n"
           "  %fusion.3 = f32[8]{0} fusion(%q), kind=kInput, calls=%fused_computation.1")
    assert xa.count_fusions(hlo) == {"kInput": 1, "kLoop": 1, "total": 2}
    assert xa.optimized_op_dtypes(hlo) == {"convolution": {"f32": 1}, "dot": {}}
    assert common.xla_cost([{"flops": 2.0}]) == {"flops": 2.0} and common.xla_cost(None) == {}
