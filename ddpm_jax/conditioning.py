"""The condition kinds, and the condition as one pytree.

A batch is ``{"x": x0, "cond": {...}}``; ``cond`` maps a kind's key to its rows (leading axis
B), ``{}`` for an unconditional run. The network (``model.apply(p, x_t, t, cond)``) alone
decides what each entry means. Everything between the data and the network (the train step,
guidance, the samplers, the bound) treats ``cond`` as an opaque pytree through the helpers
below, which use ``jax.tree.map`` and never name a key or a dtype.

Each kind is one small object knowing its key, its null value ∅ (the condition of the
unconditional branch of classifier-free guidance, Ho & Salimans 2022), how a batch's rows
of it are validated and what a run records of it:

    ClassLabel(num_classes)     "label"   int [B], class indices; ∅ = num_classes
    CaptionTokens(null_row)     "tokens"  int [B, L], caption tokens; ∅ = the null caption's row
    LowResImage(shape, ...)     "low_res" float [B, h, w, C] in [−1, 1], the image to super-resolve;
                                ∅ = zeros
    AugmentationLevel()         "low_res_level" int [B], its noise-conditioning level s; ∅ = 0

Every kind also has `augment(cond, key)`, training's view of a batch's cond before the kinds
are selected: the identity for all but `LowResImage`, which noises the low-res image and writes
its level (cascaded diffusion's noise-conditioning augmentation, Ho et al. 2021 §4.3). A new
kind is a new class here with the same members, and its entry in the network that reads it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import rng

Cond = dict  # {kind key: array [B, ...]}; {} is the unconditional condition


class Kind(Protocol):
    """What every condition kind provides (see the module docstring)."""

    key: ClassVar[str]  # its entry in a batch's cond
    field: ClassVar[str]  # the sampling field that asks for it (named in error messages)
    noun: ClassVar[str]  # what its rows are, in words ("labels")

    @property
    def null(self) -> np.ndarray:
        """∅ for one example (no batch axis)."""

    def null_like(self, rows: jnp.ndarray) -> jnp.ndarray:
        """∅ repeated for every row of `rows`, shaped and typed like them."""

    def check(self, rows: Any, batch: int) -> None:
        """One-line ValueError unless `rows` are this kind's rows for `batch` examples."""

    def record(self) -> dict:
        """What identifies the kind in a run's meta (JSON-able)."""

    def augment(self, cond: "Cond", key: jax.Array) -> "Cond":
        """Training's view of a batch's `cond` (before `Conditioning.select`)."""


class _Unaugmented:
    """The identity `augment` of the kinds that training uses as the data gives them."""

    def augment(self, cond: "Cond", key: jax.Array) -> "Cond":
        return cond


def _check_int(kind: Kind, rows: Any, shape: str, ok: bool) -> None:
    dtype = getattr(rows, "dtype", np.asarray(rows).dtype)
    if not jnp.issubdtype(dtype, jnp.integer) or not ok:
        raise ValueError(f"cond[{kind.key!r}] must be integers of shape {shape}, got {np.dtype(dtype).name} "
                         f"{tuple(np.shape(rows))}; pass the {kind.key} rows aligned with the batch.")


@dataclasses.dataclass(frozen=True)
class ClassLabel(_Unaugmented):
    """A class index per example in 0..num_classes−1; ∅ is the extra class `num_classes`."""

    num_classes: int
    key: ClassVar[str] = "label"
    field: ClassVar[str] = "sampling.labels"
    noun: ClassVar[str] = "labels"

    def __post_init__(self):
        if int(self.num_classes) < 1:
            raise ValueError(f"model.num_classes={self.num_classes} must be >= 1 for class conditioning.")

    @property
    def null(self) -> np.ndarray:
        return np.int32(self.num_classes)

    def null_like(self, rows: jnp.ndarray) -> jnp.ndarray:
        return jnp.full(jnp.shape(rows), self.num_classes, jnp.asarray(rows).dtype)

    def check(self, rows: Any, batch: int) -> None:
        _check_int(self, rows, f"[{batch}]", tuple(np.shape(rows)) == (batch,))

    def record(self) -> dict:
        return {"num_classes": int(self.num_classes)}


