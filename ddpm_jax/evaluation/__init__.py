"""Evaluation: the FID Inception network, FID / Inception Score statistics."""
