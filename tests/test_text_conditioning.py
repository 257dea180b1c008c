"""Text conditioning wired into a run (data.captions): batches with tokens, caption dropout, exact
resume, the sampler's captions, classifier-free guidance with the null caption, checks, eval."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import mnist_text
from ddpm_jax import checks, condition_config, data, guidance, imaging, parallel, sampler, sampling, setup, train
from ddpm_jax.data import captions
from ddpm_jax.models import text
from ddpm_jax.modes import evaluate, sample
from ddpm_jax.run_meta import CheckpointMismatchError


def tiny_config(**training) -> ml_collections.ConfigDict:
    """configs/mnist_text.py on 8x8 digits with a tiny U-Net (cross-attention at 4x4 and in the middle)."""
    config = mnist_text.get_config()
    config.data.image_size = 8
    config.model.update(ch=32, ch_mult=(1, 2), attn_resolutions=(), transformer_resolutions=(4,), context_dim=32,
                        transformer_heads=2, text_layers=1, text_heads=2)
    config.diffusion.num_timesteps = 20
    config.training.update(batch_size=8, num_steps=4, sample_every=0, checkpoint_every=2, log_every=2)
    config.training.update(training)
    config.sampling.update(method="ddim", steps=3, num_samples=6, batch_size=6)
    config.eval.update(num_samples=8, batch_size=8, chunk_size=8)
    return config


def _leaves(tree):
    return jax.tree.leaves(jax.device_get(tree))


# ---- data -----------------------------------------------------------------------------------------

def test_captioned_source_carries_each_examples_caption_tokens():
    config = tiny_config()
    src = data.load_source(config.data, "train")
    rows = [0, 7, 123]
    batch = src.read(rows)
    tok = captions.tokenizer_for(config.data)
    names = captions.mnist_captions("train")
    tokens = batch["cond"]["tokens"]
    assert tokens.dtype == np.int32 and tokens.shape == (3, 6)  # the longest caption: 6 words
    assert [tok.decode(r) for r in tokens] == [" ".join(text.words(names[i])) for i in rows]
    np.testing.assert_array_equal(batch["cond"]["label"],
                                  data.load_pixel_source(config.data, "train").read(rows)["cond"]["label"])
    # the eval iterator's padding rows are all <pad>: the fully masked context
    it = data.create_eval_iterator(config.data, "test", batch_size=3 * 333 + 2)
    last = list(it)[-1]
    assert not last["mask"][-1] and (last["cond"]["tokens"][~last["mask"]] == text.PAD_ID).all()


def test_the_vocabulary_is_the_training_captions_and_recorded_in_the_meta():
    config = tiny_config()
    tok = captions.tokenizer_for(config.data)
    assert tok == text.Tokenizer.build(captions.mnist_captions("train")) and tok.vocab_size == 23
    meta = setup.create_run(config, parallel.make_mesh(jax.devices()[:1])).meta
    assert meta.model_kwargs["vocab_size"] == 23 and meta.model_kwargs["context_length"] == 8
    plain = tiny_config()
    plain.data.captions = False
    assert "vocab_size" not in setup.create_run(plain, parallel.make_mesh(jax.devices()[:1])).meta.model_kwargs


# ---- training -------------------------------------------------------------------------------------

def _losses_for_tokens(config, token_sets):
    """The train step's loss (fresh params, one fixed batch of images) for each caption batch."""
    mesh = parallel.make_mesh()
    run = setup.create_run(config, mesh)
    state, tx = setup.create_train_state(config, run.model, run.shape, mesh)
    step = train.make_train_step(config, run.model, run.sched, tx, mesh)
    x = np.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 8) + run.shape), np.float32)
    y = np.zeros((1, 8), np.int32)
    losses = []
    for tokens in token_sets:
        batch = {"x": x, "cond": {"label": y, "tokens": np.asarray(tokens, np.int32)[None]}}
        fresh = jax.tree.map(jnp.copy, state)  # the step donates its state
        _, metrics = step(fresh, parallel.host_to_global(batch, mesh, batch_axis=1))
        losses.append(float(np.asarray(metrics["loss"])[0]))
    return losses


