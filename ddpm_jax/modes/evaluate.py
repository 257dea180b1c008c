"""``--mode=eval`` and ``--mode=fid_stats``: sample quality as in the paper (FID, Inception Score).

eval
    Generates ``eval.num_samples`` samples from the newest valid checkpoint's EMA params
    (image i depends only on (``sampling.seed``, i); ``config.sampling`` picks the sampler)
    into ``step_dir/samples/`` in resumable uint8 chunks (``evaluation/chunked_generation.py``),
    then, with ``eval.metric=inception`` (the default), computes FID against ``eval.fid_stats``
    and the Inception Score (10 splits) from the FID Inception's features of those uint8
    images, as if read back from PNG files; the samples' own statistics go to
    ``step_dir/sample_stats.npz`` (pytorch-fid format). TensorBoard: ``eval/fid``,
    ``eval/inception_score``, ``eval/classifier_<metric>`` (and ``..._x_floor``).

    With ``eval.metric=classifier`` (digits, MNIST: what a CPU can judge), the metrics are
    those of ``evaluation/sample_quality.py`` in the features of the data set's own classifier
    (``evaluation/classifier.py``; trained once into ``eval.classifier_path`` if it is not
    there yet), each beside its noise floor: the same metric for as many real held-out images
    against the same real training images. Results: ``step_dir/results_<metric>.json``, where
    ``step_dir = workdir/eval/step_<k>_<sampler>_seed<s>`` (DDPM and DDIM samples of one
    checkpoint keep their own folders).

    For the Inception metrics, what cannot be computed is found before any sample is made
    (``checks.check_eval_inputs``): without usable Inception weights, or with ``eval.fid_stats``
    set but unusable, the run stops at once with one line saying which field to set and how to get
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

from ddpm_jax import checks, condition_config, data, files, metrics, parallel, setup
from ddpm_jax.evaluation import chunked_generation, classifier, fid, sample_quality
from ddpm_jax.evaluation import inception_metrics as im
from ddpm_jax.modes import require_images, say


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """``--mode=eval``: samples, then FID / IS or the classifier metrics (see the module docstring)."""
    require_images(data.example_shape(config.data), config.data.source, "eval")
    checks.check_config(config, "eval")
    metric = str(config.eval.metric)
    if metric == "classifier":  # found (or trained, once) before any sample is made
        clf = classifier.load_or_train(config.data, classifier.resolve_path(config), log=say)
    loaded = setup.load_run(config, workdir)
    step_dir = os.path.join(workdir, "eval", f"step_{loaded.step}_{setup.sampler_tag(config)}"
                                             f"_seed{int(config.sampling.seed)}")
    out_dir, gen = _generate(config, loaded, step_dir)
    results: dict[str, Any] = dict(step=loaded.step, metric=metric, num_samples=int(config.eval.num_samples),
                                   samples_dir=out_dir, sampling_seed=int(config.sampling.seed),
                                   sampler=_sampler_record(config), generation=gen)
    if metric == "inception":
        results.update(_inception_metrics(config, out_dir, step_dir))
    elif jax.process_index() == 0:  # a small network on one device: process 0 scores for all
        chunks = list(chunked_generation.read_chunks(
            out_dir, range(gen["num_chunks"]), num_samples=int(config.eval.num_samples),
            chunk_size=int(config.eval.chunk_size)))
        images = np.concatenate([im for _, im in chunks])
        # A conditional model's samples are scored against the class each was asked for (its caption's digit).
        asked = condition_config.asked_classes(config, np.concatenate([i for i, _ in chunks]))
        results["classifier"] = dict(path=classifier.resolve_path(config), **clf.info)
        results.update(sample_quality.evaluate_samples(clf, config.data, images, labels=asked))
    _write_results(step_dir, loaded.step, results)
    return results


def _sampler_record(config: ml_collections.ConfigDict) -> dict:
    """What made the samples: the sampler's options and the process's target, variance and clipping."""
    d = config.diffusion
    return dict(setup.sampler_options(config), var_type=str(d.var_type), clip_denoised=setup.clips_x0(config),
                pred=str(d.pred))


def _generate(config: ml_collections.ConfigDict, loaded: setup.LoadedRun, step_dir: str) -> tuple[str, dict]:
    """The resumable uint8 sample chunks of `eval.num_samples` images under `step_dir/samples`."""
    ev, shape, seed = config.eval, loaded.sample_shape, int(config.sampling.seed)  # decoded, on latents
    out_dir = os.path.join(step_dir, "samples")
    meta = dict(step=loaded.step, sampling_seed=seed, shape=list(shape), chunk_size=int(ev.chunk_size),
                sampler=_sampler_record(config), **condition_config.sampled_meta(config))
    chunked_generation.check_samples_meta(out_dir, meta)
    local_mesh = parallel.make_mesh(jax.local_devices())  # each process samples its own chunks
    gen = chunked_generation.generate_samples(
        setup.make_sampler(loaded, config, mesh=local_mesh), parallel.to_host(loaded.params), out_dir,
        num_samples=int(ev.num_samples), chunk_size=int(ev.chunk_size), batch_size=int(ev.batch_size),
        shape=shape)
    say(f"samples: {ev.num_samples} in {out_dir} ({gen['chunks_skipped']} of {gen['num_chunks']} chunks "
        f"were already there; {gen['images_generated']} generated in {gen['seconds']:.1f} s, "
        f"{gen['images_per_sec']:.1f} images/s)")
    return out_dir, gen


def _inception_metrics(config: ml_collections.ConfigDict, out_dir: str, step_dir: str) -> dict:
    """IS (and FID against ``eval.fid_stats`` when it is set) of the uint8 samples in ``out_dir``."""
    ev = config.eval
    num_samples = int(ev.num_samples)
    local_mesh = parallel.make_mesh(jax.local_devices())
    run_fn = im.inception_runner(str(ev.inception_weights), local_mesh)
    stats, is_acc = im.sample_features(out_dir, run_fn, num_samples=num_samples, chunk_size=int(ev.chunk_size),
                                       batch=im.host_inception_batch(ev, local_mesh), merge_dir=step_dir,
                                       with_is=num_samples >= im.IS_SPLITS)
    if jax.process_index() == 0 and stats.count >= 2:
        fid.save_stats(os.path.join(step_dir, "sample_stats.npz"), stats.mu, stats.sigma)
    results: dict[str, Any] = dict(inception_weights=str(ev.inception_weights))
    if is_acc is not None:
        results["inception_score"], results["inception_score_std"] = is_acc.result()
        results.update(inception_score_splits=im.IS_SPLITS, inception_score_logits=im.IS_LOGITS)
    if str(ev.fid_stats):
        mu_ref, sigma_ref = fid.load_stats(str(ev.fid_stats))
        results["fid"] = fid.frechet_distance(stats.mu, stats.sigma, mu_ref, sigma_ref)
        results["fid_stats"] = str(ev.fid_stats)
    else:
        results["not_computed"] = ("FID not computed: eval.fid_stats is not set: compute the reference "
                                   "statistics with --mode=fid_stats and pass --config.eval.fid_stats=FILE.npz")
        say(f"note: {results['not_computed']}")
    return results


def _write_results(step_dir: str, step: int, results: dict) -> None:
    """``step_dir/results_<metric>.json``, TensorBoard scalars and the readable lines (process 0)."""
    if jax.process_index() != 0:
        return
    path = files.write_json(os.path.join(step_dir, f"results_{results['metric']}.json"), results)
    workdir = os.path.dirname(os.path.dirname(step_dir))
    scalars = {f"eval/{k}": results[k] for k in ("fid", "inception_score") if k in results}
    for name, value in results.get("metrics", {}).items():
        scalars[f"eval/classifier_{name}"] = value
        scalars[f"eval/classifier_{name}_x_floor"] = results["ratio"][name]
    if "conditional" in results:
        scalars["eval/label_accuracy"] = results["conditional"]["generated"]["accuracy"]
    metrics.write_scalars(workdir, step, scalars)
    if results["metric"] == "classifier":
        sampler = results["sampler"]
        steps = f", {sampler['num_steps']} steps" if sampler["num_steps"] else ""
        print(f"step {step}, {sampler['method']} sampler{steps}:\n" + sample_quality.format_report(results),
              flush=True)
    else:
        scores = ", ".join(f"{k} {results[k]:.4f}" for k in ("fid", "inception_score") if k in results)
        say(f"step {step}: {scores or 'no FID/IS'}")
    say(f"wrote {path}")


def run_fid_stats(config: ml_collections.ConfigDict, workdir: str) -> str:
    """``--mode=fid_stats``: reference mu, sigma of a split; returns the written path."""
    shape = tuple(data.example_shape(config.data))
    require_images(shape, config.data.source, "fid_stats")
    checks.check_config(config, "fid_stats")
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
