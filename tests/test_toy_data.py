"""The 2-D toy sets are the seed tutorial's draws, exactly."""

import zlib

import numpy as np
import pytest
from sklearn import datasets

from ddpm_jax.data import sources


@pytest.mark.parametrize("name", ["swiss_roll", "s_curve", "moons"])
def test_toy_points_are_the_tutorials(name):
    seed = zlib.crc32(b"train") % 2**31
    n = 10**4
    want = {
        "swiss_roll": lambda: datasets.make_swiss_roll(n, noise=0.1, random_state=seed)[0][:, [0, 2]] / 10,
        "s_curve": lambda: datasets.make_s_curve(n, noise=0.1, random_state=seed)[0][:, [0, 2]] / 10,
        "moons": lambda: datasets.make_moons(n, noise=0.1, random_state=seed)[0],
    }[name]()
    np.testing.assert_allclose(sources.toy_points(name, n, "train"), want, rtol=1e-15)
