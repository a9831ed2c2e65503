"""Byte spans of tokens: where each token of a tokenization lies in the UTF-8 bytes of its text.

Two tokenizers share nothing but the text, so the common coordinate of a teacher and a student
tokenization is the byte offset into `text.encode("utf-8")`. `token_byte_spans(tokenizer, text)`
returns the token ids and, for each token, its byte span `[start, end)`:

- Byte-level BPE pieces (GPT-2's byte-to-unicode alphabet: SmolLM2, Llama 3, Qwen, ...),
  SentencePiece pieces (`▁` for a space) and their byte-fallback pieces (`<0xF0>`) are decoded to
  their exact bytes and located in the text from the end of the previous token on. A character of
  several bytes split over several tokens (an emoji in byte-level BPE) gets one exact sub-span per
  token, where the tokenizer's character offsets give each of them the whole character.
- A piece with a space that the pre-tokenizer added (`add_prefix_space`) and the text lacks is
  located without that space.
- Special tokens that occur in the text (`<|im_end|>` written out) get the span of their text;
  special tokens added around it (BOS/EOS of a post-processor) and other zero-width tokens get an
  empty span `(cursor, cursor)` where they stand.
- Anything else (a normalizer that rewrote the text, a piece alphabet we cannot decode) falls back
  to the tokenizer's own character offsets converted to bytes; a run of tokens sharing one such span
  becomes empty spans followed by the full span on the last of them, so an aligner groups the run.

The spans are checked to be ordered and disjoint (`check_spans`); the result equals TRL's
`encode_with_byte_offsets` on byte-level tokenizers (tests/engine/test_alignment.py), without depending on
TRL, and also covers SentencePiece pieces and byte fallback, which TRL refuses.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode map, inverted: piece character -> the byte it stands for."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


@dataclass(frozen=True)
class TokenSpans:
    """One text's tokenization: token ids and each token's byte span `[start, end)` in the text."""

    ids: list[int]
    spans: list[tuple[int, int]]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.spans):
            raise ValueError(f"TokenSpans has {len(self.ids)} ids but {len(self.spans)} spans")

    def __len__(self) -> int:
        return len(self.ids)


def backend_of(tokenizer):
    """The `tokenizers.Tokenizer` behind a fast transformers tokenizer (or the backend itself)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "encode") or not hasattr(backend, "id_to_token"):
        raise ValueError(
            f"byte spans need a fast tokenizer (a `tokenizers` backend with offsets); got "
            f"{type(tokenizer).__name__}. Load it with `AutoTokenizer.from_pretrained(..., use_fast=True)`"
        )
    return backend


def _piece_bytes(backend, token_id: int, added: dict[int, str]) -> bytes | None:
    """The exact bytes a token stands for, when its piece can be decoded; None otherwise."""
    if token_id in added:
        return added[token_id].encode("utf-8")
    piece = backend.id_to_token(token_id)
    if piece is None:
        return None
    fallback = _BYTE_FALLBACK.fullmatch(piece)
    if fallback:
        return bytes([int(fallback.group(1), 16)])
    if "▁" in piece:  # SentencePiece's space marker (never a byte-level piece character)
        return piece.replace("▁", " ").encode("utf-8")
    table = _byte_level_decoder()
    if all(ch in table for ch in piece):
        return bytes(table[ch] for ch in piece)
    return None


def _locate(piece: bytes, text: bytes, cursor: int, hint: int) -> tuple[int, int] | None:
    """Where `piece` lies in `text` at the tokenizer's offset or right after the previous token."""
    for start in dict.fromkeys((max(hint, cursor), cursor)):
        if text[start : start + len(piece)] == piece:
            return start, start + len(piece)
        if piece[:1] == b" " and text[start : start + len(piece) - 1] == piece[1:]:
            return start, start + len(piece) - 1  # a prefix space the pre-tokenizer added
    return None


def spans_from_encoding(backend, text: str, ids: Sequence[int], char_offsets: Sequence[tuple[int, int]]):
    """Byte spans for an encoding's ids and character offsets (see the module docstring)."""
    data = text.encode("utf-8")
    char_to_byte = [0]
    for ch in text:
        char_to_byte.append(char_to_byte[-1] + len(ch.encode("utf-8")))
    added = {i: tok.content for i, tok in backend.get_added_tokens_decoder().items()}
    spans: list[tuple[int, int]] = []
    cursor = 0
    n = len(ids)
    for i, (token_id, (c_start, c_end)) in enumerate(zip(ids, char_offsets, strict=True)):
        b_start, b_end = char_to_byte[c_start], char_to_byte[c_end]
        span = None
        if c_start == c_end:
            span = (cursor, cursor)
        else:
            piece = _piece_bytes(backend, token_id, added)
            if piece:
                span = _locate(piece, data, cursor, b_start)
        if span is None:  # fall back to the character offsets
            start = max(b_start, cursor)
            shares_next = i + 1 < n and tuple(char_offsets[i + 1]) == (c_start, c_end)
            if shares_next or b_end <= cursor:
                span = (start, start) if b_end > cursor else (cursor, cursor)
            else:
                span = (start, b_end)
        spans.append(span)
        cursor = span[1]
    return check_spans(spans, "token_byte_spans")


def check_spans(spans: Sequence[tuple[int, int]], what: str) -> list[tuple[int, int]]:
    """Spans must be `0 <= start <= end`, in order and disjoint: start >= the previous end."""
    out = [(int(s), int(e)) for s, e in spans]
    previous_end = 0
    for i, (start, end) in enumerate(out):
        if start < previous_end or end < start:
            raise ValueError(
                f"{what}: byte span {i} is ({start}, {end}) after a token ending at byte {previous_end}; "
                "spans must be ordered and disjoint ([start, end) with start >= the previous end). "
                "Compute them with secure_kd.cross_tokenizer.token_byte_spans on the text both sides share"
            )
        previous_end = end
    return out


def token_byte_spans(tokenizer, text: str, *, add_special_tokens: bool = False) -> TokenSpans:
    """Tokenize `text` and give each token its byte span in `text.encode("utf-8")`.

    `tokenizer` is a fast transformers tokenizer or a `tokenizers.Tokenizer`. Special tokens written
    in the text are recognized as the tokenizer does; `add_special_tokens=True` adds the
    post-processor's BOS/EOS with empty spans.
    """
    backend = backend_of(tokenizer)
    encoding = backend.encode(text, add_special_tokens=add_special_tokens)
    spans = spans_from_encoding(backend, text, encoding.ids, encoding.offsets)
    return TokenSpans(ids=list(encoding.ids), spans=spans)


def stack_spans(
    sequences: Sequence[TokenSpans], seq_len: int | None = None, *, pad_id: int = 0
) -> tuple[Tensor, Tensor]:
    """Pad tokenizations into `ids [B, L]` (pad_id) and `spans [B, L, 2]` ((-1, -1) = no text)."""
    length = max((len(s) for s in sequences), default=0) if seq_len is None else seq_len
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    spans = torch.full((len(sequences), length, 2), -1, dtype=torch.long)
    for b, seq in enumerate(sequences):
        if len(seq) > length:
            raise ValueError(f"sequence {b} has {len(seq)} tokens, more than seq_len={length}")
        if len(seq):
            ids[b, : len(seq)] = torch.tensor(seq.ids, dtype=torch.long)
            spans[b, : len(seq)] = torch.tensor(seq.spans, dtype=torch.long)
    return ids, spans
