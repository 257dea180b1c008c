"""Captioned data: MNIST captions from label and pixels, folder captions, the tokenizer file
(ddpm_jax/data/captions.py, ddpm_jax/data/folder.py)."""

import collections

import numpy as np
import pytest
from PIL import Image

from ddpm_jax.data import captions, folder, mnist
from ddpm_jax.data.base import ArraySource
from ddpm_jax.models.text import Tokenizer

DIGIT_WORDS = set(captions.DIGIT_WORDS)
ATTRIBUTE_WORDS = {"a", "an", "small", "large", "thin", "thick", "upright", "slanted", "left", "right"}


def _canvas() -> np.ndarray:
    return np.zeros((28, 28), np.uint8)


def _bar(width: int, rows=(4, 24)) -> np.ndarray:
    """A vertical stroke `width` px wide, centred, over `rows`."""
    img = _canvas()
    left = 14 - width // 2
    img[rows[0]:rows[1], left:left + width] = 255
    return img


def _line(direction: int, width: int = 3) -> np.ndarray:
    """A straight stroke from the bottom to the top, leaning right (+1: like '/') or left (-1)."""
    img = _canvas()
    for row in range(4, 24):
        col = int(round(14 + direction * (13.5 - row) * 0.6))  # The top (small row) is to the right for +1.
        img[row, col - width // 2:col - width // 2 + width] = 255
    return img


def test_attributes_of_hand_made_strokes():
    images = np.stack([_bar(2), _bar(6), _line(+1), _line(-1), _bar(3, rows=(10, 18)), _canvas()])
    a = captions.attributes(images)
    thin, thick = captions.mnist_thresholds().width
    assert a["width"][0] < thin < thick < a["width"][1]  # 2 px vs 6 px strokes.
    np.testing.assert_allclose(a["width"][:2], [2.0, 6.0], rtol=0.25)
    np.testing.assert_allclose(a["slant"][:2], 0.0, atol=1e-12)  # Vertical strokes are upright.
    left, right = captions.mnist_thresholds().slant
    assert a["slant"][2] > right and a["slant"][3] < left
    np.testing.assert_allclose(a["slant"][2:4], [0.6, -0.6], atol=0.05)  # The drawn shear.
    assert a["area"][0] == 2 * 20 and a["area"][4] == 3 * 8
    assert a["width"][5] == a["area"][5] == a["slant"][5] == 0  # No ink.
    # Channel axis and float input give the same numbers.
    b = captions.attributes(images[..., None].astype(np.float32) / 255.0)
    for key in a:
        np.testing.assert_allclose(a[key], b[key])


def test_describe_hand_made_digits():
    th = captions.mnist_thresholds()
    got = captions.caption_digits(np.stack([_bar(2), _bar(6), _line(+1), _line(-1)]), np.array([1, 1, 7, 7]), th)
    assert got[0] == "a small thin upright one"  # Area 40 < the ones' lower tertile (120).
    assert got[1] == "a thick upright one"  # Area 6 x 20 = 120: not below the tertile, no size word.
    assert got[2].endswith("seven slanted right") and got[3].endswith("seven slanted left")
    flat = captions.Thresholds(width=(1.0, 9.0), slant=(-1.0, 1.0), area=((0.0, 1e9),) * 10)
    assert captions.describe(8, 2.0, 10.0, 0.0, flat) == "an upright eight"
    assert captions.describe(8, 2.0, 10.0, 2.0, flat) == "an eight slanted right"
    with pytest.raises(ValueError, match="not in 0..9"):
        captions.describe(10, 2.0, 10.0, 0.0, flat)


def test_thresholds_are_the_documented_training_quantiles():
    th = captions.mnist_thresholds()
    np.testing.assert_allclose(th.width, captions.THRESHOLDS_DOC["width"], atol=1e-3)
    np.testing.assert_allclose(th.slant, captions.THRESHOLDS_DOC["slant"], atol=1e-3)
    assert th.area[1] == (120.0, 220.0) and len(th.area) == 10


def test_mnist_captions_are_deterministic_and_name_the_label():
    train = captions.mnist_captions("train")
    _, labels = mnist.load_split("train", 28, 1)
    assert len(train) == len(labels) == 4000
    captions._mnist_captions.cache_clear()
    captions.mnist_thresholds.cache_clear()
    assert captions.mnist_captions("train") == train  # Recomputed from the pixels: the same.
    words = collections.Counter(w for c in train for w in c.split())
    assert set(words) == DIGIT_WORDS | ATTRIBUTE_WORDS
    for caption, label in zip(train, labels):
        assert [w for w in caption.split() if w in DIGIT_WORDS] == [captions.DIGIT_WORDS[label]]
    n = len(train)
    assert abs(words["thin"] / n - 1 / 3) < 0.01 and abs(words["thick"] / n - 1 / 3) < 0.01
    assert abs(words["left"] / n - 0.2) < 0.01 and abs(words["right"] / n - 0.2) < 0.01
    test = captions.mnist_captions("test")
    assert len(test) == 1000 and max(len(c.split()) for c in train + test) == 6
    tok = Tokenizer.build(train)
    assert tok.vocab_size == 3 + 20 and Tokenizer.build(train[::-1]) == tok


def _write_folder(root, names, caption_of=lambda n: f"a photo of {n}"):
    rng = np.random.default_rng(0)
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
        if caption_of is not None:
            path.with_suffix(".txt").write_text(caption_of(path.stem))


def test_folder_captions_are_read_beside_the_images(tmp_path):
    _write_folder(tmp_path, ["img_002.png", "img_001.png", "sub/img_003.jpg"])
    (tmp_path / "img_002.txt").write_text("  A red\n car \n")
    src = folder.load_folder(str(tmp_path), 8, 3, captions=True)
    assert [p.split("/")[-1] for p in src.files] == ["img_001.png", "img_002.png", "img_003.jpg"]
    assert src.captions == ["a photo of img_001", "A red car", "a photo of img_003"]
    assert folder.load_folder(str(tmp_path), 8, 3).captions is None  # Off by default.


def test_missing_caption_file_is_a_one_line_error_naming_it(tmp_path):
    _write_folder(tmp_path, ["img_001.png"])
    _write_folder(tmp_path, ["img_002.png"], caption_of=None)
    image, txt = str(tmp_path / "img_002.png"), str(tmp_path / "img_002.txt")
    with pytest.raises(ValueError) as err:
        folder.load_folder(str(tmp_path), 8, 3, captions=True)
    message = str(err.value)
    assert "\n" not in message and repr(image) in message and repr(txt) in message
    assert "data.captions=False" in message


def test_captioned_source_pairs_tokens_with_images():
    images, labels = mnist.load_split("test", 28, 1)
    src = captions.CaptionedSource(ArraySource(images, labels, 10), captions.mnist_captions("test"),
                                   Tokenizer.build(captions.mnist_captions("train")), context_length=8)
    batch = src.read([5, 0, 999])
    assert set(batch) == {"x", "cond"} and set(batch["cond"]) == {"label", "tokens"}
    tokens = batch["cond"]["tokens"]
    assert tokens.shape == (3, 8) and tokens.dtype == np.int32
    np.testing.assert_array_equal(batch["x"], images[[5, 0, 999]])
    tok = Tokenizer.build(captions.mnist_captions("train"))
    assert tok.decode(tokens[0]) == captions.mnist_captions("test")[5]
    np.testing.assert_array_equal(src.example(999)["cond"]["tokens"], tokens[2])
    assert src.num_classes == 10 and len(src) == 1000
    with pytest.raises(ValueError, match="model.context_length=4"):
        captions.CaptionedSource(ArraySource(images, labels, 10), captions.mnist_captions("test"), tok, 4)


def test_tokenizer_file_round_trip(tmp_path):
    tok = Tokenizer.build(["a thick seven", "an upright eight"])
    path = captions.save_tokenizer(str(tmp_path), tok)
    assert path.endswith("tokenizer.json")
    assert captions.load_tokenizer(str(tmp_path)) == tok
    with pytest.raises(ValueError, match="no tokenizer file"):
        captions.load_tokenizer(str(tmp_path / "other"))


def test_sampling_captions_are_what_the_model_reads_and_a_loss_is_warned_once(capsys):
    import ddpm_jax.main  # noqa: F401  (puts the repository root on sys.path for `configs`)
    from configs import mnist_text

    cfg = mnist_text.get_config().data
    given = "a thick seven|a purple sevn 7"
    assert captions.sampling_captions(given, cfg) == ["a thick seven", "a <unk> <unk>"]
    assert captions.sampling_captions(given, cfg) == ["a thick seven", "a <unk> <unk>"]
    tokenizer = captions.tokenizer_for(cfg)
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"warning: caption 'a purple sevn 7' is read as 'a <unk> <unk>' (the vocabulary is the training "
                   f"captions' {tokenizer.vocab_size} words; letters only); the grid is labelled with it."]
    # the tokens are the same either way: what is shown is what is encoded
    np.testing.assert_array_equal(tokenizer.encode(["a purple sevn 7"], 8)[0],
                                  tokenizer.encode(["a <unk> <unk>"], 8)[0])
