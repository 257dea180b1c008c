"""``--mode=eval | fid_stats | bpd`` (``ddpm_jax.main`` dispatches here).

eval
    Generates ``eval.num_samples`` samples from the newest checkpoint's EMA params (image
    i depends only on (``sampling.seed``, i); ``config.sampling`` picks the sampler) into
    ``workdir/eval/step_<k>/samples/`` in resumable uint8 chunks (``generation.py``), then
    computes FID against ``eval.fid_stats`` and the Inception Score (10 splits) from the FID
    Inception's features of those uint8 images, as if read back from PNG files. Results go
    to ``workdir/eval/<k>.json`` and TensorBoard (``workdir/tb``: ``eval/fid``,
    ``eval/inception_score``); the samples' own statistics to
    ``workdir/eval/step_<k>/sample_stats.npz`` (pytorch-fid format).

    When FID / IS cannot be computed, the samples are generated all the same, and:
      * nothing configured (``eval.inception_weights`` and ``eval.fid_stats`` empty, the
        defaults): one line says FID/IS were skipped, which fields to set and how to get
        the files; the exit status is 0.
      * Inception weights but no ``eval.fid_stats``: IS only, one line on how to get FID; 0.
      * a path that is set but does not exist, or ``eval.fid_stats`` set without Inception
        weights (an explicit request for FID that cannot be met): the same line is logged at
        the start (stop and fix it: the samples already made are kept), the samples are
        generated, and the run ends with that line as its error; the exit status is 1.

fid_stats
    Reference statistics (mu, sigma of the pool_3 features, pytorch-fid's ``.npz``) of a
    split (``eval.fid_stats_split``, default ``data.train_split``: the paper's CIFAR-10 FID
    uses the training set) through the data pipeline's eval iterator, written to
    ``eval.fid_stats_out`` or ``workdir/fid_stats_<dataset>_<split>.npz``. Needs the weights.

bpd
    Bits/dim over ``data.eval_split``: see ``bpd.py``.

Multi-host: sampling and the Inception run on each process's own devices, each on its own
share of the chunks / examples; the statistics are then merged through small files in
the workdir, which must be on a filesystem all processes see.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Callable, Iterable, Iterator

import jax
import ml_collections
import numpy as np

from ddpm_jax import data, parallel
from ddpm_jax.evaluation import bpd, fid, generation, inception

MODES = ("eval", "fid_stats", "bpd")
IS_SPLITS = 10
IS_LOGITS = "logits"   # the graph's softmax/logits (with the fc bias), as TF-GAN, which the DDPM code used


def run(config: ml_collections.ConfigDict, workdir: str, mode: str) -> Any:
    if mode == "eval":
        return run_eval(config, workdir)
    if mode == "fid_stats":
        return run_fid_stats(config, workdir)
    if mode == "bpd":
        return bpd.run(config, workdir)
    raise ValueError(f"unknown evaluation mode {mode!r}; use one of {', '.join(MODES)}")


# ---- what can be computed ------------------------------------------------------------------------

def _how_to_get_weights(flag_value: str = "inception_fid.npz") -> str:
    return (f"download {inception.FID_WEIGHTS_URL}, convert it once with `python -m "
            f"ddpm_jax.evaluation.convert_inception --pth {inception.FID_WEIGHTS_PTH} --out "
            f"{flag_value}` and pass --config.eval.inception_weights={flag_value}")


def weights_problem(path: str) -> str | None:
    """Why the Inception weights cannot be loaded (one line), or None."""
    if not path:
        return "eval.inception_weights is not set: " + _how_to_get_weights()
    if not os.path.isfile(path):
        return inception.missing_weights_message(path)
    return None


def stats_problem(path: str) -> str | None:
    """Why the FID reference statistics cannot be read (one line), or None."""
    how = ("compute them with --mode=fid_stats (or `python -m pytorch_fid --save-stats DATA_DIR "
           "FILE.npz`) and pass --config.eval.fid_stats=FILE.npz")
    if not path:
        return "eval.fid_stats is not set: " + how
    if not os.path.isfile(path):
        return f"eval.fid_stats={path!r} not found: " + how
    return None


def metrics_plan(ev: ml_collections.ConfigDict) -> tuple[bool, bool, str | None, bool]:
    """(compute IS, compute FID, the one-line note on what is skipped, is that note an error)."""
    weights, stats = str(ev.inception_weights), str(ev.fid_stats)
    w_problem, s_problem = weights_problem(weights), stats_problem(stats)
    problems = [p for p in (w_problem, s_problem) if p]
    note = None
    if problems:
        skipped = "FID and IS" if w_problem else "FID"
        note = f"{skipped} not computed: " + "; ".join(problems)
    # An explicit request: a path that is set but missing, or stats given without weights.
    fatal = bool((weights and w_problem) or (stats and (s_problem or w_problem)))
    return w_problem is None, w_problem is None and s_problem is None, note, fatal


# ---- Inception over images -----------------------------------------------------------------------

def _local_mesh():
    return parallel.make_mesh(jax.local_devices())


_RUNNERS: dict[tuple, Callable] = {}


def inception_runner(weights_path: str, mesh) -> Callable[[np.ndarray], dict]:
    """``run(images in [-1, 1]) -> dict(pool, logits, ...)`` on ``mesh`` (this process's devices).

    Kept per (weights file, devices): a second evaluation in the same process (e.g. from
    the training loop) reuses the loaded weights and the compiled network.
    """
    st = os.stat(weights_path) if os.path.isfile(weights_path) else None
    key = (os.path.realpath(weights_path), st and (st.st_mtime_ns, st.st_size),
           tuple(d.id for d in mesh.devices.flat))
    if key not in _RUNNERS:
        apply_fn, variables = inception.load_inception(weights_path)
        _RUNNERS.clear()   # one network at a time (~100 MB of weights)
        _RUNNERS[key] = fid.make_inception_fn(apply_fn, variables, mesh=mesh)
    return _RUNNERS[key]


def host_inception_batch(ev: ml_collections.ConfigDict, mesh) -> int:
    """This process's share of ``eval.inception_batch_size``, a multiple of its devices."""
    n = max(1, -(-int(ev.get("inception_batch_size", 200)) // jax.process_count()))
    d = mesh.local_mesh.size
    return -(-n // d) * d


def fixed_batches(pieces: Iterable[tuple[np.ndarray, np.ndarray]], size: int
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Re-cuts (indices, images) pieces into batches of exactly ``size`` rows (one compiled
    shape); the last one is padded with copies of its last row. Yields (indices, images, n valid)."""
    idx_buf: list[np.ndarray] = []
    img_buf: list[np.ndarray] = []
    count = 0
    for idx, img in pieces:
        idx_buf.append(np.asarray(idx))
        img_buf.append(np.asarray(img))
        count += len(idx)
        while count >= size:
            idx_all, img_all = np.concatenate(idx_buf), np.concatenate(img_buf)
            yield idx_all[:size], img_all[:size], size
            idx_buf, img_buf, count = [idx_all[size:]], [img_all[size:]], count - size
    if count:
        idx_all, img_all = np.concatenate(idx_buf), np.concatenate(img_buf)
        pad = size - count
        yield (np.concatenate([idx_all, np.repeat(idx_all[-1:], pad)]),
               np.concatenate([img_all, np.repeat(img_all[-1:], pad, axis=0)]), count)


def uint8_to_float(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] → float32 [-1, 1]: what pytorch-fid feeds its network for a PNG (x/255·2 − 1)."""
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def merge_across_processes(arrays: dict[str, np.ndarray], directory: str, tag: str
                           ) -> list[dict[str, np.ndarray]]:
    """Every process's ``arrays`` (in process order), exchanged through files in ``directory``."""
    if jax.process_count() == 1:
        return [arrays]
    os.makedirs(directory, exist_ok=True)
    path = lambda p: os.path.join(directory, f".merge_{tag}_{p}.npz")  # noqa: E731
    tmp = path(jax.process_index()) + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path(jax.process_index()))
    generation.sync(f"ddpm_jax_merge_{tag}_written")
    out = []
    for p in range(jax.process_count()):
        with np.load(path(p), allow_pickle=False) as f:
            out.append({k: f[k] for k in f.files})
    generation.sync(f"ddpm_jax_merge_{tag}_read")
    if jax.process_index() == 0:
        for p in range(jax.process_count()):
            os.remove(path(p))
    return out


def sample_features(out_dir: str, run_fn: Callable, *, num_samples: int, chunk_size: int,
                    batch: int, merge_dir: str, with_is: bool = True,
                    progress: bool = True) -> tuple[fid.ActivationStats, fid.InceptionScoreAccumulator | None]:
    """Pool_3 statistics and IS sums of the uint8 samples in ``out_dir``, over all processes."""
    p, n_proc = jax.process_index(), jax.process_count()
    chunks = list(range(generation.num_chunks(num_samples, chunk_size)))[p::n_proc]
    stats = fid.ActivationStats()
    is_acc = fid.InceptionScoreAccumulator(num_samples, IS_SPLITS) if with_is else None
    pieces = generation.read_chunks(out_dir, chunks, num_samples=num_samples, chunk_size=chunk_size)
    bar = None
    if progress and p == 0:
        from tqdm.auto import tqdm  # noqa: PLC0415

        bounds = (generation.chunk_bounds(c, num_samples, chunk_size) for c in chunks)
        bar = tqdm(total=sum(hi - lo for lo, hi in bounds), desc="Inception", unit="img",
                   dynamic_ncols=True)
    try:
        for idx, images, n in fixed_batches(pieces, batch):
            out = run_fn(uint8_to_float(images))
            stats.update(out["pool"][:n])
            if is_acc is not None:
                is_acc.update(out[IS_LOGITS][:n], idx[:n])
            if bar is not None:
                bar.update(n)
    finally:
        if bar is not None:
            bar.close()
    parts = merge_across_processes(
        {**{f"stats_{k}": v for k, v in stats.to_arrays().items()},
         **({f"is_{k}": v for k, v in is_acc.to_arrays().items()} if is_acc is not None else {})},
        merge_dir, "sample_features")
    merged_stats, merged_is = fid.ActivationStats(), None
    for part in parts:
        merged_stats.merge(fid.ActivationStats.from_arrays({k[6:]: v for k, v in part.items()
                                                            if k.startswith("stats_")}))
        if is_acc is not None:
            acc = fid.InceptionScoreAccumulator.from_arrays({k[3:]: v for k, v in part.items()
                                                             if k.startswith("is_")})
            merged_is = acc if merged_is is None else merged_is.merge(acc)
    return merged_stats, merged_is


# ---- the modes -----------------------------------------------------------------------------------

def _require_images(config: ml_collections.ConfigDict, mode: str) -> tuple:
    shape = tuple(data.example_shape(config.data))
    if len(shape) != 3:
        raise ValueError(f"--mode={mode} needs image data; data.source={config.data.source!r} gives "
                         f"points of shape {shape} (use --mode=sample for 2-D data)")
    return shape


def _say(line: str) -> None:
    """One line for the user, from process 0 (stderr, next to absl's log lines)."""
    if jax.process_index() == 0:
        print(line, file=sys.stderr, flush=True)


def _write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """``--mode=eval``: samples, then FID / IS (see the module docstring). Returns the results."""
    from ddpm_jax import generate, sample, train  # noqa: PLC0415 (train imports evaluation)

    shape = _require_images(config, "eval")
    ev = config.eval
    with_is, with_fid, note, fatal = metrics_plan(ev)
    if note and fatal:   # said now, so a long run can be stopped and fixed; raised at the end
        _say(f"warning: {note} (sampling goes on; the run will end with this error)")

    mesh = parallel.make_mesh()
    model, sched = train.create_model(config), train.create_schedule(config)
    params, step = sample.load_ema_params(config, workdir, model, shape, mesh)
    options = generate.sampler_options(config.sampling, config.diffusion)
    seed = int(config.sampling.seed)
    num_samples, chunk_size = int(ev.num_samples), int(ev.chunk_size)
    step_dir = os.path.join(workdir, "eval", f"step_{step}")
    out_dir = os.path.join(step_dir, "samples")
    generation.check_meta(out_dir, dict(step=step, sampling_seed=seed, shape=list(shape),
                                        chunk_size=chunk_size, sampler=options))
    local_mesh = _local_mesh()
    sampler = generate.Sampler(generate.model_apply_fn(model), sched, local_mesh, shape=shape,
                               seed=seed, **options)
    gen = generation.generate_samples(sampler, parallel.to_host(params), out_dir, num_samples=num_samples,
                                      chunk_size=chunk_size, batch_size=int(ev.batch_size), shape=shape)
    _say(f"samples: {num_samples} in {out_dir} ({gen['chunks_skipped']} of {gen['num_chunks']} chunks "
         f"were already there; {gen['images_generated']} generated in {gen['seconds']:.1f} s, "
         f"{gen['images_per_sec']:.1f} images/s)")

    results: dict[str, Any] = dict(step=step, num_samples=num_samples, samples_dir=out_dir,
                                   sampling_seed=seed, sampler=options, generation=gen)
    if with_is:
        run_fn = inception_runner(str(ev.inception_weights), local_mesh)
        stats, is_acc = sample_features(out_dir, run_fn, num_samples=num_samples, chunk_size=chunk_size,
                                        batch=host_inception_batch(ev, local_mesh), merge_dir=step_dir,
                                        with_is=num_samples >= IS_SPLITS)
        if jax.process_index() == 0 and stats.count >= 2:
            fid.save_stats(os.path.join(step_dir, "sample_stats.npz"), stats.mu, stats.sigma)
        results["inception_weights"] = str(ev.inception_weights)
        if is_acc is not None:
            results["inception_score"], results["inception_score_std"] = is_acc.result()
            results.update(inception_score_splits=IS_SPLITS, inception_score_logits=IS_LOGITS)
        if with_fid:
            mu_ref, sigma_ref = fid.load_stats(str(ev.fid_stats))
            results["fid"] = fid.frechet_distance(stats.mu, stats.sigma, mu_ref, sigma_ref)
            results["fid_stats"] = str(ev.fid_stats)
    if note:
        results["not_computed"] = note
    if jax.process_index() == 0:
        path = os.path.join(workdir, "eval", f"{step}.json")
        _write_json(path, results)
        from tensorboardX import SummaryWriter  # noqa: PLC0415

        with SummaryWriter(os.path.join(workdir, "tb")) as tb:
            for key, tag in (("fid", "eval/fid"), ("inception_score", "eval/inception_score")):
                if key in results:
                    tb.add_scalar(tag, float(results[key]), int(step))
        scores = ", ".join(f"{k} {results[k]:.4f}" for k in ("fid", "inception_score") if k in results)
        _say(f"step {step}: {scores or 'no FID/IS'}; wrote {path}")
    if note:
        if fatal:
            raise (inception.MissingWeightsError if not with_is else FileNotFoundError)(note)
        _say(f"note: {note}")
    return results


def dataset_name(data_cfg: ml_collections.ConfigDict) -> str:
    """A file-name-safe name of the configured dataset (``cifar10``, ``lsun_church_outdoor``, ``digits``)."""
    source = str(data_cfg.source)
    if source == "tfds":
        name = str(data_cfg.tfds_name)
    elif source in ("image", "folder"):
        name = f"{source}_{os.path.splitext(os.path.basename(str(data_cfg.path).rstrip('/')))[0]}"
    else:
        name = source
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or source


def run_fid_stats(config: ml_collections.ConfigDict, workdir: str) -> str:
    """``--mode=fid_stats``: reference mu, sigma of a split; returns the written path."""
    shape = _require_images(config, "fid_stats")
    ev = config.eval
    problem = weights_problem(str(ev.inception_weights))
    if problem:
        raise inception.MissingWeightsError(f"--mode=fid_stats needs the FID Inception: {problem}")
    split = str(ev.get("fid_stats_split", "") or config.data.train_split)
    out = str(ev.get("fid_stats_out", "") or
              os.path.join(workdir, f"fid_stats_{dataset_name(config.data)}_{split}.npz"))
    local_mesh = _local_mesh()
    run_fn = inception_runner(str(ev.inception_weights), local_mesh)
    host_batch = host_inception_batch(ev, local_mesh)
    p, n_proc = jax.process_index(), jax.process_count()
    it = data.create_eval_iterator(config.data, split, batch_size=host_batch * n_proc,
                                   process_index=p, process_count=n_proc)
    stats = fid.ActivationStats()
    bar = None
    if p == 0:
        from tqdm.auto import tqdm  # noqa: PLC0415

        bar = tqdm(total=data.num_examples(config.data, split), desc=f"Inception ({split})",
                   unit="img", dynamic_ncols=True)
    try:
        for batch in it:
            mask = np.asarray(batch["mask"], bool)
            if mask.any():
                stats.update(run_fn(np.asarray(batch["x"], np.float32))["pool"], mask=mask)
            if bar is not None:
                bar.update(int(mask.sum()) * n_proc)
    finally:
        if bar is not None:
            bar.close()
        close = getattr(it, "close", None)
        if close is not None:
            close()
    merged = fid.ActivationStats()
    for part in merge_across_processes(stats.to_arrays(), os.path.dirname(os.path.abspath(out)), "fid_stats"):
        merged.merge(fid.ActivationStats.from_arrays(part))
    if p == 0:
        fid.save_stats(out, merged.mu, merged.sigma)
    _say(f"FID reference statistics of {dataset_name(config.data)}/{split} ({merged.count} images, "
         f"shape {shape}) written to {out}")
    return out
