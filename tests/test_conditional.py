"""Class-conditional DDPM (docs/conditional.md): the U-Net's label embedding, labels through the
sampler, training's label dropout, checks, the diffusers import with num_class_embeds, bits/dim
given the labels, and a small conditional digits model that draws the class it is asked for."""

import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import digits_cond
from ddpm_jax import checks, condition_config, imaging, parallel, sampler, sampling, schedules, setup, train
from ddpm_jax.evaluation import bpd, classifier, sample_quality
from ddpm_jax.models.unet import UNet
from ddpm_jax.diffusion import GaussianDiffusion
from ddpm_jax.schedules import Schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE = "a2c9a01"  # the last commit before class conditioning: today's unconditional U-Net
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, out_ch=1)
SHAPE = (8, 8, 1)


def _old_unet_module():
    """ddpm_jax/models/unet.py as it was before conditioning, loaded from git as a module."""
    try:
        src = subprocess.run(["git", "show", f"{BEFORE}:ddpm_jax/models/unet.py"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"needs the git history (commit {BEFORE}) to compare with the pre-conditioning U-Net")
    module = types.ModuleType("unet_before_conditioning")
    sys.modules[module.__name__] = module  # dataclasses (Flax modules) look their module up there
    exec(compile(src, "unet_before_conditioning.py", "exec"), module.__dict__)
    return module


def _randomize(params, seed=0):
    """Every leaf random and non-zero (fresh zero-initialised layers would hide differences)."""
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [jnp.asarray(rng.normal(0, 0.2, x.shape), x.dtype) for x in leaves])


def _inputs(batch=4, seed=1):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(batch,) + SHAPE), jnp.float32),
            jnp.asarray(rng.integers(0, 1000, batch), jnp.int32))


# ---- the model ------------------------------------------------------------------------------------

def test_num_classes_0_is_todays_unet_bit_for_bit():
    old = _old_unet_module().UNet(**TINY)
    new = UNet(**TINY)  # num_classes=0, the default
    x, t = _inputs()
    key = jax.random.key(3)
    p_old = old.init(key, x, t)["params"]
    p_new = new.init(key, x, t)["params"]
    assert jax.tree.structure(p_old) == jax.tree.structure(p_new)
    for a, b in zip(jax.tree.leaves(p_old), jax.tree.leaves(p_new)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same names, shapes, init values
    params = _randomize(p_old)
    y_old = jax.jit(lambda p: old.apply({"params": p}, x, t))(params)
    y_new = jax.jit(lambda p: new.apply({"params": p}, x, t))(params)
    assert np.asarray(y_old).tobytes() == np.asarray(y_new).tobytes()


def test_parameter_counts():
    def count(model):
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                                   jnp.zeros((1,), jnp.int32)))["params"]
        return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)), shapes

    n0, _ = count(UNet())
    n10, shapes = count(UNet(num_classes=10))
    assert n0 == 35_746_307
    assert n10 == n0 + 11 * 512  # one 4ch row per class and the null class
    assert shapes["class_embedding"]["embedding"].shape == (11, 512)


