"""CelebA-HQ 256x256, unconditional: the paper's setup (Ho et al. 2020, App. B).

Command (prepare the data once, with requirements-tf.txt installed; CelebA-HQ needs a manual download into tfds' manual_dir, see the tfds celeb_a_hq page):
    python -m ddpm_jax.data.prepare --dataset=celeb_a_hq/256 --data_dir=$HOME/tensorflow_datasets
    python -m ddpm_jax.main --config=configs/celebahq256.py --workdir=runs/celebahq256

Paper: 114M-parameter U-Net (ch 128, ch_mult (1,1,2,2,4,4), 2 res blocks, attention at
16x16, dropout 0.0), T=1000 linear betas 1e-4 -> 0.02, Adam 2e-5 with 5000 warmup steps,
batch 64, grad-norm clip 1, EMA 0.9999, random flips, 0.5M steps; samples with the
fixedsmall variance (as the released checkpoints).
Paper hardware and time: one TPU v3-8, 2.2 steps/s at batch 64 (so about 63 hours to 0.5M steps,
derived); sampling 128 images takes 300 s.
Paper result: samples only (the paper reports no CelebA-HQ FID in its main tables).
NOT run here (the development machine is a 2-core CPU). On GPUs short of memory, add
--config.model.remat=True and/or --config.model.dtype=bfloat16.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.data.source = "tfds"
    config.data.tfds_name = "celeb_a_hq/256"
    config.data.train_split = "train"
    config.data.eval_split = "train"
    config.data.image_size = 256
    config.data.num_channels = 3
    config.data.random_flip = True
    config.model.ch = 128
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.0
    config.diffusion.var_type = "fixedsmall"
    config.optim.lr = 2e-5
    config.optim.warmup_steps = 5000
    config.training.batch_size = 64
    config.training.num_steps = 500_000
    config.training.num_grid_samples = 16
    config.sampling.batch_size = 64
    config.eval.batch_size = 64
    return config
