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


LR_DECAYS = ("constant", "linear", "cosine")


def lr_schedule(lr: float, warmup_steps: int, decay: str, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`; then `decay`: constant (the paper's), or
    annealed to 0 at update `num_steps`, linearly or along a half cosine (diffusers' "cosine")."""
    if decay not in LR_DECAYS:
        raise ValueError(f"optim.lr_decay={decay!r} is unknown; use one of {LR_DECAYS}.")
    if decay != "constant" and num_steps <= warmup_steps:
        raise ValueError(f"a {decay} lr decay needs more steps ({num_steps}) than warmup steps ({warmup_steps}); "
                         "raise the run's num_steps or set optim.lr_decay=constant.")
    if decay == "constant":
        if warmup_steps <= 0:
            return optax.constant_schedule(lr)
        # Update number k (0-based, optax's count) uses lr * min(k / warmup, 1): from 0, as
        # the official TF code (lr * min(global_step / warmup, 1) with the pre-update step).
        return optax.linear_schedule(0.0, lr, warmup_steps)
    anneal = (optax.linear_schedule(lr, 0.0, num_steps - warmup_steps) if decay == "linear"
              else optax.cosine_decay_schedule(lr, num_steps - warmup_steps))
    if warmup_steps <= 0:
        return anneal
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), anneal], [warmup_steps])


def learning_rate_schedule(config: Any) -> optax.Schedule:
    """The trainer's schedule (`lr_schedule`): the `optim` section's over `training.num_steps` updates."""
    o = config.optim
    return lr_schedule(float(o.lr), int(o.warmup_steps), str(o.lr_decay), int(config.training.num_steps))


def adam(optim_cfg: Any, learning_rate: float | optax.Schedule) -> optax.GradientTransformation:
    """Adam at `learning_rate` with `optim_cfg`'s β1, β2, ε and global-norm clipping (Ho et al. 2020, App. B)."""
    clip = [optax.clip_by_global_norm(float(optim_cfg.grad_clip))] if float(optim_cfg.grad_clip) > 0 else []
    return optax.chain(*clip, optax.adam(learning_rate=learning_rate, b1=float(optim_cfg.beta1),
                                         b2=float(optim_cfg.beta2), eps=float(optim_cfg.eps)))


def create_optimizer(config: Any) -> optax.GradientTransformation:
    """The trainer's optimiser: `adam` with the `optim` section on `learning_rate_schedule(config)`."""
    return adam(config.optim, learning_rate_schedule(config))


def ema_update(ema_params: Any, params: Any, decay: float | jnp.ndarray) -> Any:
    """ema <- decay * ema + (1 - decay) * params."""
    return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema_params, params)
