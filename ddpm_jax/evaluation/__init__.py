"""Evaluation as in the paper: FID, Inception Score and bits/dim, at scale.

* ``inception`` — the FID Inception-v3 (2015-12-05 graph) in Flax; ``convert_inception``
  turns pytorch-fid's .pth into the .npz it reads.
* ``fid`` — streaming activation statistics, Fréchet distance, Inception Score.
* ``generation`` — resumable, chunked, multi-host sample generation (uint8 .npz chunks).
* ``bpd`` — the variational bound in bits/dim (the official ``calc_bpd_loop``).
* ``run`` — ``--mode=eval | fid_stats | bpd``.
"""
