"""Progressive distillation (Salimans & Ho 2022) of the MNIST v-prediction model (configs/mnist.py, T = 200).

The teacher is configs/mnist.py with the v target (min-SNR-5, as the file), trained 4,400 steps.
The first round takes it as a 16-step DDIM teacher (trailing spacing; distill.teacher_steps=16) and
makes an 8-step student; then 8 -> 4 -> 2 -> 1, one round per command, each in its own workdir (the
teacher of a round is the previous round's workdir). sampling.steps follows distill.steps, so
--mode=sample or --mode=eval with the same distill.steps samples the student with its own N DDIM
steps (method ddim, spacing trailing, eta 0):

    python -m ddpm_jax.main --config=configs/mnist.py --workdir=workdirs/mnist_v \
        --config.diffusion.pred=v --config.training.num_steps=4400 --config.training.batch_size=32  # the teacher
    python -m ddpm_jax.main --config=configs/mnist_distill.py --mode=distill --workdir=workdirs/mnist_pd8 \
        --config.distill.teacher_workdir=workdirs/mnist_v --config.distill.teacher_steps=16 --config.distill.steps=8
    python -m ddpm_jax.main --config=configs/mnist_distill.py --mode=distill --workdir=workdirs/mnist_pd4 \
        --config.distill.teacher_workdir=workdirs/mnist_pd8 --config.distill.steps=4
    (likewise mnist_pd2 from mnist_pd4 with steps=2, mnist_pd1 from mnist_pd2 with steps=1)
    python -m ddpm_jax.main --config=configs/mnist_distill.py --mode=eval --workdir=workdirs/mnist_pd4 \
        --config.distill.steps=4

Each round: 1,000 Adam updates at batch 32, lr 5e-4 annealed to 0, EMA 0.995, the loss weighted by
max(SNR, 1): a CPU-sized budget (the paper trains 50,000 updates a round on CIFAR-10). Every other
field is configs/mnist.py's, so the teacher's checkpoint and RunMeta match.

Measured (docs/distillation.md; 2-core CPU, 500 samples, classifier fd with floor 14.3): the students
at 8 / 4 / 2 / 1 calls reach fd 52.3 / 58.2 / 72.8 / 90.6 (seeds 1-3 at 4 calls: 72.9 / 63.1 / 73.9),
against the teacher's 16-step DDIM 49.5, its DDIM at 8 / 4 / 2 / 1 calls 63.8 / 112 / 429 / 1,920, its
20-call DPM-Solver++ 40.9 / 50.4 / 41.6 / 47.7 (seeds 0-3) and its 200-step DDPM 36.8; rounds of
651-1,299 s.
"""

from configs import digits_distill, mnist


def get_config():
    return digits_distill.as_student(mnist.get_config(), num_steps=1000, checkpoint_every=500, steps=8)