def test_caption_dropout_reaches_the_train_step():
    tok = captions.tokenizer_for(tiny_config().data)
    a = tok.encode(["a thick seven"] * 8, 6)[0]
    b = tok.encode(["a thin one slanted left"] * 8, 6)[0]
    # The transformers' proj_out starts at zero, so fresh params ignore the caption: one step of Adam first.
    la, lb = _losses_for_tokens(tiny_config(label_dropout=1.0), (a, b))
    assert la == lb  # p = 1: every caption is the null caption
    config = tiny_config(label_dropout=0.0)
    mesh = parallel.make_mesh()
    run = setup.create_run(config, mesh)
    state, tx = setup.create_train_state(config, run.model, run.shape, mesh)
    params = jax.tree.map(lambda p: p + 0.05 * jnp.sign(jnp.sin(jnp.arange(p.size).reshape(p.shape) + 1.0)),
                          jax.device_get(state.params))
    apply = setup.model_apply_fn(run.model)
    x, t = jnp.zeros((8, *run.shape)), jnp.full((8,), 5, jnp.int32)
    tokens = lambda ids: {"tokens": jnp.asarray(ids)}  # noqa: E731
    assert float(jnp.max(jnp.abs(apply(params, x, t, tokens(a)) - apply(params, x, t, tokens(b))))) > 1e-4


def test_captioned_training_resumes_exactly_and_saves_the_vocabulary(tmp_path):
    """Caption dropout draws from the step's key: 2 + 2 resumed steps == 4 straight, bit for bit."""
    def run(workdir, steps):
        return train.train_and_evaluate(tiny_config(num_steps=steps, label_dropout=0.5), str(workdir))

    straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4)
    assert int(resumed.step) == int(straight.step) == 4
    for u, v in zip(_leaves(straight.params), _leaves(resumed.params)):
        np.testing.assert_array_equal(u, v)
    assert captions.load_tokenizer(str(tmp_path / "a")) == captions.tokenizer_for(tiny_config().data)


# ---- sampling and guidance -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("text_run"))
    train.train_and_evaluate(tiny_config(num_steps=2), workdir)
    return workdir


def test_sampler_cycles_the_captions_and_guides_with_the_null_caption(trained):
    config = tiny_config()
    config.sampling.update(captions="a thick seven|a thin one", guidance_scale=2.0)
    loaded = setup.load_run(config, trained)
    params = jax.tree.map(lambda p: p + 0.05 * jnp.cos(jnp.arange(p.size).reshape(p.shape)), jax.device_get(loaded.params))
    out = sampler.generate(setup.make_sampler(loaded, config), params, num_samples=4, batch_size=4)
    ids = captions.tokenizer_for(config.data).encode(["a thick seven", "a thin one"] * 2, 8)[0]
    apply = setup.model_apply_fn(loaded.model)
    cond = {"tokens": jnp.asarray(ids)}
    null_cond = condition_config.create_conditioning(config).null_like(cond)
    ref = sampling.sample(apply, params, loaded.process, shape=loaded.shape, indices=jnp.arange(4), seed=0,
                          method="ddim", num_steps=3, cond=cond, guidance_scale=2.0, null_cond=null_cond)
    np.testing.assert_allclose(out.samples, np.asarray(ref.samples), atol=1e-4)
    # the guided network: (1 + w) eps(x, caption) - w eps(x, null caption), in one doubled call
    x, t = jnp.asarray(np.random.default_rng(1).normal(size=(4, *loaded.shape)), jnp.float32), jnp.full((4,), 7)
    guided = guidance.model_fn(apply, params, cond=cond, guidance_scale=2.0, null_cond=null_cond)(x, t)
    null = jnp.asarray(text.null_tokens(4, 8))
    explicit = 3.0 * apply(params, x, t, cond) - 2.0 * apply(params, x, t, {"tokens": null})
    np.testing.assert_allclose(np.asarray(guided), np.asarray(explicit), atol=1e-5)
    # the captions change the samples; padding length does not change the network
    plain = sampler.generate(setup.make_sampler(loaded, tiny_config()), params, num_samples=4, batch_size=4)
    assert np.abs(plain.samples - out.samples).max() > 1e-3
    short = captions.tokenizer_for(config.data).encode(["a thick seven", "a thin one"] * 2, 4)[0]
    np.testing.assert_allclose(np.asarray(apply(params, x, t, {"tokens": jnp.asarray(short)})),
                               np.asarray(apply(params, x, t, cond)), atol=1e-5)


def test_null_caption_default_tags_and_asked_classes():
    config = tiny_config()
    config.sampling.captions = ""
    assert condition_config.sampler_conditions(config)["tokens"].tolist() == text.null_tokens(1, 8).tolist()
    assert setup.sampler_tag(config) == "ddim3_cnull"
    config.sampling.update(captions="eval_split", guidance_scale=3.0)
    assert setup.sampler_tag(config) == "ddim3_cevalsplit_w3"
    test_labels = data.load_pixel_source(config.data, "test").read(range(5))["cond"]["label"]
    np.testing.assert_array_equal(condition_config.asked_classes(config, np.arange(5)), test_labels)
    config.sampling.captions = "a thick seven|a thin one|a large thin nine"
    np.testing.assert_array_equal(condition_config.asked_classes(config, np.arange(5)), [7, 1, 9, 7, 1])
    config.sampling.captions = "a thick seven|something thin"  # no digit named: no accuracy to score
    assert condition_config.asked_classes(config, np.arange(2)) is None
    assert captions.named_class("a seven or a one") is None


