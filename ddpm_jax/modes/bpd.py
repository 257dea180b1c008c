"""``--mode=bpd``: bits/dim of a workdir's newest valid EMA params over ``data.eval_split``.

``eval.bpd_method`` picks what is computed:

* ``vlb`` (default): the variational bound of Ho et al. (2020), eq. (5) (``evaluation/bpd.py``),
  written to ``workdir/eval/bpd_<step>.json``, ``bpd_<step>.png`` and TensorBoard scalars;
* ``ode``: the exact log-likelihood of the probability-flow ODE of dequantised data
  (Song et al. 2021b; ``evaluation/ode_likelihood.py``; ``eval.ode_steps``, ``eval.ode_trace``),
  written to ``workdir/eval/bpd_ode_<step>.json``;
* ``both``: the two, one after the other. They are different quantities (see
  ``ode_likelihood``'s docstring): neither bounds the other.

Each prints one line. A DDPM on an autoencoder's latents (``data.latents_from``) reports the
bound of its latents: ``latent_*`` keys, ``space="latent"`` and "latent-space bits/dim" in the
line (``bpd.label_latent``); the ODE likelihood is refused there (``checks.check_latent_mode``).
"""

from __future__ import annotations

import os

import jax
import ml_collections

from ddpm_jax import checks, data, files, metrics, setup
from ddpm_jax.evaluation import bpd, ode_likelihood
from ddpm_jax.modes import require_images

BPD_METHODS = ("vlb", "ode", "both")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Evaluates `eval.bpd_method`; returns the bound's terms (``bpd.evaluate_bpd``) and/or ``ode``."""
    checks.check_config(config, "bpd")
    require_images(data.example_shape(config.data), config.data.source, "bpd")
    method = str(config.eval.get("bpd_method", "vlb"))
    if method not in BPD_METHODS:
        raise ValueError(f"eval.bpd_method={method!r} is unknown; use one of {', '.join(BPD_METHODS)}.")
    loaded = setup.load_run(config, workdir)
    result: dict = dict(step=loaded.step)
    if method in ("vlb", "both"):
        result.update(bpd.evaluate_bpd(config, loaded.params, loaded.model, loaded.sched, loaded.mesh))
        paths = bpd.write_report(workdir, loaded.step, result)
        result["paths"] = paths
        if jax.process_index() == 0:
            print(f"step {loaded.step}: {bpd.summary_line(result)}; wrote {paths['json']} and {paths['png']}",
                  flush=True)
    if method in ("ode", "both"):
        ode = ode_likelihood.evaluate_ode_bpd(config, loaded.params, loaded.model, loaded.sched)
        result["ode"] = ode
        if jax.process_index() == 0:
            path = os.path.join(workdir, "eval", f"bpd_ode_{loaded.step}.json")
            files.keep_previous(path)
            files.write_json(path, dict(ode, step=loaded.step))
            metrics.write_scalars(workdir, loaded.step, {"eval/ode_total_bpd": ode["total_bpd"]})
            print(f"step {loaded.step}: {ode_likelihood.summary_line(ode)}; wrote {path}", flush=True)
    return result
