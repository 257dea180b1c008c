"""Large-scale sample generation: resumable chunks, per-image seeds, processes sharing the work."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, parallel, sampler, schedules, setup
from ddpm_jax.evaluation import chunked_generation
from ddpm_jax.evaluation import inception_metrics as im
from ddpm_jax.models.unet import UNet

SHAPE = (8, 8, 1)
T = 5
SCHED = schedules.Schedule.from_betas(schedules.get_betas("linear", T, beta_start=0.05, beta_end=0.3))
PARAMS = {"w": jnp.float32(0.3), "v": jnp.float32(0.1)}


def _apply(params, x, t, cond=None):
    return params["w"] * x + params["v"] * (t.astype(jnp.float32) / T)[:, None, None, None]


def _sampler(devices, apply_fn=_apply, seed=3):
    mesh = parallel.make_mesh(jax.devices()[:devices])
    process = diffusion.GaussianDiffusion(SCHED, var_type="fixedlarge", clip_x0=True, pred="eps")
    return sampler.Sampler(apply_fn, process, mesh, shape=SHAPE, seed=seed, method="ddpm")


class Spy:
    """Records the image indices each sampler call asks for."""

    def __init__(self, sampler):
        self.sampler, self.mesh, self.calls = sampler, sampler.mesh, []

    def __call__(self, params, indices):
        self.calls.append(np.asarray(indices).copy())
        return self.sampler(params, indices)


def _all_images(out_dir, num_samples, chunk_size):
    pieces = list(chunked_generation.read_chunks(out_dir, range(chunked_generation.num_chunks(num_samples, chunk_size)),
                                         num_samples=num_samples, chunk_size=chunk_size))
    indices = np.concatenate([p[0] for p in pieces])
    np.testing.assert_array_equal(indices, np.arange(num_samples))   # no duplicates, no gaps
    return np.concatenate([p[1] for p in pieces])


def _generate(sampler, out_dir, num_samples=23, chunk_size=5, batch_size=8, **kw):
    return chunked_generation.generate_samples(sampler, PARAMS, str(out_dir), num_samples=num_samples,
                                       chunk_size=chunk_size, batch_size=batch_size, shape=SHAPE,
                                       progress=False, **kw)


def test_interrupted_generation_resumes_without_regenerating_finished_chunks(tmp_path, monkeypatch):
    sampler = _sampler(8)
    report = _generate(sampler, tmp_path / "whole")
    assert report["chunks_generated"] == 5 and report["images_generated"] == 23
    whole = _all_images(str(tmp_path / "whole"), 23, 5)
    assert whole.dtype == np.uint8 and whole.shape == (23, *SHAPE)
    assert len({im.tobytes() for im in whole}) == 23   # per-image noise: all different

    # Interrupt while writing the third chunk: its temporary file is left, no chunk file.
    real_write, written = chunked_generation._write_chunk, []

    def failing_write(path, indices, images):
        if len(written) == 2:
            with open(f"{path}.tmp{os.getpid()}", "wb") as f:
                f.write(b"half a chunk")
            raise KeyboardInterrupt("killed while writing")
        written.append(path)
        real_write(path, indices, images)

    out = str(tmp_path / "interrupted")
    monkeypatch.setattr(chunked_generation, "_write_chunk", failing_write)
    with pytest.raises(KeyboardInterrupt):
        _generate(sampler, out)
    monkeypatch.setattr(chunked_generation, "_write_chunk", real_write)
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "chunk_*.npz"))) == \
        ["chunk_00000.npz", "chunk_00001.npz"]
    assert chunked_generation.pending_chunks(out, num_samples=23, chunk_size=5, shape=SHAPE) == [2, 3, 4]
    before = {p: os.stat(p).st_mtime_ns for p in written}

    spy = Spy(sampler)
    report = _generate(spy, out)
    assert report["chunks_skipped"] == 2 and report["chunks_generated"] == 3
    asked = np.concatenate(spy.calls)
    assert asked.min() == 10 and set(range(10, 23)) <= set(asked.tolist())   # chunks 0, 1 not redone
    assert {p: os.stat(p).st_mtime_ns for p in written} == before
    np.testing.assert_array_equal(_all_images(out, 23, 5), whole)
    # A third run finds nothing to do.
    spy.calls.clear()
    assert _generate(spy, out)["chunks_generated"] == 0 and not spy.calls


def test_samples_do_not_depend_on_device_count_or_batch_size(tmp_path):
    model = UNet(ch=32, out_ch=1, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *SHAPE)), jnp.zeros((1,), jnp.int32))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.normal(size=s.shape), jnp.float32), shapes["params"])
    apply_fn = setup.model_apply_fn(model)
    runs = {}
    for devices, batch, chunk in ((8, 16, 6), (1, 3, 6), (8, 8, 4)):
        out = str(tmp_path / f"{devices}_{batch}_{chunk}")
        chunked_generation.generate_samples(_sampler(devices, apply_fn), params, out, num_samples=13,
                                    chunk_size=chunk, batch_size=batch, shape=SHAPE, progress=False)
        runs[(devices, batch, chunk)] = _all_images(out, 13, chunk).astype(int)
    ref = runs[(8, 16, 6)]
    assert len({im.tobytes() for im in ref}) == 13
    for key, images in runs.items():
        # Equal up to float32 rounding inside the network (at most one uint8 level, rarely).
        assert np.abs(images - ref).max() <= 1, key
        assert np.mean(images == ref) > 0.99, key


def test_processes_share_the_chunks_without_duplicates_or_gaps(tmp_path, monkeypatch):
    sampler = _sampler(8)
    _generate(sampler, tmp_path / "one")
    out = str(tmp_path / "three")
    _generate(sampler, out, num_samples=23, chunk_size=5)           # chunks 0..4
    os.remove(chunked_generation.chunk_path(out, 1))
    os.remove(chunked_generation.chunk_path(out, 3))
    os.remove(chunked_generation.chunk_path(out, 4))
    pending = chunked_generation.pending_chunks(out, num_samples=23, chunk_size=5, shape=SHAPE)
    assert pending == [1, 3, 4]
    real_write, writes = chunked_generation._write_chunk, []
    monkeypatch.setattr(chunked_generation, "_write_chunk",
                        lambda path, i, im: (writes.append(path), real_write(path, i, im)))
    for p in range(3):   # three processes, each with the list all of them saw
        _generate(sampler, out, pending=pending, process_index=p, process_count=3)
    assert writes == [chunked_generation.chunk_path(out, c) for c in (1, 3, 4)]   # each once, by its process
    np.testing.assert_array_equal(_all_images(out, 23, 5), _all_images(str(tmp_path / "one"), 23, 5))


def test_other_settings_are_refused_and_broken_chunks_redone(tmp_path):
    out = str(tmp_path)
    meta = dict(step=4, sampling_seed=3, shape=list(SHAPE), chunk_size=5, sampler={"method": "ddpm"})
    chunked_generation.check_samples_meta(out, meta)
    chunked_generation.check_samples_meta(out, meta)                       # the same settings: fine
    with pytest.raises(ValueError, match=r"sampling_seed=3.*sampling_seed=4.*delete"):
        chunked_generation.check_samples_meta(out, dict(meta, sampling_seed=4))
    with open(os.path.join(out, "meta.json")) as f:
        assert json.load(f)["sampler"] == {"method": "ddpm"}
    # A chunk with the wrong range or an unreadable file is pending again.
    chunked_generation._write_chunk(chunked_generation.chunk_path(out, 0), np.arange(1, 6), np.zeros((5, *SHAPE), np.uint8))
    with open(chunked_generation.chunk_path(out, 1), "wb") as f:
        f.write(b"not a zip")
    chunked_generation._write_chunk(chunked_generation.chunk_path(out, 2), np.arange(10, 13), np.zeros((3, *SHAPE), np.uint8))
    assert chunked_generation.pending_chunks(out, num_samples=13, chunk_size=5, shape=SHAPE) == [0, 1]
    with pytest.raises(ValueError, match="must all be >= 1"):
        _generate(_sampler(1), out, num_samples=0)


def test_fixed_batches_recut_pieces_and_pad_the_last():
    pieces = [(np.arange(0, 3), np.arange(0, 3)[:, None] * np.ones((1, 2))),
              (np.arange(3, 10), np.arange(3, 10)[:, None] * np.ones((1, 2)))]
    out = list(im.fixed_batches(pieces, 4))
    assert [n for _, _, n in out] == [4, 4, 2]
    assert all(len(i) == 4 and len(x) == 4 for i, x, _ in out)
    np.testing.assert_array_equal(np.concatenate([i[:n] for i, _, n in out]), np.arange(10))
    np.testing.assert_array_equal(out[-1][0], [8, 9, 9, 9])
    np.testing.assert_array_equal(np.concatenate([x[:n, 0] for _, x, n in out]), np.arange(10))
