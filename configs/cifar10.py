"""CIFAR-10 32x32, unconditional: the paper's exact setup (Ho et al. 2020, Sec. 4 and App. B).

Command (prepare the data once, with requirements-tf.txt installed):
    python -m ddpm_jax.data.prepare --dataset=cifar10 --data_dir=$HOME/tensorflow_datasets
    python -m ddpm_jax.main --config=configs/cifar10.py --workdir=runs/cifar10

Paper: 35.7M-parameter U-Net (ch 128, ch_mult (1,2,2,2), 2 res blocks, attention at
16x16, dropout 0.1), T=1000 linear betas 1e-4 -> 0.02, Adam 2e-4 with 5000 warmup
steps, batch 128, grad-norm clip 1, EMA 0.9999, random flips, 800k steps.
Paper hardware and time: one TPU v3-8, 21 steps/s at batch 128, 10.6 hours to 800k
steps; sampling 256 images takes 17 s.
Paper result (EMA weights, fixedlarge variance): FID 3.17, IS 9.46 (50k samples, train
set statistics), NLL <= 3.75 bits/dim on the test set (3.70 train).
NOT run to completion here (the development machine is a 2-core CPU); the model, the
loss and the sampler are checked against the released checkpoint's outputs in tests.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.data.source = "tfds"
    config.data.tfds_name = "cifar10"
    config.data.image_size = 32
    config.data.num_channels = 3
    config.data.random_flip = True
    config.data.eval_split = "test"
    # Model, diffusion, optimiser and loop: the base defaults are the paper's CIFAR-10
    # values; spelled out here so this file alone documents the experiment.
    config.model.ch = 128
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.1
    config.diffusion.schedule = "linear"
    config.diffusion.num_timesteps = 1000
    config.diffusion.beta_start = 1e-4
    config.diffusion.beta_end = 0.02
    config.diffusion.var_type = "fixedlarge"
    config.optim.lr = 2e-4
    config.optim.warmup_steps = 5000
    config.optim.grad_clip = 1.0
    config.optim.ema_decay = 0.9999
    config.training.batch_size = 128
    config.training.num_steps = 800_000
    config.eval.num_samples = 50_000
    return config
