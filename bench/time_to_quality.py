"""Time to quality: sample quality against training wall time, for ddpm_jax and its PyTorch peer.

    python -m bench.time_to_quality --side=ours --config=configs/mnist.py --budget_s=900 --out=ttq
    python -m bench.time_to_quality --side=peer_exact --config=configs/mnist.py --budget_s=900 --out=ttq
    python -m bench.time_to_quality --side=peer_diffusers --config=configs/mnist.py --budget_s=900 --out=ttq
    python -m bench.time_to_quality --plot=ttq/time_to_quality.png ttq/time_to_quality.jsonl

One side per process, one process at a time (never two on the same cores). Each side trains
for `--budget_s` seconds of training wall time; at each mark (`--marks`, seconds of training
time: compilation included, evaluation excluded and timed apart) it samples `--num_samples`
images with SDE-DPM-Solver++ 2M at `--calls` network calls (uniform in log-SNR, x̂_0 clipped:
the project's `sde_dpmpp_2m`, and diffusers' `DPMSolverMultistepScheduler` configured the same)
from the EMA weights (and from each post-hoc EMA profile of `--config.ema.sigma_rels`, tracked in the
step: a row each) and scores them with the project's classifier metrics
(`evaluation.sample_quality`: Fréchet distance, precision, recall in the features of the data
set's classifier, each beside its floor, the held-out real images against the same reference).

Sides:
  ours            the project's train step (`train.make_train_step`) fed by its grain pipeline, with
                  the XLA:CPU flags the entry point sets for training (`ddpm_jax.cpu_flags`)
  peer_exact      diffusers with the project's exported architecture, init, schedule and optimiser
                  (`bench/peer_trainer.exact_recipe`): the implementations' speed alone
  peer_diffusers  diffusers' train_unconditional.py recipe with an MNIST-sized U-Net
                  (`bench/peer_trainer.diffusers_recipe`): what a user would run

Each mark appends a JSON line to `<out>/time_to_quality.jsonl`: side, mark, training seconds,
steps, images seen, train images/s (whole run and since the previous mark), sampling seconds and
images/s, evaluation seconds, the metrics / floor / ratio, the load average, the recipe.
`--plot` draws FD / floor against training minutes and against images seen, one line per side,
and prints the time each side took to reach 3x and 2x the floor.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common

SIDES = ("ours", "peer_exact", "peer_diffusers")
MARK_FRACTIONS = (1 / 15, 2 / 15, 3 / 15, 5 / 15, 7.5 / 15, 10 / 15, 12.5 / 15, 1.0)
THRESHOLDS = (3.0, 2.0)  # FD / floor levels the summary reports the time to
RESULTS = "time_to_quality.jsonl"
MAX_CHUNK = 50  # most steps between two looks at the clock


def parse_args(argv):
    rest, overrides = common.split_overrides(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", default="ours", choices=SIDES)
    p.add_argument("--config", default="configs/mnist.py")
    p.add_argument("--budget_s", type=float, default=900.0, help="training wall seconds")
    p.add_argument("--marks", default="", help="comma list of training seconds (default: 8 marks up to the budget)")
    p.add_argument("--num_samples", type=int, default=500)
    p.add_argument("--calls", type=int, default=20, help="network calls of the solver")
    p.add_argument("--sample_batch", type=int, default=250)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (training: the config's seed)")
    p.add_argument("--classifier_path", default="", help="'' = eval.classifier_path or the data's default")
    p.add_argument("--out", default="ttq")
    p.add_argument("--tag", default="", help="free text stored with the rows (e.g. the recipe change)")
    p.add_argument("--plot", default="", help="write this plot from the JSON-lines files given as arguments")
    args, files = p.parse_known_args(rest)
    args.overrides, args.files = overrides, files
    if args.plot:
        if not files:
            raise common.BenchError("--plot needs the JSON-lines files to draw, e.g. ttq/time_to_quality.jsonl.")
        return args
    if files:
        raise common.BenchError(f"unexpected arguments {files}; config overrides are --config.FIELD=VALUE.")
    common.check_positive(num_samples=args.num_samples, calls=args.calls, sample_batch=args.sample_batch)
    if args.budget_s <= 0:
        raise common.BenchError(f"--budget_s={args.budget_s} must be > 0.")
    args.mark_list = parse_marks(args.marks, args.budget_s)
    return args


def parse_marks(text: str, budget_s: float) -> list[float]:
    """The marks in training seconds, increasing, the last one the budget."""
    if not text:
        return [round(f * budget_s, 3) for f in MARK_FRACTIONS]
    try:
        marks = [float(m) for m in text.split(",") if m]
    except ValueError:
        raise common.BenchError(f"--marks={text}: use a comma list of seconds, e.g. 60,300,900.") from None
    if not marks or any(b <= a for a, b in zip(marks, marks[1:])) or marks[0] <= 0 or marks[-1] > budget_s:
        raise common.BenchError(f"--marks={text} must increase, start above 0 and end at most at "
                                f"--budget_s={budget_s}.")
    return marks


class Ours:
    """The project's trainer: its compiled step, EMA and input pipeline; its registry's solver."""

    def __init__(self, config):
        import jax

        from ddpm_jax import checks, data, parallel, post_hoc_ema, run_meta, setup, train

        self.jax, self.config = jax, config
        self.run = setup.create_run(config, parallel.make_mesh())
        checks.validate_config(config, self.run.mesh)
        self.state, tx = setup.create_train_state(config, self.run.model, self.run.shape, self.run.mesh)
        self.sigma_rels = post_hoc_ema.parse_sigma_rels(config.ema.get("sigma_rels", ()), "ema.sigma_rels")
        if self.sigma_rels:  # tracked inside the compiled step, so their cost is in the training time
            self.state = self.state.replace(phema=post_hoc_ema.create(self.state.params, self.sigma_rels))
        self.step_fn = train.make_train_step(config, self.run.model, self.run.sched, tx, self.run.mesh)
        self.it = data.create_train_iterator(config.data, global_batch_size=int(config.training.batch_size),
                                             seed=int(config.seed))
        self.spd = int(config.training.steps_per_dispatch)
        self.batch_size = int(config.training.batch_size)
        self.num_params = int(sum(x.size for x in jax.tree.leaves(self.state.params)))
        name, kwargs = run_meta.model_spec(config)
        self.record = dict(impl="ddpm_jax", model=dict(name=name, **kwargs),
                           **{k: v for k, v in common.jax_env().items() if k != "host"})
        self.steps, self._samplers = 0, {}

    def train(self, steps: int) -> float:
        from ddpm_jax import loop

        metrics = None
        for _ in range(-(-int(steps) // self.spd)):  # whole dispatches: the loop's unit
            batches = loop.next_dispatch(self.it, self.spd, self.run.mesh)[0]
            self.state, metrics = self.step_fn(self.state, batches)
            self.steps += self.spd
        self.jax.block_until_ready((self.state, metrics))
        return float(self.jax.device_get(metrics["loss"])[-1])

    def averages(self) -> list[tuple[str, object]]:
        """The weights each mark samples: the fixed-decay EMA, then each tracked power-function profile."""
        profiles = self.state.phema.ema_params if self.sigma_rels else ()
        return [(f"decay {float(self.config.optim.ema_decay)}", self.state.ema_params),
                *((f"sigma_rel {s}", params) for s, params in zip(self.sigma_rels, profiles))]

    def sample(self, params, num: int, *, seed: int, calls: int, batch_size: int):
        from ddpm_jax import sampler, setup

        if (seed, calls) not in self._samplers:
            cfg = self.config.copy_and_resolve_references()
            cfg.sampling.method, cfg.sampling.steps, cfg.sampling.spacing = "sde_dpmpp_2m", calls, ""
            cfg.sampling.seed = seed
            self._samplers[seed, calls] = setup.make_sampler(self.run, cfg)
        out = sampler.generate(self._samplers[seed, calls], params, num_samples=num,
                               batch_size=batch_size)
        return out.samples

    def close(self) -> None:
        self.it.close()


class Peer:
    """A `bench.peer_trainer.PeerTrainer` under the side's recipe, on the config's training images."""

    def __init__(self, config, side: str):
        import diffusers
        import torch

        from bench import peer_trainer
        from ddpm_jax import data, parallel, run_meta, setup

        images = data.load_arrays(config.data, str(config.data.train_split))["x"]
        if side == "peer_exact":
            run = setup.create_run(config, parallel.make_mesh())
            name, kwargs = run_meta.model_spec(config)
            if name != "unet":
                raise common.BenchError(f"model.name={name!r}: peer_exact needs the U-Net (diffusers exports it).")
            params = setup.init_params(run.model, run.shape, int(config.seed), run.mesh)
            recipe = peer_trainer.exact_recipe(config, kwargs, run.shape, run.meta, params)
        else:
            recipe = peer_trainer.diffusers_recipe(images.shape[1], images.shape[3], len(images))
        self.trainer = peer_trainer.PeerTrainer(recipe, images, seed=int(config.seed))
        self.batch_size, self.num_params = recipe.batch_size, self.trainer.num_params
        self.record = dict(impl="diffusers", torch=torch.__version__, diffusers=diffusers.__version__,
                           torch_threads=torch.get_num_threads(), recipe=peer_trainer.recipe_record(recipe))

    @property
    def steps(self) -> int:
        return self.trainer.steps

    def train(self, steps: int) -> float:
        return self.trainer.train(steps)

    def averages(self) -> list[tuple[str, None]]:
        """The recipe's EMA, the one average the peer keeps (its trainer samples it)."""
        return [("the recipe's EMA", None)]

    def sample(self, params: None, num: int, *, seed: int, calls: int, batch_size: int):
        from ddpm_jax import schedules
        from ddpm_jax.sampling import solvers

        # The project's plan for this β (log-SNR uniform from λ = −5.1): diffusers' own `use_lu_lambdas`
        # grid repeats timesteps on a capped-β (cosine) schedule, which its multistep solver cannot step.
        plan = solvers.timesteps(schedules.Schedule.from_betas(self.trainer.betas()), calls, "logsnr")
        return self.trainer.sample(num, seed=seed, timesteps=[int(t) for t in plan], batch_size=batch_size)

    def close(self) -> None:
        pass


