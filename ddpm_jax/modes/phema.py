"""`--mode=phema`: the EMA of any σ_rel after training, from the run's post-hoc EMA snapshots.

    python -m ddpm_jax.main --mode=phema --config=... --workdir=RUN --config.ema.sigma_rel=0.05[,0.1,...]

Reads every snapshot of `RUN/ema_snapshots` (written in training with `ema.sigma_rels` and
`ema.snapshot_every`), solves for each σ_rel the least-squares weights of the stored profiles
(`post_hoc_ema.check_representable`, App. C.3 of Karras et al. 2024) at the newest snapshot's
step and writes the weighted sum as a params checkpoint of that step into
`<ema.out_workdir or RUN/phema>/sigma_rel_<σ_rel>`: every other mode reads it with `--workdir`
set there (sample, eval, bpd, figures, the diffusers export). Its RunMeta's `source` records
σ_rel, γ, the snapshot steps used, the fit's residual and the run. An existing reconstruction
of the same σ_rel from the same snapshots is kept; one of other snapshots is refused.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections

from ddpm_jax import checkpointing, checks, post_hoc_ema, setup
from ddpm_jax.modes import say
from ddpm_jax.run_meta import RunMeta


def out_workdir(config: ml_collections.ConfigDict, workdir: str, sigma_rel: float) -> str:
    """Where the reconstruction of `sigma_rel` goes: `<ema.out_workdir or workdir/phema>/sigma_rel_<σ_rel>`."""
    base = str(config.ema.get("out_workdir", "")) or os.path.join(str(workdir), "phema")
    return os.path.join(base, f"sigma_rel_{sigma_rel:g}")


def open_snapshots(workdir: str) -> checkpointing.Checkpointer:
    """The workdir's snapshots; a one-line FileNotFoundError when it has none."""
    path = checkpointing.workdir_path(workdir, checkpointing.SNAPSHOT_DIR)
    fix = (f"no post-hoc EMA snapshots in {path}; train with --config.ema.sigma_rels=0.05,0.1 "
           "--config.ema.snapshot_every=N (N steps between snapshots) and run --mode=phema on that workdir.")
    if not os.path.isdir(path):
        raise FileNotFoundError(fix)
    snaps = checkpointing.Checkpointer(workdir, keep=None, async_save=False, subdir=checkpointing.SNAPSHOT_DIR)
    if not snaps.all_steps():
        snaps.close()
        raise FileNotFoundError(fix)
    return snaps


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Writes the reconstruction of every σ_rel of `ema.sigma_rel`; returns their records."""
    checks.check_config(config, "phema")
    sigma_rels = post_hoc_ema.parse_sigma_rels(config.ema.get("sigma_rel", ""), "ema.sigma_rel")
    if not sigma_rels:
        raise ValueError("ema.sigma_rel is empty; name the EMA width(s) to reconstruct, e.g. "
                         "--config.ema.sigma_rel=0.05 or 0.03,0.05,0.1.")
    with open_snapshots(workdir) as snaps:
        steps = snaps.all_steps()
        metas = [snaps.read_meta(s) for s in steps]
        stored = RunMeta.from_dict(metas[-1]["run"], str(workdir))
        ddpm = setup.create_run(config)
        ddpm.meta.check_matches(stored, str(workdir))
        snap_t = [s for s, m in zip(steps, metas) for _ in m["gammas"]]
        snap_g = [g for m in metas for g in m["gammas"]]
        weights, residual = post_hoc_ema.check_representable(sigma_rels, snap_t, snap_g, steps[-1], str(workdir))
        records = [dict(sigma_rel=s, gamma=post_hoc_ema.gamma_from_sigma_rel(s), step=steps[-1],
                        snapshot_steps=steps, residual=float(r), workdir=out_workdir(config, workdir, s))
                   for s, r in zip(sigma_rels, residual)]
        todo = [i for i, rec in enumerate(records) if not _kept(rec)]
        if todo:
            params = setup.abstract_params(ddpm.model, ddpm.shape, ddpm.mesh)
            sums = weighted_sums(snaps, steps, metas, params, weights[:, todo])
            for i, summed in zip(todo, sums):
                _write(records[i], summed, stored, workdir)
    for rec in records:
        say(f"σ_rel {rec['sigma_rel']:g} (γ {rec['gamma']:.3f}) from {len(steps)} snapshots, steps "
            f"{steps[0]}..{steps[-1]}, fit residual {rec['residual']:.2%}: {rec['workdir']}")
    return records


def weighted_sums(snaps: checkpointing.Checkpointer, steps: list[int], metas: list[dict], params_template,
                   weights) -> list:
    """Σ_i x_i θ̂_i over the stored profiles for every column of `weights` [n, m], reading each snapshot once."""
    axpy = jax.jit(lambda acc, w, p: jax.tree.map(lambda a, b: a + w.astype(b.dtype) * b, acc, p))
    sums, row = None, 0
    for step, meta in zip(steps, metas):
        k = len(meta["gammas"])
        template = post_hoc_ema.Snapshot(step=jax.ShapeDtypeStruct((), jnp.int32),
                                         **dataclasses.asdict(post_hoc_ema.abstract(params_template, k)))
        profiles = snaps.restore_train(template, step).state.ema_params
        if sums is None:
            sums = [jax.tree.map(jnp.zeros_like, profiles[0]) for _ in range(weights.shape[1])]
        for j, profile in enumerate(profiles):
            sums = [axpy(acc, jnp.float32(weights[row + j, m]), profile) for m, acc in enumerate(sums)]
        row += k
    return sums


def _source(rec: dict, workdir: str) -> dict:
    return dict(post_hoc_ema=dict(sigma_rel=rec["sigma_rel"], gamma=rec["gamma"], snapshot_steps=rec["snapshot_steps"],
                                  residual=rec["residual"], run=str(workdir)))


def _kept(rec: dict) -> bool:
    """True if `rec`'s workdir already holds this reconstruction; a one-line error if it holds another."""
    meta = checkpointing.read_meta(rec["workdir"])
    if meta is None:
        return False
    old = meta.get("source", {}).get("post_hoc_ema", {})
    if old.get("snapshot_steps") == rec["snapshot_steps"] and old.get("sigma_rel") == rec["sigma_rel"]:
        return True
    raise FileExistsError(f"{rec['workdir']} holds another reconstruction (σ_rel {old.get('sigma_rel')}, snapshots "
                          f"{old.get('snapshot_steps')}); remove it or set --config.ema.out_workdir elsewhere.")


def _write(rec: dict, params, stored: RunMeta, workdir: str) -> None:
    """The params checkpoint every mode reads, its RunMeta's source naming the reconstruction."""
    meta = dataclasses.replace(stored, source=_source(rec, workdir))
    checkpointing.save_pretrained(rec["workdir"], params, meta.to_dict(), step=rec["step"])
    config_json = os.path.join(str(workdir), "config.json")
    if jax.process_index() == 0 and os.path.isfile(config_json):  # sampling reads the training config's choices
        shutil.copyfile(config_json, os.path.join(rec["workdir"], "config.json"))
