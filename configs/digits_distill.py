"""Progressive distillation (Salimans & Ho 2022) of the digits model (configs/digits.py, T = 100).

One round per command, each in its own workdir; the teacher of a round is the previous round's
workdir. T = 100 is not a power of two, so the first round takes the trained model as a 32-step
DDIM teacher (trailing spacing; distill.teacher_steps=32) and makes a 16-step student; then
16 -> 8 -> 4 -> 2 -> 1. sampling.steps follows distill.steps, so the same command with --mode=sample
or --mode=eval samples the student with its own N DDIM steps (method ddim, spacing trailing, eta 0):

    python -m ddpm_jax.main --config=configs/digits.py --workdir=workdirs/digits            # the teacher
    python -m ddpm_jax.main --config=configs/digits_distill.py --mode=distill --workdir=workdirs/digits_pd16 \\
        --config.distill.teacher_workdir=workdirs/digits --config.distill.teacher_steps=32 --config.distill.steps=16
    python -m ddpm_jax.main --config=configs/digits_distill.py --mode=distill --workdir=workdirs/digits_pd8 \\
        --config.distill.teacher_workdir=workdirs/digits_pd16 --config.distill.steps=8
    (likewise digits_pd4 from digits_pd8 with steps=4, digits_pd2 from digits_pd4 with steps=2,
     digits_pd1 from digits_pd2 with steps=1)
    python -m ddpm_jax.main --config=configs/digits_distill.py --mode=eval --workdir=workdirs/digits_pd8 \\
        --config.distill.steps=8

The student predicts v (diffusion.pred=v) and starts from the ε-teacher's weights; the loss is
weighted by max(SNR, 1). Each round: 2,000 Adam updates at batch 32, lr 5e-4 annealed to 0, EMA 0.995.
Every other field is configs/digits.py's (model, schedule, data, eval), so the teacher's checkpoint
and RunMeta match.

Measured (docs/distillation.md; 2-core CPU shared with other jobs, 594 samples, seed 0, classifier
fd with floor 48.4): the students at 8 / 4 / 2 / 1 calls reach fd 41.4 / 43.0 / 46.3 / 53.6
(precision 0.50-0.46), against the teacher's DDIM at the same calls 44.2 / 76.2 / 183 / 614 and
its 20-call DPM-Solver++ 27.4; rounds took 250-562 s each (2,000 updates).
"""

from configs import digits


def get_config():
    config = digits.get_config()
    config.diffusion.pred = "v"

    config.distill.lr = 5e-4
    config.distill.ema_decay = 0.995
    config.distill.batch_size = 32
    config.distill.num_steps = 2000
    config.distill.log_every = 50
    config.distill.checkpoint_every = 1000
    config.distill.steps = 16

    config.sampling.method = "ddim"
    config.sampling.spacing = "trailing"
    config.sampling.eta = 0.0
    config.sampling.steps = config.distill.get_ref("steps")
    return config
