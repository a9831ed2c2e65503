"""Stable fingerprints of tokenizers, datasets and model directories, used by caches and privacy ledgers."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path


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


MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".gguf", ".model", ".txt", ".jinja")


def model_dir_fingerprint(directory: str | Path) -> str:
    """sha256 over the name and contents of every weight, config and tokenizer file directly in a
    model directory (sorted by name): two directories with the same files share it, any changed byte
    changes it."""
    root = Path(directory)
    files = sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith(MODEL_FILE_SUFFIXES))
    if not files:
        raise ValueError(f"{root} holds no model files to fingerprint (config.json, *.safetensors)")
    h = hashlib.sha256()
    for path in files:
        name = path.name.encode("utf-8")
        h.update(len(name).to_bytes(8, "little"))
        h.update(name)
        h.update(path.stat().st_size.to_bytes(8, "little"))
        with open(path, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
