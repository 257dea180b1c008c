"""XLA's own view of the compiled train step: memory, FLOPs, fusions and bf16 coverage.

    python -m bench.xla_analysis [--out=FILE.json] [--quick]

Compiles (never runs) the real trainer's step, `train.make_train_step` (EMA, clipping,
donated state), on abstract `jax.ShapeDtypeStruct` inputs, so nothing large is
allocated, for the CIFAR-10 U-Net at batch 128 and the 256x256 U-Net at batch 64, in
bf16 and fp32 compute, with and without remat (`--quick`: CIFAR-10 without remat).
Each variant records `compiled.memory_analysis()` (argument / output / temp bytes),
`compiled.cost_analysis()` (FLOPs, bytes accessed), the fusions of the optimized HLO,
the convolutions and dot products of the lowered HLO by operand dtype (the program
every backend gets; XLA:CPU later upcasts bf16 convolutions to f32, the optimized
counts show it), and the dtypes of the train state's leaves. One device: the numbers
are those of the whole batch on one chip. One JSON line per variant on stdout, then a
table; `--out` writes everything as one JSON file.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
from typing import Any, Sequence

if __package__ in (None, ""):  # `python bench/xla_analysis.py`: make `bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from bench import common
# The trainer's own setup and step, all in one place (so a move of these is one edit here).
from ddpm_jax.data import example_shape
from ddpm_jax.parallel import data_sharded, make_mesh
from ddpm_jax.setup import abstract_params, abstract_train_state, create_model, create_schedule
from ddpm_jax.train import make_train_step
from ddpm_jax.train_state import create_optimizer

MODELS = (("cifar10", "configs/cifar10.py", 128), ("celebahq256", "configs/celebahq256.py", 64))
DTYPES = ("bfloat16", "float32")
MIB = 2.0 ** 20

_FUSION = re.compile(r"\bfusion\(.*\bkind=(k\w+)")
_OPT_OP = re.compile(r"= (\w+)\[[^\]]*\]\S* (convolution|dot)\(")
_MLIR_OP = re.compile(r"stablehlo\.(convolution|dot_general)\b.*:\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)")
_ELEMENT = re.compile(r"(?:[0-9?]+x)*(\w+)>$")


# ---- parsing the HLO ----------------------------------------------------------------------------


def count_fusions(optimized_hlo: str) -> dict[str, int]:
    """Fusion instructions of an optimized HLO module by kind (kLoop, kInput, ...), and 'total'."""
    kinds = collections.Counter(m.group(1) for m in map(_FUSION.search, optimized_hlo.splitlines()) if m)
    return dict(sorted(kinds.items()), total=sum(kinds.values()))


def lowered_op_dtypes(stablehlo: str) -> dict[str, dict[str, int]]:
    """Convolutions and dot products of a lowered (StableHLO) module by operand dtypes.

    Key 'bf16' / 'f32' when both operands have that element type, else 'lhs*rhs'.
    """
    out: dict[str, collections.Counter] = {"convolution": collections.Counter(),
                                           "dot_general": collections.Counter()}
    for line in stablehlo.splitlines():
        m = _MLIR_OP.search(line)
        if m:
            lhs, rhs = (_ELEMENT.search(t).group(1) for t in m.group(2, 3))
            out[m.group(1)][lhs if lhs == rhs else f"{lhs}*{rhs}"] += 1
    return {op: dict(sorted(c.items())) for op, c in out.items()}


def optimized_op_dtypes(optimized_hlo: str) -> dict[str, dict[str, int]]:
    """Convolutions and dots of an optimized HLO module by result dtype (what the backend runs)."""
    out: dict[str, collections.Counter] = {"convolution": collections.Counter(), "dot": collections.Counter()}
    for m in map(_OPT_OP.search, optimized_hlo.splitlines()):
        if m:
            out[m.group(2)][m.group(1)] += 1
    return {op: dict(sorted(c.items())) for op, c in out.items()}


def state_dtypes(state: Any) -> dict[str, dict[str, int]]:
    """Leaf dtypes of the train state's params, EMA params and optimizer state (leaf counts)."""
    def count(tree):
        return dict(sorted(collections.Counter(str(x.dtype) for x in jax.tree.leaves(tree)).items()))

    return dict(params=count(state.params), ema_params=count(state.ema_params),
                opt_state=count(state.opt_state))


# ---- lowering and compiling ---------------------------------------------------------------------


def lower_train_step(config, batch: int, devices: Sequence[jax.Device] | None = None):
    """(lowered step, abstract train state) of the trainer's one-step program on `devices` (default: one)."""
    mesh = make_mesh(list(devices) if devices is not None else jax.devices()[:1])
    shape = example_shape(config.data)
    model, sched = create_model(config), create_schedule(config)
    state = abstract_train_state(config, model, shape, mesh)
    step = make_train_step(config, model, sched, create_optimizer(config), mesh)
    # steps_per_dispatch = 1: XLA counts a loop body once, so a multi-step program would under-count.
    x = jax.ShapeDtypeStruct((1, batch, *shape), jnp.float32, sharding=data_sharded(mesh, batch_axis=1))
    return step.lower(state, {"x": x}), state


def forward_flops_per_image(model, config) -> float | None:
    """FLOPs of one image through the network (train=False), from the lowered HLO (no compile)."""
    shape = example_shape(config.data)
    x, t = jax.ShapeDtypeStruct((1, *shape), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32)
    params = abstract_params(model, shape, make_mesh(jax.devices()[:1]))
    fwd = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, train=False))
    return common.xla_flops(fwd.lower(params, x, t).cost_analysis())


