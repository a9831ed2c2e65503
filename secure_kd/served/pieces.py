"""Token strings back to token ids: llama-cpp-python's server keys its top logprobs by text.

Its `/v1/completions` answers `top_logprobs` as one `{token text: logprob}` dict per position, the
text being `llama_token_to_piece(id, special=False)` decoded as UTF-8 with errors ignored. A
distillation target needs ids, so `PieceMap` rebuilds that text for every id of the served model's
tokenizer (the same vocabulary as the GGUF) and inverts it. Two kinds of ids cannot be told apart
from their text and are dropped from every answer, their mass going to the tail:

- control tokens (`<|im_start|>`, `<|im_end|>`, ...): their piece is empty (an echoed answer
  names its own label, the text's next token, so `<|im_end|>` is named where the text ends a turn);
- byte-level tokens that are not whole UTF-8 characters (a lone continuation byte, half of an
  emoji): ignoring the invalid bytes leaves an empty or shared text.

For SmolLM2's vocabulary of 49,152 this leaves a few hundred ids ambiguous (`ambiguous_ids`); the
tests compare the recovered ids with the in-process model's top-k. Byte-level BPE vocabularies
(GPT-2 style: SmolLM2, Llama 3, Qwen) are rebuilt exactly; others through `tokenizer.decode`,
which the caller should check the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode stand-ins for the 256 bytes, inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes, strict=True)}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    return pre is not None and "ByteLevel" in repr(pre)


def token_pieces(tokenizer) -> list[str]:
    """The text llama-cpp-python's server shows for every token id (index = id)."""
    vocab_size = len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = {
        int(i): token
        for i, token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items()
        if getattr(token, "special", False)
    }
    special |= set(added)
    byte_level = _is_byte_level(tokenizer)
    decoder = _byte_decoder()
    pieces: list[str] = []
    for token_id, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(vocab_size)))):
        if token_id in special or token is None:
            pieces.append("")
        elif byte_level and all(ch in decoder for ch in token):
            pieces.append(bytes(decoder[ch] for ch in token).decode("utf-8", errors="ignore"))
        else:
            pieces.append(tokenizer.decode([token_id]).replace("\ufffd", ""))
    return pieces


class PieceMap:
    """Token text -> token id for the texts that name exactly one id."""

    def __init__(self, pieces: list[str]) -> None:
        owners: dict[str, list[int]] = {}
        for token_id, piece in enumerate(pieces):
            owners.setdefault(piece, []).append(token_id)
        self.vocab_size = len(pieces)
        self.pieces = pieces
        self._unique = {piece: ids[0] for piece, ids in owners.items() if len(ids) == 1}
        self.ambiguous_ids = sorted(i for ids in owners.values() if len(ids) > 1 for i in ids)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> PieceMap:
        return cls(token_pieces(tokenizer))

    def ids(self, answer: Mapping[str, float], label: int | None = None) -> tuple[dict[int, float], int]:
        """({token id: logprob} for the texts that name one id, number of entries dropped).

        `label`: the token the server wrote into this answer last (llama-cpp-python adds the text's
        actual next token to every echoed answer, overwriting any entry with the same text), so its
        text names it even when that text is ambiguous: the end-of-turn token where the text ends a
        turn, for instance."""
        found: dict[int, float] = {}
        dropped = 0
        for piece, logprob in answer.items():
            token_id = self._unique.get(piece)
            if label is not None and piece == self.pieces[label]:
                token_id = label
            if token_id is None:
                dropped += 1
            else:
                found[token_id] = float(logprob)
        return found, dropped
