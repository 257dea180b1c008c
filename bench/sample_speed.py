"""Sampling time of the real sampler: `sampler.Sampler` (one jitted `lax.scan` over the steps).

    python -m bench.sample_speed --config=configs/cifar10.py --method=ddpm --batch=256
    python -m bench.sample_speed --config=configs/cifar10.py --method=ddpm,ddim --steps=50 --batch=256
        [--config.model.dtype=bfloat16] [--config.model.attention_impl=cudnn]

One JSON line per method (a comma list: the network and weights are built once), timing runs of the whole chain on `--batch` images: the first call (compile +
run) and the median of `--runs` further calls, each ended by `jax.block_until_ready`;
compile_s = first call - median. Weights: random, none zero (the init zeroes the output
layers, which would make the network's output exactly 0): kernels N(0, 1/fan_in),
GroupNorm scales 1 + N(0, 0.01), biases N(0, 0.01); drawn with NumPy, so no
initialiser has to be compiled. FLOPs: XLA's cost analysis of one network
call on the batch (lowered, unpartitioned) times the number of steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common


def parse_args(argv):
    rest, overrides = common.split_overrides(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/cifar10.py")
    p.add_argument("--method", default="ddpm", help="ddpm, ddim, or a comma list of them")
    p.add_argument("--steps", type=int, default=0, help="ddim: steps (0: its default, 50); ddpm: all T")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--runs", type=int, default=3,
                   help="timed calls after the first (compiling) one; 0: the first call only")
    p.add_argument("--num_devices", type=int, default=0)
    p.add_argument("--peak_flops", type=float, default=0.0)
    p.add_argument("--matmul_precision", default="")
    p.add_argument("--tag", default="")
    args = p.parse_args(rest)
    args.overrides = overrides
    common.check_positive(batch=args.batch)
    if args.runs < 0:
        raise common.BenchError(f"--runs={args.runs}: use 0 (time the first, compiling call only) or more.")
    args.methods = common.sampling_methods(args.method, args.steps)
    return args


def measure(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    if args.matmul_precision:
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    from ddpm_jax import data, parallel, run_meta, sampler, setup

    config = common.load_config(args.config, args.overrides)
    devices = jax.devices()[: args.num_devices] if args.num_devices else jax.devices()
    mesh = parallel.make_mesh(devices)
    parallel.check_batch_size(args.batch, mesh, what="--batch")
    shape = data.example_shape(config.data)
    model, sched = setup.create_model(config), setup.create_schedule(config)
    params = random_params(model, shape, mesh)
    apply_fn = setup.model_apply_fn(model)
    indices = np.arange(args.batch, dtype=np.int32)
    x = jnp.zeros((args.batch, *shape), jnp.float32)
    t = jnp.zeros((args.batch,), jnp.int32)
    fwd = common.xla_flops(jax.jit(apply_fn).lower(params, x, t).cost_analysis())
    fwd_per_image = fwd / args.batch if fwd else None
    peak, peak_source = common.peak_flops(devices[0].device_kind, args.peak_flops)
    paper = common.PAPER_FORWARD_FLOPS_PER_IMAGE if common.is_paper_cifar10_model(config) else None
    name, kwargs = run_meta.model_spec(config)
    records = []
    for method in args.methods:
        config.sampling.method, config.sampling.steps = method, int(args.steps) if method == "ddim" else 0
        options = setup.sampler_options(config)
        steps = int(options["num_steps"])
        sampler_fn = sampler.Sampler(apply_fn, setup.create_diffusion(config, sched), mesh, shape=shape, seed=0,
                                     **options)
        start = time.perf_counter()
        out = jax.block_until_ready(sampler_fn(params, indices))
        first_s = time.perf_counter() - start
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            out = jax.block_until_ready(sampler_fn(params, indices))
            times.append(time.perf_counter() - start)
        samples = np.asarray(out.samples)
        # --runs=0 (a long CPU chain timed once): the first call stands for the run.
        median_s = common.median(times) if times else None
        images_per_sec = args.batch / (median_s or first_s)
        records.append(common.emit(dict(
            impl="ddpm_jax", bench="sample", **common.jax_env(devices), config=args.config,
            overrides=args.overrides, tag=args.tag, model=dict(name=name, **kwargs),
            method=method, num_steps=steps, var_type=str(config.diffusion.var_type), batch=args.batch,
            image_shape=list(shape), dtype=str(config.model.dtype),
            attention_impl=str(config.model.attention_impl), matmul_precision=args.matmul_precision or "default",
            first_call_s=first_s, compile_s=None if median_s is None else max(first_s - median_s, 0.0),
            runs_s=[round(s, 4) for s in times], median_s=median_s, images_per_sec=images_per_sec,
            ms_per_step=1e3 * (median_s or first_s) / steps,
            run_spread=common.spread(times) if times else None, xla_forward_flops_per_image=fwd_per_image,
            paper_forward_flops_per_image=paper, peak_flops_per_device=peak, peak_source=peak_source,
            mfu_xla=common.mfu(fwd_per_image and fwd_per_image * steps, images_per_sec, peak, len(devices)),
            mfu_paper=common.mfu(paper and paper * steps, images_per_sec, peak, len(devices)),
            all_finite=bool(np.isfinite(samples).all()),
            sample_range=[float(samples.min()), float(samples.max())],
            memory=common.device_memory(devices[0]),
        )))
    return records


def random_params(model, shape: tuple, mesh, seed: int = 0):
    """Random weights with the model's param shapes (no zeros), replicated on `mesh`."""
    import jax
    import numpy as np

    from ddpm_jax import parallel, setup

    shapes = setup.abstract_params(model, shape, mesh)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        z = rng.standard_normal(leaf.shape).astype(np.float32)
        if len(leaf.shape) > 1:  # conv / dense kernel: unit-variance outputs
            return z / np.sqrt(np.prod(leaf.shape[:-1]))
        return (1.0 + 0.1 * z) if jax.tree_util.keystr(path).endswith("['scale']") else 0.1 * z

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    return jax.device_put(params, parallel.replicated(mesh))


def main(argv=None) -> list[dict]:
    return common.run_cli(lambda args: measure(parse_args(args)), argv)


if __name__ == "__main__":
    main()
