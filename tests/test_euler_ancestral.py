"""Euler ancestral (sampling/euler_ancestral.py) against two independent references.

diffusers' `EulerAncestralDiscreteScheduler` (η = 1) and a NumPy transcription of k-diffusion's
`sample_euler_ancestral` loop (any η), both run on the same closed-form denoiser, the same
timesteps and the same noises, in float64; then the registry entry through `sampling.sample`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, sampling, schedules
from ddpm_jax.sampling import euler_ancestral
from ddpm_jax.schedules import Schedule

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

T, N = 1000, 20
MU, S = 0.3, 0.5  # the Gaussian data N(μ, s² I) of the model below


def _setup():
    betas = schedules.get_betas("linear", T)
    abar = np.cumprod(1.0 - betas)
    sched = Schedule.from_betas(betas).replace(
        sqrt_alphas_cumprod=jnp.asarray(np.sqrt(abar)),
        sqrt_one_minus_alphas_cumprod=jnp.asarray(np.sqrt(1.0 - abar)),
        sqrt_recip_alphas_cumprod=jnp.asarray(np.sqrt(1.0 / abar)),
        sqrt_recipm1_alphas_cumprod=jnp.asarray(np.sqrt(1.0 / abar - 1.0)))
    return abar, diffusion.GaussianDiffusion(sched, clip_x0=False)


def _eps(x_vp, t, abar):
    """ε̂ at (x_t, t): the optimal model of N(μ, s²) data plus a smooth nonlinear term (NumPy)."""
    a, s = np.sqrt(abar[t]), np.sqrt(1.0 - abar[t])
    return s * (x_vp - a * MU) / (a ** 2 * S ** 2 + s ** 2) + 0.1 * np.sin(x_vp + t / 50.0)


def _ours(ts, x_tilde0, noises, abar, process, eta):
    """Our stepper over `ts`: the states x̃ after every step (x / α of the timestep reached)."""
    def model_fn(x, t):
        return jax.pure_callback(lambda x, t: _eps(np.asarray(x), int(t), abar),
                                 jax.ShapeDtypeStruct(x.shape, x.dtype), x, t)

    st = sampling.METHODS["euler_ancestral"].stepper(process, model_fn, jnp.asarray(ts, jnp.int32),
                                                     lambda t: jnp.asarray(noises)[t], eta)
    alpha = np.append(np.sqrt(abar[ts]), 1.0)
    state, out = st.init(jnp.asarray(x_tilde0 * alpha[0])), []
    for i in range(len(ts)):
        state = st.step(state, jax.tree.map(lambda a: a[i], st.xs))
        out.append(np.asarray(st.output(state)[0]) / alpha[i + 1])
    return out


def test_matches_diffusers_euler_ancestral_step_by_step(monkeypatch):
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as module

    rng = np.random.default_rng(0)
    noises = rng.standard_normal((T, 3, 4))
    ref = diffusers.EulerAncestralDiscreteScheduler(num_train_timesteps=T, beta_schedule="linear",
                                                    timestep_spacing="trailing")
    ref.set_timesteps(N)
    ts = ref.timesteps.numpy().astype(np.int64)
    assert ts[0] == T - 1 and np.all(ts == np.round(ts))  # integer timesteps: σ̃ exactly the table's
    abar = np.cumprod(1.0 - schedules.get_betas("linear", T))
    sig = np.sqrt((1.0 - abar[ts]) / abar[ts])
    ref.sigmas = torch.from_numpy(np.append(sig, 0.0))  # float64 σ's, then 0
    x_tilde = sig[0] * rng.standard_normal((3, 4))
    with jax.enable_x64(True):
        abar, process = _setup()
        ours = _ours(ts, x_tilde, noises, abar, process, eta=1.0)

    pending = {}
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: pending["z"])
    x = torch.from_numpy(x_tilde.copy())
    for i, t_ref in enumerate(ref.timesteps):
        t = int(ts[i])
        x_vp = ref.scale_model_input(x, t_ref)  # x̃ / √(σ̃² + 1) = α x̃
        pending["z"] = torch.from_numpy(noises[t].copy())
        x = ref.step(torch.from_numpy(_eps(x_vp.numpy(), t, abar)), t_ref, x).prev_sample
        theirs = x.numpy()
        # diffusers upcasts x̃ to float32 inside its step: agreement to float32 rounding.
        assert np.max(np.abs(ours[i] - theirs)) <= 1e-5 * max(1.0, np.max(np.abs(theirs))), i


def _k_diffusion(sigmas, x, denoise, noises, eta):
    """k-diffusion's `sample_euler_ancestral` (with its `get_ancestral_step`), transcribed to NumPy."""
    states = []
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, i)
        s_from, s_to = sigmas[i], sigmas[i + 1]
        sigma_up = min(s_to, eta * (s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2) ** 0.5)
        sigma_down = (s_to ** 2 - sigma_up ** 2) ** 0.5
        d = (x - denoised) / s_from
        x = x + d * (sigma_down - s_from)
        if s_to > 0:
            x = x + noises[i] * sigma_up
        states.append(x)
    return states


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_matches_k_diffusion_loop(eta):
    rng = np.random.default_rng(1)
    noises = rng.standard_normal((T, 2, 5))
    with jax.enable_x64(True):
        abar, process = _setup()
        ts = np.asarray(sampling.METHODS["euler_ancestral"].plan(process.sched, T, 12, "karras"))
    sig = np.append(np.sqrt((1.0 - abar[ts]) / abar[ts]), 0.0)
    x_tilde = sig[0] * rng.standard_normal((2, 5))

    def denoise(x_tilde, i):  # D(x̃; σ̃) = x̃ − σ̃ ε̂(α x̃, t)
        alpha = np.sqrt(abar[ts[i]])
        return x_tilde - sig[i] * _eps(alpha * x_tilde, int(ts[i]), abar)

    want = _k_diffusion(sig, x_tilde, denoise, [noises[t] for t in ts], eta)
    with jax.enable_x64(True):
        abar, process = _setup()
        ours = _ours(ts, x_tilde, noises, abar, process, eta)
    for i, (a, b) in enumerate(zip(ours, want)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10, err_msg=f"step {i}")


