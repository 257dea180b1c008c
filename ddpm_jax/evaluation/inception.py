"""The FID Inception-v3 network (the 2015-12-05 TensorFlow graph) in Flax Linen, NHWC.

This is the network every published FID and Inception Score was computed with
(TTUR's FID, improved-gan's IS), as pytorch-fid ports it
(``pytorch_fid.inception.fid_inception_v3``): torchvision's ``Inception3`` with
1008 classes and four patched block types

* ``FIDInceptionA`` / ``FIDInceptionC`` / ``FIDInceptionE_1``: the pool branch
  averages without counting the zero padding (TF's ``avg_pool`` semantics,
  ``count_include_pad=False``);
* ``FIDInceptionE_2`` (``Mixed_7c``): the pool branch is a *max* pool.

Every convolution is torchvision's ``BasicConv2d``: conv without bias, BatchNorm
in inference mode with eps = 1e-3, ReLU.

Input convention. pytorch-fid takes images in [0, 1], resizes them to 299 × 299
with ``F.interpolate(mode='bilinear', align_corners=False)`` (no antialiasing,
up- or downsampling) and then maps them to [-1, 1] (``2x - 1``). Our images are
already in [-1, 1] (the data pipeline's scale), so the network here takes [-1, 1] images of
any size and only resizes; since bilinear weights sum to one,
``resize(2x - 1) = 2 resize(x) - 1``, i.e. identical to pytorch-fid fed ``(x + 1) / 2``.
Grayscale (C = 1) images are repeated to RGB, as PIL's ``convert('RGB')`` does.

Outputs: ``pool`` (the 2048-d ``pool_3`` features used by FID), ``logits``
(``fc``: ``pool @ W + b``, the graph's ``softmax/logits``) and
``logits_unbiased`` (``pool @ W``, what the original improved-gan Inception
Score code feeds its softmax; see ``fid.inception_score``).

Weights are read from a local ``.npz`` made once by
``python -m ddpm_jax.evaluation.convert_inception``; nothing is downloaded.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_PTH = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SIZE = 299
NUM_CLASSES = 1008
FORMAT_TAG = "ddpm_jax-fid-inception-2015-12-05-v1"

Precision = Any


class MissingWeightsError(FileNotFoundError):
    """The converted FID Inception weights (.npz) are not where we were told to look."""


def missing_weights_message(path: str) -> str:
    """One-line message: where to get the .pth and the exact convert command."""
    return (f"FID Inception weights not found at {path!r}: download {FID_WEIGHTS_URL} "
            f"and convert it once with `python -m ddpm_jax.evaluation.convert_inception "
            f"--pth {FID_WEIGHTS_PTH} --out {path}`")


# ----------------------------------------------------------------------------- resize

@functools.lru_cache(maxsize=32)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of PyTorch's bilinear interpolation, align_corners=False.

    As ``F.interpolate(size=..., mode='bilinear', align_corners=False)`` (no
    antialias, also when downsampling, unlike ``jax.image.resize``): source
    coordinate ``(dst + 0.5) * in/out - 0.5`` clamped at 0, linear between the
    two neighbouring pixels (the upper one clamped at the border). Computed in
    float32 as PyTorch's CPU kernel does, whose ``scale * (dst + 0.5) - 0.5`` is a
    fused multiply-add (one rounding): emulated exactly in float64, so the weights
    are bit-identical to torch's (a plain float32 evaluation is off by up to 1.5e-5).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    # float32 × float32 is exact in float64; one rounding to float32 afterwards = FMA.
    src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam1 = (src - i0.astype(np.float32)).astype(np.float32)
    lam0 = np.float32(1.0) - lam1
    w = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(w, (rows, i0), lam0)
    np.add.at(w, (rows, i1), lam1)
    return w


def resize_bilinear(x: jnp.ndarray, size: int = INCEPTION_SIZE,
                    precision: Precision = jax.lax.Precision.HIGHEST) -> jnp.ndarray:
    """Resize NHWC images to ``size × size`` exactly as pytorch-fid does (see above)."""
    h, w = x.shape[1], x.shape[2]
    if h != size:
        x = jnp.einsum("oh,bhwc->bowc", bilinear_matrix(h, size), x, precision=precision)
    if w != size:
        x = jnp.einsum("ow,bhwc->bhoc", bilinear_matrix(w, size), x, precision=precision)
    return x


# ----------------------------------------------------------------------------- network

def _pad(padding) -> tuple:
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return ((ph, ph), (pw, pw))


class BasicConv(nn.Module):
    """torchvision's BasicConv2d: conv (no bias) → BatchNorm(eps=1e-3, inference) → ReLU."""
    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: int | tuple[int, int] = 0
    precision: Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, self.kernel, strides=(self.stride, self.stride),
                    padding=_pad(self.padding), use_bias=False, precision=self.precision,
                    name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_exclude_pad(x):
    # TF's avg_pool does not count the zero padding (pytorch-fid's count_include_pad=False patch).
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


