"""Text conditioning: a word-level tokenizer built from the training captions, and a small
transformer text encoder trained jointly with the diffusion model from scratch (as LDM's
text-to-image model, Rombach et al. 2022 §4.3, trains its BERT-like encoder; Vaswani et al. 2017).

Tokenizer. A caption's words are its maximal runs of letters after lower-casing ("A thick,
slanted 7!" -> ["a", "thick", "slanted"]: digits and punctuation separate words and are dropped).
Ids 0, 1, 2 are reserved: `<pad>` (padding, masked out), `<unk>` (a word not seen in the training
captions) and `<null>` (the null caption "" of classifier-free guidance: a caption with no words
encodes as the single token `<null>`, so the encoder gives the null branch its own learned
context). The other words follow in a deterministic order that does not depend on the captions'
order: by decreasing count, ties alphabetically. The vocabulary is saved with the run as JSON
(`to_json` / `from_json`; the files are written by `data.captions.save_tokenizer`), so sampling
encodes with the training run's vocabulary.

Encoder. tokens int32 [B, L] -> token embedding + learned position embedding -> `layers` pre-LN
blocks (LayerNorm -> multi-head self-attention over the real tokens -> residual; LayerNorm -> GELU
MLP 4x -> residual; pre-LN as GPT-2 / CLIP's text encoder, which trains stably without warm-up
tricks) -> final LayerNorm -> context [B, L, width], padding rows zeroed, and the mask [B, L].
"""

from __future__ import annotations

import collections
import functools
import json
import re
from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ddpm_jax.models.attention import MultiHeadAttention, layer_norm
from ddpm_jax.models.layers import default_init

Dtype = Any
PAD, UNK, NULL = "<pad>", "<unk>", "<null>"
RESERVED = (PAD, UNK, NULL)
PAD_ID, UNK_ID, NULL_ID = 0, 1, 2
FORMAT_VERSION = 1
_WORD = re.compile(r"[a-z]+")


def words(caption: str) -> list[str]:
    """The caption's words: lower-cased maximal runs of the letters a-z."""
    return _WORD.findall(str(caption).lower())


