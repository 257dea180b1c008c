"""The train state (step, params, EMA params, post-hoc EMA profiles, optimizer state, timestep history) and the optimizer.

A plain pytree (`flax.struct`), so it can be sharded, donated to the compiled
step and saved by Orbax as is. No RNG is stored: the step's key is
`fold_in(base_key, step)`, so a resumed run draws exactly the same numbers.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training. `step` counts applied train steps."""

    step: jnp.ndarray  # int32 scalar
    params: Any
    ema_params: Any
    opt_state: Any
    # The loss-aware timestep sampler's history (`timestep_sampler.History`); None when t is uniform.
    t_history: Any = None
    # The post-hoc EMA profiles (`post_hoc_ema.Profiles`, attached by the loop); None when ema.sigma_rels is empty.
    phema: Any = None

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, t_history: Any = None) -> "TrainState":
        """Step 0: EMA starts equal to the initial params (as the paper's code)."""
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree.map(jnp.array, params),
            opt_state=tx.init(params),
            t_history=t_history,
        )


def learning_rate_schedule(optim_cfg: Any) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then constant (as the paper)."""
    lr = float(optim_cfg.lr)
    warmup = int(optim_cfg.warmup_steps)
    if warmup <= 0:
        return optax.constant_schedule(lr)
    # Update number k (0-based, optax's count) uses lr * min(k / warmup, 1): from 0, as
    # the official TF code (lr * min(global_step / warmup, 1) with the pre-update step).
    return optax.linear_schedule(0.0, lr, warmup)


def create_optimizer(optim_cfg: Any) -> optax.GradientTransformation:
    """Adam with global-norm clipping and the warmup schedule (Ho et al. 2020, App. B)."""
    chain = []
    if float(optim_cfg.grad_clip) > 0:
        chain.append(optax.clip_by_global_norm(float(optim_cfg.grad_clip)))
    chain.append(
        optax.adam(
            learning_rate=learning_rate_schedule(optim_cfg),
            b1=float(optim_cfg.beta1),
            b2=float(optim_cfg.beta2),
            eps=float(optim_cfg.eps),
        )
    )
    return optax.chain(*chain)


def ema_update(ema_params: Any, params: Any, decay: float | jnp.ndarray) -> Any:
    """ema <- decay * ema + (1 - decay) * params."""
    return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema_params, params)
