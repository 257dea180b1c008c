"""Table 2 of Ho et al. (2020) and Nichol & Dhariwal's L_hybrid: one config per row, on digits or CIFAR-10.

Rows (`configs/table2.py:<row>`, digits; `configs/table2.py:<row>,cifar10` for CIFAR-10):

    xprev_kl_learned      μ̃ prediction, the bound L, learned diagonal Σ     (paper: 7.28 IS / 23.69 FID)
    xprev_kl_fixed        μ̃ prediction, L, fixed isotropic Σ                (8.06 / 13.22)
    xprev_mse             μ̃ prediction, ‖μ̃ − μ_θ‖²                         (unstable in the paper)
    eps_kl_learned        ε prediction, L, learned diagonal Σ               (unstable)
    eps_kl_fixed          ε prediction, L, fixed isotropic Σ                (7.67 / 13.51)
    eps_simple            ε prediction, L_simple: the paper's model         (9.46 / 3.17)
    eps_hybrid            ε prediction, L_hybrid, learned_range Σ (Nichol & Dhariwal 2021)
    eps_hybrid_cosine     the same with the cosine schedule (CIFAR-10 only: digits is cosine already)
    eps_kl_loss_aware     ε, L with learned_range Σ and importance-sampled t (N&D's L_vlb)

Digits (2-core CPU; measured 7-22 min per row for the three commands at load averages 3-15 for
seed 0, 4.5-9 min at load 1-13 for seed 1, i.e. shared with other jobs; results in docs/table2.md:
both seeds give the same groups, {eps_simple, eps_hybrid} best (FD 0.45-0.49x the floor), then
eps_kl_loss_aware (1.1-1.4x, the best bits/dim: 4.24-4.25), the three xprev rows (1.9-2.4x), and
eps_kl_fixed / eps_kl_learned last (4.8-6.1x)):
    python -m ddpm_jax.main --config=configs/table2.py:eps_simple --workdir=workdirs/table2/eps_simple_s0
    python -m ddpm_jax.main --config=configs/table2.py:eps_simple --workdir=workdirs/table2/eps_simple_s0 --mode=bpd
    python -m ddpm_jax.main --config=configs/table2.py:eps_simple --workdir=workdirs/table2/eps_simple_s0 --mode=eval
(second seed: --config.seed=1 and its own --workdir). Everything else is configs/digits.py (cosine
schedule, T = 100, its fixed variance fixedsmall). CIFAR-10 rows are configs/cifar10.py (linear
schedule, T = 1000, fixedlarge; accelerators, not run here).
"""

from configs import cifar10, digits

ROWS = {  # row -> (pred, loss, var_type or None = the base config's fixed one, t_sampler)
    "xprev_kl_learned": ("xprev", "kl", "learned", "uniform"),
    "xprev_kl_fixed": ("xprev", "kl", None, "uniform"),
    "xprev_mse": ("xprev", "mse", None, "uniform"),
    "eps_kl_learned": ("eps", "kl", "learned", "uniform"),
    "eps_kl_fixed": ("eps", "kl", None, "uniform"),
    "eps_simple": ("eps", "mse", None, "uniform"),
    "eps_hybrid": ("eps", "hybrid", "learned_range", "uniform"),
    "eps_hybrid_cosine": ("eps", "hybrid", "learned_range", "uniform"),
    "eps_kl_loss_aware": ("eps", "kl", "learned_range", "loss_aware"),
}
BASES = {"digits": digits, "cifar10": cifar10}


def get_config(arg: str = "eps_simple"):
    row, _, base = arg.partition(",")
    base = base or "digits"
    if row not in ROWS or base not in BASES:
        raise ValueError(f"unknown table2 row {arg!r}; use configs/table2.py:<row>[,cifar10] with <row> one of "
                         f"{', '.join(ROWS)}.")
    if row == "eps_hybrid_cosine" and base == "digits":
        raise ValueError("configs/table2.py:eps_hybrid_cosine is for CIFAR-10 (digits uses the cosine schedule "
                         "already: configs/table2.py:eps_hybrid).")
    config = BASES[base].get_config()
    pred, loss, var_type, t_sampler = ROWS[row]
    config.diffusion.pred = pred
    config.diffusion.loss = loss
    config.diffusion.t_sampler = t_sampler
    if var_type:
        config.diffusion.var_type = var_type
    if row == "eps_hybrid_cosine":
        config.diffusion.schedule = "cosine"
    return config  # a non-finite step stops the run (training.nonfinite=error): the paper's "unstable"
