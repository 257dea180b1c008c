"""Class-conditional digits with classifier-free guidance (Ho & Salimans 2022): configs/digits.py
plus a label embedding (model.num_classes=10), label dropout 0.1, and samples of every class in turn.

Commands (docs/conditional.md has the measured table):
    python -m ddpm_jax.main --config=configs/digits_cond.py --workdir=workdirs/digits_cond
    python -m ddpm_jax.main --config=configs/digits_cond.py --workdir=workdirs/digits_cond --mode=eval \
        --config.sampling.guidance_scale=2
    python -m ddpm_jax.main --config=configs/digits_cond.py --workdir=workdirs/digits_cond --mode=sample \
        --config.sampling.guidance_scale=2      # a grid with one row per class

Hardware and time: a 2-core CPU, about as long as configs/digits.py (the label embedding adds
one 11x128 table; a guided sampling step runs the network on twice the batch).
Expected behaviour: --mode=eval with eval.metric=classifier reports `label_accuracy`, the
fraction of samples the digits classifier assigns to the class they were asked for, beside
the classifier's accuracy on the real test digits; it rises with guidance_scale w while
recall (diversity) falls at large w. Measured values: docs/conditional.md.
"""

from configs import digits


def get_config():
    config = digits.get_config()
    config.model.num_classes = 10
    config.training.label_dropout = 0.1
    config.sampling.labels = "all"  # image i asks for class i % 10: grids have one row per class
    config.sampling.guidance_scale = 0.0
    config.training.num_grid_samples = 100  # ten of each class
    config.sampling.num_samples = 100
    config.eval.num_samples = 600  # whole blocks of 10 classes; the floor uses the 297 test digits
    config.eval.batch_size = 300
    config.eval.chunk_size = 300
    return config
