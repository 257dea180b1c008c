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
DDPM can be compared at matched settings (issue 17, part 4).
Measured (docs/latent.md; 2-core CPU, load 3-4 with the test suite beside it): 3,200 steps in 650 s
wall (5.5-5.8 steps/s); 500 decoded DDPM samples in 149.5 s; classifier fd 566 = 39.6x its floor
(14.3), precision 0.55, recall 0.16: far behind the pixel model at the same steps (5.75x); the
matched-time run (about 22,000 steps) is not measured yet.
"""

import ml_collections

from configs import mnist


def get_config() -> ml_collections.ConfigDict:
    config = mnist.get_config()
    config.data.latents_from = "workdirs/ae_mnist"  # 28x28x1 digits -> 7x7x4 latents (f = 4)

    config.model.ch = 64
    config.model.ch_mult = (1,)  # 7 is odd: no downsampling level (see the docstring)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (7,)
    config.model.dropout = 0.0
    return config
