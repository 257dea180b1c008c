"""Shared test helper: random weights for the diffusers (torch) reference models of the parity tests."""

import numpy as np


def randomize_weights(model) -> None:
    """Sets every parameter of the torch `model` in place to random values at a sensible scale, none zero.

    Conv / linear weights get ~unit-variance outputs, GroupNorm scales 1 + 0.1 z, biases 0.1 z; an
    exact 0 drawn by randn is replaced by 1, so that a weight the conversion drops cannot go unnoticed.
    """
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn_like(p)
            z = torch.where(z == 0, torch.ones_like(z), z)  # randn yields an exact 0 now and then
            if p.ndim > 1:  # conv / linear: ~unit-variance outputs
                p.copy_(z / float(np.sqrt(p[0].numel())))
            elif name.endswith("weight"):  # GroupNorm scale
                p.copy_(1.0 + 0.1 * z)
            else:
                p.copy_(0.1 * z)
    assert all(bool((p != 0).all()) for p in model.parameters())
