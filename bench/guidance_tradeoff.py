"""Classifier-free guidance's trade-off: label accuracy against diversity, one `--mode=eval` per w.

    python -m bench.guidance_tradeoff --config=configs/digits_cond.py --workdir=workdirs/digits_cond \
        [--scales=0,0.5,1,2,4] [--plot=docs/figures/guidance_tradeoff_digits.png] [--config.X=...]

For each guidance scale w this runs the project's own `--mode=eval` with eval.metric=classifier
(`modes.evaluate.run_eval`; sample chunks already in the workdir are reused, so a rerun only
reads results), then prints one JSON line per w (label accuracy, and the Fréchet distance,
precision and recall in the classifier's features each beside its real-vs-real floor, with
the load average) and a markdown table, and draws the trade-off: accuracy against w, and the
distance and precision / recall against w with their floors.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common


def record(w: float, results: dict, seconds: float) -> dict:
    """The numbers of one eval: accuracy, fd (and its ratio to the floor), precision, recall, floors."""
    m, f, cond = results["metrics"], results["floor"], results["conditional"]
    return dict(guidance_scale=w, label_accuracy=cond["generated"]["accuracy"],
                real_accuracy=cond["real"]["accuracy"], per_class=cond["generated"]["per_class"],
                fd=m["fd"], fd_floor=f["fd"], fd_x_floor=results["ratio"]["fd"],
                precision=m["precision"], precision_floor=f["precision"],
                recall=m["recall"], recall_floor=f["recall"], num_samples=results["num_samples"],
                step=results["step"], sampler=results["sampler"], seconds=seconds,
                load_average=os.getloadavg())


def markdown(records: list[dict]) -> str:
    lines = ["| w | label accuracy | FD (x floor) | precision (floor) | recall (floor) |",
             "|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['guidance_scale']:g} | {r['label_accuracy']:.3f} | {r['fd']:.3g} "
                     f"({r['fd_x_floor']:.2f}x) | {r['precision']:.3f} ({r['precision_floor']:.3f}) | "
                     f"{r['recall']:.3f} ({r['recall_floor']:.3f}) |")
    return "\n".join(lines)


def plot(path: str, records: list[dict]) -> None:
    """Two panels against w: label accuracy (real test digits' as a line); FD x floor, P and R."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    from ddpm_jax import files  # noqa: PLC0415

    w = [r["guidance_scale"] for r in records]
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(w, [r["label_accuracy"] for r in records], "o-", label="samples: classifier's class = asked")
    ax1.axhline(records[0]["real_accuracy"], color="grey", ls="--", label="real test digits (true labels)")
    ax1.axhline(0.1, color="grey", ls=":", label="chance")
    ax1.set(xlabel="guidance scale w", ylabel="label accuracy", ylim=(0, 1.02), title="conditioning")
    ax1.legend(fontsize=8, loc="lower right")
    ax2.plot(w, [r["precision"] for r in records], "o-", color="C1", label="precision")
    ax2.plot(w, [r["recall"] for r in records], "s-", color="C2", label="recall")
    ax2.axhline(records[0]["precision_floor"], color="C1", ls="--", lw=0.8, label="precision floor")
    ax2.axhline(records[0]["recall_floor"], color="C2", ls="--", lw=0.8, label="recall floor")
    ax2.set(xlabel="guidance scale w", ylabel="precision / recall (k = 3)", ylim=(0, 1.02),
            title="fidelity and diversity")
    ax3 = ax2.twinx()
    ax3.plot(w, [r["fd_x_floor"] for r in records], "^-", color="C3", label="Fréchet distance / floor")
    ax3.set_ylabel("Fréchet distance / floor", color="C3")
    h2, l2 = ax2.get_legend_handles_labels()
    h3, l3 = ax3.get_legend_handles_labels()
    ax2.legend(h2 + h3, l2 + l3, fontsize=7, loc="lower left")
    fig.suptitle(f"classifier-free guidance, {records[0]['num_samples']} samples per w, "
                 f"step {records[0]['step']}, {records[0]['sampler']['method']} sampler")
    files.write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=110))


def main(argv=None) -> int:
    own, overrides = common.split_overrides(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--scales", default="0,0.5,1,2,4")
    parser.add_argument("--plot", default="")
    args = parser.parse_args(own)
    from ddpm_jax import checks  # noqa: PLC0415 (JAX only once the arguments parse)
    from ddpm_jax.modes import evaluate  # noqa: PLC0415

    base = common.load_config(args.config, overrides)
    base.eval.metric = "classifier"
    records = []
    for w in (float(s) for s in args.scales.split(",")):
        config = copy.deepcopy(base)
        config.sampling.guidance_scale = w
        checks.check_config(config, "eval")
        start = time.time()
        results = evaluate.run_eval(config, args.workdir)
        records.append(common.emit(record(w, results, time.time() - start)))
    print(markdown(records), flush=True)
    if args.plot:
        plot(args.plot, records)
        print(f"wrote {args.plot}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
