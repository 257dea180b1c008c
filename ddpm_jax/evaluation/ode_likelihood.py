"""Exact likelihood through the probability-flow ODE (Song et al. 2021b, §4.3 and App. D.2).

The network defines, besides its sampler, a deterministic flow: the probability-flow ODE
(Song et al. 2021b, eq. (13)). For the VP process it reads, in Karras' variables
x̃ = x/α_t and σ̃ = √((1 − ᾱ_t)/ᾱ_t) (`sampling/solvers.py`), and with s = log σ̃,

    dx̃/ds = f(x̃, s) = σ̃ ε̂(x̃/√(1 + σ̃²), t(σ̃)),

and the instantaneous change of variables (Chen et al. 2018; Song et al. 2021b eq. (39)) gives

    log p_0(x) = log p_T(x̃(s_max)) + ∫_{s_min}^{s_max} ∇·f(x̃(s), s) ds,    x̃(s_min) = x,

integrated from the data at σ̃_min = σ̃(t = 0) (the least noise the network was trained at; as
score_sde starts at t = ε) to σ̃_max = σ̃(T − 1), where the prior is the sampler's start
x_T ~ N(0, I), i.e. x̃ ~ N(0, (1 + σ̃_max²) I).

* Between its integer timesteps the discrete network is queried at the fractional t of σ̃,
  interpolated linearly against the log-σ̃ table (`sampling.base.t_from_log_sigma`); the U-Net's
  sinusoidal embedding is defined for real t (as score_sde's discrete DDPM models are
  queried at t·(N − 1)). x̂_0 is not clipped: the flow must be smooth.
* ∇·f by the Hutchinson–Skilling estimator E_v[vᵀ (∂f/∂x̃) v] with Rademacher v (one v per
  example, fixed for the whole solve; one forward-mode jvp per evaluation), or exactly
  (`trace="exact"`: one jvp per dimension; for checks on small data). For a Jacobian that is
  diagonal, Rademacher v gives the trace exactly (v_i² = 1).
* The ODE in s by classical fixed-step RK4 (`steps` steps uniform in log σ̃; 4 network jvps
  each). No adaptive solver: diffrax is not a dependency, and a fixed grid keeps the cost
  known and the result reproducible; compare two step counts to see the discretisation error.
* Dequantisation (uniform, as score_sde): y = 2(k + u)/256 − 1 for the 8-bit value k and
  u ~ U[0, 1)^D from the example's key, and bits/dim = −log p(y)/(D ln 2) + 7 (a bin is 2/256
  wide in [−1, 1]: log₂ 128 = 7). This is an upper bound on the discrete NLL in expectation
  over u, estimated with one u per example.

This is NOT the variational bound of `evaluation/bpd.py` (Ho et al. eq. (5)): that bounds the
NLL of the discrete-time latent-variable model p_θ(x_0) = ∫ p_θ(x_{0:T}) dx_{1:T} with its
Gaussian decoder; this is the exact log-density of a different model, the continuous flow
defined by the same ε-network, of dequantised data. Both are in bits/dim of the same 8-bit
images, and neither bounds the other.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import data, diffusion, parallel, rng, sampling, setup
from ddpm_jax.sampling.base import log_sigma_table, t_from_log_sigma
from ddpm_jax.sampler import padded_batch_size
from ddpm_jax.schedules import Schedule

TRACES = ("hutchinson", "exact")


def eps_at(apply_fn: Callable, params: Any, x_vp, t, sigma_tilde, *, process: diffusion.GaussianDiffusion):
    """ε̂ of the network at a fractional timestep t, with α = 1/√(1 + σ̃²), σ = σ̃ α (eps | x0 | v):
    the conversions of `GaussianDiffusion.x0_and_eps` at a noise level between the table's."""
    pred = process.pred
    if pred in ("xprev", "consistency"):
        raise ValueError(f"the probability-flow ODE needs ε̂ between timesteps; pred={pred!r} converts only "
                         "at integer t (use an eps, x0 or v model).")
    out, _ = process.split_output(apply_fn(params, x_vp, jnp.full((x_vp.shape[0],), t, x_vp.dtype)))
    out = out.astype(x_vp.dtype)
    alpha = jax.lax.rsqrt(1.0 + sigma_tilde ** 2)
    sigma = sigma_tilde * alpha
    if pred == "eps":
        return out
    if pred == "x0":
        return (x_vp - alpha * out) / sigma
    return alpha * out + sigma * x_vp


