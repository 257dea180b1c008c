"""Latent DDPM on CelebA-HQ 256x256 with Stable Diffusion's VAE (for accelerators; not run here).

Commands (the VAE downloaded by you, e.g. stabilityai/sd-vae-ft-mse, whose config.json has
sample_size 256; the data prepared once as in configs/celebahq256.py):
    python -m ddpm_jax.convert --autoencoder-kl PATH/TO/sd-vae-ft-mse --out runs/sd_vae
    python -m ddpm_jax.data.prepare --dataset=celeb_a_hq/256 --data_dir=$HOME/tensorflow_datasets
    python -m ddpm_jax.main --config=configs/latent_celebahq256.py --workdir=runs/latent_celebahq256
    python -m ddpm_jax.main --config=configs/latent_celebahq256.py --workdir=runs/latent_celebahq256 \
        --mode=sample --config.sampling.method=dpmpp_2m --config.sampling.steps=20

Expected behaviour: training starts by encoding the 30,000 images once into cached posterior
modes (32x32x4, f = 8: z = (mode - 0) * 0.18215, the VAE's own scaling_factor; data/latents.py),
then trains the U-Net below on them; every sample, grid, trajectory and eval image is decoded to
256x256x3 inside the compiled sampler. A VAE converted with another sample_size (the SD v1
checkpoints' vae/ folder says 512) is refused with one line naming data.image_size: the
autoencoder's image shape must be the data's.

Model and recipe after LDM's CelebA-HQ model (Rombach et al. 2022, Table 14, LDM-4 there; here
f = 8 latents of 32x32, so attention at 16, 8, 4 corresponds to LDM's at 32, 16, 8 of 64x64):
ch 224, ch_mult (1, 2, 3, 4), 2 res blocks, dropout 0; T = 1000, LDM's "linear" schedule (which
is linspace(sqrt(0.0015), sqrt(0.0195))^2: our quadratic); Adam 9.6e-5 (LDM's scaled base rate
2e-6 x batch 48), batch 48, 410k steps, EMA 0.9999; bfloat16 compute. The U-Net has 274.1M
parameters (counted with jax.eval_shape on 32x32x4; LDM's Table 14 lists 274M for its model).
NOT run here (the development machine is a 2-core CPU): no time or result is claimed.
"""

from configs import celebahq256


def get_config():
    config = celebahq256.get_config()  # the data (tfds celeb_a_hq/256, flips) and the paper's EMA
    config.data.latents_from = "runs/sd_vae"  # python -m ddpm_jax.convert --autoencoder-kl ... --out runs/sd_vae

    config.model.ch = 224
    config.model.ch_mult = (1, 2, 3, 4)  # 32, 16, 8, 4
    config.model.attn_resolutions = (16, 8, 4)
    config.model.dtype = "bfloat16"

    config.diffusion.schedule = "quadratic"
    config.diffusion.beta_start = 0.0015
    config.diffusion.beta_end = 0.0195

    config.optim.lr = 9.6e-5
    config.optim.warmup_steps = 1000

    config.training.batch_size = 48
    config.training.num_steps = 410_000
    config.sampling.batch_size = 48
    config.eval.batch_size = 48
    return config