@dataclasses.dataclass(frozen=True)
class CaptionTokens(_Unaugmented):
    """A caption's token ids per example, [L ≤ context length]; ∅ is the null caption's row.

    Past the null caption's `<null>` token the row is padding, which the text encoder masks:
    cut to a batch's token length L (a batch padded to its longest caption) it is the same ∅.
    """

    null_row: tuple[int, ...]  # the null caption's tokens [context_length]
    key: ClassVar[str] = "tokens"
    field: ClassVar[str] = "sampling.captions"
    noun: ClassVar[str] = "captions"

    @property
    def null(self) -> np.ndarray:
        return np.asarray(self.null_row, np.int32)

    def null_like(self, rows: jnp.ndarray) -> jnp.ndarray:
        rows = jnp.asarray(rows)
        return jnp.broadcast_to(jnp.asarray(self.null[:rows.shape[-1]], rows.dtype), rows.shape)

    def check(self, rows: Any, batch: int) -> None:
        shape = tuple(np.shape(rows))
        _check_int(self, rows, f"[{batch}, L <= {len(self.null_row)}]",
                   len(shape) == 2 and shape[0] == batch and shape[1] <= len(self.null_row))

    def record(self) -> dict:
        return {"context_length": len(self.null_row)}


def box_downsample(x: Any, factor: int) -> Any:
    """Area (box) downsampling of images [..., H, W, C] by `factor`: the mean of each f×f block.

    The low-res view of SR3 (Saharia et al. 2021) and the cascade's stages: linear, exact on
    constant blocks, and nearest upsampling of its output downsamples back to it.
    """
    f, shape = int(factor), np.shape(x)
    if len(shape) < 3:
        raise ValueError(f"data.low_res_factor={factor} needs images [H, W, C], but the examples have shape "
                         f"{shape}; set --config.data.low_res_factor=0.")
    h, w = shape[-3] // max(f, 1), shape[-2] // max(f, 1)
    if f < 1 or h * f != shape[-3] or w * f != shape[-2]:
        raise ValueError(f"data.low_res_factor={factor} must be >= 1 and divide the image size "
                         f"{shape[-3]}x{shape[-2]}; pick a divisor (2 for 8x8 digits, 2 for 28x28 MNIST).")
    blocks = x.reshape(*shape[:-3], h, f, w, f, shape[-1])
    return blocks.mean(axis=(-4, -2))