def drift_and_divergence(f: Callable, x, v=None, trace: str = "hutchinson"):
    """(f(x), ∇·f per example [B]): vᵀ(∂f/∂x)v for Rademacher v, or the exact trace."""
    if trace not in TRACES:
        raise ValueError(f"unknown trace={trace!r}; choose one of {', '.join(TRACES)}.")
    if trace == "hutchinson":
        fx, jv = jax.jvp(f, (x,), (v,))
        return fx, jnp.sum((v * jv).reshape(x.shape[0], -1), axis=1)
    d = int(np.prod(x.shape[1:]))
    basis = jnp.eye(d, dtype=x.dtype).reshape((d, 1) + x.shape[1:])
    fx = f(x)

    def diag(e):  # the e-th diagonal entry of every example's Jacobian (f acts per example)
        _, je = jax.jvp(f, (x,), (jnp.broadcast_to(e, x.shape),))
        return jnp.sum((je * e).reshape(x.shape[0], -1), axis=1)

    return fx, jnp.sum(jax.lax.map(diag, basis), axis=0)


def ode_log_likelihood(apply_fn: Callable, params: Any, process: diffusion.GaussianDiffusion, x, probe, *,
                       steps: int = 100, trace: str = "hutchinson") -> dict:
    """log p(x) in nats per example [B] of the flow, for continuous x [B, ...] in the x̃ = x_0 scale.

    Returns dict(log_p, prior_log_p, delta_log_p (the ∫∇·f term), x_T (x̃ at σ̃_max)).
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an int >= 1 (RK4 steps of the ODE); e.g. 100.")
    log_sig = log_sigma_table(process.sched)
    s_min, s_max = log_sig[0], log_sig[-1]
    ds = (s_max - s_min) / steps

    def rhs(x_tilde, s):
        sig = jnp.exp(s)
        t = t_from_log_sigma(log_sig, s)
        f = lambda z: sig * eps_at(apply_fn, params, z * jax.lax.rsqrt(1.0 + sig ** 2), t, sig,  # noqa: E731
                                   process=process)
        return drift_and_divergence(f, x_tilde, probe, trace)

    def rk4(carry, i):  # classical Runge–Kutta on the augmented state (x̃, ∫∇·f)
        y, acc = carry
        s = s_min + i * ds
        k1, a1 = rhs(y, s)
        k2, a2 = rhs(y + 0.5 * ds * k1, s + 0.5 * ds)
        k3, a3 = rhs(y + 0.5 * ds * k2, s + 0.5 * ds)
        k4, a4 = rhs(y + ds * k3, s + ds)
        return (y + ds / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4), acc + ds / 6.0 * (a1 + 2 * a2 + 2 * a3 + a4)), None

    x = jnp.asarray(x)
    (x_T, delta), _ = jax.lax.scan(rk4, (x, jnp.zeros((x.shape[0],), x.dtype)),
                                   jnp.arange(steps, dtype=x.dtype))
    var_T = 1.0 + jnp.exp(2.0 * s_max)
    d = int(np.prod(x.shape[1:]))
    prior = -0.5 * (jnp.sum(jnp.square(x_T).reshape(x.shape[0], -1), axis=1) / var_T
                    + d * jnp.log(2.0 * np.pi * var_T))
    return dict(log_p=prior + delta, prior_log_p=prior, delta_log_p=delta, x_T=x_T)


def dequantize(images_uint8, keys) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(y = 2(k + u)/256 − 1, Rademacher probes), u and the probe from each example's key."""
    shape = images_uint8.shape[1:]

    def one(k, key):
        ku, kv = jax.random.split(key)
        u = jax.random.uniform(ku, shape, jnp.float32)
        return 2.0 * (k.astype(jnp.float32) + u) / 256.0 - 1.0, jax.random.rademacher(kv, shape, jnp.float32)

    return jax.vmap(one)(images_uint8, keys)


def bits_per_dim(log_p, dims: int):
    """−log p/(D ln 2) + 7: bits/dim of 8-bit data from the density of y ∈ [−1, 1] (bins 2/256 wide)."""
    return -log_p / (dims * np.log(2.0)) + 7.0


