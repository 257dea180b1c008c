"""Latents of a KL autoencoder as training data (latent diffusion; Rombach et al. 2022, Sec. 3-4).

``data.latents_from=AE_WORKDIR`` (a workdir of ``--mode=train_autoencoder`` or of
``python -m ddpm_jax.convert --autoencoder-kl``) turns any image source into a source of
latents, normalised as LDM / Stable Diffusion do, with the shift of part 1 added because
these latents' mean is far from 0 (-2.36 for the MNIST autoencoder):

    z = (mode of q(z|x) - latent_mean) * scale_factor,   x_hat = D(z / scale_factor + latent_mean)

with ``latent_mean`` and ``scale_factor`` (1 / std over the training split) from
``AE_WORKDIR/autoencoder.json``. The posterior *mode* (its mean) is used, not a sample:
encoded once, a sample would be one frozen draw per image anyway, not the posterior; the mode
is deterministic (every host and every resume sees the same latents) and, with LDM's KL weight
1e-6, the posterior's std is small next to the latents' spread.

Encode once and cache: the whole split is encoded in memory the first time a batch is read
(``LatentSource``; with ``data.random_flip`` the mirrored images too, so a flip picks the
encoding of the flipped image, not a mirrored latent), then every epoch reads the cache. The
alternative, encoding each batch on the fly in the train step, runs the encoder once per image
per epoch instead of once per image. Measured (``bench/latent_encoding.py``, configs/latent_mnist.py
with workdirs/ae_mnist, 2-core CPU at load 4.9): the whole 4,000-digit split encodes in 8.1 s
(compilation included); on the fly the encoder takes 24 ms a batch of 32, 11% of a 226 ms DDPM
step, 3.0 s an epoch, so the cache pays for itself after 2.7 epochs (the config trains 25.6).
The cost: the split's latents in host memory (MNIST at 7x7x4: 3 MB); a data set too large for
memory would need the on-the-fly path, not written.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import checkpoint_recovery, checkpointing, files, imaging
from ddpm_jax.data.base import Source
from ddpm_jax.models.autoencoder import AutoencoderKL

MODEL_NAME = "autoencoder_kl"
INFO_FILE = "autoencoder.json"
ENCODE_BATCH = 256  # images per encoder call when the cache is built
_META_KEYS = ("model", "model_kwargs", "image_shape", "latent_shape")


def latents_from(cfg: Any) -> str:
    """``data.latents_from``: the autoencoder workdir, or "" (the DDPM runs on pixels)."""
    return str(cfg.get("latents_from", "") or "")


def is_autoencoder_meta(stored: Any) -> bool:
    """Whether a checkpoint's meta is an autoencoder's (trained or converted), not a DDPM's."""
    return isinstance(stored, dict) and stored.get("model") == MODEL_NAME


def check_autoencoder_meta(expected: dict, workdir: str) -> Callable[[dict | None], None]:
    """A checkpoint-meta check refusing a DDPM or an autoencoder other than `expected`, naming what differs."""

    def check(stored: dict | None) -> None:
        if stored is not None and not is_autoencoder_meta(stored):
            name = stored.get("model", {}).get("name", "?") if isinstance(stored.get("model"), dict) else "?"
            raise ValueError(f"{workdir} holds a DDPM ({name} network), not an autoencoder; sample or evaluate it "
                             "with --mode=sample / eval / bpd and its config, or give --mode=train_autoencoder a "
                             "new --workdir.")
        if stored is not None and stored != expected:
            diff = [f"{k} {stored.get(k)!r} (this config: {v!r})" for k, v in expected.items() if stored.get(k) != v]
            raise ValueError(f"{workdir} holds the checkpoint of another autoencoder: {'; '.join(diff)}; use a "
                             "new --workdir or the config it was trained with.")

    return check


def read_info(workdir: str, name: str = "data.latents_from") -> dict:
    """`AE_WORKDIR/autoencoder.json`, or a one-line error naming `name` and saying how to make it."""
    path = os.path.join(str(workdir), INFO_FILE)
    if not os.path.isfile(path):
        what = "does not exist" if not os.path.isdir(str(workdir)) else f"has no {INFO_FILE}"
        raise FileNotFoundError(
            f"{name}={str(workdir)!r} {what}; train the autoencoder there first (--mode=train_autoencoder) "
            "or convert one (python -m ddpm_jax.convert --autoencoder-kl DIR --out WORKDIR).")
    return files.read_json(path)


def load_autoencoder(workdir: str) -> tuple[AutoencoderKL, Any, dict]:
    """(model, params of the newest valid checkpoint, `autoencoder.json`) of a trained or converted
    autoencoder workdir: everything a latent data source needs (as host params)."""
    info = read_info(workdir, "autoencoder workdir")
    model = AutoencoderKL(**info["model_kwargs"])
    shape = tuple(info["image_shape"])
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape), jnp.float32)))["params"]
    check = check_autoencoder_meta({k: info[k] for k in _META_KEYS}, str(workdir))
    with checkpointing.Checkpointer(workdir, async_save=False) as ckpt:
        _, params = checkpoint_recovery.newest_valid_ema(
            ckpt, template, check_meta=lambda m: check({k: m.get(k) for k in _META_KEYS}))
    return model, params, info


def checked_info(cfg: Any) -> dict:
    """The autoencoder.json of `data.latents_from`, refused if its images are not `config.data`'s."""
    workdir = latents_from(cfg)
    info = read_info(workdir)
    image = (int(cfg.image_size), int(cfg.image_size), int(cfg.num_channels))
    if tuple(info["image_shape"]) != image:
        raise ValueError(
            f"data.latents_from={workdir!r} is an autoencoder of {tuple(info['image_shape'])} images, but "
            f"data.image_size / num_channels give {image}; set them to its image shape or use an autoencoder "
            "trained on these images.")
    return info