@dataclasses.dataclass(frozen=True)
class LowResImage:
    """The low-resolution image to super-resolve, [h, w, C] floats in [−1, 1] (SR3; the network
    upsamples it and concatenates it to x_t).

    ∅ is the all-zero image: mid-grey, the mean of the data range and the expectation of a
    fully noised level, so it carries no picture; a zero image at level 0 is exactly the
    unconditional input. `abar` are ᾱ_1..ᾱ_{s_max} of the run's schedule: training draws a
    level s ~ U{0, ..., s_max} per example and gives the network z_s = √ᾱ_s y + √(1 − ᾱ_s) ε
    (ᾱ_0 = 1: s = 0 is the clean image), the non-truncated Gaussian conditioning augmentation of
    cascaded diffusion (Ho et al. 2021 §4.3, with their forward process q(z_s | z_0)); s goes to
    the network as `AugmentationLevel`. s_max = 0: no augmentation.
    """

    shape: tuple[int, int, int]  # (h, w, C), the low resolution
    factor: int
    abar: tuple[float, ...] = dataclasses.field(default=(), repr=False)  # ᾱ_1..ᾱ_{s_max} of the schedule
    key: ClassVar[str] = "low_res"
    field: ClassVar[str] = "sampling.cond_images"
    noun: ClassVar[str] = "low-resolution images"

    @property
    def null(self) -> np.ndarray:
        return np.zeros(self.shape, np.float32)

    def null_like(self, rows: jnp.ndarray) -> jnp.ndarray:
        return jnp.zeros_like(rows)

    def check(self, rows: Any, batch: int) -> None:
        dtype, shape = getattr(rows, "dtype", np.asarray(rows).dtype), tuple(np.shape(rows))
        if not jnp.issubdtype(dtype, jnp.floating) or shape != (batch, *self.shape):
            raise ValueError(f"cond[{self.key!r}] must be floats of shape {(batch, *self.shape)}, got "
                             f"{np.dtype(dtype).name} {shape}; pass images box-downsampled by {self.factor}.")

    def record(self) -> dict:
        return {"low_res_factor": int(self.factor), "low_res_max_level": len(self.abar)}

    def augment(self, cond: Cond, key: jax.Array) -> Cond:
        """`cond` with its low-res rows noised to a level s per example and s under `AugmentationLevel.key`."""
        if self.key not in cond:
            return cond
        y = cond[self.key]
        level_key, noise_key = jax.random.split(key)
        s = jax.random.randint(level_key, (y.shape[0],), 0, len(self.abar) + 1)
        abar = jnp.concatenate([jnp.ones((1,), y.dtype), jnp.asarray(self.abar, y.dtype)])[s]
        abar = abar.reshape((-1,) + (1,) * (y.ndim - 1))
        z = jnp.sqrt(abar) * y + jnp.sqrt(1.0 - abar) * jax.random.normal(noise_key, y.shape, y.dtype)
        return {**cond, self.key: z, AugmentationLevel.key: s}

    def at_level(self, images: np.ndarray, level: int, seed: int) -> Cond:
        """Sampling's rows: `images` [K, h, w, C] noised to the fixed level s (0: as given), and s."""
        self.check(images, len(images))
        s = int(level)
        if not 0 <= s <= len(self.abar):
            raise ValueError(f"sampling.low_res_level={s} must lie in [0, {len(self.abar)}] "
                             "(training.low_res_max_level); use a level the model was trained on.")
        abar = 1.0 if s == 0 else self.abar[s - 1]
        noise = np.random.default_rng(int(seed)).standard_normal(np.shape(images)).astype(np.float32)
        z = np.sqrt(abar) * np.asarray(images, np.float32) + np.sqrt(1.0 - abar) * noise
        return {self.key: z.astype(np.float32), AugmentationLevel.key: np.full(len(images), s, np.int32)}


