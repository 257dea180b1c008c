"""Sample quality against the EMA width σ_rel, from one training run's post-hoc EMA snapshots.

    python -m bench.phema_sweep --config=configs/digits.py --workdir=workdirs/digits_phema \
        [--sigma_rels=0.02,0.03,0.04,0.05,0.06,0.08,0.1,0.13,0.16,0.2] [--seeds=0] \
        [--out=phema_sweep.jsonl] [--table=phema_sweep.md] [--plot=phema_sweep.png] [--holdout=0.07] [--config.X=...]

The run must have been trained with `ema.sigma_rels` and `ema.snapshot_every` (docs/post_hoc_ema.md).
`--mode=phema` (`modes.phema.run`) reconstructs every σ_rel of `--sigma_rels` into
`<ema.out_workdir or workdir/phema>/sigma_rel_<σ>` (existing reconstructions of the same snapshots are
kept), then the project's `--mode=eval` (`modes.evaluate.run_eval`, the metric of eval.metric: the
classifier features' Fréchet distance, precision and recall beside their real-vs-real floors for
digits / MNIST, FID / IS where configured) scores each one and the run's own fixed-decay EMA
(optim.ema_decay), with every sampling seed of `--seeds` (their spread is the noise a difference
must exceed). One JSON line per (σ_rel, seed) on stdout and `--out`, a markdown table (`--table`)
and a plot of quality against σ_rel (`--plot`) marking the fixed decay at its equivalent σ_rel
(`post_hoc_ema.sigma_rel_of_decay`: the std √β/(1 − β) of its weights over the steps trained).

`--holdout=σ`: the run also tracked σ directly (one of its `ema.sigma_rels`); σ is reconstructed from
the other profiles' snapshots alone and compared with the tracked one at the last snapshot (one JSON
line: the relative L2 error of the params, and the error over the distance between the other
profiles, i.e. how much of their difference the reconstruction misses).
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

DEFAULT_SIGMA_RELS = "0.02,0.03,0.04,0.05,0.06,0.08,0.1,0.13,0.16,0.2"
FIXED = "fixed"  # the `ema` of the run's own fixed-decay EMA row


def quality(result: dict) -> dict:
    """The numbers of a `run_eval` result that the table and plot show."""
    if result.get("metric") == "inception":
        return {k: result.get(k) for k in ("fid", "inception_score")}
    return {k: (result.get("metrics") or {}).get(k) for k in ("fd", "precision", "recall")}


def evaluate(config, workdir: str, seed: int, row: dict) -> dict:
    """`row` with the `--mode=eval` result of `workdir`'s checkpoint sampled with `seed`."""
    from ddpm_jax.modes import evaluate as evaluate_mode  # noqa: PLC0415

    c = copy.deepcopy(config)
    c.sampling.seed = int(seed)
    start = time.perf_counter()
    result = evaluate_mode.run_eval(c, workdir)
    return dict(row, seed=int(seed), metric=result.get("metric"), step=result.get("step"), **quality(result),
                floor=result.get("floor"), num_samples=result.get("num_samples"),
                eval_seconds=time.perf_counter() - start, workdir=workdir, host=common.host_info(),
                time=common.utc_now())