def latent_meta(cfg: Any) -> dict:
    """What a DDPM checkpoint on latents records of its autoencoder ({} on pixels): compared on load."""
    if not latents_from(cfg):
        return {}
    info = checked_info(cfg)
    return dict(autoencoder=os.path.normpath(latents_from(cfg)), latent_shape=list(info["latent_shape"]),
                scale_factor=float(info["scale_factor"]), latent_mean=float(info["latent_mean"]),
                autoencoder_step=int(info.get("step", 0)))


class Codec:
    """The autoencoder with the normalisation: `encode(x) -> z` and `decode_fn(params, z) -> x` (jit-able)."""

    def __init__(self, model: AutoencoderKL, params: Any, info: dict):
        self.model, self.params = model, params
        self.scale, self.shift = float(info["scale_factor"]), float(info["latent_mean"])
        self.image_shape, self.latent_shape = tuple(info["image_shape"]), tuple(info["latent_shape"])
        self._encode = jax.jit(lambda p, x: (model.apply({"params": p}, x, method="encode").mode() - self.shift)
                               * self.scale)

    def decode_fn(self, params: Any, z: jax.Array) -> jax.Array:
        """Normalised latents [..., h, w, c] -> images [..., H, W, C] in [-1, 1] (any leading axes)."""
        lead = z.shape[:-3]
        flat = z.reshape((-1, *z.shape[-3:])) / self.scale + self.shift
        x = self.model.apply({"params": params}, flat.astype(jnp.float32), method="decode")
        return jnp.clip(x, -1.0, 1.0).reshape((*lead, *x.shape[1:]))

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 (or [-1, 1]) images [N, H, W, C] -> normalised latents float32 [N, h, w, c], in batches."""
        x = imaging.as_float(images)
        parts = [np.asarray(self._encode(self.params, x[s:s + ENCODE_BATCH])) for s in range(0, len(x), ENCODE_BATCH)]
        return np.concatenate(parts).astype(np.float32)


_CODECS: dict[tuple, Codec] = {}
_CACHE: dict[tuple, np.ndarray] = {}
_LOCK = threading.RLock()  # re-entrant: the cache is filled under it and loads the codec under it


def load_codec(workdir: str) -> Codec:
    """The Codec of an autoencoder workdir, loaded once per process (keyed by its autoencoder.json)."""
    info = read_info(workdir)
    key = (os.path.abspath(str(workdir)), json.dumps(info, sort_keys=True))
    with _LOCK:
        if key not in _CODECS:
            _CODECS[key] = Codec(*load_autoencoder(workdir))
        return _CODECS[key]


class LatentSource(Source):
    """A pixel source's examples as normalised latents (float32 [h, w, c]), labels unchanged.

    Encoded on first read, all at once, and kept for the process (`key` names the pixel split,
    so the train and eval pipelines of one run share the encoding).
    """

    def __init__(self, pixels: Source, workdir: str, key: str, flip: bool):
        self.pixels, self.workdir, self.flip = pixels, str(workdir), bool(flip)
        self.num_classes, self.labels = pixels.num_classes, pixels.labels
        self._key = (os.path.abspath(self.workdir), key, json.dumps(read_info(workdir), sort_keys=True))
        self._arrays: tuple[np.ndarray, np.ndarray | None] | None = None

    def __getstate__(self) -> dict:  # grain's worker processes get the encoded arrays, not an encoder
        self._latents()
        return self.__dict__.copy()

    def _latents(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self._arrays is None:
            with _LOCK:
                if (self._key, False) not in _CACHE:
                    _CACHE[(self._key, False)] = self._encode(flip=False)
                if self.flip and (self._key, True) not in _CACHE:
                    _CACHE[(self._key, True)] = self._encode(flip=True)
            self._arrays = (_CACHE[(self._key, False)], _CACHE.get((self._key, True)) if self.flip else None)
            if self.num_classes and self.labels is None:
                self.labels = _CACHE[(self._key, "label")]
        return self._arrays

    def _encode(self, flip: bool) -> np.ndarray:
        codec, out, labels = load_codec(self.workdir), [], []
        for s in range(0, len(self.pixels), ENCODE_BATCH):
            batch = self.pixels.read(np.arange(s, min(s + ENCODE_BATCH, len(self.pixels))))
            out.append(codec.encode(batch["x"][:, :, ::-1] if flip else batch["x"]))
            labels.append(batch["cond"].get("label"))
        if self.num_classes and self.pixels.labels is None and not flip:  # labels read per record (tfds)
            _CACHE[(self._key, "label")] = np.concatenate(labels).astype(np.int32)
        return np.concatenate(out)

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> np.ndarray:
        return self._latents()[0][index]

    def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        cond = {"label": self.labels[indices]} if self.num_classes else {}
        return {"x": self._latents()[0][indices], "cond": cond}  # fancy indexing copies: flip_rows may write into it

    def flip_rows(self, batch: dict[str, np.ndarray], indices: np.ndarray, flips: np.ndarray) -> None:
        """The rows to flip take the latents of the mirrored images (a latent mirrored is not one)."""
        flipped = self._latents()[1]
        if flipped is None:
            raise ValueError("this latent source was built without flips; build it with flip=True")
        batch["x"][flips] = flipped[np.asarray(indices)[flips]]