class InceptionA(nn.Module):
    """FIDInceptionA (Mixed_5b/5c/5d)."""
    pool_features: int
    precision: Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), padding=2, name="branch5x5_2")(b5)
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=1, name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=1, name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """torchvision's InceptionB (Mixed_6a), unpatched."""
    precision: Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        b3 = conv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        bp = nn.max_pool(x, (3, 3), strides=(2, 2))
        return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
    """FIDInceptionC (Mixed_6b..6e)."""
    channels_7x7: int
    precision: Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        c7 = self.channels_7x7
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """torchvision's InceptionD (Mixed_7a), unpatched."""
    precision: Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        b3 = conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        bp = nn.max_pool(x, (3, 3), strides=(2, 2))
        return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
    """FIDInceptionE_1 (Mixed_7b, avg pool without padding) / FIDInceptionE_2 (Mixed_7c, max pool)."""
    pool: str  # "avg" | "max"
    precision: Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
        if self.pool == "avg":
            bp = _avg_pool_3x3_exclude_pad(x)
        else:
            # The FID graph max-pools here (pytorch-fid's FIDInceptionE_2 patch).
            bp = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        bp = conv(192, (1, 1), name="branch_pool")(bp)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def preprocess(x, *, resize: bool = True,
               precision: Precision = jax.lax.Precision.HIGHEST) -> jnp.ndarray:
    """Check NHWC images in [-1, 1], gray → RGB, float32, bilinear resize to 299 × 299."""
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"FID Inception expects NHWC images with 1 or 3 channels, got shape "
                         f"{tuple(x.shape)}; pass [B, H, W, 3] arrays in [-1, 1]")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"FID Inception expects float images in [-1, 1], got dtype {x.dtype}; "
                         f"convert uint8 with x / 127.5 - 1")
    x = jnp.asarray(x, jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if resize:
        x = resize_bilinear(x, INCEPTION_SIZE, precision=precision)
    return x


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3; ``__call__(images in [-1, 1], NHWC, any size) -> dict``."""
    resize: bool = True
    precision: Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        p = self.precision
        x = preprocess(x, resize=self.resize, precision=p)
        conv = functools.partial(BasicConv, precision=p)
        x = conv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)          # 149
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)                    # 147
        x = conv(64, (3, 3), padding=1, name="Conv2d_2b_3x3")(x)         # 147
        x = nn.max_pool(x, (3, 3), strides=(2, 2))                       # 73
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)                   # 71
        x = nn.max_pool(x, (3, 3), strides=(2, 2))                       # 35
        x = InceptionA(32, precision=p, name="Mixed_5b")(x)
        x = InceptionA(64, precision=p, name="Mixed_5c")(x)
        x = InceptionA(64, precision=p, name="Mixed_5d")(x)
        x = InceptionB(precision=p, name="Mixed_6a")(x)                  # 17
        x = InceptionC(128, precision=p, name="Mixed_6b")(x)
        x = InceptionC(160, precision=p, name="Mixed_6c")(x)
        x = InceptionC(160, precision=p, name="Mixed_6d")(x)
        x = InceptionC(192, precision=p, name="Mixed_6e")(x)
        x = InceptionD(precision=p, name="Mixed_7a")(x)                  # 8
        x = InceptionE("avg", precision=p, name="Mixed_7b")(x)
        x = InceptionE("max", precision=p, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))                                  # pool_3, [B, 2048]
        fc = nn.Dense(NUM_CLASSES, precision=p, name="fc")
        logits = fc(pool)
        logits_unbiased = jnp.dot(pool, fc.variables["params"]["kernel"], precision=p)
        return dict(pool=pool, logits=logits, logits_unbiased=logits_unbiased)


# ----------------------------------------------------------------------------- weights

def flatten_variables(variables) -> dict[str, np.ndarray]:
    """{'params': {...}, 'batch_stats': {...}} → {'params/Mixed_5b/branch1x1/conv/kernel': array}."""
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    return {"/".join(k.key for k in path): np.asarray(v) for path, v in flat}


def unflatten_variables(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return out


@functools.lru_cache(maxsize=1)
def variable_shapes() -> dict[str, tuple]:
    """Flattened variable path → shape of the FID Inception (traced once, no weights)."""
    abstract = jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0),
                              jax.ShapeDtypeStruct((1, INCEPTION_SIZE, INCEPTION_SIZE, 3),
                                                   jnp.float32))
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    return {"/".join(k.key for k in path): tuple(v.shape) for path, v in flat}


def check_variables(flat: dict[str, np.ndarray], source: str) -> None:
    """Raise ValueError if ``flat`` is not exactly the FID Inception's variables."""
    want = dict(variable_shapes())
    missing = sorted(set(want) - set(flat))
    extra = sorted(set(flat) - set(want))
    if missing or extra:
        raise ValueError(f"{source} does not hold the FID Inception weights ({len(missing)} "
                         f"missing, e.g. {missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]}); "
                         f"re-create it with python -m ddpm_jax.evaluation.convert_inception")
    for key, shape in want.items():
        if tuple(flat[key].shape) != shape:
            raise ValueError(f"{source}: {key} has shape {tuple(flat[key].shape)}, expected "
                             f"{shape}; re-create it with python -m ddpm_jax.evaluation.convert_inception")


def load_inception(weights_path: str | os.PathLike, *, precision: Precision =
                   jax.lax.Precision.HIGHEST) -> tuple[Callable, dict]:
    """Load converted FID Inception weights (no torch, no network).

    Returns ``(apply_fn, variables)``: ``apply_fn(variables, images)`` is jit-compiled
    (and can itself be wrapped in ``jax.jit``), images NHWC in [-1, 1] of any size, giving ``dict(pool=[B, 2048],
    logits=[B, 1008], logits_unbiased=[B, 1008])`` in float32.
    """
    path = os.fspath(weights_path)
    if not os.path.isfile(path):
        raise MissingWeightsError(missing_weights_message(path))
    if path.endswith(".pth"):
        raise ValueError(f"{path!r} is the PyTorch state dict; convert it first with "
                         f"`python -m ddpm_jax.evaluation.convert_inception --pth {path} "
                         f"--out inception_fid.npz` and pass the .npz")
    with np.load(path, allow_pickle=False) as f:
        flat = {k: f[k] for k in f.files if k != "format"}
        tag = str(f["format"]) if "format" in f.files else None
    if tag != FORMAT_TAG:
        raise ValueError(f"{path!r} is not a converted FID Inception file (format tag {tag!r}); "
                         f"create it with python -m ddpm_jax.evaluation.convert_inception")
    check_variables(flat, repr(path))
    variables = jax.tree_util.tree_map(jnp.asarray, unflatten_variables(flat))
    # Two jitted stages: each new input size compiles only the resize, the network once.
    prepare = jax.jit(functools.partial(preprocess, resize=True, precision=precision))
    network = jax.jit(FIDInceptionV3(resize=False, precision=precision).apply)

    def apply_fn(variables, images):
        return network(variables, prepare(images))

    return apply_fn, variables
