"""Soft labels across tokenizers: one byte-aligned layout of the public transfer text.

Organizations with different tokenizers (`organization_models`) cannot put token probabilities in
shared slots: token ids mean different strings on each side. What they share is the text. The layout
is computed from public inputs only, the transfer text and every participating tokenizer (all named by
the job), by every participant alike, so it says nothing about anyone's data:

- **Rows: byte-aligned spans.** In each transfer record, the *common boundaries* are the byte offsets
  where every tokenizer ends a token (within the part of the text every tokenizer's `data.max_length`
  tokens reach; byte 0 is no boundary: a sequence's first token is never predicted). Consecutive
  common boundaries b < b' make one row, the span of bytes [b, b'): on every side a whole number of
  tokens covers it exactly, and every model predicts its first token from the same text prefix.
- **Columns: the next span against the next byte.** Column 0 is the probability of the true next span
  (the product of the model's probabilities of its own tokens of the span: the likelihood of one
  tokenization, the approximation ALM and the engine's `span_aligned` make); columns 1..k the
  probability that the continuation starts with public byte `byte_set[c]` and is *not* that span;
  column k + 1 the rest (a first byte outside the set, or a token without bytes: the end of the
  sequence, a special token), not that span either. A model's next-byte probability is the sum of its
  probabilities of the tokens whose bytes start with that byte (`vocabulary_bytes`), so every
  tokenizer can fill every column, and the columns partition the continuations: a row sums to 1.
  `byte_set` is the k most frequent first bytes of the spans of the transfer text (a unigram model of
  public text, as `federation.soft_label_index.unigram_index` for tokens; `transfer.index_k`, at most
  256).

Why this and not the alternatives the issue names: a distribution over k candidate continuations per
span would need every model to score k strings (k extra forward passes per span); sequence-level
targets would give one number per record. Here one forward pass per record fills every row, the true
span carries the likelihood-matching signal (ALM, Minixhofer et al. 2025), and the next-byte columns
carry the dark knowledge a tokenizer-free view keeps of the rest of the distribution. A row is a
fixed-length vector of probabilities, so the ensemble is still the plain mean, a sum of per-client
vectors of the same length: add-only under CKKS, and the server, which holds no key, only adds.

Each organization converts its token distribution to rows with `span_rows` (`TokenizerView` locates
the rows among its own tokens) and distils its student from the ensemble through the same function
(`federation.client.cross_tokenizer`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from secure_kd.cross_tokenizer.spans import backend_of, token_byte_spans
from secure_kd.cross_tokenizer.token_bytes import vocabulary_bytes
from secure_kd.data import IGNORE_INDEX, TokenizedExample

BYTE_ALIGNED = "byte-aligned"


@dataclass(frozen=True, eq=False)
class TokenizerView:
    """One tokenizer's side of the layout. `examples[i]` is layout record i as `tokenize_records` gives
    it; its rows are the spans from token `starts[i][r] + 1` to token `ends[i][r]` (predicted at logits
    positions `starts[i][r] .. ends[i][r] - 1`). `buckets[v]`: the column (minus one) of token v's first
    byte, k for the tail (no bytes, or a byte outside the set)."""

    examples: tuple[TokenizedExample, ...]
    starts: tuple[tuple[int, ...], ...]
    ends: tuple[tuple[int, ...], ...]
    buckets: np.ndarray


@dataclass(frozen=True, eq=False)
class ByteLayout:
    """Rows: the byte-aligned spans of the transfer records, record by record; columns: the span, the k
    bytes of `byte_set`, the tail. Same interface as `SoftLabelLayout` where the server and the message
    checks use it (`n_positions`, `width`, `shape`, `k`, `kind`, `fingerprint`)."""

    byte_set: bytes
    boundaries: tuple[tuple[int, ...], ...]  # per layout record: its common boundaries, increasing
    record_indices: tuple[int, ...]  # each layout record's index in the transfer records
    span_buckets: np.ndarray  # [n_positions] int64: the bucket of each span's first byte
    views: Mapping[str, TokenizerView]
    fingerprint: str
    kind: str = BYTE_ALIGNED

    @property
    def k(self) -> int:
        return len(self.byte_set)

    @property
    def width(self) -> int:
        return self.k + 2

    @property
    def n_positions(self) -> int:
        return sum(max(0, len(b) - 1) for b in self.boundaries)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_positions, self.width)

    def rows_per_record(self) -> list[int]:
        return [max(0, len(b) - 1) for b in self.boundaries]


def _text_side(tokenizer, text: str, example: TokenizedExample, what: str, index: int):
    """The byte spans of the example's text tokens and its covered end; checks it is plain text."""
    encoded = token_byte_spans(tokenizer, text, add_special_tokens=True)
    m = min(len(encoded), len(example))
    if list(example.input_ids[:m]) != encoded.ids[:m] or any(
        label == IGNORE_INDEX for label in example.labels[1:m]
    ):
        raise ValueError(
            f"transfer record {index}: tokenizer {what!r} does not tokenize it as plain text (a masked "
            "prompt, a chat template, or a slow tokenizer); the byte-aligned layout of organization_models "
            "needs plain-text transfer records (a `text` field) and fast tokenizers"
        )
    return encoded.spans[:m]


def _last_index_by_end(spans: Sequence[tuple[int, int]]) -> dict[int, int]:
    """byte offset -> the last token ending there (a zero-width token after it predicts the next)."""
    out: dict[int, int] = {}
    for i, (_, end) in enumerate(spans):
        out[end] = i
    return out