def test_labels_condition_the_network():
    model = UNet(**TINY, num_classes=10)
    x, t = _inputs()
    params = _randomize(model.init(jax.random.key(0), x, t, {"label": jnp.zeros(4, jnp.int32)})["params"])
    apply = jax.jit(lambda p, y: model.apply({"params": p}, x, t, None if y is None else {"label": y}))
    a = np.asarray(apply(params, jnp.array([0, 1, 2, 3])))
    b = np.asarray(apply(params, jnp.array([0, 1, 2, 4])))
    np.testing.assert_array_equal(a[:3], b[:3])  # images do not see each other's labels
    assert np.abs(a[3] - b[3]).max() > 1e-3
    null = np.asarray(apply(params, jnp.full(4, 10)))
    np.testing.assert_allclose(null, np.asarray(apply(params, None)), rtol=0, atol=0)  # no label: the null class
    assert np.isnan(np.asarray(apply(params, jnp.array([0, 1, 2, 11])))[3]).all()  # never another row
    with pytest.raises(ValueError, match=r"cond\['label'\] was given to an unconditional UNet"):
        UNet(**TINY).init(jax.random.key(0), x, t, {"label": jnp.zeros(4, jnp.int32)})
    with pytest.raises(ValueError, match="class labels y must be integers"):
        model.apply({"params": params}, x, t, {"label": jnp.zeros(4)})
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        model.apply({"params": params}, x, t, {"label": jnp.zeros(3, jnp.int32)})
    with pytest.raises(ValueError, match=r"cond\['y'\] is not read by the UNet"):
        model.apply({"params": params}, x, t, {"y": jnp.zeros(4, jnp.int32)})


# ---- sampling -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cond_model():
    model = UNet(**TINY, num_classes=10)
    x, t = _inputs()
    params = _randomize(model.init(jax.random.key(0), x, t, {"label": jnp.zeros(4, jnp.int32)})["params"], seed=5)
    sched = Schedule.from_betas(schedules.get_betas("cosine", 20))
    return model, params, sched


@pytest.mark.parametrize("w", [0.0, 1.5])
def test_per_image_seeds_with_labels_for_any_batch_split_and_device_count(cond_model, w):
    model, params, sched = cond_model
    apply_fn = setup.model_apply_fn(model)
    table = {"label": np.arange(10, dtype=np.int32)}
    opts = dict(shape=SHAPE, seed=4, method="ddim", num_steps=3, cond=table, guidance_scale=w,
                null_cond={"label": 10})
    one = lambda y: dict(cond={"label": jnp.array([y])}, null_cond={"label": jnp.array([10])})  # noqa: E731
    mesh8 = parallel.make_mesh()
    mesh1 = parallel.make_mesh(jax.devices()[:1])
    assert parallel.num_devices(mesh8) == 8
    process = GaussianDiffusion(sched)
    a = sampler.generate(sampler.Sampler(apply_fn, process, mesh8, **opts), params, num_samples=13, batch_size=8)
    b = sampler.generate(sampler.Sampler(apply_fn, process, mesh1, **opts), params, num_samples=13, batch_size=5)
    np.testing.assert_allclose(a.samples, b.samples, rtol=0, atol=1e-5)
    # image 12 alone (label 12 % 10 = 2) is the same image
    alone = sampling.sample(apply_fn, params, GaussianDiffusion(sched), shape=SHAPE, indices=jnp.array([12]), seed=4,
                            method="ddim", num_steps=3, guidance_scale=w, **one(2))
    np.testing.assert_allclose(np.asarray(alone.samples)[0], a.samples[12], rtol=0, atol=1e-5)
    # the label matters: the same index asked for another class is another image
    other = sampling.sample(apply_fn, params, GaussianDiffusion(sched), shape=SHAPE, indices=jnp.array([12]), seed=4,
                            method="ddim", num_steps=3, guidance_scale=w, **one(7))
    assert np.abs(np.asarray(other.samples)[0] - a.samples[12]).max() > 1e-3
    np.testing.assert_array_equal(sampler.Sampler(apply_fn, GaussianDiffusion(sched), mesh1, **opts).cond_for(np.arange(12))["label"],
                                  np.arange(12) % 10)


def test_sampling_labels_option_and_tag():
    config = digits_cond.get_config()
    assert condition_config.sampler_labels(config) == tuple(range(10))
    config.sampling.labels, config.sampling.guidance_scale = "3,5", 2.0
    assert condition_config.sampler_labels(config) == (3, 5)
    assert setup.sampler_tag(config) == "ddpm_y3-5_w2"
    assert setup.sampler_options(config)["guidance_scale"] == 2.0
    config.sampling.labels, config.sampling.guidance_scale = "", 0.0
    assert condition_config.sampler_labels(config) is None and setup.sampler_tag(config) == "ddpm_null"
    plain = digits_cond.get_config()
    plain.model.num_classes, plain.sampling.labels = 0, ""
    assert setup.sampler_tag(plain) == "ddpm" and "guidance_scale" not in setup.sampler_options(plain)


