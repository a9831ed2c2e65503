"""Stable fingerprints of tokenizers and datasets, used by caches and privacy ledgers."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id) and the special tokens of a HF tokenizer."""
    vocab = tokenizer.get_vocab()
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    return _sha256_json({"vocab": sorted(vocab.items(), key=lambda kv: kv[1]), "special": special})


def token_dataset_fingerprint(sequences: Iterable[Iterable[int]]) -> str:
    """sha256 over the token ids of every sequence, in order (sequence boundaries included)."""
    h = hashlib.sha256()
    for seq in sequences:
        ids = list(seq)
        h.update(len(ids).to_bytes(8, "little"))
        h.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in ids))
    return h.hexdigest()


def text_dataset_fingerprint(texts: Iterable[str]) -> str:
    """sha256 over the texts of a dataset, in order (record boundaries included)."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()