@dataclasses.dataclass(frozen=True)
class AugmentationLevel(_Unaugmented):
    """The noise-conditioning level s of the low-res image per example (see `LowResImage`); ∅ = 0."""

    key: ClassVar[str] = "low_res_level"
    field: ClassVar[str] = "sampling.low_res_level"
    noun: ClassVar[str] = "augmentation levels"

    @property
    def null(self) -> np.ndarray:
        return np.int32(0)

    def null_like(self, rows: jnp.ndarray) -> jnp.ndarray:
        return jnp.zeros_like(rows)

    def check(self, rows: Any, batch: int) -> None:
        _check_int(self, rows, f"[{batch}]", tuple(np.shape(rows)) == (batch,))

    def record(self) -> dict:
        return {}


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """The kinds a run is conditioned on (none: unconditional), built once from its config."""

    kinds: tuple = ()

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def select(self, cond: Cond) -> Cond:
        """The entries of a batch's `cond` this run uses (a source may carry more, e.g. labels
        beside the captions, or labels for an unconditional run)."""
        missing = [k.key for k in self.kinds if k.key not in cond]
        if missing:
            raise ValueError(f"the batch has no cond[{missing[0]!r}] (it has {sorted(cond)}); the data "
                             "source must provide what the model is conditioned on.")
        return {k.key: cond[k.key] for k in self.kinds}

    def null(self) -> Cond:
        """∅ of every kind for one example (no batch axis)."""
        return {k.key: k.null for k in self.kinds}

    def null_like(self, cond: Cond) -> Cond:
        """∅ for every row of `cond`, entry by entry shaped like it."""
        by_key = {k.key: k for k in self.kinds}
        return {key: by_key[key].null_like(rows) for key, rows in cond.items()}

    def check(self, cond: Cond, batch: int) -> None:
        """One-line ValueError unless `cond` holds exactly this run's kinds, `batch` rows each."""
        if sorted(cond) != sorted(k.key for k in self.kinds):
            raise ValueError(f"cond has entries {sorted(cond)}, but this model is conditioned on "
                             f"{sorted(k.key for k in self.kinds)}; pass exactly those.")
        for k in self.kinds:
            k.check(cond[k.key], batch)

    def augment(self, cond: Cond, key: jax.Array) -> Cond:
        """Training's view of a batch's `cond`: every kind's `augment`, kind i with fold_in(key, i)."""
        for i, k in enumerate(self.kinds):
            cond = k.augment(cond, jax.random.fold_in(key, i))
        return cond

    def for_step(self, cond: Cond, step_key: jax.Array, probability: float) -> Cond:
        """A train step's condition: the kinds' augmentation (fold_in(step_key, `rng.COND_AUGMENT`)),
        this run's entries, then condition dropout to ∅ with `probability` (fold_in(step_key,
        `rng.LABEL_DROPOUT`)): the same draws in every trainer."""
        cond = self.select(self.augment(cond, jax.random.fold_in(step_key, rng.COND_AUGMENT)))
        return dropout(cond, self.null_like(cond), jax.random.fold_in(step_key, rng.LABEL_DROPOUT), probability)

    def record(self) -> dict:
        """Every kind's record, merged."""
        return {key: value for k in self.kinds for key, value in k.record().items()}


def batch_size(cond: Cond) -> int | None:
    """The number of rows of `cond` (its leaves' leading axis), None when it is empty."""
    leaves = jax.tree.leaves(cond)
    return None if not leaves else int(np.shape(leaves[0])[0])


def check_dropout(probability: float) -> float:
    """`training.label_dropout` as a float, or a one-line ValueError unless it lies in [0, 1]."""
    p = float(probability)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"training.label_dropout={p:g} must lie in [0, 1] (0.1 as Ho & Salimans 2022).")
    return p


def dropout(cond: Cond, null_cond: Cond, key: jax.Array, probability: float) -> Cond:
    """Training's condition dropout: each example's whole condition becomes ∅ with `probability`.

    One Bernoulli(p) draw per example, `uniform(key, [B]) < p`, replaces every entry's row;
    this teaches one network ε_θ(x, ∅) beside ε_θ(x, c) (Ho & Salimans 2022, Alg. 1, p_uncond).
    `null_cond` is ∅ aligned with `cond` (`Conditioning.null_like`). The train step only:
    sampling and evaluation use the condition as given.
    """
    p = check_dropout(probability)
    if p == 0.0 or not jax.tree.leaves(cond):
        return cond
    drop = jax.random.uniform(key, (batch_size(cond),)) < p

    def where(rows, null):
        return jnp.where(drop.reshape(drop.shape + (1,) * (jnp.ndim(rows) - 1)), null, rows)

    return jax.tree.map(where, cond, null_cond)


def cycle(table: Cond | None, indices: Sequence[int] | np.ndarray) -> Cond | None:
    """Row `i % K` of every entry of `table` (leading axis K) for each image index i (host numpy).

    Image i's condition is a function of i alone, whatever the batch it is sampled in.
    """
    if table is None:
        return None
    indices = np.asarray(indices, np.int64)
    return jax.tree.map(lambda rows: np.asarray(rows)[indices % len(rows)], table)


def repeat(example: Cond | None, n: int) -> Cond | None:
    """`example` (one example's condition, e.g. `Conditioning.null()`) stacked n times."""
    if example is None:
        return None
    return jax.tree.map(lambda v: np.broadcast_to(np.asarray(v), (int(n),) + np.shape(v)).copy(), example)
