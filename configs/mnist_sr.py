"""Super-resolution of MNIST 14x14 -> 28x28 (SR3, Saharia et al. 2021): configs/mnist.py conditioned on
each digit box-downsampled by 2 (data.low_res_factor=2), nearest-upsampled and concatenated to x_t at
the U-Net's input, with noise-conditioning augmentation (Ho et al. 2021 §4.3: the low-res input noised
to a level s ~ U{0..100} of the 200-step cosine schedule in training) and condition dropout 0.1 (so
classifier-free guidance on the low-res image works as for labels). The SR stage of the cascade whose
base is configs/mnist14.py; RunMeta records the factor and the augmentation.

Commands:
    python -m ddpm_jax.main --config=configs/mnist_sr.py --workdir=workdirs/mnist_sr
    # super-resolve the first test digits' 14x14 views (input | SR | bicubic):
    python -m ddpm_jax.main --config=configs/mnist_sr.py --workdir=workdirs/mnist_sr --mode=sample \\
        --config.sampling.cond_images=test --config.sampling.low_res_level=0
    # ... or a folder / .npz of 14x14 images: --config.sampling.cond_images=path/to/low_res.npz
    # the cascade (base: configs/mnist14.py):
    python -m ddpm_jax.main --config=configs/mnist_sr.py --workdir=workdirs/mnist_sr --mode=cascade \\
        --config.cascade.base_config=configs/mnist14.py --config.cascade.base_workdir=workdirs/mnist14
    # PSNR, consistency, classifier metrics vs bicubic, the s sweep, cascade vs direct:
    python -m bench.super_resolution --workdir=workdirs/mnist_sr --levels=0,10,50 \\
        --base_config=configs/mnist14.py --base_workdir=workdirs/mnist14 --direct_workdir=workdirs/mnist

Recipe: configs/mnist.py's (min-SNR-5 weighting, 4 steps per dispatch, 3,200 steps) with the v target.
Why v: at the top of the cosine schedule (√ᾱ_t ≈ 0) an ε-model's x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t
magnifies the smallest error in ε̂, so the low-res image barely steers the first steps. Measured on
64 test digits, x̂_0 at t = 190 given the true low-res image: RMS of box_downsample(x̂_0) − input 0.61
for the earlier ε-model (1,600 steps, unweighted), 0.10 for this v-model (0.46 given the null image).
The two runs also differ in length and weighting; how the gain splits among the three was not measured.

Hardware and time: a 2-core CPU, about as long per step as configs/mnist.py (conv_in reads one more
channel, the level embedding adds two dense layers): 3,200 steps in 2,165 s with the CPU shared
with another job. Measured (docs/super_resolution.md; 250 test digits, DDIM-50 with eta 1; final loss
0.0187): PSNR 25.2 dB against bicubic's 20.0, consistency RMS 0.051 against 0.080, classifier fd 30.6
(1.06x the floor 29.0) against bicubic's 205, precision 0.89 (floor 0.92), recall 0.90 (0.91); the
cascade from configs/mnist14.py fd 46.3 (1.60x) against 48.5 (1.68x) for the direct 28x28 v-model at 4,400 steps.
"""

from configs import mnist


def get_config():
    config = mnist.get_config()
    config.training.batch_size = 32  # the batch the results above were measured at
    config.diffusion.pred = "v"  # an ε-model ignores its low-res input at the top of the schedule (docstring)
    config.data.low_res_factor = 2
    config.training.low_res_max_level = 100  # half of the 200-step schedule
    config.training.label_dropout = 0.1
    config.sampling.low_res_level = 0
    config.sampling.cond_images = "test"  # super-resolve the first test digits' 14x14 views
    return config
