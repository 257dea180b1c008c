"""DDPM / DDIM steps and the scan sampler: against NumPy float64 references written here, against
a Python loop of steps, across batch splits and device meshes, and against diffusers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ddpm_jax import diffusion, sampling, schedules
from ddpm_jax.schedules import Schedule

GD = diffusion.GaussianDiffusion

T = 1000
TS = 40  # the small chain used by the sampler tests
SHAPE = (4, 4, 3)


@pytest.fixture(scope="module")
def betas():
    return schedules.get_betas("linear", T)


@pytest.fixture(scope="module")
def sched(betas):
    return Schedule.from_betas(betas)


@pytest.fixture(scope="module")
def small():
    return Schedule.from_betas(schedules.get_betas("linear", TS, beta_start=1e-4, beta_end=0.25))


def _rand(shape, seed, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def _f64(x):
    return np.asarray(x, np.float64)


# ---- Independent float64 references ---------------------------------------------------------------

def ref_ddpm_step(betas, eps, x, t, z, var_type, clip):
    """Alg. 2 in float64; `t` an int [B]. Written from the paper, not from ddpm_jax."""
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    out = np.empty_like(x)
    for i, ti in enumerate(t):
        ab, ab_prev = abar[ti], (abar[ti - 1] if ti > 0 else 1.0)
        if not clip:
            # Alg. 2 line 4: x_{t−1} = (x_t − β_t/√(1−ᾱ_t) ε) / √α_t + σ_t z.
            mean = (x[i] - betas[ti] / np.sqrt(1 - ab) * eps[i]) / np.sqrt(alphas[ti])
        else:
            x0 = np.clip((x[i] - np.sqrt(1 - ab) * eps[i]) / np.sqrt(ab), -1, 1)
            if ti == 0:
                mean = x0  # q(x_0 | x_1, x_0) is a point mass at x_0
            else:
                # Posterior of N(x_t; √α_t x, β_t) × N(x; √ᾱ_{t−1} x0, 1 − ᾱ_{t−1}) by Bayes' rule.
                prec = alphas[ti] / betas[ti] + 1 / (1 - ab_prev)
                mean = (np.sqrt(alphas[ti]) * x[i] / betas[ti] + np.sqrt(ab_prev) * x0 / (1 - ab_prev)) / prec
        var = betas[ti] if var_type == "fixedlarge" else betas[ti] * (1 - ab_prev) / (1 - ab)
        out[i] = mean + (np.sqrt(var) * z[i] if ti > 0 else 0.0)
    return out


def ref_ddim_step(betas, eps, x, t, t_prev, z, eta, clip):
    """Song et al. 2021 eq. (12) with σ_t(η) of eq. (16), in float64."""
    abar = np.cumprod(1.0 - betas)
    out = np.empty_like(x)
    for i, (ti, tp) in enumerate(zip(t, t_prev)):
        a, a_prev = abar[ti], (abar[tp] if tp >= 0 else 1.0)
        x0 = (x[i] - np.sqrt(1 - a) * eps[i]) / np.sqrt(a)
        e = eps[i]
        if clip:
            x0 = np.clip(x0, -1, 1)
            e = (x[i] - np.sqrt(a) * x0) / np.sqrt(1 - a)
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)
        out[i] = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma ** 2) * e + sigma * z[i]
    return out


# ---- Single steps ---------------------------------------------------------------------------------------

STEP_T = np.array([0, 1, 2, 10, 100, 500, 998, 999])


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_step_matches_float64_alg2(sched, betas, var_type, clip):
    x, eps, z = _rand((8,) + SHAPE, 0, 1.5), _rand((8,) + SHAPE, 1), _rand((8,) + SHAPE, 2)
    x_prev, x0 = sampling.ddpm_step(GD(sched, var_type=var_type, clip_x0=clip), eps, x, jnp.asarray(STEP_T), z)
    want = ref_ddpm_step(betas, _f64(eps), _f64(x), STEP_T, _f64(z), var_type, clip)
    np.testing.assert_allclose(x_prev, want, rtol=1e-5, atol=1e-5)
    if clip:
        assert float(jnp.abs(x0).max()) <= 1.0
    # A scalar t broadcasts like a [B] of that t.
    for t in (0, 37):
        got, _ = sampling.ddpm_step(GD(sched, var_type=var_type, clip_x0=clip), eps, x, t, z)
        want = ref_ddpm_step(betas, _f64(eps), _f64(x), np.full(8, t), _f64(z), var_type, clip)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_ddpm_step_adds_no_noise_at_t0(sched):
    x, eps = _rand((3, 2), 0), _rand((3, 2), 1)
    t = jnp.zeros((3,), jnp.int32)
    a, _ = sampling.ddpm_step(GD(sched), eps, x, t, jnp.full((3, 2), 1e6))
    b, x0 = sampling.ddpm_step(GD(sched), eps, x, t, jnp.zeros((3, 2)))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(b, x0, atol=1e-6)  # the posterior mean at t = 0 is x̂_0 itself


DDIM_PAIRS = [(999, 979), (500, 480), (20, 0), (10, 9), (1, 0), (0, -1), (19, -1), (999, -1)]


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [True, False])
def test_ddim_step_matches_float64_eq12(sched, betas, eta, clip):
    t, t_prev = (np.array(v) for v in zip(*DDIM_PAIRS))
    shape = (len(t),) + SHAPE
    x, eps, z = _rand(shape, 3, 1.5), _rand(shape, 4), _rand(shape, 5)
    got, _ = sampling.ddim_step(GD(sched, clip_x0=clip), eps, x, jnp.asarray(t), jnp.asarray(t_prev), z, eta=eta)
    want = ref_ddim_step(betas, _f64(eps), _f64(x), t, t_prev, _f64(z), eta, clip)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_ddim_eta1_one_step_is_ddpm_fixedsmall(sched):
    """σ_t(1)² = β̃_t, and with ε̂ recomputed from the clipped x̂_0 the mean is μ̃_t (eq. (7))."""
    t = jnp.asarray(STEP_T)
    x, eps, z = _rand((8,) + SHAPE, 6, 1.5), _rand((8,) + SHAPE, 7), _rand((8,) + SHAPE, 8)
    for clip in (True, False):
        a, _ = sampling.ddim_step(GD(sched, clip_x0=clip), eps, x, t, t - 1, z, eta=1.0)
        b, _ = sampling.ddpm_step(GD(sched, var_type="fixedsmall", clip_x0=clip), eps, x, t, z)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("pred", ["x0", "v"])
def test_steps_agree_across_parameterisations(sched, pred):
    """The same prediction expressed as x0 or v gives the same step as expressed as ε."""
    t = jnp.asarray(STEP_T[1:-1])
    x, eps, z = _rand((6,) + SHAPE, 9), _rand((6,) + SHAPE, 10), _rand((6,) + SHAPE, 11)
    x0 = diffusion.x0_from_eps(sched, x, t, eps)
    out = x0 if pred == "x0" else diffusion.v_target(sched, x0, t, eps)
    a, _ = sampling.ddpm_step(GD(sched, clip_x0=True), eps, x, t, z)
    b, _ = sampling.ddpm_step(GD(sched, clip_x0=True, pred=pred), out, x, t, z)
    np.testing.assert_allclose(a, b, atol=2e-5)
    a, _ = sampling.ddim_step(GD(sched), eps, x, t, t - 7, z, eta=0.3)
    b, _ = sampling.ddim_step(GD(sched, pred=pred), out, x, t, t - 7, z, eta=0.3)
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_ddim_eta0_ignores_the_noise(sched):
    x, eps = _rand((4, 2), 12), _rand((4, 2), 13)
    t, tp = jnp.array([900, 50, 3, 0]), jnp.array([880, 30, 0, -1])
    a, _ = sampling.ddim_step(GD(sched), eps, x, t, tp, _rand((4, 2), 14), eta=0.0)
    b, _ = sampling.ddim_step(GD(sched), eps, x, t, tp, _rand((4, 2), 15), eta=0.0)
    np.testing.assert_array_equal(a, b)


# ---- Timestep plans ---------------------------------------------------------------------------------------

def test_ddim_timesteps():
    np.testing.assert_array_equal(sampling.ddim_timesteps(1000, 10, "leading"), np.arange(900, -1, -100))
    np.testing.assert_array_equal(sampling.ddim_timesteps(1000, 10, "trailing"), np.arange(999, 0, -100))
    # quadratic, transcribed from the DDIM paper's code (ermongroup/ddim, runners/diffusion.py).
    for T_, n in ((1000, 50), (1000, 100), (100, 10)):
        seq = (np.linspace(0, np.sqrt(T_ * 0.8), n) ** 2)
        want = [int(s) for s in list(seq)][::-1]
        got = sampling.ddim_timesteps(T_, n, "quadratic")
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.int32
    # By hand for T = 1000, n = 50: (i · √800 / 49)² = i² · 800 / 2401, truncated; 0 repeats.
    np.testing.assert_array_equal(sampling.ddim_timesteps(1000, 50, "quadratic")[::-1][:6], [0, 0, 1, 2, 5, 8])
    assert sampling.ddim_timesteps(1000, 50, "quadratic")[0] == 800
    for T_ in (50, 100, 997):
        for n in range(1, T_ + 1, 7):
            for spacing in sampling.DDIM_SPACINGS:
                ts = sampling.ddim_timesteps(T_, n, spacing)
                assert len(ts) == n and ts.min() >= 0 and ts.max() <= T_ - 1
                assert np.all(np.diff(ts) <= 0) and (spacing == "quadratic" or np.all(np.diff(ts) < 0))
    with pytest.raises(ValueError, match="leading, trailing, quadratic"):
        sampling.ddim_timesteps(100, 10, "linspace")
    with pytest.raises(ValueError, match="num_steps=101"):
        sampling.ddim_timesteps(100, 101)


# ---- The scan sampler ---------------------------------------------------------------------------------------

def fake_apply(params, x, t, cond=None):
    """A deterministic stand-in for the network: ε̂ = a·x_t + tanh(t/T)."""
    tt = t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    return params["a"] * x + jnp.tanh(tt * params["inv_T"])


PARAMS = {"a": jnp.float32(0.1), "inv_T": jnp.float32(1.0 / TS)}


@functools.lru_cache(maxsize=None)
def _jitted(**kw):
    return jax.jit(functools.partial(sampling.sample, fake_apply, **kw))


def jsample(sched, indices, x_start=None, seed=0, params=PARAMS, var_type="fixedlarge", **kw):
    """sample() under jit with the process of `sched`; the seed is traced (one compile serves every seed)."""
    kw.setdefault("shape", SHAPE)
    return _jitted(**kw)(params, GD(sched, var_type=var_type), indices=indices, x_start=x_start,
                         seed=jnp.int32(seed))


def loop_sample(sched, indices, *, seed=0, method="ddpm", num_steps=None, eta=0.0, spacing="leading",
                var_type="fixedlarge", clip=True, x_start=None, start_step=None):
    """The reference: a Python loop of steps; noise of image i at step t from fold_in(key_i, t)."""
    keys = sampling.image_keys(seed, jnp.asarray(indices))
    k = TS if start_step is None else start_step
    x = sampling.image_noise(keys, TS, SHAPE) if x_start is None else x_start
    if method == "ddpm":
        ts = list(range(k - 1, -1, -1))
    else:
        ts = list(sampling.ddim_timesteps(k, min(num_steps, k), spacing))
    step = _loop_step(method, eta, var_type, clip)
    states, x0s = [], []
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        x, x0 = step(sched, keys, x, jnp.int32(t), jnp.int32(t_prev))
        states.append(x)
        x0s.append(x0)
    return x, states, x0s, ts


@functools.lru_cache(maxsize=None)
def _loop_step(method, eta, var_type, clip):
    """One loop iteration, jitted once (only to keep the test fast; t is traced, not unrolled)."""

    @jax.jit
    def step(sched, keys, x, t, t_prev):
        out = fake_apply(PARAMS, x, jnp.full((x.shape[0],), t, jnp.int32))
        z = sampling.image_noise(keys, t, SHAPE)
        if method == "ddpm":
            return sampling.ddpm_step(GD(sched, var_type=var_type, clip_x0=clip), out, x, t, z)
        return sampling.ddim_step(GD(sched, clip_x0=clip), out, x, t, t_prev, z, eta=eta)

    return step


def test_image_noise_is_fold_in_of_seed_and_index():
    keys = sampling.image_keys(3, jnp.array([5, 11]))
    z = sampling.image_noise(keys, 7, (2,))
    want = jax.random.normal(jax.random.fold_in(jax.random.fold_in(jax.random.key(3), 11), 7), (2,))
    np.testing.assert_array_equal(z[1], want)


@pytest.mark.parametrize("n, kw", [(5, dict(method="ddpm", var_type="fixedlarge")),
                                  (3, dict(method="ddim", num_steps=8, eta=0.5, spacing="trailing")),
                                  (3, dict(method="ddim", num_steps=7, eta=0.0, spacing="quadratic"))])
def test_scan_sampler_equals_python_loop_and_keeps_trajectory(small, n, kw):
    idx = jnp.arange(4)
    ref, states, x0s, ts = loop_sample(small, idx, **kw)
    out = jsample(small, idx, trajectory_every=n, **kw)
    np.testing.assert_allclose(out.samples, ref, atol=1e-5)
    # Frames after steps n, 2n, …: the loop's states and x̂_0s there; t is the paper index.
    K = len(ts) // n
    assert out.trajectory.shape == out.trajectory_x0.shape == (K, 4) + SHAPE
    for j in range(K):
        np.testing.assert_allclose(out.trajectory[j], states[(j + 1) * n - 1], atol=1e-5)
        np.testing.assert_allclose(out.trajectory_x0[j], x0s[(j + 1) * n - 1], atol=1e-5)
    t_after = [(ts[i + 1] + 1 if i + 1 < len(ts) else 0) for i in range(len(ts))]
    np.testing.assert_array_equal(out.trajectory_t, [t_after[(j + 1) * n - 1] for j in range(K)])
    if kw["method"] == "ddpm":
        np.testing.assert_array_equal(out.trajectory_t, np.arange(TS - 5, -1, -5))
        # The last frame is the last step, t = 0: no noise there, so x_0 is exactly the clipped x̂_0
        # (the posterior mean at t = 0 is x̂_0: coef1 = 1, coef2 = 0).
        np.testing.assert_array_equal(out.samples, out.trajectory[-1])
        np.testing.assert_array_equal(out.samples, out.trajectory_x0[-1])
    if kw["method"] == "ddpm" and kw["var_type"] == "fixedlarge":
        no_traj = jsample(small, idx, **kw)
        assert no_traj.trajectory is None
        np.testing.assert_allclose(no_traj.samples, out.samples, atol=1e-6)


def test_partial_denoising(small):
    idx = jnp.arange(3)
    x0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3,) + SHAPE), jnp.float32)
    # k = 0: nothing to undo, the input comes back (DDPM and DDIM).
    for kw in (dict(), dict(method="ddim", num_steps=5)):
        out = jsample(small, idx, x_start=x0, start_step=0, **kw)
        np.testing.assert_array_equal(out.samples, x0)
    np.testing.assert_array_equal(sampling.noised_start(small, x0, 0, _rand(x0.shape, 1)), x0)
    # noised_start(k) is q(x_k | x_0): q_sample at t = k − 1.
    z = _rand(x0.shape, 2)
    xk = sampling.noised_start(small, x0, 12, z)
    np.testing.assert_array_equal(xk, diffusion.q_sample(small, x0, 11, z))
    # From x_k the sampler runs exactly the loop's last k steps.
    for kw in (dict(), dict(method="ddim", num_steps=4, eta=1.0, spacing="trailing")):
        out = jsample(small, idx, x_start=xk, start_step=12, **kw)
        ref, _, _, ts = loop_sample(small, idx, x_start=xk, start_step=12, **kw)
        assert ts[0] == 11 and len(ts) == (12 if not kw else 4)
        np.testing.assert_allclose(out.samples, ref, atol=1e-5)


def test_ddim_eta0_is_deterministic_and_ddpm_is_not(small):
    idx = jnp.arange(4)
    x_T = _rand((4,) + SHAPE, 3)
    a = jsample(small, idx, x_start=x_T, method="ddim", num_steps=10, seed=0).samples
    b = jsample(small, idx, x_start=x_T, method="ddim", num_steps=10, seed=1).samples
    np.testing.assert_array_equal(a, b)
    c = jsample(small, idx, x_start=x_T, method="ddim", num_steps=10, eta=1.0, seed=0).samples
    d = jsample(small, idx, x_start=x_T, method="ddim", num_steps=10, eta=1.0, seed=1).samples
    assert float(jnp.abs(c - d).max()) > 1e-2


def test_per_image_seeds_do_not_depend_on_batching(small):
    whole = jsample(small, jnp.arange(8)).samples
    halves = [jsample(small, jnp.arange(4) + 4 * h).samples for h in range(2)]
    np.testing.assert_array_equal(whole, jnp.concatenate(halves))
    rev = jsample(small, jnp.arange(8)[::-1]).samples
    np.testing.assert_array_equal(rev, whole[::-1])
    # A Python-int seed (static under jit, as in the contract) gives the keys a traced one does.
    static_keys = jax.random.key_data(sampling.image_keys(0, jnp.arange(8)))
    traced_keys = jax.random.key_data(jax.jit(sampling.image_keys)(jnp.int32(0), jnp.arange(8)))
    np.testing.assert_array_equal(static_keys, traced_keys)
    other_seed = jsample(small, jnp.arange(8), seed=1).samples
    assert float(jnp.abs(other_seed - whole).max(axis=(1, 2, 3)).min()) > 1e-2  # every image changes
    # Images are distinct: different indices give different noise.
    assert float(jnp.abs(whole[0] - whole[1]).max()) > 1e-2


@pytest.mark.parametrize("method, start_step", [("ddpm", None), ("ddim", 10)])
def test_sharded_sampling_matches_one_device(small, method, start_step):
    kw = dict(method=method, num_steps=6 if method == "ddim" else None, eta=0.5)
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py fakes 8 CPU devices"
    auto = (jax.sharding.AxisType.Auto,)
    mesh8 = jax.make_mesh((8,), ("data",), axis_types=auto)
    mesh1 = jax.sharding.Mesh(np.array(devices[:1]), ("data",), axis_types=auto)
    idx = np.arange(16, dtype=np.int32)
    x_start = _rand((16,) + SHAPE, 4)
    results = []
    for mesh in (mesh8, mesh1):
        shard = NamedSharding(mesh, P("data"))
        x0 = None if start_step is None else jax.device_put(x_start, shard)
        out = jsample(small, jax.device_put(idx, shard), x_start=x0, start_step=start_step, **kw)
        results.append(out.samples)
        if mesh is mesh8:  # nothing forced the batch onto one device
            assert not out.samples.sharding.is_fully_replicated
            assert {s.data.shape[0] for s in out.samples.addressable_shards} == {2}
    np.testing.assert_allclose(results[0], results[1], atol=1e-6)


def test_sample_rejects_bad_options(small):
    idx = jnp.arange(2)
    with pytest.raises(ValueError, match="ddpm, ddim"):
        sampling.sample(fake_apply, PARAMS, GD(small), shape=SHAPE, indices=idx, seed=0, method="plms")
    with pytest.raises(ValueError, match="method='ddim'"):
        sampling.sample(fake_apply, PARAMS, GD(small), shape=SHAPE, indices=idx, seed=0, num_steps=10)
    with pytest.raises(ValueError, match="needs x_start"):
        sampling.sample(fake_apply, PARAMS, GD(small), shape=SHAPE, indices=idx, seed=0, start_step=5)
    with pytest.raises(ValueError, match="expected"):
        sampling.sample(fake_apply, PARAMS, GD(small), shape=SHAPE, indices=idx, seed=0,
                        x_start=jnp.zeros((3,) + SHAPE), start_step=5)
    with pytest.raises(ValueError, match="0..T=40"):
        sampling.sample(fake_apply, PARAMS, GD(small), shape=SHAPE, indices=idx, seed=0,
                        x_start=jnp.zeros((2,) + SHAPE), start_step=41)
    with pytest.raises(ValueError, match="0..T=40"):
        sampling.noised_start(small, jnp.zeros((2,) + SHAPE), -1, jnp.zeros((2,) + SHAPE))


# ---- Parity with diffusers (torch, CPU) ----------------------------------------------------------------------
#
# Conventions where diffusers differs from the paper's official code, and what we follow:
# * "fixedlarge" log-variance at t = 0: the official code uses log posterior_variance[1] there
#   ("to get a better decoder log likelihood"); diffusers' fixed_large uses β_0 (and its
#   fixed_small clamps β̃_0 = 0 to 1e-20). Sampling never sees it (no noise at t = 0), but the
#   bits/dim of eq. (13) does: we follow the official code (test_t0_log_variance_convention).
# * DDIM with clipping: we recompute ε̂ from the clipped x̂_0 (guided-diffusion), which is
#   diffusers' use_clipped_model_output=True; its default (False) mixes the clipped x̂_0 with the
#   raw ε̂, so x̂_0 and ε̂ no longer describe the same x_t.
# * Trailing DDIM spacing: diffusers' step goes from t to t − T//n, not to the next timestep of
#   its own list; the two agree when n divides T (tested here). We always step to the next
#   timestep in the list (and to ᾱ = 1 after the last).
# * diffusers builds its tables in float32 (torch.cumprod); ours are float64 cast once, so
#   agreement is to float32 round-off, not bit-exact.

DIFFUSERS_VAR = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}


def _torch():
    import torch

    torch.manual_seed(0)
    return torch


def _float64_tables(ds, betas):
    """Gives a diffusers scheduler float64 tables; with float64 inputs its step is then a float64
    reference of its own algorithm, so the comparison measures algorithms, not table round-off."""
    torch = _torch()
    ds.betas = torch.from_numpy(betas)
    ds.alphas = 1.0 - ds.betas
    ds.alphas_cumprod = torch.cumprod(ds.alphas, dim=0)
    ds.one = ds.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return ds


def ddpm_step_errors(var_type, pred, float64=True, ts=(999, 998, 500, 100, 10, 1, 0)):
    """Max |ours − diffusers| of x_{t−1} and x̂_0 over `ts`, same model output and noise."""
    torch = _torch()
    from diffusers import DDPMScheduler

    ds = DDPMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                       variance_type=DIFFUSERS_VAR[var_type], clip_sample=True,
                       prediction_type={"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[pred])
    betas = schedules.get_betas("linear", T)
    dtype = torch.float64 if float64 else torch.float32
    if float64:
        _float64_tables(ds, betas)
    sched = Schedule.from_betas(betas)
    err_x, err_x0 = 0.0, 0.0
    for t in ts:
        x = torch.randn(4, 3, 8, 8) * 1.5  # diffusers' NCHW: our steps are elementwise, any layout works
        out = torch.randn(4, 3, 8, 8)
        gen = torch.Generator().manual_seed(1000 + t)
        state = gen.get_state()
        res = ds.step(out.to(dtype), t, x.to(dtype), generator=gen)
        # The noise diffusers drew: replay its generator from the saved state.
        z = torch.randn(x.shape, generator=torch.Generator().set_state(state), dtype=dtype)
        ours, x0 = sampling.ddpm_step(GD(sched, var_type=var_type, clip_x0=True, pred=pred),
                                      jnp.asarray(out.numpy()), jnp.asarray(x.numpy()), t,
                                      jnp.asarray(z.numpy(), jnp.float32))
        err_x = max(err_x, float(np.abs(np.asarray(ours, np.float64) - res.prev_sample.numpy()).max()))
        err_x0 = max(err_x0, float(np.abs(np.asarray(x0, np.float64) - res.pred_original_sample.numpy()).max()))
    return err_x, err_x0


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
@pytest.mark.parametrize("pred", ["eps", "x0", "v"])
def test_ddpm_step_matches_diffusers(var_type, pred):
    err_x, err_x0 = ddpm_step_errors(var_type, pred)
    # x̂_0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t magnifies float32 round-off by 1/√ᾱ_t ≈ 160 at t = 999.
    assert err_x <= 1e-5 and err_x0 <= 3e-5, (err_x, err_x0)
    if pred == "eps":
        # Stock diffusers (float32 torch.cumprod over T = 1000 steps, 1 − ᾱ_t/ᾱ_{t−1} in float32)
        # agrees only to its table round-off.
        err_x, err_x0 = ddpm_step_errors(var_type, pred, float64=False)
        assert err_x <= 2e-4 and err_x0 <= 1e-4, (err_x, err_x0)


def ddim_step_errors(spacing, eta, num_steps=50, clip=True, float64=True):
    torch = _torch()
    from diffusers import DDIMScheduler

    ds = DDIMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                       clip_sample=clip, set_alpha_to_one=True, timestep_spacing=spacing)
    ds.set_timesteps(num_steps)
    betas = schedules.get_betas("linear", T)
    dtype = torch.float64 if float64 else torch.float32
    if float64:
        _float64_tables(ds, betas)
    ts = sampling.ddim_timesteps(T, num_steps, spacing)
    np.testing.assert_array_equal(ds.timesteps.numpy(), ts)
    sched = Schedule.from_betas(betas)
    err = 0.0
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        x, out, z = torch.randn(2, 3, 4, 4) * 1.5, torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        res = ds.step(out.to(dtype), int(t), x.to(dtype), eta=eta, use_clipped_model_output=True,
                      variance_noise=z.to(dtype) if eta > 0 else None)
        ours, _ = sampling.ddim_step(GD(sched, clip_x0=clip), jnp.asarray(out.numpy()), jnp.asarray(x.numpy()),
                                     int(t), int(t_prev), jnp.asarray(z.numpy()), eta=eta)
        err = max(err, float(np.abs(np.asarray(ours, np.float64) - res.prev_sample.numpy()).max()))
    return err


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers(spacing, eta):
    assert ddim_step_errors(spacing, eta) <= 1e-5
    if eta == 0.5:  # stock float32 diffusers: within its table round-off
        assert ddim_step_errors(spacing, eta, float64=False) <= 1e-4


def test_ddim_timesteps_match_diffusers():
    from diffusers import DDIMScheduler

    for T_ in (50, 1000):
        for spacing in ("leading", "trailing"):
            ds = DDIMScheduler(num_train_timesteps=T_, timestep_spacing=spacing)
            for n in range(1, T_ + 1, 3 if T_ == 50 else 37):
                ds.set_timesteps(n)
                theirs = ds.timesteps.numpy()
                if len(theirs) != n:  # diffusers' float arange can add a final −1 (e.g. T=50, n=29)
                    assert spacing == "trailing" and theirs[-1] == -1
                    theirs = theirs[:n]
                np.testing.assert_array_equal(sampling.ddim_timesteps(T_, n, spacing), theirs, err_msg=f"{T_} {n}")


def test_ddim_clipping_convention():
    """Clipping active: ours = diffusers with use_clipped_model_output=True, ≠ its default."""
    torch = _torch()
    from diffusers import DDIMScheduler

    ds = DDIMScheduler(num_train_timesteps=T, clip_sample=True, set_alpha_to_one=True)
    ds.set_timesteps(10)
    sched = Schedule.from_betas(schedules.get_betas("linear", T))
    x, out = torch.randn(2, 8) * 3, torch.randn(2, 8)  # |x_t| large: x̂_0 gets clipped
    ours, x0 = sampling.ddim_step(GD(sched), jnp.asarray(out.numpy()), jnp.asarray(x.numpy()), 900, 800,
                                  jnp.zeros((2, 8)), eta=0.0)
    assert float(jnp.abs(x0).max()) == 1.0
    clipped = ds.step(out, 900, x, use_clipped_model_output=True).prev_sample.numpy()
    default = ds.step(out, 900, x).prev_sample.numpy()
    np.testing.assert_allclose(ours, clipped, atol=1e-5)
    assert np.abs(np.asarray(ours) - default).max() > 1e-2


def test_t0_log_variance_convention(sched, betas):
    """At t = 0 both variance types use log posterior_variance[1], as the official code."""
    from diffusers import DDPMScheduler

    abar = np.cumprod(1 - betas)
    post1 = betas[1] * (1 - abar[0]) / (1 - abar[1])
    x = jnp.zeros((1, 2))
    for var_type in ("fixedlarge", "fixedsmall"):
        out = GD(sched, var_type=var_type).p_mean_variance(x, x, jnp.zeros((1,), jnp.int32))
        assert float(out["log_variance"][0, 0]) == pytest.approx(np.log(post1), rel=1e-6)
    # diffusers' fixed_large_log at t = 0 is log β_0 instead: a different decoder likelihood.
    ds = DDPMScheduler(num_train_timesteps=T, variance_type="fixed_large_log")
    assert float(ds._get_variance(0)) == pytest.approx(np.log(betas[0]), rel=1e-4)  # float32 1 − ᾱ_0
    assert abs(np.log(post1) - np.log(betas[0])) > 0.5


TD = 50  # the chain of the whole-trajectory comparisons


def trajectory_errors(method, var_type="fixedlarge", num_steps=None, eta=0.0, spacing="leading",
                      monkeypatch=None):
    """Max |ours − diffusers| over every state of a whole sampling run (same x_T and noise)."""
    torch = _torch()
    from diffusers import DDIMScheduler, DDPMScheduler
    from diffusers.schedulers import scheduling_ddpm

    sched = Schedule.from_betas(schedules.get_betas("linear", TD, beta_start=1e-4, beta_end=0.2))
    params = {"a": jnp.float32(0.1), "inv_T": jnp.float32(1.0 / TD)}
    idx = jnp.arange(3)
    out = jsample(sched, idx, params=params, method=method, var_type=var_type, num_steps=num_steps, eta=eta,
                  spacing=spacing, trajectory_every=1)
    keys = sampling.image_keys(0, idx)
    noise = lambda t: torch.from_numpy(np.array(sampling.image_noise(keys, t, SHAPE)))  # noqa: E731
    x = noise(TD)
    model = lambda x, t: 0.1 * x + torch.tanh(torch.tensor(t / TD, dtype=torch.float32))  # noqa: E731
    common = dict(num_train_timesteps=TD, beta_start=1e-4, beta_end=0.2, beta_schedule="linear", clip_sample=True)
    if method == "ddpm":
        ds = DDPMScheduler(variance_type=DIFFUSERS_VAR[var_type], **common)
        ts = list(range(TD - 1, -1, -1))
        pending = {}
        # diffusers' DDPM step draws its own noise: hand it ours for the current step.
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kw: pending["z"])
    else:
        ds = DDIMScheduler(set_alpha_to_one=True, timestep_spacing=spacing, **common)
        ds.set_timesteps(num_steps)
        ts = [int(t) for t in ds.timesteps]
    states = []
    for t in ts:
        if method == "ddpm":
            pending["z"] = noise(t)
            x = ds.step(model(x, t), t, x).prev_sample
        else:
            x = ds.step(model(x, t), t, x, eta=eta, use_clipped_model_output=True,
                        variance_noise=noise(t) if eta > 0 else None).prev_sample
        states.append(x.numpy())
    assert out.trajectory.shape[0] == len(states)
    return float(np.abs(np.asarray(out.trajectory) - np.stack(states)).max())


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
def test_ddpm_trajectory_matches_diffusers(var_type, monkeypatch):
    assert trajectory_errors("ddpm", var_type, monkeypatch=monkeypatch) <= 1e-5


@pytest.mark.parametrize("spacing, eta", [("leading", 0.5), ("trailing", 0.0)])
def test_ddim_trajectory_matches_diffusers(spacing, eta):
    assert trajectory_errors("ddim", num_steps=10, eta=eta, spacing=spacing) <= 1e-5
