"""Evaluation as in the paper (FID, Inception Score, bits/dim) and what a CPU can judge.

* ``inception`` — the FID Inception-v3 (2015-12-05 graph) in Flax; ``convert_inception``
  turns pytorch-fid's .pth into the .npz it reads.
* ``fid`` — streaming activation statistics, Fréchet distance, Inception Score.
* ``inception_metrics`` — the Inception over sample chunks and data splits, across hosts.
* ``classifier``, ``sample_quality`` — a small CNN trained here per data set, and the
  Fréchet distance, precision/recall and classifier score in its features, each beside its
  real-vs-real noise floor (digits, MNIST).
* ``chunked_generation`` — resumable, chunked, multi-host sample generation (uint8 .npz chunks).
* ``bpd`` — the variational bound in bits/dim (the official ``calc_bpd_loop``).
* ``toy2d`` — energy distance and sliced W2 of 2-D samples beside their noise floor.

The modes that run them are in ``ddpm_jax/modes/``.
"""
