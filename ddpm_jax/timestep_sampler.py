"""Which timesteps a training batch sees: uniform, or the loss-aware importance sampler.

L_vlb = Σ_t L_t is estimated from one t per example. Uniform t ~ U{0, …, T−1} gives
T·L_t; Nichol & Dhariwal (2021, §3.3) note that the terms differ by orders of magnitude
(the first few dominate), so the estimate of L_vlb is noisy, and sample instead

    p_t ∝ √E[L_t²],   Σ p_t = 1,   L_vlb = E_{t∼p}[L_t / p_t]      (their eq. (18)),

with √E[L_t²] from a history of the last 10 losses per t, and t uniform until every t
has 10 of them. A batch is then weighted by w_t = 1 / (T p_t): E_{t∼p}[w_t L_t] =
(1/T) Σ_t L_t, the uniform mean, so the objective is the same in expectation, only its
variance changes. As in improved-diffusion's `LossSecondMomentResampler`, a small floor
(`uniform_prob`) of the uniform distribution is mixed in.

The history is a pytree of arrays (`History`) kept in the train state, so it is
checkpointed with it and a resumed run draws the same timesteps. `update` takes the
*global* batch's (t, loss) pairs inside the compiled step, so every device and host
computes the same new history.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

T_SAMPLERS = ("uniform", "loss_aware")
HISTORY_LEN = 10  # losses kept per timestep
UNIFORM_PROB = 1e-3  # share of the uniform distribution mixed into p_t


def check_t_sampler(name: str) -> None:
    if name not in T_SAMPLERS:
        raise ValueError(f"unknown t_sampler={name!r}; choose one of {', '.join(T_SAMPLERS)}.")


@flax.struct.dataclass
class History:
    """The last `HISTORY_LEN` losses of each timestep (oldest first) and how many are filled."""

    losses: jnp.ndarray  # float32 [T, HISTORY_LEN]
    counts: jnp.ndarray  # int32 [T], at most HISTORY_LEN

    @classmethod
    def create(cls, num_timesteps: int, history_len: int = HISTORY_LEN) -> "History":
        return cls(losses=jnp.zeros((num_timesteps, history_len), jnp.float32),
                   counts=jnp.zeros((num_timesteps,), jnp.int32))

    @property
    def num_timesteps(self) -> int:
        return int(self.losses.shape[0])


def probabilities(history: History, uniform_prob: float = UNIFORM_PROB) -> jnp.ndarray:
    """p_t [T]: uniform until every t has a full history, then ∝ √mean(L_t²), mixed with uniform."""
    T, full = history.num_timesteps, history.losses.shape[1]
    weights = jnp.sqrt(jnp.mean(jnp.square(history.losses), axis=1))
    p = weights / jnp.maximum(jnp.sum(weights), 1e-30)
    p = p * (1.0 - uniform_prob) + uniform_prob / T
    warmed_up = jnp.all(history.counts == full) & (jnp.sum(weights) > 0)
    return jnp.where(warmed_up, p, jnp.full((T,), 1.0 / T))


def sample(key: jax.Array, batch_size: int, num_timesteps: int, history: History | None = None
           ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(t int32 [B], weights float32 [B]): t ~ p and w_t = 1 / (T p_t); uniform when `history` is None.

    Uniform draws are `randint(key, (B,), 0, T)` with weights 1, exactly L_simple's draw.
    """
    if history is None:
        t = jax.random.randint(key, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
        return t, jnp.ones((batch_size,), jnp.float32)
    p = probabilities(history)
    t = jax.random.choice(key, num_timesteps, (batch_size,), p=p).astype(jnp.int32)
    return t, (1.0 / (num_timesteps * p[t])).astype(jnp.float32)


def update(history: History, t: jnp.ndarray, losses: jnp.ndarray) -> History:
    """The history after the batch's (t_i, L_i), in batch order: a full row drops its oldest loss."""
    full = history.losses.shape[1]

    def push(h: History, tl):
        ti, li = tl
        row, n = h.losses[ti], h.counts[ti]
        shifted = jnp.concatenate([row[1:], li[None]])
        filled = row.at[jnp.minimum(n, full - 1)].set(li)
        new_row = jnp.where(n == full, shifted, filled)
        return History(losses=h.losses.at[ti].set(new_row),
                       counts=h.counts.at[ti].set(jnp.minimum(n + 1, full))), None

    history, _ = jax.lax.scan(push, history, (t.astype(jnp.int32), losses.astype(jnp.float32)))
    return history