def memory_numbers(compiled) -> dict[str, int]:
    """Bytes of `compiled.memory_analysis()` (an object in JAX 0.10; {} where unavailable)."""
    stats = compiled.memory_analysis()
    fields = ("argument", "output", "alias", "temp", "generated_code")
    out = {f"{k}_bytes": int(getattr(stats, f"{k}_size_in_bytes")) for k in fields
           if stats is not None and hasattr(stats, f"{k}_size_in_bytes")}
    if stats is not None and getattr(stats, "peak_memory_in_bytes", None) is not None:
        out["peak_bytes"] = int(stats.peak_memory_in_bytes)
    return out


def analyze(config, batch: int, devices: Sequence[jax.Device] | None = None) -> dict:
    """XLA's analysis of the compiled train step of `config` at global `batch` (compiles, runs nothing)."""
    devices = list(devices) if devices is not None else jax.devices()[:1]
    start = time.perf_counter()
    lowered, state = lower_train_step(config, batch, devices)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    cost = common.xla_cost(compiled.cost_analysis())
    num_devices = len(devices)
    # An SPMD program's cost is per device: times the devices, over the global batch.
    flops = float(cost.get("flops", 0.0)) * num_devices
    optimized = compiled.as_text()
    return dict(
        batch=batch, num_devices=num_devices, dtype=str(config.model.dtype), remat=bool(config.model.remat),
        num_params=int(sum(x.size for x in jax.tree.leaves(state.params))),
        lower_s=round(lower_s, 2), compile_s=round(compile_s, 2), memory=memory_numbers(compiled),
        flops=flops, flops_per_image=flops / batch,
        lowered_flops_per_image=(common.xla_flops(lowered.cost_analysis()) or 0.0) / batch,
        bytes_accessed=float(cost.get("bytes accessed", 0.0)) * num_devices,
        transcendentals=float(cost.get("transcendentals", 0.0)) * num_devices,
        fusions=count_fusions(optimized), lowered_ops=lowered_op_dtypes(lowered.as_text()),
        optimized_ops=optimized_op_dtypes(optimized), state_dtypes=state_dtypes(state),
    )


# ---- the variants, the table, the command line --------------------------------------------------


def variants(quick: bool) -> list[tuple[str, str, int, str, bool]]:
    """(name, config, batch, dtype, remat), the most asked-for first (CIFAR-10 bf16)."""
    models = MODELS[:1] if quick else MODELS
    remats = (False,) if quick else (False, True)
    return [(name, path, batch, dtype, remat) for name, path, batch in models
            for remat in remats for dtype in DTYPES]


def _ops_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in counts.items()) or "0"


COLUMNS = ("model", "batch", "compute", "remat", "compile s", "train-step GFLOPs/image", "vs 37.3",
           "forward GFLOPs/image", "argument MiB", "output MiB", "temp MiB", "fusions",
           "convolutions (lowered)", "dots (lowered)", "convolutions (optimized, this backend)",
           "state leaves")


def _row(r: dict) -> list[str]:
    mem, ops, leaves = r["memory"], r["lowered_ops"], r["state_dtypes"]
    return [
        r["model"], str(r["batch"]), r["dtype"], "yes" if r["remat"] else "no", f"{r['compile_s']:.0f}",
        f"{r['flops_per_image'] / 1e9:.2f}", f"{r['paper_ratio']:.2f}x" if r.get("paper_ratio") else "–",
        f"{r['forward_flops_per_image'] / 1e9:.2f}",
        *(f"{mem.get(k, 0) / MIB:,.0f}" for k in ("argument_bytes", "output_bytes", "temp_bytes")),
        str(r["fusions"]["total"]), _ops_text(ops["convolution"]), _ops_text(ops["dot_general"]),
        _ops_text(r["optimized_ops"]["convolution"]),
        f"params {'/'.join(leaves['params'])}; optimizer {'/'.join(leaves['opt_state'])}",
    ]


def format_table(records: Sequence[dict]) -> str:
    """A markdown table of the variants' key numbers."""
    lines = [COLUMNS, ["---"] * len(COLUMNS)] + [_row(r) for r in records]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def measure(argv: list[str]) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="", help="write the records and the environment as one JSON file")
    p.add_argument("--quick", action="store_true", help="CIFAR-10 only, without remat (2 compiles)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    env, records, forward = common.jax_env(jax.devices()[:1]), [], {}
    for name, path, batch, dtype, remat in variants(args.quick):
        config = common.load_config(path, [f"model.dtype={dtype}", f"model.remat={remat}"])
        if name not in forward:  # the dtype does not change the count
            forward[name] = forward_flops_per_image(create_model(config), config) or 0.0
        result = analyze(config, batch)
        paper = common.is_paper_cifar10_model(config)
        records.append(common.emit(dict(
            bench="xla_analysis", model=name, config=path, **result, forward_flops_per_image=forward[name],
            train_over_forward=result["lowered_flops_per_image"] / forward[name] if forward[name] else None,
            paper_ratio=result["flops_per_image"] / common.PAPER_TRAIN_FLOPS_PER_IMAGE if paper else None,
            host=common.host_info())))
    total_s = time.perf_counter() - start
    print(format_table(records))
    print(f"{len(records)} compiles in {total_s:.0f} s on {env['device']['kind']} "
          f"(jax {env['versions']['jax']}, load {common.host_info()['loadavg']})")
    if args.out:
        with open(args.out, "w") as f:
            command = "python -m bench.xla_analysis" + (" --quick" if args.quick else "")
            json.dump(dict(env, command=command, total_s=round(total_s, 1), records=records), f, indent=1)
    return records


def main(argv: list[str] | None = None) -> list[dict]:
    return common.run_cli(measure, argv)


if __name__ == "__main__":
    main()