def public_byte_set(first_bytes: Sequence[int], k: int) -> bytes:
    """The `k` most frequent first bytes (ties to the smaller byte), unused bytes in order after them."""
    counts = np.bincount(np.asarray(first_bytes, dtype=np.int64), minlength=256)
    order = np.lexsort((np.arange(256), -counts))
    return bytes(int(b) for b in order[: min(k, 256)])


def _buckets(tokenizer, byte_set: bytes) -> np.ndarray:
    column = {b: c for c, b in enumerate(byte_set)}
    k = len(byte_set)
    return np.array(
        [k if piece is None else column.get(piece[0], k) for piece in vocabulary_bytes(tokenizer)],
        dtype=np.int64,
    )


def build_byte_layout(
    texts: Sequence[str],
    tokenizers: Mapping[str, object],
    examples: Mapping[str, Sequence[TokenizedExample]],
    k: int,
) -> ByteLayout:
    """The layout of the transfer `texts` for `tokenizers` (name -> tokenizer), each with its tokenized
    transfer set `examples[name]` (`tokenize_records` of the same records); `k` public bytes per row."""
    if not tokenizers:
        raise ValueError("the byte-aligned layout needs at least one tokenizer")
    if not 1 <= k:
        raise ValueError(f"transfer.index_k={k} must be >= 1 (public bytes per span)")
    names = sorted(tokenizers)
    by_record = {n: {e.record_index: e for e in examples[n]} for n in names}
    records = sorted(set.intersection(*(set(by_record[n]) for n in names)))
    boundaries: list[tuple[int, ...]] = []
    starts: dict[str, list[tuple[int, ...]]] = {n: [] for n in names}
    ends: dict[str, list[tuple[int, ...]]] = {n: [] for n in names}
    first_bytes: list[int] = []
    for index in records:
        data = texts[index].encode("utf-8")
        sides = {n: _text_side(tokenizers[n], texts[index], by_record[n][index], n, index) for n in names}
        last = {n: _last_index_by_end(s) for n, s in sides.items()}
        reach = min((s[-1][1] if s else 0) for s in sides.values())
        common = sorted(set.intersection(*(set(e) for e in last.values())) - {0})
        common = [b for b in common if b <= reach]
        boundaries.append(tuple(common))
        for n in names:
            starts[n].append(tuple(last[n][b] for b in common[:-1]))
            ends[n].append(tuple(last[n][b] for b in common[1:]))
        first_bytes += [data[b] for b in common[:-1]]
    if not first_bytes:
        raise ValueError(
            "the transfer set has no byte span every tokenizer agrees on; use longer transfer records or "
            "a larger data.max_length"
        )
    byte_set = public_byte_set(first_bytes, k)
    column = {b: c for c, b in enumerate(byte_set)}
    span_buckets = np.array([column.get(b, len(byte_set)) for b in first_bytes], dtype=np.int64)
    span_buckets.setflags(write=False)
    digest = hashlib.sha256(BYTE_ALIGNED.encode() + byte_set)
    for index, bounds in zip(records, boundaries, strict=True):
        data = texts[index].encode("utf-8")
        digest.update(len(data).to_bytes(8, "little") + data)
        digest.update(np.asarray(bounds, dtype=np.int64).tobytes() + b"|")
    views = {}
    for n in names:
        digest.update(n.encode() + hashlib.sha256(backend_of(tokenizers[n]).to_str().encode()).digest())
        buckets = _buckets(tokenizers[n], byte_set)
        buckets.setflags(write=False)
        views[n] = TokenizerView(
            tuple(by_record[n][i] for i in records), tuple(starts[n]), tuple(ends[n]), buckets
        )
    return ByteLayout(
        byte_set, tuple(boundaries), tuple(records), span_buckets, views, digest.hexdigest()[:32]
    )


def span_rows(
    log_probs: Tensor,
    input_ids: Tensor,
    starts: Tensor,
    ends: Tensor,
    buckets: Tensor,
    span_buckets: Tensor,
    k: int,
) -> tuple[Tensor, Tensor]:
    """One example's rows of the layout from its log-probabilities `[L, V]` (the model's output at each
    position; V may exceed the tokenizer's size, padding columns count in the tail) and `input_ids [L]`.

    Returns `(rows [R, k + 2], log_span [R])`: the rows (module docstring; differentiable) and the log
    probability of each true span (column 0 in log space, for a loss without log(exp(.)))."""
    width = log_probs.shape[-1]
    if width < buckets.shape[0]:
        raise ValueError(f"the model's output has {width} columns, its tokenizer {buckets.shape[0]} tokens")
    full = torch.cat([buckets, buckets.new_full((width - buckets.shape[0],), k)])
    token_lp = log_probs[:-1].gather(-1, input_ids[1:, None]).squeeze(-1)
    cumulative = torch.cat([token_lp.new_zeros(1), token_lp.cumsum(0)])  # [t] = sum of the first t
    log_span = cumulative[ends] - cumulative[starts]
    p_span = log_span.exp()
    probs = log_probs[starts].exp()
    first = probs.new_zeros(probs.shape[0], k + 1).scatter_add_(1, full.expand(probs.shape[0], width), probs)
    first = first - torch.nn.functional.one_hot(span_buckets, k + 1).to(first.dtype) * p_span[:, None]
    return torch.cat([p_span[:, None], first.clamp_min(0.0)], dim=-1), log_span