def test_sample_mode_writes_a_caption_grid(trained):
    config = tiny_config()
    config.sampling.update(captions="a thick seven|a thin one|an upright zero", num_samples=6)
    paths = sample.run(config, trained)
    arrays = np.load(paths["npz"])
    assert arrays["captions"].tolist() == ["a thick seven", "a thin one", "an upright zero"] * 2
    assert arrays["labels"].tolist() == [7, 1, 0] * 2
    grid = imaging.caption_grid(arrays["samples"], arrays["captions"].tolist())
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.shape[1] > grid.shape[0] / 3  # text strip + 2 columns


def test_eval_scores_the_digit_each_caption_names(trained, tmp_path):
    config = tiny_config()
    config.eval.update(metric="classifier", classifier_path=str(tmp_path / "clf"))
    config.sampling.update(captions="eval_split", guidance_scale=1.0)
    results = evaluate.run_eval(config, trained)
    # image i was asked for test digit i's caption, so scored against test digit i's class
    asked = data.load_pixel_source(config.data, "test").read(range(8))["cond"]["label"]
    generated = results["conditional"]["generated"]
    assert [c for c, a in enumerate(generated["per_class"]) if a is not None] == sorted(set(asked.tolist()))
    counts = np.bincount(asked, minlength=10)
    per_class = [a or 0.0 for a in generated["per_class"]]
    assert generated["accuracy"] == pytest.approx(float(np.dot(counts, per_class)) / 8)
    step_dir = os.path.join(trained, "eval", "step_2_ddim3_cevalsplit_w1_seed0")
    with open(os.path.join(step_dir, "samples", "meta.json")) as f:
        assert json.load(f)["captions"] == "eval_split"
    assert list(results["sampler"]["null_cond"]["tokens"]) == text.null_tokens(1, 8)[0].tolist()


# ---- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,match", [
    (dict(captions="a seven " * 5), r"has 10 words, more than model.context_length=8"),
    (dict(captions="", guidance_scale=2.0), r"guidance_scale=2 guides towards a caption, but sampling.captions is ''"),
    (dict(labels="3"), r"sampling.labels='3' is for class-conditional models"),
])
def test_bad_sampling_captions_are_refused(change, match):
    config = tiny_config()
    config.sampling.update(change)
    for mode in ("sample", "eval"):
        with pytest.raises(ValueError, match=match) as err:
            checks.check_config(config, mode)
        assert "\n" not in str(err.value)


def test_captions_for_an_uncaptioned_model_are_refused():
    config = tiny_config()
    config.data.captions = False
    config.sampling.captions = "a thick seven"
    with pytest.raises(ValueError, match=r"sampling.captions='a thick seven' needs a text-conditional model"):
        checks.check_config(config, "sample")


@pytest.mark.parametrize("change,match", [
    (dict(source="digits"), r"data.captions needs captioned data \(data.source one of mnist, folder\)"),
    (dict(context_dim=0, transformer_resolutions=()), r"data.captions needs cross-attention: set --config.model.context_dim"),
    (dict(context_length=4), r"training caption\(s\) have more than model.context_length=4 words"),
    (dict(num_classes=10), r"data.captions needs model.name='unet' without class labels"),
])
def test_bad_captioned_training_is_refused(change, match):
    config = tiny_config()
    for key, value in change.items():
        (config.data if key == "source" else config.model)[key] = value
    with pytest.raises(ValueError, match=match) as err:
        checks.check_config(config, "train", parallel.make_mesh())
        setup.create_run(config)
    assert "\n" not in str(err.value)


def test_a_workdir_of_another_vocabulary_or_without_captions_is_refused(trained, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    captions.save_tokenizer(str(other), text.Tokenizer.build(["a red seven"]))
    with pytest.raises(ValueError, match=r"was trained on captions with another vocabulary \(6 ids"):
        train.train_and_evaluate(tiny_config(), str(other))
    assert captions.load_tokenizer(str(other)) == text.Tokenizer.build(["a red seven"])  # left as it was
    assert not os.path.exists(other / "checkpoints")
    plain = tiny_config()
    plain.data.captions = False
    plain.model.update(context_dim=0, transformer_resolutions=())
    with pytest.raises(CheckpointMismatchError, match="holds a checkpoint with model.kwargs"):
        setup.load_run(plain, trained)
