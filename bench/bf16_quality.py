"""Does bfloat16 compute change training? The digits default trained in float32 and in bfloat16.

    python -m bench.bf16_quality [--config=configs/digits.py] [--steps=2000] [--plot=docs/benchmarks_bf16_loss.png]

Both runs use the trainer's own step (`train.make_train_step`: fp32 params, Adam state and
EMA; `model.dtype` only changes the network's compute) and the real data iterator, with
the same seed: the same batches, timesteps, noise and dropout, so the two curves differ
only by the compute precision. A third run, float32 with seed + 1, measures how much two
equally valid runs differ anyway (the yardstick for the bf16 difference).

One JSON line: per run the final training loss (mean of the last 10% of steps) and the
held-out loss of the final EMA params (L_simple on the test split, float32 compute,
fixed timesteps and noise: the same numbers for every run); between runs the max and
mean |difference| of the smoothed per-step loss (moving average over `--smooth` steps).
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
    p.add_argument("--config", default="configs/digits.py")
    p.add_argument("--steps", type=int, default=0, help="train steps (0: training.num_steps)")
    p.add_argument("--smooth", type=int, default=50, help="moving-average window of the curves")
    p.add_argument("--eval_draws", type=int, default=4, help="noise draws per test image")
    p.add_argument("--no_reference", action="store_true", help="skip the float32 seed+1 run")
    p.add_argument("--plot", default="", help="PNG path for the curves ('' = no plot)")
    p.add_argument("--tag", default="")
    args = p.parse_args(rest)
    args.overrides = overrides
    common.check_positive(smooth=args.smooth, eval_draws=args.eval_draws)
    if args.steps < 0:
        raise common.BenchError(f"--steps={args.steps} must be >= 0.")
    return args


def initial_state(config):
    """The trainer's initial TrainState of `config`, on the host (the same for every dtype)."""
    import jax

    from ddpm_jax import data, parallel, setup

    model = setup.create_model(config)
    state, _ = setup.create_train_state(config, model, data.example_shape(config.data), parallel.make_mesh())
    return jax.device_get(state)


def train_run(config, steps: int, host_state) -> dict:
    """Per-step losses and the final EMA params of `steps` trainer steps from `host_state`."""
    import jax
    import numpy as np

    from ddpm_jax import data, loop, parallel, setup, train, train_state

    mesh = parallel.make_mesh()
    model, sched = setup.create_model(config), setup.create_schedule(config)
    tx = train_state.create_optimizer(config)
    state = jax.device_put(host_state, parallel.replicated(mesh))
    step_fn = train.make_train_step(config, model, sched, tx, mesh)
    it = data.create_train_iterator(config.data, global_batch_size=int(config.training.batch_size),
                                    seed=int(config.seed))
    spd = int(config.training.steps_per_dispatch)
    losses, done = [], 0
    start = time.perf_counter()
    while done < steps:
        n = min(spd, steps - done)
        batches, _ = loop.next_dispatch(it, n, mesh)
        state, metrics = step_fn(state, batches)
        losses.append(metrics["loss"])
        done += n
    losses = np.concatenate([np.asarray(x) for x in jax.device_get(losses)])
    it.close()
    return dict(losses=losses, ema_params=state.ema_params, seconds=time.perf_counter() - start)


def heldout_loss_fn(config, draws: int, seed: int = 1234):
    """params -> L_simple on the eval split, float32 compute, fixed t and noise (one compile)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ddpm_jax import data, diffusion, setup

    cfg = config.copy_and_resolve_references()
    cfg.model.dtype = "float32"
    model, sched = setup.create_model(cfg), setup.create_schedule(cfg)
    x0 = np.concatenate([b["x"][b["mask"]] for b in data.create_eval_iterator(
        cfg.data, cfg.data.eval_split, batch_size=64)])
    x0 = jnp.asarray(np.tile(x0, (draws,) + (1,) * (x0.ndim - 1)))
    process = diffusion.GaussianDiffusion(sched, pred=str(cfg.diffusion.pred))  # L_simple

    @jax.jit
    def loss(params):
        fn = lambda x_t, t: model.apply({"params": params}, x_t, t, train=False)  # noqa: E731
        return jnp.mean(process.loss_simple(fn, x0, jax.random.key(seed)))

    return lambda params: float(loss(jax.device_get(params)))


def smooth(x, window: int):
    import numpy as np

    window = max(1, min(window, len(x)))
    return np.convolve(x, np.ones(window) / window, mode="valid")


def compare(a, b, window: int) -> dict:
    import numpy as np

    d = np.abs(smooth(a, window) - smooth(b, window))
    return dict(max_abs_diff_smoothed=float(d.max()), mean_abs_diff_smoothed=float(d.mean()))


def measure(args) -> list[dict]:
    import jax
    import numpy as np

    runs = {"float32": ("float32", 0), "bfloat16": ("bfloat16", 0)}
    if not args.no_reference:
        runs["float32_seed+1"] = ("float32", 1)
    base = common.load_config(args.config, args.overrides)
    steps = args.steps or int(base.training.num_steps)
    heldout = heldout_loss_fn(base, args.eval_draws)
    results, inits = {}, {}
    for name, (dtype, seed_offset) in runs.items():
        config = common.load_config(args.config, args.overrides)
        config.model.dtype = dtype
        config.seed = int(config.seed) + seed_offset
        if config.seed not in inits:
            inits[config.seed] = initial_state(config)
        r = train_run(config, steps, inits[config.seed])
        tail = max(1, len(r["losses"]) // 10)
        results[name] = dict(
            dtype=dtype, seed=int(config.seed), seconds=r["seconds"], losses=r["losses"],
            final_loss=float(np.mean(r["losses"][-tail:])), heldout_loss=heldout(r["ema_params"]),
            all_finite=bool(np.isfinite(r["losses"]).all()),
        )
    window = min(args.smooth, steps)
    record = dict(
        impl="ddpm_jax", bench="bf16_quality", **common.jax_env(), config=args.config,
        overrides=args.overrides, tag=args.tag, steps=steps, batch=int(config.training.batch_size),
        smooth_window=window,
        runs={k: {f: v for f, v in r.items() if f != "losses"} for k, r in results.items()},
        bf16_vs_fp32=compare(results["bfloat16"]["losses"], results["float32"]["losses"], window),
        curves_every=max(1, steps // 40),
    )
    record["curves"] = {k: [round(float(v), 5) for v in smooth(r["losses"], window)[::record["curves_every"]]]
                        for k, r in results.items()}
    if "float32_seed+1" in results:
        record["fp32_seed_vs_seed"] = compare(results["float32_seed+1"]["losses"],
                                              results["float32"]["losses"], window)
    if args.plot:
        plot(results, window, args.plot, title=f"{args.config}, {steps} steps, {jax.devices()[0].platform}")
        record["plot"] = args.plot
    return [common.emit(record)]


def plot(results: dict, window: int, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=80)
    styles = {"float32": ("C0", "-"), "bfloat16": ("C3", "--"), "float32_seed+1": ("0.6", ":")}
    for name, r in results.items():
        y = smooth(r["losses"], window)
        color, style = styles.get(name, ("k", "-"))
        ax.plot(range(window, window + len(y)), y, style, color=color, lw=1.4, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss ({window}-step mean)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    return common.run_cli(lambda args: measure(parse_args(args)), argv)


if __name__ == "__main__":
    main()