class Judge:
    """The project's classifier metrics with the reference and floor features computed once."""

    def __init__(self, config, path: str):
        from ddpm_jax import data
        from ddpm_jax.evaluation import classifier, sample_quality

        self.sq, self.data_cfg = sample_quality, config.data
        self.clf = classifier.load_or_train(config.data, path)
        ref = data.load_arrays(config.data, str(config.data.train_split))["x"]
        held = data.load_arrays(config.data, str(config.data.eval_split))["x"]
        self.reference = sample_quality.FeatureSet.of(self.clf, ref)
        self.held = sample_quality.FeatureSet.of(self.clf, held)

    def __call__(self, samples) -> dict:
        result = self.sq.compare(self.sq.FeatureSet.of(self.clf, samples), self.reference, self.held,
                                 reference_split=str(self.data_cfg.train_split),
                                 held_out_split=str(self.data_cfg.eval_split))
        return {k: result[k] for k in ("metrics", "floor", "ratio", "counts")}


def make_side(side: str, config):
    return Ours(config) if side == "ours" else Peer(config, side)


def measure(args) -> list[dict]:
    from ddpm_jax import cpu_flags

    if args.side == "ours":  # the entry point's training flags, before JAX starts its backend
        cpu_flags.apply("train")
    from ddpm_jax.evaluation import classifier

    config = common.load_config(args.config, args.overrides)
    if args.side != "ours" and config.ema.get("sigma_rels", ()):
        raise common.BenchError(f"--side={args.side} tracks no post-hoc EMA profiles; drop --config.ema.sigma_rels.")
    path = args.classifier_path or classifier.resolve_path(config)
    judge = Judge(config, path)  # trained (once) before any clock starts
    side = make_side(args.side, config)
    os.makedirs(args.out, exist_ok=True)
    base = dict(bench="time_to_quality", side=args.side, config=args.config, overrides=args.overrides, tag=args.tag,
                budget_s=args.budget_s, batch=side.batch_size, num_params=side.num_params, calls=args.calls,
                solver="sde_dpmpp_2m (SDE-DPM-Solver++ 2M, log-SNR grid)", num_samples=args.num_samples,
                sampling_seed=args.seed, xla_flags=os.environ.get("XLA_FLAGS", ""), host=common.host_info(),
                **side.record)
    records, train_s, rate, prev, first_step_s = [], 0.0, None, (0, 0.0), None
    try:
        for mark in args.mark_list:
            while train_s < mark:
                if first_step_s is None:  # the first dispatch alone: its time is mostly the compile
                    chunk = 1
                else:
                    chunk = MAX_CHUNK if rate is None else max(1, min(MAX_CHUNK, int((mark - train_s) * rate) + 1))
                before, start = side.steps, time.perf_counter()
                loss = side.train(chunk)
                seconds = time.perf_counter() - start
                train_s += seconds
                if first_step_s is None:
                    first_step_s = seconds
                else:
                    rate = (side.steps - before) / seconds
            for average, params in side.averages():
                record = _evaluate(args, side, params, judge, base, mark, train_s, loss, prev)
                record.update(ema=average, first_step_s=round(first_step_s, 3))
                records.append(common.emit(record))
                with open(os.path.join(args.out, RESULTS), "a") as f:
                    common.emit(record, stream=f)
            prev = (side.steps, train_s)
    finally:
        side.close()
    return records


