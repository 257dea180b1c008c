"""2-D toy data (swiss roll, S-curve, moons) with the tutorial's gated MLP: diffusion you can watch.

Command (train, then the reverse-chain figure and the sample-quality scores):
    python -m ddpm_jax.main --config=configs/toy2d.py --workdir=workdirs/toy2d && \\
    python -m ddpm_jax.main --config=configs/toy2d.py --workdir=workdirs/toy2d --mode=sample
    # other data / schedule:  --config.data.toy_name=moons   (swiss_roll | s_curve | moons)
    #                         --config.diffusion.schedule=sigmoid --config.diffusion.beta_start=1e-5
    #                         (linear | sigmoid | quadratic ...; T: --config.diffusion.num_timesteps)
    # the tutorial's own recipe: --config=configs/toy2d.py:tutorial

`--mode=sample` writes under workdirs/toy2d/samples/: chain_ddpm_noclip_step<step>_seed0_n10000_every10.png (the reverse
chain, x_100, x_90, ..., x_0, as the tutorial plots it), scores_ddpm_noclip_step<step>_seed0_n10000.json and one
line: energy distance D² and sliced W2 of 10,000 samples against 10,000 fresh points
(the toy2d test split), next to the same scores of another fresh draw (the noise floor).

Recipe ("ours", the default): the tutorial's network (three 128-unit linear layers
gated per timestep, softplus), its gates started at 1 instead of U[0, 1); T = 100 with
linear beta from 1e-4 to 0.2 (alpha_bar_T = 2e-5: x_T is noise); Adam lr 3e-3 after a
100-step warmup, grad-norm clip 1, batch 128, 20,000 steps, EMA 0.995 (the samples come
from the EMA weights: without it they were ~7x farther from the data); fixedlarge reverse
variance; no clipping of the predicted x0 (the points are standardised, not in [-1, 1]).

Recipe "tutorial" (configs/toy2d.py:tutorial): as the tutorial's code: gates U[0, 1),
sigmoid beta from 1e-5 to 1e-2 over T = 100 (alpha_bar_T = 0.60: x_T keeps 78% of the
signal, yet sampling starts from N(0, I)), Adam lr 1e-3 without warmup or clipping,
batch 128, 1000 epochs of the 10,000 points (78,200 steps), its EMA(0.9), sigma_t^2 =
beta_t. (Not reproduced: its antithetic sampling of t, and torch's default init.)

Hardware, time and results: docs/experiments.md (2-core CPU).
"""

from configs import base

RECIPES = ("", "ours", "tutorial")


def get_config(recipe: str = ""):
    if recipe not in RECIPES:
        raise ValueError(f"unknown toy2d recipe {recipe!r}; use configs/toy2d.py or "
                         "configs/toy2d.py:tutorial.")
    config = base.get_config()
    config.data.source = "toy2d"
    config.data.toy_name = "swiss_roll"  # swiss_roll | s_curve | moons
    config.data.toy_num_points = 10_000
    config.data.random_flip = False

    config.model.name = "mlp"
    config.model.mlp_hidden = 128
    config.model.mlp_gate_init = "ones"
    config.model.dropout = 0.0

    config.diffusion.schedule = "linear"
    config.diffusion.num_timesteps = 100
    config.diffusion.beta_start = 1e-4
    config.diffusion.beta_end = 0.2
    config.diffusion.var_type = "fixedlarge"

    config.optim.lr = 3e-3
    config.optim.warmup_steps = 100
    config.optim.ema_decay = 0.995

    config.training.batch_size = 128
    config.training.num_steps = 20_000
    config.training.steps_per_dispatch = 10  # tiny steps: fewer Python round trips
    config.training.log_every = 1000
    config.training.sample_every = 10_000
    config.training.checkpoint_every = 10_000
    config.training.keep_every = 0
    config.training.num_grid_samples = 2000

    config.sampling.num_samples = 10_000  # scored against as many fresh points
    config.sampling.batch_size = 10_000
    config.sampling.trajectory_every = 10  # the chain figure: x_T, x_{T-10}, ..., x_0
    config.sampling.clip_denoised = False  # points are standardised, not in [-1, 1]
    config.eval.num_samples = 10_000
    config.eval.batch_size = 10_000

    if recipe == "tutorial":
        config.model.mlp_gate_init = "uniform"
        config.diffusion.schedule = "sigmoid"
        config.diffusion.beta_start = 1e-5
        config.diffusion.beta_end = 1e-2
        config.optim.lr = 1e-3
        config.optim.warmup_steps = 0
        config.optim.grad_clip = 0.0
        config.optim.ema_decay = 0.9
        config.training.num_steps = 78_200  # 1000 epochs x ceil(10,000 / 128) batches
        config.training.sample_every = 0
        config.training.checkpoint_every = 78_200
    return config
