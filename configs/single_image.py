"""The tutorial experiment: diffusion on ONE 64x64 grayscale photo (scikit-image's 'camera').

Command (train, then the two animations and the PSNR):
    python -m ddpm_jax.main --config=configs/single_image.py --workdir=workdirs/single_image && \\
    python -m ddpm_jax.main --config=configs/single_image.py --workdir=workdirs/single_image --mode=sample
    # another picture: --config.data.path=astronaut (a scikit-image picture name) or an image file

`--mode=sample` noises the photo to step k = 180 with q(x_k | x_0) (eq. (4)), runs the 180
reverse steps, and writes under workdirs/single_image/samples/: partial_ddpm_step600_seed0_n4_k180.gif
(the chain from x_180: x_t left, predicted x_0 right), partial_..._{original,noised,
denoised}.png, partial_..._psnr.json and one line with the PSNR of the noised input
and of the denoised output against the photo; and the chain from pure noise,
trajectory_ddpm_step600_seed0_n4_every10.gif and
sample_ddpm_step600_seed0_n4.png (files are named by method, step, seed and count).

Schedule as the tutorial: linear beta from 1e-4 to 0.04, T = 300 (alpha_bar_T = 2e-3;
alpha_bar at k = 180 is 0.11: a third of the signal amplitude is left). The network
memorises the picture, so every sample is (a close copy of) the photo.
Made practical on a CPU: the smallest U-Net GroupNorm(32) allows (ch 32 at 64x64, four
levels, one res block per level, no attention: 1.5M parameters), batch 4, 600 steps at lr
2e-3, EMA 0.99, no sample grids during training (each costs 300 network calls).
Hardware, time and results: docs/experiments.md (2-core CPU).
"""

from configs import base


def get_config():
    config = base.get_config()
    config.data.source = "image"
    config.data.path = "camera"
    config.data.image_size = 64
    config.data.num_channels = 1
    config.data.random_flip = False
    config.data.repeat_single_image = 1024

    config.model.ch = 32
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()
    config.model.dropout = 0.0

    config.diffusion.schedule = "linear"
    config.diffusion.num_timesteps = 300
    config.diffusion.beta_start = 1e-4
    config.diffusion.beta_end = 0.04

    config.optim.lr = 2e-3
    config.optim.warmup_steps = 100
    config.optim.ema_decay = 0.99

    config.training.batch_size = 4
    config.training.num_steps = 600
    config.training.log_every = 50
    config.training.sample_every = 0  # --mode=sample draws them (and animates the chains)
    config.training.checkpoint_every = 300
    config.training.keep_every = 0
    config.training.num_grid_samples = 4

    config.sampling.num_samples = 4
    config.sampling.batch_size = 4
    config.sampling.init_image = config.data.get_ref("path")  # the training picture
    config.sampling.start_step = 180  # the tutorial's partial denoising
    config.sampling.trajectory_every = 10  # a GIF frame every 10 steps
    return config
