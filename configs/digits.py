"""The default experiment: a small U-Net on scikit-learn's 1,797 8x8 handwritten digits.

Command (`make demo` runs the first two):
    python -m ddpm_jax.main --config=configs/digits.py --workdir=workdirs/digits
    python -m ddpm_jax.main --config=configs/digits.py --workdir=workdirs/digits --mode=eval
    python -m ddpm_jax.main --config=configs/digits.py --workdir=workdirs/digits --mode=bpd

Hardware and time: a 2-core CPU. Measured here for the whole command (imports,
compilation, 2,000 steps, two sample grids, checkpoints): 189 s wall with a load
average of about 1 from other jobs, 215 s with a load average of 2-3.7.
Expected result: final loss about 0.15 (L_simple under the cosine schedule, which
weights the hard low-noise steps more than the linear one), EMA samples in
workdirs/digits/samples/step_2000.png that read as digits, most of them clearly;
--mode=eval: the classifier metrics of 594 DDPM samples beside their floor (measured:
Fréchet distance 0.48x the floor, confident fraction 0.89x the real test digits' own; the
floor is the last 297 digits, other writers, against the first 1,500, which is why a
model can score below it: see docs/experiments.md); --mode=bpd: the NLL bound on the 297
test digits, 4.76 bits/dim (an untrained model: 7.36), in workdirs/digits/eval/bpd_2000.json.
Scaled down from the paper's CIFAR-10 setup so a laptop finishes quickly: a 2-level
U-Net (ch 32 at 8x8, 64 with attention at 4x4: with 32 channels on both levels,
GroupNorm(32) normalises every channel alone and the samples stayed noisy), T = 100 with the cosine
schedule (the linear one leaves few steps at the low noise levels that matter at
8x8), fixedsmall reverse variance, batch 32, lr 2e-3 with a short warmup, EMA decay
0.995 (0.9999 averages over far more steps than this run has).
"""

from configs import base


def get_config():
    config = base.get_config()
    config.data.source = "digits"
    config.data.image_size = 8
    config.data.num_channels = 1
    config.data.random_flip = False  # digits are not mirror-symmetric

    config.model.ch = 32
    config.model.ch_mult = (1, 2)  # 8x8 and 4x4
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.0

    config.diffusion.schedule = "cosine"
    config.diffusion.num_timesteps = 100
    config.diffusion.var_type = "fixedsmall"

    config.optim.lr = 2e-3
    config.optim.warmup_steps = 100
    config.optim.ema_decay = 0.995

    config.training.batch_size = 32
    config.training.num_steps = 2000
    config.training.log_every = 50
    config.training.sample_every = 1000
    config.training.checkpoint_every = 1000
    config.training.keep_every = 0
    config.training.num_grid_samples = 64
    config.training.eval_bpd_after = False  # --mode=bpd: 4.76 bits/dim (53 s; left out of `make demo`)

    config.sampling.batch_size = 64
    config.sampling.num_samples = 64
    config.eval.metric = "classifier"  # `make demo`: classifier-feature metrics beside their floors
    config.eval.num_samples = 594  # two blocks of the 297 test digits that make the floor
    config.eval.batch_size = 297
    config.eval.chunk_size = 297
    return config
