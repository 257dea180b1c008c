"""bench/nfe_quality.py: sampler specs, NFE per sampler, the per-sampler config, the plot of saved runs."""

import json

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


def test_a_students_sampler_sets_its_round_and_the_plot_redraws_saved_runs(tmp_path):
    from configs import digits_distill

    c = nfe_quality.sampler_config(digits_distill.get_config(), "ddim", 4, 0, "trailing")
    assert c.sampling.steps == c.distill.steps == 4  # the student of 4 steps is read as one
    rows = [dict(method="ddim", label=label, steps=n, nfe=n, seed=0, metrics=dict(fd=fd, precision=0.5, recall=0.9),
                 floor=dict(fd=48.4, precision=0.7, recall=0.7)) for label, n, fd in
            (("teacher", 4, 76.2), ("teacher", 8, 44.2), ("progressive", 4, 39.4), ("progressive", 8, 37.8))]
    tagged = [dict(rows[0], label="consistency", method="consistency", tag=f"consistency{n}-time_uniform", nfe=n,
                   steps=n) for n in (4, 1)] + [dict(rows[0], tag="ddim4-leading"), dict(rows[0], seed=1)]
    drawn = nfe_quality.lines(rows + tagged)
    assert [r["nfe"] for r in drawn["consistency"]] == [1, 4]  # every spacing is drawn
    assert [r["metrics"]["fd"] for r in drawn["teacher"]] == [76.2, 44.2] and "tag" not in drawn["teacher"][0]
    src, png = tmp_path / "nfe.jsonl", tmp_path / "nfe.png"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert nfe_quality.main([f"--plot={png}", f"--from={src}"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(common.BenchError, match="--workdir is required"):
        nfe_quality.main([])
