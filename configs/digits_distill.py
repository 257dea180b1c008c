"""Progressive distillation (Salimans & Ho 2022) of a v-prediction digits model (configs/digits.py, T = 100).

One round per command, each in its own workdir; the teacher of a round is the previous round's
workdir. The teacher predicts v, as the student does (an ε-teacher's first round spends itself
relearning the output head), and trains 4,000 steps. T = 100 is not a power of two, so the first
round takes it as a 64-step DDIM teacher (trailing spacing; distill.teacher_steps=64) and makes a
32-step student; then 32 -> 16 -> 8 -> 4 (-> 2 -> 1). sampling.steps follows distill.steps, so the
same command with --mode=sample or --mode=eval samples the student with its own N DDIM steps
(method ddim, spacing trailing, eta 0):

    python -m ddpm_jax.main --config=configs/digits.py --workdir=workdirs/digits_v \
        --config.diffusion.pred=v --config.training.num_steps=4000                    # the teacher
    python -m ddpm_jax.main --config=configs/digits_distill.py --mode=distill --workdir=workdirs/digits_pd32 \
        --config.distill.teacher_workdir=workdirs/digits_v --config.distill.teacher_steps=64 --config.distill.steps=32
    python -m ddpm_jax.main --config=configs/digits_distill.py --mode=distill --workdir=workdirs/digits_pd16 \
        --config.distill.teacher_workdir=workdirs/digits_pd32 --config.distill.steps=16
    (likewise digits_pd8 from digits_pd16 with steps=8, digits_pd4 from digits_pd8 with steps=4, ...)
    python -m ddpm_jax.main --config=configs/digits_distill.py --mode=eval --workdir=workdirs/digits_pd4 \
        --config.distill.steps=4

The loss is weighted by max(SNR, 1). Each round: 4,000 Adam updates at batch 32, lr 5e-4 annealed
to 0, EMA 0.995. Every other field is configs/digits.py's (model, schedule, data, eval), so the
teacher's checkpoint and RunMeta match.

Measured (docs/distillation.md; 2-core CPU shared with one or two other jobs, 594 samples, classifier
fd with floor 48.4): the students at 32 / 16 / 8 / 4 calls reach fd 24.9 / 25.4 / 26.2 / 27.4 (seeds 1-3
at 4 calls: 33.9 / 26.7 / 23.7), against the teacher's 64-step DDIM 24.5, its 20-call DPM-Solver++
23.4 / 27.3 / 21.4 / 20.2 (seeds 0-3) and its 4-call DDIM 84.7; rounds took 482-700 s (4,000 updates).
With 8,000 updates in the rounds after the first (--config.distill.num_steps=8000 from digits_pd32 on):
24.9 / 25.6 at 16 / 8 calls and 26.7 / 32.7 / 26.1 / 23.6 at 4 calls (seeds 0-3), rounds of 780-1,110 s.
From a teacher of 8,000 steps (--config.training.num_steps=8000, 378 s; another machine's classifier,
floor 51.2), the same rounds: 21.6 / 22.5 / 23.1 at 32 / 16 / 8 calls, 24.3 / 30.3 / 25.2 / 26.3 at 4
(seeds 0-3), against its 64-step DDIM 20.5 and 20-call DPM-Solver++ 20.3 / 26.1 / 20.9 / 22.9; rounds of
283-532 s with the CPU to itself; --config.distill.lr=1e-3 in every round: 24.1 / 30.0 / 25.1 / 25.7.
With 2,000 updates a round from the 32-step DDIM (--config.distill.num_steps=2000): 26.7 / 27.7 /
28.5 / 32.7 / 36.5 at 16 / 8 / 4 / 2 / 1 calls, 238-249 s a round.
"""

from configs import digits


def as_student(config, *, num_steps: int, checkpoint_every: int, steps: int):
    """`config` (the teacher's) as a v-prediction student's: the distill fields of the module docstring,
    sampling with the student's own DDIM steps (sampling.steps follows distill.steps)."""
    config.diffusion.pred = "v"

    config.distill.lr = 5e-4
    config.distill.ema_decay = 0.995
    config.distill.batch_size = 32
    config.distill.num_steps = num_steps
    config.distill.log_every = 50
    config.distill.checkpoint_every = checkpoint_every
    config.distill.steps = steps

    config.sampling.method = "ddim"
    config.sampling.spacing = "trailing"
    config.sampling.eta = 0.0
    config.sampling.steps = config.distill.get_ref("steps")
    return config


def get_config():
    return as_student(digits.get_config(), num_steps=4000, checkpoint_every=1000, steps=32)
