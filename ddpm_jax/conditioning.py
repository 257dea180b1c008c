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

Three hooks have defaults (`KindDefaults`): `augment(cond, key)`, training's view of a batch's
cond (the identity here); `derive(x)`, rows computed from the batch's images for a kind that no
data source carries (None here); `network_kwargs()`, what the network must be built with to
read the kind ({} here: `model.num_classes` is the model's own field). A kind defined in its own
module (the low-res image of `super_resolution`) overrides them.
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
        """Training's view of a batch's `cond` (after `Conditioning.of_batch`)."""

    def derive(self, x: Any) -> Any:
        """Its rows for images `x` [B, ...] when the data carries none; None: the data must."""

    def network_kwargs(self) -> dict:
        """The network's keyword hyper-parameters that reading this kind needs (JSON-able)."""


class KindDefaults:
    """The hooks of a kind that training uses as the data gives it: identity `augment`, nothing
    derived from the images, no network hyper-parameter of its own."""

    def augment(self, cond: "Cond", key: jax.Array) -> "Cond":
        return cond

    def derive(self, x: Any) -> Any:
        return None

    def network_kwargs(self) -> dict:
        return {}


def check_int(kind: Kind, rows: Any, shape: str, ok: bool) -> None:
    """One-line ValueError naming `kind`'s entry unless `rows` are integers and `ok` (their shape fits `shape`)."""
    dtype = getattr(rows, "dtype", np.asarray(rows).dtype)
    if not jnp.issubdtype(dtype, jnp.integer) or not ok:
        raise ValueError(f"cond[{kind.key!r}] must be integers of shape {shape}, got {np.dtype(dtype).name} "
                         f"{tuple(np.shape(rows))}; pass the {kind.key} rows aligned with the batch.")


@dataclasses.dataclass(frozen=True)
class ClassLabel(KindDefaults):
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
        check_int(self, rows, f"[{batch}]", tuple(np.shape(rows)) == (batch,))

    def record(self) -> dict:
        return {"num_classes": int(self.num_classes)}


@dataclasses.dataclass(frozen=True)
class CaptionTokens(KindDefaults):
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
        check_int(self, rows, f"[{batch}, L <= {len(self.null_row)}]",
                  len(shape) == 2 and shape[0] == batch and shape[1] <= len(self.null_row))

    def record(self) -> dict:
        return {"context_length": len(self.null_row)}


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """The kinds a run is conditioned on (none: unconditional), built once from its config."""

    kinds: tuple = ()

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def of_batch(self, batch: dict) -> Cond:
        """This run's condition of a batch ``{"x", "cond"}``: each kind's rows as the data gives them
        (a source may carry more, e.g. labels beside the captions), or derived from the images."""
        given, cond = batch.get("cond", {}), {}
        for k in self.kinds:
            rows = given[k.key] if k.key in given else k.derive(batch["x"])
            if rows is None:
                raise ValueError(f"the batch has no cond[{k.key!r}] (it has {sorted(given)}); the data "
                                 "source must provide what the model is conditioned on.")
            cond[k.key] = rows
        return cond

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

    def for_step(self, batch: dict, step_key: jax.Array, probability: float) -> Cond:
        """A train step's condition of `batch`: this run's entries (`of_batch`), the kinds' augmentation
        (fold_in(step_key, `rng.COND_AUGMENT`)), then condition dropout to ∅ with `probability`
        (fold_in(step_key, `rng.LABEL_DROPOUT`)): the same draws in every trainer."""
        cond = self.augment(self.of_batch(batch), jax.random.fold_in(step_key, rng.COND_AUGMENT))
        return dropout(cond, self.null_like(cond), jax.random.fold_in(step_key, rng.LABEL_DROPOUT), probability)

    def record(self) -> dict:
        """Every kind's record, merged."""
        return {key: value for k in self.kinds for key, value in k.record().items()}

    def network_kwargs(self) -> dict:
        """Every kind's `network_kwargs`, merged."""
        return {key: value for k in self.kinds for key, value in k.network_kwargs().items()}


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
