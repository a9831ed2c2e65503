"""The exact bytes each vocabulary id of a tokenizer stands for.

`vocabulary_bytes(tokenizer)` decodes every id with the same piece decoder `token_byte_spans` uses
(GPT-2's byte-level alphabet, SentencePiece's `▁` and `<0xNN>` byte fallback, added tokens by their
content): the bytes a token contributes to a text, so that, at a token boundary, the probability a
model gives each next *byte* is the sum of its probabilities of the tokens whose bytes start with it.
Special tokens (end of sequence, chat markers) and ids whose piece cannot be decoded get `None`: they
start no text. Ids from the tokenizer's size up to `width` (padding of a model's output layer) get
`None` too.
"""

from __future__ import annotations

from secure_kd.cross_tokenizer.spans import _piece_bytes, backend_of


def vocabulary_bytes(tokenizer, width: int | None = None) -> list[bytes | None]:
    """One entry per id `0 .. width - 1` (default: the tokenizer's size with added tokens): its bytes,
    or None for special tokens, padding and pieces that do not decode to bytes."""
    backend = backend_of(tokenizer)
    size = backend.get_vocab_size(with_added_tokens=True)
    width = size if width is None else width
    decoder = backend.get_added_tokens_decoder()
    added = {i: token.content for i, token in decoder.items() if not token.special}
    special = {i for i, token in decoder.items() if token.special}
    out: list[bytes | None] = []
    for token_id in range(width):
        if token_id >= size or token_id in special:
            out.append(None)
            continue
        piece = _piece_bytes(backend, token_id, added)
        out.append(piece if piece else None)
    return out
