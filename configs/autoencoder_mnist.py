"""The KL autoencoder of latent diffusion on real MNIST (the first stage; Rombach et al. 2022).

Command:
    python -m ddpm_jax.main --config=configs/autoencoder_mnist.py --workdir=workdirs/ae_mnist \
        --mode=train_autoencoder

Model: f = 4 (28x28x1 -> 7x7x4 latents; the LDM "KL-f4" design at small widths): block_out_channels
(16, 32, 32), one ResNet block per level, mid-block attention, GroupNorm(16). Loss: L1 summed per
image + 1e-6 KL (LDM's weight), Adam 2e-3 with a 100-step warmup, batch 16, 2,100 steps, no EMA (as
LDM's first stage). Writes workdirs/ae_mnist/{checkpoints, autoencoder.json (scale factor, shapes),
autoencoder_metrics.json (test PSNR, classifier fd of the reconstructions beside its floor),
reconstructions.png}. Left out of LDM's recipe (see ddpm_jax/modes/autoencoder.py): the LPIPS
perceptual loss (needs pretrained VGG weights, a download) and the patch-GAN term (needs a
discriminator warm-up and far more steps than a CPU run affords).

Hardware and time (measured): a 2-core CPU shared with three other training jobs (load average 7-8):
the 2,100 steps took 9 min 35 s wall including compilation (SIGTERM at step 2,100, then the same
command finished: scale factor and test metrics in 77 s, 50 s of it training the MNIST feature
classifier once into workdirs/classifiers/mnist_28).
Measured result (test split, 1,000 images, reconstructions of the posterior mode): PSNR 29.72 dB
(mean over images; 29.14 dB pooled); classifier Fréchet distance of the reconstructions against the
4,000 training digits 6.00, floor (the real test digits against the same) 6.04: 0.99x floor
(precision 0.917 / floor 0.918, recall 0.888 / 0.899); latent scale factor 0.631 (latent std 1.58,
mean -2.36). The logged batch losses were still falling (L1 per image 22.7 at step 1,600, 21.5
at 2,100; single batches), so a longer run should reconstruct better.
"""

import ml_collections

from configs import mnist


def get_config() -> ml_collections.ConfigDict:
    config = mnist.get_config()  # MNIST's data settings (28x28x1, no flip); the DDPM fields are unused here
    ae = config.autoencoder
    ae.block_out_channels = (16, 32, 32)  # f = 4: 7x7 latents
    ae.layers_per_block = 1
    ae.latent_channels = 4
    ae.norm_num_groups = 16
    ae.lr = 2e-3
    ae.warmup_steps = 100
    ae.batch_size = 16
    ae.num_steps = 2100
    ae.checkpoint_every = 500
    ae.keep_checkpoints = 2
    return config
