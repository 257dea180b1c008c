"""Training throughput of the real trainer: `train.make_train_step` fed by the real data pipeline.

    python -m bench.train_throughput --config=configs/cifar10.py [--config.model.dtype=bfloat16]
        [--config.model.attention_impl=cudnn] [--config.training.steps_per_dispatch=4]
        [--config.data.prefetch=4] [--config.model.remat=True] [--batch=128] [--modes=step,train,data]

The step is the trainer's own (EMA, gradient clipping, donated state, `lax.scan` over
`steps_per_dispatch` steps), built with `setup.create_train_state` / `make_train_step`,
and fed exactly as the training loop (`loop.train`) feeds it: `data.create_train_iterator`
(grain), `steps_per_dispatch` host batches stacked and made global by
`parallel.host_to_global`, `data.prefetch` dispatches queued ahead of the step, under the XLA:CPU
flags the entry point sets for training (`ddpm_jax.cpu_flags`).

Measurements (one JSON line each):
  train_step  the compiled step on a few device-resident batches (no input pipeline): the ceiling;
  train       the same step fed by the pipeline, as the trainer runs it;
  data        the host iterator alone (batches/s a trainer could at most consume).
Each is the median of `--windows` timing windows after `--warmup` steps; every window
starts and ends with `jax.block_until_ready` on the train state and metrics.
FLOPs: XLA's cost analysis of the compiled one-step program (loops are counted once by
XLA, so with steps_per_dispatch > 1 the one-step program is lowered separately), and the
paper-model constant 37.3 GFLOPs/image for reference when the model is the paper's U-Net.

Data: `--data=auto` uses the config's source, except a tfds source (CIFAR-10 needs a
prepared dataset and tensorflow-datasets), which becomes the labelled synthetic stand-in:
`data.source=image` with one scikit-image picture repeated 50,000 times (the size of
CIFAR-10's train split) at the config's resolution, through the same grain pipeline
(shuffle, flip, uint8 -> [-1, 1]).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

if __package__ in (None, ""):  # `python bench/train_throughput.py`: make `bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common

MODES = ("step", "train", "data")
SYNTHETIC_PICTURE = "astronaut"
SYNTHETIC_EXAMPLES = 50_000


def parse_args(argv):
    rest, overrides = common.split_overrides(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/cifar10.py")
    p.add_argument("--data", default="auto", choices=("auto", "config", "synthetic"))
    p.add_argument("--batch", type=int, default=0, help="global batch (0: training.batch_size)")
    p.add_argument("--modes", default="step,train,data", help=f"comma list of {MODES}")
    p.add_argument("--warmup", type=int, default=10, help="steps run after compiling, before timing")
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--steps_per_window", type=int, default=20)
    p.add_argument("--num_devices", type=int, default=0, help="first N devices (0: all)")
    p.add_argument("--peak_flops", type=float, default=0.0, help="dense bf16 peak FLOP/s per device")
    p.add_argument("--matmul_precision", default="", help="jax_default_matmul_precision ('' = leave)")
    p.add_argument("--prng_impl", default="", help="jax_default_prng_impl, e.g. unsafe_rbg ('' = leave); "
                   "the step's dropout and noise keys follow it")
    p.add_argument("--tag", default="", help="free text stored with the records")
    args = p.parse_args(rest)
    args.overrides = overrides
    args.modes = [m for m in args.modes.split(",") if m]
    bad = sorted(set(args.modes) - set(MODES))
    if bad or not args.modes:
        raise common.BenchError(f"--modes={','.join(args.modes)}: use a comma list of {', '.join(MODES)}.")
    common.check_positive(windows=args.windows, steps_per_window=args.steps_per_window)
    if args.warmup < 0:
        raise common.BenchError(f"--warmup={args.warmup} must be >= 0.")
    return args


def configure(args):
    """The overridden config, with the batch and the data source resolved; and the data label."""
    config = common.load_config(args.config, args.overrides)
    if args.batch:
        config.training.batch_size = int(args.batch)
    label = f"config: {config.data.source}"
    use_synthetic = args.data == "synthetic" or (args.data == "auto" and config.data.source == "tfds")
    if use_synthetic:
        name = config.data.tfds_name or config.data.source
        config.data.source, config.data.path = "image", SYNTHETIC_PICTURE
        config.data.repeat_single_image = SYNTHETIC_EXAMPLES
        label = (f"synthetic stand-in for {name}: skimage '{SYNTHETIC_PICTURE}' x{SYNTHETIC_EXAMPLES} at "
                 f"{config.data.image_size}x{config.data.image_size}x{config.data.num_channels}, "
                 "through the real grain pipeline")
    common.check_whole_dispatches(args.steps_per_window, int(config.training.steps_per_dispatch))
    return config, label


def measure(args) -> list[dict]:
    from ddpm_jax import cpu_flags

    cpu_flags.apply("train")  # the entry point's training flags, before JAX starts its backend
    import jax
    import numpy as np

    if args.matmul_precision:
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    if args.prng_impl:
        jax.config.update("jax_default_prng_impl", args.prng_impl)
    from ddpm_jax import checks, data, loop, parallel, run_meta, setup, train

    config, data_label = configure(args)
    devices = jax.devices()[: args.num_devices] if args.num_devices else jax.devices()
    mesh = parallel.make_mesh(devices)
    checks.validate_config(config, mesh)
    batch = int(config.training.batch_size)
    spd = int(config.training.steps_per_dispatch)
    prefetch = max(int(config.data.prefetch), 1)
    shape = data.example_shape(config.data)
    model, sched = setup.create_model(config), setup.create_schedule(config)
    state, tx = setup.create_train_state(config, model, shape, mesh)
    num_params = int(sum(x.size for x in jax.tree.leaves(state.params)))
    step_fn = train.make_train_step(config, model, sched, tx, mesh)
    it = data.create_train_iterator(config.data, global_batch_size=batch, seed=int(config.seed))

    def next_dispatch():  # the loop's own stacking + host_to_global
        return loop.next_dispatch(it, spd, mesh)[0]

    first = next_dispatch()
    start = time.perf_counter()
    compiled = step_fn.lower(state, first).compile()
    compile_s = time.perf_counter() - start
    flops_per_image, flops_source = _flops_per_image(compiled, step_fn, state, first, spd, batch, mesh)
    peak, peak_source = common.peak_flops(devices[0].device_kind, args.peak_flops)
    paper = common.PAPER_TRAIN_FLOPS_PER_IMAGE if common.is_paper_cifar10_model(config) else None
    name, kwargs = run_meta.model_spec(config)
    base = dict(
        impl="ddpm_jax", **common.jax_env(devices), xla_flags=os.environ.get("XLA_FLAGS", ""),
        config=args.config, overrides=args.overrides,
        tag=args.tag, model=dict(name=name, num_params=num_params, **kwargs), data=data_label,
        batch=batch, image_shape=list(shape), dtype=str(config.model.dtype),
        attention_impl=str(config.model.attention_impl), remat=bool(config.model.remat),
        steps_per_dispatch=spd, prefetch=prefetch, matmul_precision=args.matmul_precision or "default",
        prng_impl=str(jax.config.jax_default_prng_impl),
        compile_s=round(compile_s, 3), xla_flops_per_image=flops_per_image, xla_flops_source=flops_source,
        paper_flops_per_image=paper, peak_flops_per_device=peak, peak_source=peak_source,
    )
    holder = {"state": state, "metrics": None}
    dispatches = args.steps_per_window // spd

    def sync():
        jax.block_until_ready((holder["state"], holder["metrics"]))

    def run_step(batches):
        holder["state"], holder["metrics"] = compiled(holder["state"], batches)

    records = []
    for mode in args.modes:
        if mode == "data":
            records.append(common.emit(dict(base, bench="data", host=common.host_info(),
                                            **_time_data(args, it, batch))))
            continue
        if mode == "step":  # a few device-resident dispatches, rotated: no input pipeline at all
            fixed = [first] + [next_dispatch() for _ in range(3)]
            feed = lambda i: fixed[i % len(fixed)]  # noqa: E731
        else:  # as loop.train: `prefetch` dispatches queued ahead of the step
            queue = collections.deque()

            def feed(i):
                while len(queue) < prefetch:
                    queue.append(next_dispatch())
                return queue.popleft()

        for i in range(-(-args.warmup // spd)):
            run_step(feed(i))
        times = common.run_windows(lambda i: run_step(feed(i)), sync, windows=args.windows,
                                   steps_per_window=dispatches, clock=time.perf_counter)
        metrics = jax.device_get(holder["metrics"])
        steps_per_sec = args.steps_per_window / common.median(times)
        images_per_sec = steps_per_sec * batch
        records.append(common.emit(dict(
            base, bench="train_step" if mode == "step" else "train",
            windows_s=[round(t, 4) for t in times], window_steps=args.steps_per_window,
            warmup_steps=args.warmup, steps_per_sec=steps_per_sec, images_per_sec=images_per_sec,
            step_ms=1e3 / steps_per_sec, window_spread=common.spread(times),
            mfu_xla=common.mfu(flops_per_image, images_per_sec, peak, len(devices)),
            mfu_paper=common.mfu(paper, images_per_sec, peak, len(devices)),
            mfu_xla_vs_tf32_peak=_tf32_mfu(config, flops_per_image, images_per_sec, devices),
            last_loss=float(np.asarray(metrics["loss"])[-1]),
            all_finite=bool(np.all(np.asarray(metrics["finite"]))), host=common.host_info(),
            memory=common.device_memory(devices[0]),
        )))
    it.close()
    return records


def _flops_per_image(compiled, step_fn, state, batches, spd, batch, mesh):
    """(XLA FLOPs per trained image, where the count came from); None when XLA gives none."""
    import jax

    devices = len(mesh.devices.flat)
    if spd == 1:  # the SPMD-partitioned program: its cost is per device
        flops, source = common.xla_flops(compiled.cost_analysis()), "compiled step"
        flops = None if flops is None else flops * devices
    else:  # XLA counts a while loop's body once: lower a one-step program (global, unpartitioned)
        one = jax.tree.map(lambda b: b[:1], batches)
        flops, source = common.xla_flops(step_fn.lower(state, one).cost_analysis()), "lowered 1-step HLO"
    if flops is None:
        return None, "unavailable"
    return flops / batch, source


def _tf32_mfu(config, flops_per_image, images_per_sec, devices):
    if str(config.model.dtype) != "float32":
        return None
    return common.mfu(flops_per_image, images_per_sec, common.tf32_peak(devices[0].device_kind), len(devices))


def _time_data(args, it, batch) -> dict:
    """Host batches/s of the grain iterator alone (no device work)."""
    for _ in range(args.warmup):
        next(it)
    times = []
    for _ in range(args.windows):
        start = time.perf_counter()
        for _ in range(args.steps_per_window):
            next(it)
        times.append(time.perf_counter() - start)
    batches_per_sec = args.steps_per_window / common.median(times)
    return dict(windows_s=[round(t, 4) for t in times], window_steps=args.steps_per_window,
                batches_per_sec=batches_per_sec, images_per_sec=batches_per_sec * batch,
                window_spread=common.spread(times))


def main(argv=None) -> list[dict]:
    return common.run_cli(lambda args: measure(parse_args(args)), argv)


if __name__ == "__main__":
    main()
