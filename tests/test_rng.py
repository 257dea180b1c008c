"""The random streams of `ddpm_jax.rng`: distinct, defined once, and apart from the counters folded beside them."""

import ast
import pathlib

from ddpm_jax import config_loading, rng

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _configs() -> list:
    return [config_loading.load_config(str(p)) for p in sorted((ROOT / "configs").glob("*.py"))]


def _largest(configs, *fields: str) -> int:
    """The largest value any config gives one of the dotted `fields` (absent fields skipped)."""
    found = []
    for config in configs:
        for field in fields:
            node = config
            for part in field.split("."):
                node = node.get(part) if hasattr(node, "get") else None
            if node is not None:
                found.append(int(node))
    assert found, fields
    return max(found)


def test_streams_are_pairwise_distinct():
    values = list(rng.STREAMS.values())
    assert len(set(values)) == len(values), rng.STREAMS
    assert rng.STREAMS == {name: getattr(rng, name) for name in rng.STREAMS}
    assert all(0 <= v < 2 ** 32 for v in values)  # fold_in takes a uint32


def test_streams_beside_counters_exceed_every_count_a_config_uses():
    configs = _configs()
    # Folded into per-image keys next to the timesteps t = 0..T.
    max_t = _largest(configs, "diffusion.num_timesteps")
    assert min(rng.BPD, rng.ODE) > max_t
    # Folded into key(seed) next to the step numbers and the image indices.
    max_count = _largest(configs, "training.num_steps", "autoencoder.num_steps", "sampling.num_samples",
                         "eval.num_samples", "evaluation.num_samples")
    assert rng.FIGURE_MIX > max_count
    # The one-off streams below those counts (the module docstring says why their keys still differ).
    root = {rng.INIT, rng.FIGURE_MIX, rng.NOISED_START, rng.AUTOENCODER_INIT, rng.AUTOENCODER_SCALE}
    assert {v for v in root if v <= max_count} == {rng.INIT, rng.NOISED_START, rng.AUTOENCODER_INIT,
                                                    rng.AUTOENCODER_SCALE}


def test_no_stream_constant_outside_rng():
    """Every fold_in of a literal stream is written as `rng.NAME`: the streams live in one module."""
    for path in (ROOT / "ddpm_jax").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "fold_in":
                data = node.args[1]
                assert not isinstance(data, ast.Constant), f"{path.name}:{node.lineno} folds in a literal"
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "").endswith("_STREAM") for t in node.targets):
                raise AssertionError(f"{path.name}:{node.lineno} defines a stream outside ddpm_jax/rng.py")
