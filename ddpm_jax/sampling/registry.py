"""The sampler registry: every method `sampling.sample` runs, one `Method` entry each.

A new sampler is one module defining its entry (plan, stepper, order, NFE, default spacing and
steps, its η) and one line in `METHODS` below. `resolve` turns the user's (steps, spacing, eta)
into the entry's concrete values, every rule checked here once.
"""

from __future__ import annotations

from ddpm_jax.sampling import consistency, ddpm_ddim, euler_ancestral, solvers
from ddpm_jax.sampling.base import Method

METHODS: dict[str, Method] = {m.name: m for m in (
    ddpm_ddim.DDPM,
    ddpm_ddim.DDIM,
    *solvers.ENTRIES,
    euler_ancestral.ENTRY,
    consistency.ENTRY,
)}


def get(method: str) -> Method:
    """The entry of `method`, or a one-line ValueError listing the known ones."""
    if method not in METHODS:
        raise ValueError(f"unknown method={method!r}; choose one of {', '.join(METHODS)} "
                         "(DPM-Solver++ has orders 2 and 3: dpmpp_2m, dpmpp_3m).")
    return METHODS[method]


def resolve(method: str, num_timesteps: int, num_steps: int | None = None, spacing: str | None = None,
            eta: float | None = None) -> tuple[Method, int, str, float | None]:
    """(entry, steps, spacing, eta) with the method's defaults filled in and checked.

    num_steps None or 0: the method's default (every timestep for ddpm; ddim 50 and the
    solvers 20, at most T). spacing None or "": its default. eta None: its default; a method
    without η ignores it. Every bad value is a one-line ValueError naming it.
    """
    entry = get(method)
    T = int(num_timesteps)
    if num_steps is None or (not isinstance(num_steps, bool) and num_steps == 0):
        num_steps = min(entry.default_steps, T) or T
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or not 1 <= num_steps <= T:
        raise ValueError(f"num_steps={num_steps!r} must be an int in 1..T={T} (0: the method's default) "
                         f"for method={method!r}; e.g. num_steps={min(entry.default_steps or T, T)}.")
    spacing = spacing or entry.default_spacing
    if entry.spacings and spacing not in entry.spacings:
        raise ValueError(f"unknown spacing={spacing!r} for method={method!r}; choose one of "
                         f"{', '.join(entry.spacings)} (or '' for its default, {entry.default_spacing}).")
    if entry.eta is None:
        return entry, int(num_steps), spacing, None
    return entry, int(num_steps), spacing, entry.eta if eta is None else eta