def table(records: list[dict]) -> str:
    """A markdown table: one row per (EMA, seed), the quality columns of the metric."""
    keys = [k for k in ("fd", "precision", "recall", "fid", "inception_score") if k in records[0]]
    lines = ["| EMA | σ_rel | γ | fit residual | seed | " + " | ".join(keys) + " |",
             "|" + "---|" * (5 + len(keys))]
    for r in records:
        cells = [r["ema"], f"{r['sigma_rel']:.4g}", "" if r["gamma"] is None else f"{r['gamma']:.2f}",
                 "" if r["residual"] is None else f"{r['residual']:.2%}", str(r["seed"])]
        cells += ["" if r.get(k) is None else f"{r[k]:.4g}" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    floor = records[0].get("floor") or {}
    if floor:
        lines.append("\nFloor (real vs real): " + ", ".join(f"{k} {floor[k]:.4g}" for k in keys if k in floor))
    return "\n".join(lines) + "\n"


def plot(path: str, records: list[dict]) -> None:
    """Each quality number against σ_rel (log x), the fixed decay marked at its equivalent σ_rel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    from ddpm_jax import files  # noqa: PLC0415

    keys = [k for k in ("fd", "precision", "recall", "fid") if k in records[0]]
    fig = Figure(figsize=(4.2 * len(keys), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    post = [r for r in records if r["ema"] != FIXED]
    fixed = [r for r in records if r["ema"] == FIXED]
    for ax, key in zip(axes, keys):
        for i, seed in enumerate(dict.fromkeys(r["seed"] for r in post)):
            rows = sorted((r for r in post if r["seed"] == seed), key=lambda r: r["sigma_rel"])
            ax.plot([r["sigma_rel"] for r in rows], [r[key] for r in rows], marker="o", color=f"C{i}",
                    label=f"post-hoc EMA, seed {seed}")
        for r in fixed:
            ax.plot([r["sigma_rel"]], [r[key]], "*", color="k", markersize=11)
        if fixed:
            ax.axvline(fixed[0]["sigma_rel"], color="k", ls=":", label=f"fixed decay {fixed[0]['decay']:g}")
        floor = (records[0].get("floor") or {}).get(key)
        if floor is not None:
            ax.axhline(floor, color="gray", ls="--", label="floor (real vs real)")
        ax.set_xscale("log")
        ax.set(xlabel="σ_rel", title={"fd": "Fréchet distance (classifier features)"}.get(key, key))
    axes[0].legend(fontsize=7)
    files.write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=100))


def holdout_error(config, workdir: str, sigma_rel: float) -> dict:
    """The reconstruction of a tracked σ_rel from the other profiles' snapshots, against the tracked one."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from ddpm_jax import post_hoc_ema, setup  # noqa: PLC0415
    from ddpm_jax.modes import phema  # noqa: PLC0415

    with phema.open_snapshots(workdir) as snaps:
        steps = snaps.all_steps()
        metas = [snaps.read_meta(s) for s in steps]
        rows = [(s, g, k) for s, m in zip(steps, metas) for k, g in enumerate(m["gammas"])]
        target = post_hoc_ema.gamma_from_sigma_rel(sigma_rel)
        held = [abs(post_hoc_ema.sigma_rel_from_gamma(g) - sigma_rel) < 1e-6 for _, g, _ in rows]
        if not any(held):
            raise common.BenchError(f"--holdout={sigma_rel:g} is not one of the run's ema.sigma_rels.")
        kept = [i for i, h in enumerate(held) if not h]
        x, residual = post_hoc_ema.solve_weights([rows[i][0] for i in kept], [rows[i][1] for i in kept], steps[-1],
                                                 [target])
        weights = np.zeros((len(rows), 3))
        weights[kept, 0] = x[:, 0]
        weights[max(i for i, h in enumerate(held) if h), 1] = 1.0  # the tracked profile at the last snapshot
        others = [i for i in kept if rows[i][0] == steps[-1]]
        if len(others) > 1:  # two other profiles' difference: the scale of what the EMA width changes
            weights[others[0], 2], weights[others[-1], 2] = 1.0, -1.0
        run = setup.create_run(config)
        made, tracked, between = (jax.device_get(t) for t in phema.weighted_sums(
            snaps, steps, metas, setup.abstract_params(run.model, run.shape, run.mesh), weights))

    def norm(tree) -> float:
        return float(np.sqrt(sum(np.sum(np.square(np.asarray(v, np.float64))) for v in jax.tree.leaves(tree))))

    error = norm(jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, made, tracked))
    return dict(holdout=sigma_rel, step=steps[-1], fit_residual=float(residual[0]), relative_error=error / norm(tracked),
                error_over_profile_difference=error / norm(between) if len(others) > 1 else None,
                profiles=[post_hoc_ema.sigma_rel_from_gamma(g) for g in metas[-1]["gammas"]])


def measure(argv: list[str]) -> list[dict]:
    rest, overrides = common.split_overrides(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/digits.py")
    p.add_argument("--workdir", required=True)
    p.add_argument("--sigma_rels", default=DEFAULT_SIGMA_RELS)
    p.add_argument("--seeds", default="0", help="sampling seeds every row is evaluated with")
    p.add_argument("--out", default="", help="also append the JSON lines to this file")
    p.add_argument("--table", default="", help="write the markdown table here")
    p.add_argument("--plot", default="")
    p.add_argument("--holdout", type=float, default=0.0, help="a tracked σ_rel to reconstruct without its snapshots")
    args = p.parse_args(rest)
    config = common.load_config(args.config, overrides)
    if args.holdout:
        return [common.emit(holdout_error(config, args.workdir, args.holdout))]
    config.ema.sigma_rel = args.sigma_rels

    from ddpm_jax import post_hoc_ema  # noqa: PLC0415
    from ddpm_jax.modes import phema  # noqa: PLC0415

    try:
        built = phema.run(config, args.workdir)
    except (ValueError, FileNotFoundError, FileExistsError) as err:  # the mode's one-line refusals
        raise common.BenchError(str(err)) from err
    rows = [dict(ema="post-hoc", sigma_rel=r["sigma_rel"], gamma=r["gamma"], residual=r["residual"],
                 snapshot_steps=r["snapshot_steps"], source=r["workdir"]) for r in built]
    step = rows[0]["snapshot_steps"][-1]  # the fixed-decay EMA of the run's checkpoint at its last snapshot
    decay = float(config.optim.ema_decay)
    rows.append(dict(ema=FIXED, decay=decay, sigma_rel=post_hoc_ema.sigma_rel_of_decay(decay, step), gamma=None,
                     residual=None, source=args.workdir))
    records = []
    for row in rows:
        for seed in (int(s) for s in args.seeds.split(",")):
            records.append(common.emit(evaluate(config, row["source"], seed, row)))
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(records[-1], default=str) + "\n")
    if args.table:
        with open(args.table, "w") as f:
            f.write(table(records))
    if args.plot:
        plot(args.plot, records)
    return records


def main(argv=None) -> int:
    common.run_cli(measure, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