def test_class_grid_has_one_row_per_class():
    images = np.linspace(-1, 1, 12 * 8 * 8).reshape(12, 8, 8, 1).astype(np.float32)
    grid = imaging.class_grid(images, np.arange(12) % 4)  # 4 classes, 3 each
    cols = imaging.make_grid(images[:3], ncol=3)
    scale = grid.shape[1] // cols.shape[1]
    assert grid.shape[0] // scale == 4 * 9 + 1  # 4 rows of 8 px + 1 px padding
    row0 = imaging.make_grid(images[[0, 4, 8]], ncol=3)  # class 0: images 0, 4, 8
    np.testing.assert_array_equal(grid[::scale, ::scale][:row0.shape[0]], row0)


# ---- training -------------------------------------------------------------------------------------

def _tiny_cond_config(label_dropout: float) -> ml_collections.ConfigDict:
    config = digits_cond.get_config()
    # (1, 2): with 32 channels alone GroupNorm(32) would erase every per-channel embedding offset
    config.model.ch_mult, config.model.attn_resolutions = (1, 2), ()
    config.training.label_dropout = label_dropout
    config.training.batch_size = 8
    return config


def _losses_for_labels(config, label_sets):
    """The train step's loss (random params, one fixed batch of images) for each set of labels."""
    mesh = parallel.make_mesh()
    run = setup.create_run(config, mesh)
    state, tx = setup.create_train_state(config, run.model, run.shape, mesh)
    params = jax.device_put(_randomize(jax.device_get(state.params)), parallel.replicated(mesh))
    step = train.make_train_step(config, run.model, run.sched, tx, mesh)
    x = np.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 8) + run.shape), np.float32)
    losses = []
    for labels in label_sets:
        batch = {"x": x, "cond": {"label": np.asarray(labels, np.int32)[None]}}
        fresh = jax.tree.map(jnp.copy, state.replace(params=params))  # the step donates its state
        _, metrics = step(fresh, parallel.host_to_global(batch, mesh, batch_axis=1))
        losses.append(float(np.asarray(metrics["loss"])[0]))
    return losses


def test_label_dropout_reaches_the_train_step():
    a, b = np.arange(8) % 10, (np.arange(8) + 3) % 10
    # p = 1: every label becomes the null class, so the batch's labels cannot change the loss
    la, lb = _losses_for_labels(_tiny_cond_config(1.0), (a, b))
    assert la == lb
    # p = 0: they do
    la, lb = _losses_for_labels(_tiny_cond_config(0.0), (a, b))
    assert abs(la - lb) > 1e-6 * abs(la)


def test_label_dropout_never_applies_when_sampling(cond_model):
    """The sampler of a config with label_dropout = 1 uses the labels as asked."""
    model, params, sched = cond_model
    config = digits_cond.get_config()
    config.model.update(ch_mult=TINY["ch_mult"], num_res_blocks=1, attn_resolutions=(4,))
    config.training.label_dropout = 1.0
    config.diffusion.num_timesteps, config.sampling.method, config.sampling.steps = 20, "ddim", 3
    run = setup.create_run(config, parallel.make_mesh(jax.devices()[:1]))
    run = setup.Run(mesh=run.mesh, shape=run.shape, model=run.model, process=setup.create_diffusion(config, sched),
                    meta=run.meta)
    out = sampler.generate(setup.make_sampler(run, config), params, num_samples=4, batch_size=4)
    ref = sampling.sample(setup.model_apply_fn(model), params, run.process, shape=SHAPE, indices=jnp.arange(4),
                          seed=0, method="ddim", num_steps=3, cond={"label": jnp.arange(4)})
    np.testing.assert_allclose(out.samples, np.asarray(ref.samples), rtol=0, atol=1e-5)


