"""Super-resolution quality of a trained SR workdir, each number beside bicubic upsampling and the floor.

    python -m bench.super_resolution --workdir=workdirs/mnist_sr [--config=configs/mnist_sr.py] \
        [--num=500] [--levels=0,10,50] [--out=sr.jsonl] [--table=sr.md] [--config.X=...] \
        [--base_config=configs/mnist14.py --base_workdir=workdirs/mnist14 --base_overrides='a.b=v'] \
        [--direct_config=configs/mnist.py --direct_workdir=workdirs/mnist --direct_overrides='a.b=v']

For each augmentation level s of `--levels` (`sampling.low_res_level`) the project's `--mode=sample`
(`modes.sample.run`, `sampling.cond_images=<data.eval_split>`) super-resolves the first `--num` real
test images' box-downsampled views (its grid of input | SR | bicubic is written as usual); then, for
the SR outputs and for bicubic upsampling of the same inputs:

* psnr — dB (uint8, `imaging.psnr`) against the real high-res image, averaged over the images;
* consistency — RMS of box_downsample(output) − input in [−1, 1] units (0: the output downsamples
  exactly to what it was asked to super-resolve);
* fd / precision / recall / confident — the classifier-feature metrics of `evaluation/sample_quality.py`
  against the real training images, beside their floor (real test images against the same), as
  `--mode=eval` computes them.

`--steering=t,...` prints instead, per timestep t, the RMS of box_downsample(x̂_0) − input for
x̂_0 predicted from a noised test image given its low-res view and given the null image: how much
the input steers the network at each noise level.

With `--base_workdir` the cascade (`modes.cascade.run`: the base model's samples
super-resolved at the first level of `--levels`) and, with `--direct_workdir`, the direct model's
samples are scored with the same classifier metrics (the cascaded-diffusion paper's comparison),
each with its sampling time. One JSON line per row on stdout (and `--out`), and a markdown table.
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

METRICS = ("fd", "precision", "recall", "confident")


def fidelity(outputs, real, low, factor: int) -> dict:
    """PSNR of `outputs` against `real` and the RMS consistency of their box downsampling with `low`."""
    import numpy as np  # noqa: PLC0415

    from ddpm_jax import imaging  # noqa: PLC0415

    down = imaging.box_downsample(np.asarray(outputs, np.float64), factor)
    return dict(psnr=float(np.mean([imaging.psnr(o, r) for o, r in zip(outputs, real)])),
                consistency=float(np.sqrt(np.mean((down - np.asarray(low, np.float64)) ** 2))))


def quality(clf, config, images) -> dict:
    """The classifier metrics of `images` against the real training images, with the floor and ratio."""
    from ddpm_jax.evaluation import sample_quality  # noqa: PLC0415

    result = sample_quality.evaluate_samples(clf, config.data, images)
    return {key: {name: result[key][name] for name in METRICS} for key in ("metrics", "floor", "ratio")}


def stage_config(config, num: int, **sampling):
    """A copy of `config` sampling `num` images in batches of eval.batch_size, with `sampling` fields set."""
    c = copy.deepcopy(config)
    c.sampling.update(num_samples=int(num), batch_size=min(int(c.eval.batch_size), int(num)), **sampling)
    return c


def timed(fn, *args) -> tuple[dict, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def super_resolution_rows(config, workdir: str, num: int, levels: list[int], clf) -> list[dict]:
    """One row for bicubic and one per level s: fidelity and classifier metrics of the outputs."""
    import numpy as np  # noqa: PLC0415

    from ddpm_jax import data, imaging  # noqa: PLC0415
    from ddpm_jax.modes import sample  # noqa: PLC0415

    split, f = str(config.data.eval_split), int(config.data.low_res_factor)
    real = imaging.as_float(data.load_arrays(config.data, split, num)["x"])
    rows = []
    for i, level in enumerate(levels):
        c = stage_config(config, len(real), cond_images=split, low_res_level=int(level))
        paths, seconds = timed(sample.run, c, workdir)
        with np.load(paths["npz"]) as arrays:
            outputs, low, bicubic = arrays["samples"], arrays["low_res"], arrays["bicubic"]
        if i == 0:
            rows.append(dict(row="bicubic", **fidelity(bicubic, real, low, f), **quality(clf, config, bicubic)))
        rows.append(dict(row=f"SR s={level}", level=int(level), tag=os.path.basename(paths["npz"]),
                         sample_seconds=seconds, **fidelity(outputs, real, low, f), **quality(clf, config, outputs)))
    return rows


def cascade_rows(config, workdir: str, args, level: int, clf) -> list[dict]:
    """The cascade's samples and (with `--direct_workdir`) the direct model's, scored alike."""
    import numpy as np  # noqa: PLC0415

    from ddpm_jax.modes import cascade, sample  # noqa: PLC0415

    rows = []
    if args.base_workdir:
        c = stage_config(config, args.num, low_res_level=int(level))
        c.cascade.update(base_config=args.base_config, base_workdir=args.base_workdir,
                         base_overrides=args.base_overrides)
        paths, seconds = timed(cascade.run, c, workdir)
        with np.load(paths["npz"]) as arrays:
            rows.append(dict(row=f"cascade (s={level})", tag=os.path.basename(paths["npz"]), sample_seconds=seconds,
                             **quality(clf, config, arrays["samples"])))
    if args.direct_workdir:
        direct = common.load_config(args.direct_config, args.direct_overrides.split())  # sampled as the cascade
        same = {k: config.sampling[k] for k in cascade.CASCADE_SAMPLING if k not in ("num_samples", "batch_size")}
        paths, seconds = timed(sample.run, stage_config(direct, args.num, **same), args.direct_workdir)
        with np.load(paths["npz"]) as arrays:
            rows.append(dict(row="direct", workdir=args.direct_workdir, tag=os.path.basename(paths["npz"]),
                             sample_seconds=seconds, **quality(clf, direct, arrays["samples"])))
    return rows


def steering_rows(config, workdir: str, num: int, timesteps: list[int]) -> list[dict]:
    """How much the low-res image steers the network at each t of `timesteps`: the RMS of
    box_downsample(x̂_0) − input, x̂_0 from x_t = q_sample(real test image, t) given the image's own
    low-res view at level 0, and given the null image (`LowResImage.null`)."""
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from ddpm_jax import data, imaging, setup, super_resolution  # noqa: PLC0415

    loaded, f = setup.load_run(config, workdir), int(config.data.low_res_factor)
    real = imaging.as_float(data.load_arrays(config.data, str(config.data.eval_split), num)["x"]).astype(np.float32)
    low = imaging.box_downsample(real, f).astype(np.float32)
    noise = np.random.default_rng(int(config.sampling.seed)).standard_normal(real.shape).astype(np.float32)
    level = jnp.zeros((len(real),), jnp.int32)  # s = 0: the low-res image as given
    rows = []
    for t in timesteps:
        t_rows = jnp.full((len(real),), int(t), jnp.int32)
        x_t = loaded.process.q_sample(jnp.asarray(real), t_rows, jnp.asarray(noise))
        row = dict(row=f"steering t={t}", t=int(t))
        for name, y in (("consistency_true", low), ("consistency_null", np.zeros_like(low))):
            cond = {super_resolution.LowResImage.key: jnp.asarray(y), super_resolution.AugmentationLevel.key: level}
            out = loaded.apply_fn(loaded.params, x_t, t_rows, cond)
            x0 = np.asarray(loaded.process.x0_and_eps(out, x_t, t_rows)[0], np.float64)
            row[name] = float(np.sqrt(np.mean((imaging.box_downsample(x0, f) - low) ** 2)))
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """The rows as markdown: fidelity, then each classifier metric with its floor."""
    floor = next((r["floor"] for r in rows if "floor" in r), {})
    head = ["row", "PSNR dB", "consistency (RMS)", *(f"{m} (floor {floor.get(m, float('nan')):.3g})" for m in METRICS),
            "fd / floor", "sampling s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["row"], f"{r['psnr']:.2f}" if "psnr" in r else "", f"{r['consistency']:.4f}" if "consistency" in r
                 else "", *(f"{r['metrics'][m]:.3g}" for m in METRICS), f"{r['ratio']['fd']:.2f}x",
                 f"{r['sample_seconds']:.0f}" if "sample_seconds" in r else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measure(argv: list[str]) -> list[dict]:
    rest, overrides = common.split_overrides(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/mnist_sr.py")
    p.add_argument("--workdir", required=True, help="the trained SR workdir")
    p.add_argument("--num", type=int, default=500, help="test images super-resolved (and cascade / direct samples)")
    p.add_argument("--levels", default="0", help="sampling.low_res_level s swept, comma-separated")
    p.add_argument("--base_config", default="configs/mnist14.py")
    p.add_argument("--base_workdir", default="", help="the cascade's base model (empty: no cascade row)")
    p.add_argument("--base_overrides", default="", help="cascade.base_overrides: 'a.b=v c.d=w' of the base config")
    p.add_argument("--direct_config", default="configs/mnist.py")
    p.add_argument("--direct_workdir", default="", help="the direct high-res model (empty: no direct row)")
    p.add_argument("--direct_overrides", default="", help="'a.b=v c.d=w' of the direct config")
    p.add_argument("--steering", default="", help="timesteps t, comma-separated: x̂_0's consistency given the "
                   "true and the null low-res image (only these rows)")
    p.add_argument("--out", default="", help="also append the JSON lines to this file")
    p.add_argument("--table", default="", help="also write the markdown table to this file")
    args = p.parse_args(rest)
    config = common.load_config(args.config, overrides)
    common.check_positive(num=args.num)
    levels = [int(s) for s in args.levels.split(",") if s.strip()]
    if not int(config.data.get("low_res_factor", 0)) or not levels:
        raise common.BenchError(f"--config={args.config} is not a super-resolution config (data.low_res_factor > 0), "
                                "or --levels is empty; give e.g. --config=configs/mnist_sr.py --levels=0,10.")

    if args.steering:
        rows = steering_rows(config, args.workdir, args.num, [int(t) for t in args.steering.split(",")])
        return [common.emit(dict(workdir=args.workdir, **row, num=args.num, time=common.utc_now())) for row in rows]
    from ddpm_jax.evaluation import classifier  # noqa: PLC0415

    clf = classifier.load_or_train(config.data, classifier.resolve_path(config))
    rows = super_resolution_rows(config, args.workdir, args.num, levels, clf)
    rows += cascade_rows(config, args.workdir, args, levels[0], clf)
    records = [common.emit(dict({"workdir": args.workdir}, **row, num=args.num, method=str(config.sampling.method),
                                host=common.host_info(), time=common.utc_now())) for row in rows]
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r, default=str) + "\n" for r in records)
    text = table(rows)
    print(text, flush=True)
    if args.table:
        with open(args.table, "w") as f:
            f.write(text + "\n")
    return records


def main(argv: list[str] | None = None) -> int:
    common.run_cli(measure, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
