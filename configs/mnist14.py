"""The base stage of an MNIST cascade: configs/mnist.py at 14x14, each digit box-downsampled by 2.

The 14x14 digits are exactly what configs/mnist_sr.py is conditioned on (data/mnist.py box-downsamples
at a size dividing 28, `imaging.box_downsample` rounded to uint8), so the super-resolution stage
reads samples of the distribution it was trained on. A U-Net of two levels (14x14, 7x7).

Commands (the cascade: docs/super_resolution.md):
    python -m ddpm_jax.main --config=configs/mnist14.py --workdir=workdirs/mnist14
    python -m ddpm_jax.main --config=configs/mnist14.py --workdir=workdirs/mnist14 --mode=sample
    python -m ddpm_jax.main --config=configs/mnist_sr.py --workdir=workdirs/mnist_sr --mode=cascade \\
        --config.cascade.base_config=configs/mnist14.py --config.cascade.base_workdir=workdirs/mnist14

Hardware and time: a 2-core CPU; a train step at batch 32 takes about a quarter of configs/mnist.py's
(a quarter of the pixels, one level fewer). Measured: 3,200 steps in 1,615 s with the CPU shared
(load 5-8), final loss 0.0798; its cascade with configs/mnist_sr.py in docs/super_resolution.md.
"""

from configs import mnist


def get_config():
    config = mnist.get_config()
    mnist.as_first_measured(config)  # the results above were measured with the first recipe
    config.data.image_size = 14
    config.model.ch_mult = (1, 2)  # 14x14, 7x7
    config.model.attn_resolutions = (7,)
    config.eval.metric = "classifier"  # the classifier of 14x14 digits (trained on this config's data)
    return config