# ---- checks ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,match", [
    (dict(labels="3,12"), r"sampling.labels='3,12' holds 12, outside 0..9 \(model.num_classes=10\)"),
    (dict(labels="-1"), "holds -1, outside 0..9"),
    (dict(labels="three"), "sampling.labels='three' is not 'all' or a comma-separated list"),
    (dict(guidance_scale=-1.0), "sampling.guidance_scale=-1 must be a finite number >= 0"),
    (dict(labels="", guidance_scale=2.0), "sampling.guidance_scale=2 guides towards a class, but sampling.labels"),
    (dict(num_classes=0, labels="3"), "sampling.labels='3' needs a class-conditional model"),
    (dict(num_classes=0, labels="", guidance_scale=1.0), "sampling.guidance_scale=1 needs a class-conditional"),
])
def test_bad_labels_and_guidance_are_refused(change, match):
    config = digits_cond.get_config()
    if "num_classes" in change:
        config.model.num_classes = change.pop("num_classes")
    config.sampling.update(change)
    for mode in ("sample", "eval"):
        with pytest.raises(ValueError, match=match) as err:
            checks.check_config(config, mode)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("change,match", [
    (dict(num_classes=7), r"model.num_classes=7, but data.source='digits' has 10 classes; set "
                          r"--config.model.num_classes=10"),
    (dict(label_dropout=1.5), r"training.label_dropout=1.5 must lie in \[0, 1\]"),
])
def test_bad_conditional_training_is_refused(change, match):
    config = digits_cond.get_config()
    if "num_classes" in change:
        config.model.num_classes = change["num_classes"]
        config.sampling.labels = "0"
    else:
        config.training.label_dropout = change["label_dropout"]
    with pytest.raises(ValueError, match=match):
        checks.check_config(config, "train", parallel.make_mesh())


def test_unlabelled_data_is_refused_for_a_conditional_model():
    config = digits_cond.get_config()
    config.data.update(source="image", path="camera", image_size=8, num_channels=1)
    with pytest.raises(ValueError, match="data.source='image' has no labels"):
        checks.check_conditional_training(config)


# ---- the diffusers import ---------------------------------------------------------------------------

def test_converter_parity_with_num_class_embeds(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from ddpm_jax.convert.diffusers import ConversionError, load_diffusers_unet

    from test_convert import TINY_CONFIG, _diffusers_unet, _write_config

    model = _diffusers_unet(dict(TINY_CONFIG, num_class_embeds=11))
    assert isinstance(model, diffusers.UNet2DModel)
    model.save_pretrained(str(tmp_path / "m"))
    kwargs, params = load_diffusers_unet(str(tmp_path / "m"))
    assert kwargs["num_classes"] == 10
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)
    t, y = np.array([0, 300, 700, 999]), np.array([0, 4, 9, 10])  # 10: the null row
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample.numpy()
    unet = UNet(**kwargs)
    out = unet.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t, jnp.int32),
                     {"label": jnp.asarray(y, jnp.int32)})
    ref = ref.transpose(0, 2, 3, 1)
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=2e-4 * np.abs(ref).max())
    with pytest.raises(ConversionError, match="num_class_embeds=1"):
        load_diffusers_unet(_write_config(tmp_path / "one", dict(TINY_CONFIG, num_class_embeds=1)))


# ---- evaluation -----------------------------------------------------------------------------------

