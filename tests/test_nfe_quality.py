"""bench/nfe_quality.py: sampler specs, NFE per sampler, the per-sampler config."""

import pytest

from bench import common, nfe_quality
from configs import digits


def test_specs_nfe_and_configs():
    specs = nfe_quality.parse_samplers("ddpm, ddim:10,dpmpp_3m:15:karras,heun:18")
    assert specs == [("ddpm", None, ""), ("ddim", 10, ""), ("dpmpp_3m", 15, "karras"), ("heun", 18, "")]
    assert [nfe_quality.nfe(m, n, 100) for m, n, _ in specs] == [100, 10, 15, 35]
    assert nfe_quality.sampler_config(digits.get_config(), "dpmpp_3m", 15, 0, "karras").sampling.spacing == "karras"
    config = digits.get_config()
    c = nfe_quality.sampler_config(config, "heun", 18, seed=1)
    assert (c.sampling.method, c.sampling.steps, c.sampling.seed) == ("heun", 18, 1)
    assert config.sampling.method == "ddpm"  # the original is left alone
    assert nfe_quality.sampler_config(config, "ddim", 20, 0).sampling.steps == 20
    with pytest.raises(common.BenchError, match="dpmpp_2m:20"):
        nfe_quality.parse_samplers("dpmpp_2m")