def _evaluate(args, side, params, judge: Judge, base: dict, mark: float, train_s: float, loss: float, prev) -> dict:
    start = time.perf_counter()
    samples = side.sample(params, args.num_samples, seed=args.seed, calls=args.calls, batch_size=args.sample_batch)
    sample_s = time.perf_counter() - start
    scores = judge(samples)
    eval_s = time.perf_counter() - start
    steps, batch = side.steps, side.batch_size
    interval = (steps - prev[0]) * batch / max(train_s - prev[1], 1e-9)
    return dict(base, utc=common.utc_now(), mark_s=mark, train_s=round(train_s, 3), steps=steps,
                images_seen=steps * batch, train_images_per_s=steps * batch / train_s,
                interval_train_images_per_s=interval, loss=loss, sample_s=round(sample_s, 3),
                sample_images_per_s=args.num_samples / sample_s, eval_s=round(eval_s, 3),
                load_avg=[round(x, 2) for x in os.getloadavg()], **scores)


# ---- reading the rows back --------------------------------------------------------------------------


def read_rows(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        with open(path) as f:
            rows += [r for r in common.read_records(f.read()) if r.get("bench") == "time_to_quality"]
    if not rows:
        raise common.BenchError(f"no time_to_quality rows in {paths}.")
    return rows


def curves(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by run (side and tag) and by the average sampled where a run has several, in training-time order."""
    profiled = {(r["side"], r.get("tag")) for r in rows if str(r.get("ema", "")).startswith("sigma_rel")}
    out: dict[str, list[dict]] = {}
    for r in rows:
        labels = [r.get("tag")] + ([r.get("ema")] if (r["side"], r.get("tag")) in profiled else [])
        text = ", ".join(str(v) for v in labels if v)
        out.setdefault(r["side"] + (f" ({text})" if text else ""), []).append(r)
    return {k: sorted(v, key=lambda r: r["train_s"]) for k, v in out.items()}


def time_to(rows: list[dict], ratio: float) -> dict | None:
    """The first mark of a run whose FD is at most `ratio` x its floor (training s, images seen), or None."""
    for r in rows:
        if r["ratio"]["fd"] <= ratio:
            return dict(train_s=r["train_s"], images_seen=r["images_seen"], fd=r["metrics"]["fd"])
    return None


def summary(rows: list[dict]) -> str:
    """A markdown table: per run, time to 3x and 2x the floor, best FD / floor, train and sample images/s."""
    lines = ["| run | time to FD <= 3x floor | time to FD <= 2x floor | best FD (x floor) at | "
             "train images/s | sample images/s |", "| --- | --- | --- | --- | --- | --- |"]
    for name, run in curves(rows).items():
        cells = []
        for thr in THRESHOLDS:
            hit = time_to(run, thr)
            cells.append("not reached" if hit is None
                         else f"{hit['train_s'] / 60:.1f} min ({hit['images_seen']:,} images)")
        best = min(run, key=lambda r: r["ratio"]["fd"])
        last = run[-1]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {best['metrics']['fd']:.1f} ({best['ratio']['fd']:.2f}x) at "
                     f"{best['train_s'] / 60:.1f} min | {last['train_images_per_s']:.1f} | "
                     f"{last['sample_images_per_s']:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, run in curves(rows).items():
        ratio = [r["ratio"]["fd"] for r in run]
        axes[0].plot([r["train_s"] / 60 for r in run], ratio, marker="o", label=name)
        axes[1].plot([r["images_seen"] for r in run], ratio, marker="o", label=name)
    for ax, xlabel in zip(axes, ("training wall time (min, evaluation excluded)", "images seen")):
        for thr in THRESHOLDS:
            ax.axhline(thr, color="grey", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("classifier FD / floor")
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")
    axes[0].legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"{r0['config']}: {r0['num_samples']} samples, {r0['calls']}-call SDE-DPM-Solver++ 2M, EMA weights")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    def run(argv_):
        args = parse_args(argv_)
        if not args.plot:
            return measure(args)
        rows = read_rows(args.files)
        plot(rows, args.plot)
        print(summary(rows))
        return rows

    return common.run_cli(run, argv)


if __name__ == "__main__":
    main()
