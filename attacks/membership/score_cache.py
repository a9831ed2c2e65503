"""On-disk cache of per-token statistics (`TokenStats`), keyed by model hash + data hash + max length.

A resumed or repeated audit of the same model on the same records reads the statistics back instead of
running the model again (zero forward passes, and the model is not even loaded). The key is the sha256
of: the model's fingerprint (`secure_kd.fingerprint.model_dir_fingerprint`: its weight, config and
tokenizer files), the token ids scored (`token_dataset_fingerprint`: covers the records, the tokenizer
and the truncation), the max length and the scorer version. One safetensors file per key, written
atomically (0600 in a 0700 directory: per-token log-probabilities of private records are private
data). A file that does not read back with the expected key and shape is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from attacks.membership.token_scores import TokenStats
from secure_kd.fingerprint import token_dataset_fingerprint
from secure_kd.paths import PRIVATE_FILE_MODE, atomic_write_bytes, private_dir

SCORER_VERSION = 1
MAX_CACHE_BYTES = 8 * 1024**3


def cache_key(model_fingerprint: str, sequences: Sequence[Sequence[int]], max_length: int) -> str:
    payload = {
        "model": model_fingerprint,
        "data": token_dataset_fingerprint(sequences),
        "max_length": int(max_length),
        "scorer": SCORER_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class ScoreCache:
    """`get(key, n)` -> TokenStats or None; `put(key, stats)`; files `<directory>/<key>.safetensors`."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def get(self, key: str, n_records: int) -> TokenStats | None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from secure_kd.model_files import ModelLoadError, check_safetensors_file

        path = self.path(key)
        if not path.is_file() or path.stat().st_size > MAX_CACHE_BYTES:
            return None
        try:
            check_safetensors_file(path)
            tensors = load_file(str(path))
            with open(path, "rb") as fh:  # the key stored in the header must be this key
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            stored_key = header.get("__metadata__", {}).get("key")
            offsets = tensors["offsets"].numpy()
            arrays = [tensors[name].numpy() for name in ("logprob", "mu", "sigma2")]
        except (ModelLoadError, SafetensorError, OSError, ValueError, KeyError):
            return None
        total = int(offsets[-1]) if len(offsets) else -1
        if stored_key != key or len(offsets) != n_records + 1 or any(len(a) != total for a in arrays):
            return None
        return TokenStats(*arrays, offsets=offsets, n_forwards=0)

    def put(self, key: str, stats: TokenStats) -> Path:
        from safetensors.torch import save

        private_dir(self.directory)
        tensors = {
            "logprob": torch.from_numpy(np.ascontiguousarray(stats.logprob, np.float32)),
            "mu": torch.from_numpy(np.ascontiguousarray(stats.mu, np.float32)),
            "sigma2": torch.from_numpy(np.ascontiguousarray(stats.sigma2, np.float32)),
            "offsets": torch.from_numpy(np.ascontiguousarray(stats.offsets, np.int64)),
        }
        path = self.path(key)
        atomic_write_bytes(path, save(tensors, metadata={"key": key}), mode=PRIVATE_FILE_MODE)
        return path


def cached_stats(
    cache: ScoreCache | None,
    model_fingerprint: str,
    sequences: Sequence[Sequence[int]],
    max_length: int,
    compute: Callable[[], TokenStats],
) -> tuple[TokenStats, bool]:
    """(stats, read from the cache?): `compute()` runs only on a miss (and its result is stored)."""
    if cache is None:
        return compute(), False
    key = cache_key(model_fingerprint, sequences, max_length)
    found = cache.get(key, len(sequences))
    if found is not None:
        return found, True
    stats = compute()
    cache.put(key, stats)
    return stats, False
