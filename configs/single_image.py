"""The tutorial experiment: diffusion on ONE 64x64 grayscale photo (scikit-image's 'camera').

Command:
    python -m ddpm_jax.main --config=configs/single_image.py --workdir=workdirs/single_image
    # another picture: --config.data.path=astronaut (any scikit-image picture) or a file path
    # partial denoising of the photo from step k:
    python -m ddpm_jax.main --config=configs/single_image.py --workdir=workdirs/single_image \
        --mode=sample --config.sampling.init_image=camera --config.sampling.start_step=150

Schedule as the tutorial: linear beta from 1e-4 to 0.04, T = 300 (alpha_bar_T ~2e-3).
The network memorises the picture, so every sample is (a close copy of) the photo;
partial denoising shows how much of the photo survives noising to step k.
Hardware and time: meant for one GPU, where 2,000 steps of batch 16 should take
minutes (not measured: no GPU here). NOT run to completion here: on the 2-core
development CPU a step took 3.4 s (measured over 40 steps, load average about 3),
so the full run is about two hours there.
Expected result: workdirs/single_image/samples/step_2000.png shows the cameraman
(not verified here).
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
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.0

    config.diffusion.schedule = "linear"
    config.diffusion.num_timesteps = 300
    config.diffusion.beta_start = 1e-4
    config.diffusion.beta_end = 0.04

    config.optim.lr = 1e-3
    config.optim.warmup_steps = 100
    config.optim.ema_decay = 0.995

    config.training.batch_size = 16
    config.training.num_steps = 2000
    config.training.log_every = 50
    config.training.sample_every = 500
    config.training.checkpoint_every = 500
    config.training.keep_every = 0
    config.training.num_grid_samples = 16

    config.sampling.num_samples = 16
    config.sampling.batch_size = 16
    config.sampling.start_step = 150
    return config