def test_bpd_of_a_conditional_model_is_given_the_labels(cond_model):
    model, params, sched = cond_model
    apply_fn = setup.model_apply_fn(model)
    mesh = parallel.make_mesh()
    x = np.asarray(np.random.default_rng(2).integers(0, 256, (8,) + SHAPE) / 127.5 - 1, np.float32)
    labels = np.arange(8) % 10
    fn = bpd.make_bpd_fn(apply_fn, GaussianDiffusion(sched), mesh, seed=0)
    put = lambda a: parallel.host_to_global(a, mesh)  # noqa: E731
    given = parallel.to_host(fn(params, put(x), put(np.arange(8, dtype=np.int32)),
                                {"label": put(labels.astype(np.int32))}))
    fixed = bpd.make_bpd_fn(lambda p, x, t, cond: apply_fn(p, x, t, {"label": jnp.asarray(labels, jnp.int32)}),
                            GaussianDiffusion(sched), parallel.make_mesh(jax.devices()[:1]), seed=0)
    one = parallel.make_mesh(jax.devices()[:1])
    ref = parallel.to_host(fixed(params, parallel.host_to_global(x, one),
                                 parallel.host_to_global(np.arange(8, dtype=np.int32), one)))
    np.testing.assert_allclose(given["total"], ref["total"], rtol=1e-5)
    null = parallel.to_host(fn(params, put(x), put(np.arange(8, dtype=np.int32)), None))
    assert np.abs(null["total"] - given["total"]).max() > 1e-4


def test_label_accuracy():
    logits = np.eye(4)[[0, 1, 2, 2]] * 5.0
    out = sample_quality.label_accuracy(logits, np.array([0, 1, 2, 3]), 5)
    assert out["accuracy"] == 0.75 and out["per_class"] == [1.0, 1.0, 1.0, 0.0, None]
    with pytest.raises(ValueError, match="labels must be"):
        sample_quality.label_accuracy(logits, np.array([0, 1]), 5)


def test_a_conditional_digits_model_draws_the_asked_class(tmp_path):
    """A few hundred steps on digits: the classifier finds the asked class far more often than 1 in 10."""
    config = digits_cond.get_config()
    config.training.update(num_steps=400, sample_every=0, checkpoint_every=400, log_every=100)
    train.train_and_evaluate(config, str(tmp_path / "run"))
    config.sampling.update(method="ddim", steps=20, guidance_scale=1.0, labels="all")
    loaded = setup.load_run(config, str(tmp_path / "run"))
    out = sampler.generate(setup.make_sampler(loaded, config), loaded.params, num_samples=100, batch_size=100)
    clf = classifier.load_or_train(config.data, str(tmp_path / "clf"), log=None, steps=300)
    accuracy = clf.accuracy(imaging.to_uint8(out.samples), np.arange(100) % 10)
    # chance is 0.1; Binomial(100, 0.1) exceeds 0.3 with probability < 1e-8
    assert accuracy > 0.3, accuracy


def test_the_conditional_doc_names_real_configs_keys_and_figures():
    from test_experiments import test_doc_commands_name_real_configs_and_keys

    test_doc_commands_name_real_configs_and_keys("docs/conditional.md")
    with open(os.path.join(ROOT, "docs", "conditional.md")) as f:
        figures = re.findall(r"\]\((figures/[^)]+)\)", f.read())
    assert figures
    for figure in figures:
        path = os.path.join(ROOT, "docs", figure)
        assert os.path.isfile(path) and os.path.getsize(path) < 1_000_000, figure


def test_conditional_training_resumes_exactly(tmp_path):
    """Label dropout draws from the step's key: 3 + 3 resumed steps == 6 straight, bit for bit."""
    def run(workdir, steps):
        config = _tiny_cond_config(0.5)
        config.training.update(num_steps=steps, sample_every=0, checkpoint_every=3, log_every=3)
        return train.train_and_evaluate(config, str(workdir))

    straight = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    resumed = run(tmp_path / "b", 6)
    assert int(resumed.step) == int(straight.step) == 6
    for u, v in zip(jax.tree.leaves(jax.device_get(straight.params)), jax.tree.leaves(jax.device_get(resumed.params))):
        np.testing.assert_array_equal(u, v)
