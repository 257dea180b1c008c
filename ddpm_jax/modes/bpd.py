"""``--mode=bpd``: bits/dim of a workdir's newest valid EMA params over ``data.eval_split``.

The bound and its loop are ``evaluation/bpd.py``; this writes ``workdir/eval/bpd_<step>.json``,
``bpd_<step>.png`` and TensorBoard scalars, and prints one line.
"""

from __future__ import annotations

import jax
import ml_collections

from ddpm_jax import data, setup
from ddpm_jax.evaluation import bpd
from ddpm_jax.modes import require_images


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Evaluates the bound; returns its terms (``bpd.evaluate_bpd``), the step and the paths written."""
    require_images(data.example_shape(config.data), config.data.source, "bpd")
    loaded = setup.load_run(config, workdir)
    result = dict(bpd.evaluate_bpd(config, loaded.params, loaded.model, loaded.sched, loaded.mesh),
                  step=loaded.step)
    paths = bpd.write_report(workdir, loaded.step, result)
    if jax.process_index() == 0:
        print(f"step {loaded.step}: {bpd.summary_line(result)}; wrote {paths['json']} and {paths['png']}",
              flush=True)
    return dict(result, paths=paths)
