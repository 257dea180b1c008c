"""Class-conditional CIFAR-10 32x32 with classifier-free guidance (Ho & Salimans 2022), for accelerators.

configs/cifar10.py (the paper's U-Net, schedule and optimiser) plus a learned class embedding
(model.num_classes=10: 10 x 512 table and a null row, +5,632 parameters on the 35,746,307)
and label dropout 0.2 (p_uncond of Ho & Salimans' CIFAR-style ImageNet 64 runs: 0.1-0.2).

Commands (prepare the data once, with requirements-tf.txt installed):
    python -m ddpm_jax.data.prepare --dataset=cifar10 --data_dir=$HOME/tensorflow_datasets
    python -m ddpm_jax.main --config=configs/cifar10_cond.py --workdir=runs/cifar10_cond
    # one row per class, guided (w = 1 is diffusers' guidance_scale 2):
    python -m ddpm_jax.main --config=configs/cifar10_cond.py --workdir=runs/cifar10_cond --mode=sample \
        --config.sampling.guidance_scale=1 --config.sampling.method=dpmpp_2m --config.sampling.steps=25
    # FID / IS against the training set's statistics for w in {0, 0.3, 1, 4}:
    python -m ddpm_jax.main --config=configs/cifar10_cond.py --workdir=runs/cifar10_cond --mode=eval \
        --config.sampling.guidance_scale=0.3 --config.eval.inception_weights=inception_fid.npz \
        --config.eval.fid_stats=fid_stats_cifar10_train.npz

Hardware and time: as configs/cifar10.py (one TPU v3-8 or 8 GPUs: about 11 hours to 800k
steps); guided sampling doubles the network batch of every step.
Expected behaviour (NOT run here: the development machine is a 2-core CPU): Ho & Salimans
report on ImageNet 64x64 that a small w (about 0.1-0.3) lowers FID below the conditional
model's (w = 0) while IS keeps rising with w and FID rises again at large w (w = 4: sharper,
less diverse samples). The same shape is expected here; the digits run of docs/conditional.md
shows the accuracy / recall trade-off on a CPU.
"""

from configs import cifar10


def get_config():
    config = cifar10.get_config()
    config.model.num_classes = 10
    config.training.label_dropout = 0.2
    config.sampling.labels = "all"  # image i asks for class i % 10
    config.sampling.guidance_scale = 0.3
    config.training.num_grid_samples = 100  # ten of each class, one row per class
    return config