def test_ancestral_sigmas_split_the_variance():
    """σ_down² + σ_up² = σ̃'² and σ_up ≤ σ̃' for every η; η = 0 gives σ_down = σ̃' (Euler)."""
    s, s_next = jnp.asarray([10.0, 1.0, 0.3]), jnp.asarray([5.0, 0.9, 0.0])
    for eta in (0.0, 0.5, 1.0, 3.0):
        down, up = euler_ancestral.ancestral_sigmas(s, s_next, eta)
        np.testing.assert_allclose(down ** 2 + up ** 2, s_next ** 2, rtol=1e-6, atol=1e-12)
        assert np.all(np.asarray(up) <= np.asarray(s_next) + 1e-7)
    np.testing.assert_allclose(euler_ancestral.ancestral_sigmas(s, s_next, 0.0)[0], s_next)


def test_through_sampling_sample():
    """The registry entry in the driver: η = 0 ignores the seed, η = 1 (default) does not; NFE = N."""
    sched = Schedule.from_betas(schedules.get_betas("linear", 50, beta_start=1e-4, beta_end=0.3))
    process, calls = diffusion.GaussianDiffusion(sched), []

    def apply_fn(params, x, t, cond):
        jax.debug.callback(lambda: calls.append(1))
        return jnp.tanh(x) * params + 0.01 * t[:, None].astype(x.dtype)

    x_T = sampling.image_noise(sampling.image_keys(9, jnp.arange(4)), 50, (2,))
    kw = dict(shape=(2,), indices=jnp.arange(4), x_start=x_T, method="euler_ancestral", num_steps=7)
    det = [sampling.sample(apply_fn, 0.5, process, seed=s, eta=0.0, **kw).samples for s in (0, 1)]
    anc = [sampling.sample(apply_fn, 0.5, process, seed=s, **kw).samples for s in (0, 1)]
    np.testing.assert_array_equal(det[0], det[1])
    assert not np.allclose(anc[0], anc[1]) and np.all(np.isfinite(anc[0]))
    calls.clear()
    jax.block_until_ready(sampling.sample(apply_fn, 0.5, process, seed=0, **kw).samples)
    assert len(calls) == sampling.METHODS["euler_ancestral"].nfe(7) == 7
