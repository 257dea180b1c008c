"""Sample quality per network call: every sampler of a trained run through `--mode=eval`, timed.

    python -m bench.nfe_quality --config=configs/digits.py --workdir=workdirs/digits_nfe \
        [--samplers=ddpm,ddim:10,dpmpp_2m:20,heun:10] [--spread=dpmpp_2m:20] [--seeds=0,1] [--label=teacher] \
        [--time_samples=297] [--out=nfe.jsonl] [--plot=docs/figures/nfe_quality_digits.png] [--config.X=...]
    python -m bench.nfe_quality --plot=nfe.png --from=nfe.jsonl        # redraw the plot of earlier runs

A `{steps}` in --workdir is each sampler's step count: distilled students, one workdir per
step count (--config=configs/digits_distill.py --workdir=workdirs/digits_pd{steps}
--samplers=ddim:4:trailing,... --label=progressive).

For each sampler (`method[:steps]`; heun's steps N are 2N − 1 network calls) this runs the
project's own `--mode=eval` (`modes.evaluate.run_eval`: eval.num_samples samples, the
metric of eval.metric, e.g. the classifier features' Fréchet distance and precision /
recall beside their real-vs-real floors; existing sample chunks are reused) and then times
the compiled sampler on `--time_samples` images in batches of min(eval.batch_size,
time_samples) (one warm-up call of the same batch first, so compilation is not counted;
jax.block_until_ready ends each call), reported per 1,000 images. The
samplers of `--spread` are evaluated again with every seed of `--seeds`: their spread
is the run-to-run noise a difference must exceed. One JSON line per (sampler, seed) on
stdout (and `--out`) with the load average (a shared CPU is slow for reasons that are not ours), and
a plot of the Fréchet distance and precision / recall against NFE with the floors, one line
per `--label` (default: the sampling method).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common

DEFAULT_SAMPLERS = ("ddpm,ddim:10,ddim:20,ddim:50,ddim:100,dpmpp_2m:5,dpmpp_2m:10,dpmpp_2m:15,dpmpp_2m:20,"
                    "dpmpp_3m:5,dpmpp_3m:10,dpmpp_3m:15,dpmpp_3m:20,sde_dpmpp_2m:20,heun:5,heun:10,heun:18")


def parse_samplers(text: str) -> list[tuple]:
    """'ddpm,ddim:10,heun:5:time_uniform' -> [("ddpm", None, ""), ("ddim", 10, ""), ("heun", 5, "time_uniform")]
    (the optional third part is its sampling.spacing)."""
    out = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        method, _, rest = item.partition(":")
        steps, _, spacing = rest.partition(":")
        if method != "ddpm" and not steps:
            raise common.BenchError(f"--samplers item {item!r} needs :steps (e.g. {method}:20); only ddpm runs all T.")
        out.append((method, int(steps) if steps else None, spacing))
    return out


def sampler_config(config, method: str, steps: int | None, seed: int, spacing: str = ""):
    """A copy of `config` sampling with `method` over `steps` (None: every step, ddpm) and, if given,
    `spacing` (sampling.steps, sampling.spacing)."""
    c = copy.deepcopy(config)
    c.sampling.method, c.sampling.seed = method, int(seed)
    c.sampling.steps = int(steps or 0)
    if spacing:
        c.sampling.spacing = spacing
    return c


def nfe(method: str, steps: int | None, num_timesteps: int) -> int:
    from ddpm_jax import sampling  # noqa: PLC0415

    return sampling.METHODS[method].nfe(int(steps or num_timesteps))


def time_sampler(config, workdir: str, num_samples: int) -> dict:
    """Seconds for `num_samples` images from the compiled sampler (a warm-up call not counted)."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from ddpm_jax import setup  # noqa: PLC0415

    loaded = setup.load_run(config, workdir)
    sampler = setup.make_sampler(loaded, config)
    batch = min(int(config.eval.batch_size), num_samples)
    jax.block_until_ready(sampler(loaded.params, np.arange(batch)).samples)  # compile + one run
    start = time.perf_counter()
    for lo in range(0, num_samples, batch):
        jax.block_until_ready(sampler(loaded.params, np.arange(lo, lo + batch)).samples)
    seconds = time.perf_counter() - start
    done = -(-num_samples // batch) * batch
    return dict(seconds_per_1000=seconds * 1000.0 / done, timed_samples=done, batch=batch)


def lines(records: list[dict]) -> dict[str, list[dict]]:
    """The plot's lines: per label (else method), the first seed's records by NFE, the first record
    at each NFE (another spacing at the same NFE is left out)."""
    out: dict[str, dict[int, dict]] = {}
    for r in records:
        if r["seed"] == records[0]["seed"]:
            out.setdefault(r.get("label") or r["method"], {}).setdefault(r["nfe"], r)
    return {label: [by_nfe[n] for n in sorted(by_nfe)] for label, by_nfe in out.items()}


def plot(path: str, records: list[dict]) -> None:
    """FD (log y) and precision / recall against NFE (log x), one line per label, floors dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    from ddpm_jax import files  # noqa: PLC0415

    fig = Figure(figsize=(12, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, name in zip(axes, ("fd", "precision", "recall")):
        for i, (label, rows) in enumerate(lines(records).items()):
            style = dict(marker="o", color=f"C{i}", label=label)
            ax.plot([r["nfe"] for r in rows], [r["metrics"][name] for r in rows], **style)
        others = [r for r in records if r["seed"] != records[0]["seed"]]
        if others:
            ax.plot([r["nfe"] for r in others], [r["metrics"][name] for r in others], "x", color="k",
                    label="other seeds")
        ax.axhline(records[0]["floor"][name], color="gray", ls="--", label="floor (real vs real)")
        ax.set_xscale("log")
        if name == "fd":  # few-call samplers are orders of magnitude off
            ax.set_yscale("log")
        ax.set(xlabel="network calls (NFE)", title={"fd": "Fréchet distance (classifier features)"}.get(name, name))
    axes[0].legend(fontsize=7)
    files.write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=100))


def main(argv=None) -> int:
    rest, overrides = common.split_overrides(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/digits.py")
    p.add_argument("--workdir", default="", help="the run; {steps} is replaced by each sampler's steps")
    p.add_argument("--samplers", default=DEFAULT_SAMPLERS)
    p.add_argument("--spread", default="", help="samplers evaluated with every seed of --seeds")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--time_samples", type=int, default=297, help="images timed per sampler (0: no timing)")
    p.add_argument("--out", default="", help="also append the JSON lines to this file")
    p.add_argument("--plot", default="")
    p.add_argument("--label", default="", help="the records' line in the plot (default: the sampling method)")
    p.add_argument("--from", dest="from_files", default="", help="comma-separated JSON lines files to plot")
    args = p.parse_args(rest)
    if args.from_files:
        plot(args.plot, [json.loads(line) for path in args.from_files.split(",") for line in open(path)])
        return 0
    if not args.workdir:
        raise common.BenchError("--workdir is required (or --from=FILE.jsonl --plot=PNG to redraw a plot).")
    config = common.load_config(args.config, overrides)

    from ddpm_jax import setup  # noqa: PLC0415
    from ddpm_jax.modes import evaluate  # noqa: PLC0415

    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(m, n, sp, seeds[0]) for m, n, sp in parse_samplers(args.samplers)]
    jobs += [(m, n, sp, s) for m, n, sp in parse_samplers(args.spread) for s in seeds[1:]]
    records = []
    for method, steps, spacing, seed in jobs:
        c = sampler_config(config, method, steps, seed, spacing)
        workdir = args.workdir.format(steps=steps)
        start = time.perf_counter()
        result = evaluate.run_eval(c, workdir)
        record = dict(method=method, steps=steps, seed=seed, label=args.label or method, workdir=workdir,
                      tag=setup.sampler_tag(c),
                      nfe=nfe(method, steps, int(config.diffusion.num_timesteps)),
                      num_samples=result["num_samples"], metrics=result.get("metrics"),
                      fid=result.get("fid"), inception_score=result.get("inception_score"),
                      generation=result.get("generation"),
                      floor=result.get("floor"), ratio=result.get("ratio"), eval_seconds=time.perf_counter() - start,
                      host=common.host_info(), time=common.utc_now())
        if args.time_samples and seed == seeds[0]:
            record.update(time_sampler(c, workdir, args.time_samples))
        records.append(common.emit(record))
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(records[-1], default=str) + "\n")
    if args.plot and records and records[0].get("metrics"):
        plot(args.plot, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