def make_ode_bpd_fn(apply_fn: Callable, process: diffusion.GaussianDiffusion, mesh, *, seed: int, **options) -> Callable:
    """``fn(params, images_uint8, indices) -> dict(bpd, prior_bpd, delta_bpd)`` over the ('data',) mesh."""
    rep, shard = parallel.replicated(mesh), parallel.data_sharded(mesh)

    def fn(params, process, images, indices):
        keys = jax.vmap(lambda k: jax.random.fold_in(k, rng.ODE))(sampling.image_keys(seed, indices))
        y, probe = dequantize(images, keys)
        out = ode_log_likelihood(apply_fn, params, process, y, probe, **options)
        d = int(np.prod(images.shape[1:]))
        return dict(bpd=bits_per_dim(out["log_p"], d), prior_bpd=-out["prior_log_p"] / (d * np.log(2.0)),
                    delta_bpd=-out["delta_log_p"] / (d * np.log(2.0)))

    jitted = jax.jit(fn, in_shardings=(rep, rep, shard, shard), out_shardings=shard)
    return lambda params, images, indices: jitted(params, process, images, indices)


def evaluate_ode_bpd(config: ml_collections.ConfigDict, params: Any, model, sched: Schedule, *,
                     split: str | None = None, num_examples: int | None = None, progress: bool = True) -> dict:
    """Bits/dim of the probability-flow ODE over a split (eval.ode_steps, eval.ode_trace).

    Each process computes every example on its local devices (a small-data evaluation).
    Returns dict(total_bpd, total_bpd_stderr, prior_bpd, delta_bpd, num_examples, steps, ...).
    """
    ev = config.eval
    split = str(split or config.data.eval_split)
    requested = int(ev.bpd_num_examples if num_examples is None else num_examples)
    arrays = data.load_arrays(config.data, split, None if requested == 0 else requested)
    images = np.asarray(arrays["x"])
    if images.dtype != np.uint8:
        raise ValueError(f"the ODE likelihood needs 8-bit images; data.source={config.data.source!r} gives "
                         f"{images.dtype} arrays")
    mesh = parallel.make_mesh(jax.local_devices())
    steps, trace = int(ev.get("ode_steps", 100)), str(ev.get("ode_trace", "hutchinson"))
    fn = make_ode_bpd_fn(setup.model_apply_fn(model), setup.create_diffusion(config, sched), mesh,
                         seed=int(config.seed), steps=steps, trace=trace)
    n, b = len(images), padded_batch_size(min(int(ev.bpd_batch_size), len(images)), mesh)
    params = jax.device_put(params, parallel.replicated(mesh))
    parts: dict[str, list] = dict(bpd=[], prior_bpd=[], delta_bpd=[])
    start = time.time()
    for lo in range(0, n, b):
        idx = np.arange(lo, lo + b)
        batch = images[np.minimum(idx, n - 1)]  # the last batch padded with copies, dropped below
        out = parallel.to_host(fn(params, parallel.host_to_global(batch, mesh),
                                  parallel.host_to_global(idx.astype(np.int32), mesh)))
        keep = idx < n
        for key in parts:
            parts[key].append(np.asarray(out[key], np.float64)[keep])
        if progress and jax.process_index() == 0:
            print(f"ode bits/dim: {min(lo + b, n)}/{n} examples", flush=True)
    bpd = np.concatenate(parts["bpd"])
    return dict(method="ode", total_bpd=float(bpd.mean()),
                total_bpd_stderr=float(bpd.std(ddof=1) / np.sqrt(len(bpd))) if len(bpd) > 1 else 0.0,
                prior_bpd=float(np.concatenate(parts["prior_bpd"]).mean()),
                delta_bpd=float(np.concatenate(parts["delta_bpd"]).mean()),
                dequantization_offset_bpd=7.0, num_examples=int(n), split=split, steps=steps, trace=trace,
                solver="rk4", sigma_min=float(np.exp(log_sigma_table(sched)[0])),
                sigma_max=float(np.exp(log_sigma_table(sched)[-1])), seed=int(config.seed),
                seconds=time.time() - start)


def summary_line(result: dict) -> str:
    return (f"ODE bits/dim on {result['split']} ({result['num_examples']} examples, RK4 {result['steps']} steps, "
            f"{result['trace']} trace): {result['total_bpd']:.4f} ± {result['total_bpd_stderr']:.4f} = "
            f"prior {result['prior_bpd']:.4f} + flow {result['delta_bpd']:.4f} + dequantisation 7")
