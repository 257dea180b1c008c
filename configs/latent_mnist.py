"""configs/mnist.py's DDPM on the 7x7x4 latents of configs/autoencoder_mnist.py's autoencoder.

Command (the autoencoder first, then the DDPM on its latents; sample and eval decode):
    python -m ddpm_jax.main --config=configs/autoencoder_mnist.py --workdir=workdirs/ae_mnist \
        --mode=train_autoencoder
    python -m ddpm_jax.main --config=configs/latent_mnist.py --workdir=workdirs/latent_mnist
    python -m ddpm_jax.main --config=configs/latent_mnist.py --workdir=workdirs/latent_mnist --mode=eval
    python -m ddpm_jax.main --config=configs/latent_mnist.py --workdir=workdirs/latent_mnist --mode=bpd

The data are the normalised posterior modes z = (mode - latent_mean) * scale_factor of the
4,000 MNIST training digits (data/latents.py), encoded once when training starts; samples,
grids, trajectories and eval's images are decoded to 28x28x1; --mode=bpd reports latent-space
bits/dim (not comparable with the pixel DDPM's). A run whose workdir was trained on another
autoencoder is refused, naming both.

Model: a small U-Net for 7x7: one level (ch_mult (1,): 7 is odd, so the stride-2 downsampling
of a second level cannot be undone by the x2 upsampling; checks.py refuses (1, 2) on 7x7 latents),
ch 64, two res blocks, self-attention at 7x7 and in the middle block. Everything else
(schedule, optimiser, batch, steps, eval) is configs/mnist.py's, so the pixel and the latent
DDPM can be compared at matched settings (the same training wall-clock budget).
Measured (docs/latent.md, "Pixel vs latent DDPM"; the idle 2-core CPU): 8.3 steps/s (configs/mnist.py:
2.1). Given the pixel model's 1,510 s of training (its 3,200 steps), this model ran 12,486 steps
(--config.training.num_steps=1000000 and a SIGTERM at the budget); 500 decoded samples, DDPM (200 steps):
classifier fd 55.8 = 3.91x its floor (14.3; the pixel model 5.56x), precision 0.72, recall 0.90, 187 s per
1,000 samples (pixel 1,039 s); SDE-DPM-Solver++(2M) 20 calls: 3.05x, 24 s per 1,000. The autoencoder's
168 s come on top, once. Latents are sampled without clipping x0 (setup.clips_x0).
"""

import ml_collections

from configs import mnist


def get_config() -> ml_collections.ConfigDict:
    config = mnist.get_config()
    mnist.as_first_measured(config)  # the results above were measured with the first recipe
    config.data.latents_from = "workdirs/ae_mnist"  # 28x28x1 digits -> 7x7x4 latents (f = 4)

    config.model.ch = 64
    config.model.ch_mult = (1,)  # 7 is odd: no downsampling level (see the docstring)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (7,)
    config.model.dropout = 0.0
    return config