class Tokenizer:
    """Word-level tokenizer: `encode(captions, max_len)` -> (int32 ids [B, max_len], bool mask)."""

    def __init__(self, vocab: Sequence[str]):
        vocab = list(vocab)
        if tuple(vocab[:len(RESERVED)]) != RESERVED:
            raise ValueError(f"a vocabulary must start with the reserved tokens {list(RESERVED)}, got "
                             f"{vocab[:len(RESERVED)]}; build it with Tokenizer.build(captions).")
        if len(set(vocab)) != len(vocab):
            raise ValueError("the vocabulary has repeated words; build it with Tokenizer.build(captions).")
        self.vocab = vocab
        self._ids = {w: i for i, w in enumerate(vocab)}

    @classmethod
    def build(cls, captions: Iterable[str], max_words: int | None = None) -> "Tokenizer":
        """The vocabulary of `captions`: reserved ids, then words by decreasing count, ties alphabetically.

        `max_words` keeps the most frequent words only (the rest encode as `<unk>`)."""
        counts = collections.Counter(w for caption in captions for w in words(caption))
        ordered = sorted(counts, key=lambda w: (-counts[w], w))
        if max_words is not None:
            ordered = ordered[:int(max_words)]
        return cls(list(RESERVED) + ordered)

    @property
    def vocab_size(self) -> int:
        """Rows of the token embedding (`model.vocab_size`): reserved ids included."""
        return len(self.vocab)

    def ids(self, caption: str) -> list[int]:
        """The caption's token ids, unpadded: `[NULL_ID]` for a caption without words."""
        out = [self._ids.get(w, UNK_ID) for w in words(caption)]
        return out or [NULL_ID]

    def encode(self, captions: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(int32 ids [B, max_len] padded with PAD_ID, bool mask [B, max_len] of the real tokens)."""
        if isinstance(captions, str):
            raise ValueError(f"encode takes a list of captions, got the string {captions!r}; pass [caption].")
        ids = np.full((len(captions), int(max_len)), PAD_ID, np.int32)
        for row, caption in enumerate(captions):
            tokens = self.ids(caption)
            if len(tokens) > max_len:
                raise ValueError(f"caption {caption!r} has {len(tokens)} words, more than model.context_length="
                                 f"{max_len}; shorten it or raise --config.model.context_length.")
            ids[row, :len(tokens)] = tokens
        return ids, ids != PAD_ID

    def decode(self, ids: Sequence[int]) -> str:
        """The words of `ids` joined by spaces (padding dropped; `<null>` gives "")."""
        return " ".join(self.vocab[int(i)] for i in ids if int(i) not in (PAD_ID, NULL_ID))

    def to_json(self) -> str:
        return json.dumps({"format": "ddpm_jax.word_tokenizer", "version": FORMAT_VERSION, "vocab": self.vocab})

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        obj = json.loads(text)
        if not isinstance(obj, dict) or obj.get("format") != "ddpm_jax.word_tokenizer":
            raise ValueError("not a ddpm_jax tokenizer file (no format 'ddpm_jax.word_tokenizer'); "
                             "give the tokenizer.json a training run wrote.")
        if obj.get("version") != FORMAT_VERSION:
            raise ValueError(f"tokenizer file version {obj.get('version')} is not {FORMAT_VERSION}; "
                             "rebuild it from the captions.")
        return cls(obj["vocab"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and other.vocab == self.vocab

    def __repr__(self) -> str:
        return f"Tokenizer({self.vocab_size} ids: {self.vocab[3:8]}...)"


def null_tokens(batch: int, max_len: int) -> np.ndarray:
    """The null caption's ids for `batch` rows: `<null>` then padding (caption dropout / CFG)."""
    ids = np.full((batch, int(max_len)), PAD_ID, np.int32)
    ids[:, 0] = NULL_ID
    return ids


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + SelfAttn(LN(x), key mask); x + MLP(LN(x)) (GELU, 4x)."""

    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
        dim = h.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = h + MultiHeadAttention(self.heads, dim // self.heads, dim, name="attn", **kw)(
            layer_norm("norm1", **kw)(h), mask=mask)
        dense = functools.partial(nn.Dense, kernel_init=default_init(), **kw)
        m = dense(4 * dim, name="mlp_in")(layer_norm("norm2", **kw)(h))
        return h + dense(dim, name="mlp_out")(nn.gelu(m, approximate=False))


class TextEncoder(nn.Module):
    """tokens int32 [B, L] (L <= context_length) -> (context [B, L, width], mask bool [B, L])."""

    vocab_size: int
    context_length: int
    width: int
    layers: int = 2
    heads: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer ids [B, L], got {tokens.dtype} {tokens.shape}; "
                             "encode captions with Tokenizer.encode.")
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"tokens have length {tokens.shape[1]} > model.context_length="
                             f"{self.context_length}; encode with max_len=model.context_length.")
        if self.width % self.heads:
            raise ValueError(f"text encoder width {self.width} (model.context_dim) is not divisible by "
                             f"{self.heads} heads (model.text_heads); pick a divisor.")
        mask = tokens != PAD_ID
        # N(0, 0.02) embeddings, as BERT / GPT-2.
        embed = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                         dtype=self.dtype, param_dtype=self.param_dtype, name="token_embedding")
        pos = self.param("position_embedding", nn.initializers.normal(0.02),
                         (self.context_length, self.width), self.param_dtype)
        h = embed(tokens.astype(jnp.int32)) + pos[:tokens.shape[1]].astype(self.dtype)
        for i in range(self.layers):
            h = EncoderBlock(self.heads, dtype=self.dtype, param_dtype=self.param_dtype, name=f"blocks_{i}")(h, mask)
        h = layer_norm("final_norm", self.param_dtype, self.dtype)(h)
        # Padding rows carry nothing (they are masked in every cross-attention anyway).
        return jnp.where(mask[..., None], h, jnp.zeros((), h.dtype)), mask
