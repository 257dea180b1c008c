"""Super-resolution of digits (SR3, Saharia et al. 2021): configs/digits.py conditioned on each
digit box-downsampled 8x8 -> 4x4 (data.low_res_factor=2), the 4x4 image nearest-upsampled and
concatenated to x_t at the U-Net's input, with noise-conditioning augmentation (Ho et al. 2021
§4.3: the low-res input noised to a level s ~ U{0..50} of the run's schedule in training) and
condition dropout 0.1, so classifier-free guidance on the low-res image works as for labels.

Commands:
    python -m ddpm_jax.main --config=configs/digits_sr.py --workdir=workdirs/digits_sr
    python -m ddpm_jax.main --config=configs/digits_sr.py --workdir=workdirs/digits_sr --mode=sample \
        --config.sampling.cond_images=test --config.sampling.low_res_level=0
    # or 4x4 images of a folder / an .npz (a --mode=sample output): --config.sampling.cond_images=low_res.npz

Hardware and time: a 2-core CPU, about as long as configs/digits.py (conv_in reads one more
channel, a second timestep-like embedding adds two dense layers). No result has been measured
with this config yet.
"""

from configs import digits


def get_config():
    config = digits.get_config()
    config.data.low_res_factor = 2
    config.training.low_res_max_level = 50  # half of the 100-step schedule
    config.training.label_dropout = 0.1
    config.sampling.low_res_level = 0
    config.sampling.cond_images = "test"  # super-resolve the first test digits' 4x4 views
    return config
