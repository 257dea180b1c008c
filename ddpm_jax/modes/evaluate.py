"""``--mode=eval`` and ``--mode=fid_stats``: sample quality as in the paper (FID, Inception Score).

eval
    Generates ``eval.num_samples`` samples from the newest valid checkpoint's EMA params
    (image i depends only on (``sampling.seed``, i); ``config.sampling`` picks the sampler)
    into ``workdir/eval/step_<k>/samples/`` in resumable uint8 chunks
    (``evaluation/chunked_generation.py``), then computes FID against ``eval.fid_stats`` and
    the Inception Score (10 splits) from the FID Inception's features of those uint8 images,
    as if read back from PNG files. Results go to ``workdir/eval/<k>.json`` and TensorBoard
    (``workdir/tb``: ``eval/fid``, ``eval/inception_score``); the samples' own statistics to
    ``workdir/eval/step_<k>/sample_stats.npz`` (pytorch-fid format).

    What cannot be computed is found before any sample is made (``checks.check_eval_inputs``,
    called by ``main``): without usable Inception weights, or with ``eval.fid_stats`` set but
    unusable, the run stops at once with one line saying which field to set and how to get
    the file. Without ``eval.fid_stats``, the Inception Score alone is computed and one line
    says how to get FID.

fid_stats
    Reference statistics (mu, sigma of the pool_3 features, pytorch-fid's ``.npz``) of a
    split (``eval.fid_stats_split``, default ``data.train_split``: the paper's CIFAR-10 FID
    uses the training set) through the data pipeline's eval iterator, written to
    ``eval.fid_stats_out`` or ``workdir/fid_stats_<dataset>_<split>.npz``. Needs the weights.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from ddpm_jax import checks, data, files, parallel, setup
from ddpm_jax.evaluation import chunked_generation, fid
from ddpm_jax.evaluation import inception_metrics as im
from ddpm_jax.modes import require_images, say


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """``--mode=eval``: samples, then FID / IS (see the module docstring). Returns the results."""
    require_images(data.example_shape(config.data), config.data.source, "eval")
    checks.check_eval_inputs(config, "eval")
    ev = config.eval
    with_fid = bool(str(ev.fid_stats))
    note = None if with_fid else ("FID not computed: eval.fid_stats is not set: compute the reference "
                                  "statistics with --mode=fid_stats and pass --config.eval.fid_stats=FILE.npz")

    loaded = setup.load_run(config, workdir)
    step, shape, seed = loaded.step, loaded.shape, int(config.sampling.seed)
    num_samples, chunk_size = int(ev.num_samples), int(ev.chunk_size)
    step_dir = os.path.join(workdir, "eval", f"step_{step}")
    out_dir = os.path.join(step_dir, "samples")
    options = setup.sampler_options(config)
    chunked_generation.check_samples_meta(out_dir, dict(step=step, sampling_seed=seed, shape=list(shape),
                                                chunk_size=chunk_size, sampler=options))
    local_mesh = parallel.make_mesh(jax.local_devices())  # each process samples its own chunks
    sampler = setup.make_sampler(loaded, config, mesh=local_mesh)
    gen = chunked_generation.generate_samples(
        sampler, parallel.to_host(loaded.params), out_dir, num_samples=num_samples, chunk_size=chunk_size,
        batch_size=int(ev.batch_size), shape=shape)
    say(f"samples: {num_samples} in {out_dir} ({gen['chunks_skipped']} of {gen['num_chunks']} chunks "
        f"were already there; {gen['images_generated']} generated in {gen['seconds']:.1f} s, "
        f"{gen['images_per_sec']:.1f} images/s)")

    results: dict[str, Any] = dict(step=step, num_samples=num_samples, samples_dir=out_dir,
                                   sampling_seed=seed, sampler=options, generation=gen)
    run_fn = im.inception_runner(str(ev.inception_weights), local_mesh)
    stats, is_acc = im.sample_features(out_dir, run_fn, num_samples=num_samples, chunk_size=chunk_size,
                                       batch=im.host_inception_batch(ev, local_mesh), merge_dir=step_dir,
                                       with_is=num_samples >= im.IS_SPLITS)
    if jax.process_index() == 0 and stats.count >= 2:
        fid.save_stats(os.path.join(step_dir, "sample_stats.npz"), stats.mu, stats.sigma)
    results["inception_weights"] = str(ev.inception_weights)
    if is_acc is not None:
        results["inception_score"], results["inception_score_std"] = is_acc.result()
        results.update(inception_score_splits=im.IS_SPLITS, inception_score_logits=im.IS_LOGITS)
    if with_fid:
        mu_ref, sigma_ref = fid.load_stats(str(ev.fid_stats))
        results["fid"] = fid.frechet_distance(stats.mu, stats.sigma, mu_ref, sigma_ref)
        results["fid_stats"] = str(ev.fid_stats)
    if note:
        results["not_computed"] = note
    _write_results(workdir, step, results)
    if note:
        say(f"note: {note}")
    return results


def _write_results(workdir: str, step: int, results: dict) -> None:
    """``workdir/eval/<step>.json``, TensorBoard scalars and one summary line (process 0)."""
    if jax.process_index() != 0:
        return
    path = files.write_json(os.path.join(workdir, "eval", f"{step}.json"), results)
    from tensorboardX import SummaryWriter  # noqa: PLC0415 (heavy; only when results are written)

    with SummaryWriter(os.path.join(workdir, "tb")) as tb:
        for key, tag in (("fid", "eval/fid"), ("inception_score", "eval/inception_score")):
            if key in results:
                tb.add_scalar(tag, float(results[key]), int(step))
    scores = ", ".join(f"{k} {results[k]:.4f}" for k in ("fid", "inception_score") if k in results)
    say(f"step {step}: {scores or 'no FID/IS'}; wrote {path}")


def run_fid_stats(config: ml_collections.ConfigDict, workdir: str) -> str:
    """``--mode=fid_stats``: reference mu, sigma of a split; returns the written path."""
    shape = tuple(data.example_shape(config.data))
    require_images(shape, config.data.source, "fid_stats")
    checks.check_eval_inputs(config, "fid_stats")
    ev = config.eval
    split = str(ev.get("fid_stats_split", "") or config.data.train_split)
    out = str(ev.get("fid_stats_out", "") or
              os.path.join(workdir, f"fid_stats_{im.dataset_name(config.data)}_{split}.npz"))
    local_mesh = parallel.make_mesh(jax.local_devices())
    run_fn = im.inception_runner(str(ev.inception_weights), local_mesh)
    host_batch = im.host_inception_batch(ev, local_mesh)
    p, n_proc = jax.process_index(), jax.process_count()
    it = data.create_eval_iterator(config.data, split, batch_size=host_batch * n_proc,
                                   process_index=p, process_count=n_proc)
    stats = fid.ActivationStats()
    with files.progress_bar(data.num_examples(config.data, split), f"Inception ({split})") as bar:
        for batch in it:
            mask = np.asarray(batch["mask"], bool)
            if mask.any():
                stats.update(run_fn(np.asarray(batch["x"], np.float32))["pool"], mask=mask)
            bar.update(int(mask.sum()) * n_proc)
    merged = fid.ActivationStats()
    for part in im.merge_across_processes(stats.to_arrays(), os.path.dirname(os.path.abspath(out)),
                                          "fid_stats"):
        merged.merge(fid.ActivationStats.from_arrays(part))
    if p == 0:
        fid.save_stats(out, merged.mu, merged.sigma)
    say(f"FID reference statistics of {im.dataset_name(config.data)}/{split} ({merged.count} images, "
        f"shape {shape}) written to {out}")
    return out
