"""One shard file: the codec's compressed streams plus the sequence lengths, in safetensors.

A cache with the teacher's tokenization adds two int32 tensors: `token_ids` (one per position) and
`byte_spans` (start, end per position, flattened), stored raw: they are exact.

Reading checks, in order: the file size against the manifest (and a sanity bound derived from
the shard's token count, so a hostile manifest cannot make the reader load a huge file), the
sha256 against the manifest, the safetensors header length, then the tensor names, dtypes
and the sequence lengths. Nothing is parsed before the checksum matches.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from secure_kd.cache.codec import CODEC_NAME
from secure_kd.cache.errors import REBUILD_HINT, CacheCorruptionError
from secure_kd.cache.files import parse_safetensors, read_bounded, sha256_hex
from secure_kd.cache.manifest import CACHE_FORMAT, ShardInfo

SHARD_TENSORS = {
    "gap_classes": np.dtype(np.uint8),
    "gap_remainders": np.dtype(np.uint8),
    "value_codes": np.dtype(np.uint8),
    "tail_codes": np.dtype(np.uint8),
    "sequence_lengths": np.dtype(np.int32),
}
TOKENIZATION_TENSORS = {"token_ids": np.dtype(np.int32), "byte_spans": np.dtype(np.int32)}
_SAFETENSORS_DTYPES = {np.dtype(np.uint8): "U8", np.dtype(np.int32): "I32"}
_REBUILD = REBUILD_HINT


def max_shard_bytes(n_tokens: int, n_sequences: int, k: int, *, tokenization: bool = False) -> int:
    """Upper bound on a sane shard file: raw codes plus generous LZMA and header overhead."""
    return (1 << 20) + n_tokens * (12 * k + 16 + (12 if tokenization else 0)) + 8 * n_sequences


def serialize_shard(
    streams: dict[str, np.ndarray],
    sequence_lengths: list[int],
    tokenization: dict[str, np.ndarray] | None = None,
) -> bytes:
    """A safetensors file with a deterministic layout, so equal shards have equal sha256.

    (safetensors' own writer orders header keys arbitrarily.) Layout per the safetensors
    format: 8-byte little-endian header length, JSON header padded with spaces to a multiple
    of 8, then the tensor bytes; the int32 tensor comes first so it is aligned.
    """
    tensors = {"sequence_lengths": np.asarray(sequence_lengths, dtype=np.int32)}
    if tokenization is not None:  # int32 first, so every tensor stays aligned
        tensors.update(
            (name, np.asarray(tokenization[name], dtype=np.int32)) for name in TOKENIZATION_TENSORS
        )
    tensors.update(
        (name, np.asarray(streams[name], dtype=np.uint8)) for name in SHARD_TENSORS if name in streams
    )
    expected = {**SHARD_TENSORS, **(TOKENIZATION_TENSORS if tokenization is not None else {})}
    if set(tensors) != set(expected):
        raise ValueError(f"a shard needs the streams {sorted(expected)}, got {sorted(tensors)}")
    header: dict[str, object] = {"__metadata__": {"format": CACHE_FORMAT, "codec": CODEC_NAME}}
    offset = 0
    for name, array in tensors.items():
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    body = b"".join(
        array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes() for array in tensors.values()
    )
    return len(header_bytes).to_bytes(8, "little") + header_bytes + body


def read_shard_file(path: Path, max_bytes: int) -> bytes:
    return read_bounded(path, max_bytes, what="cache shard")


def load_shard(
    directory: Path, shard: ShardInfo, k: int, *, tokenization: bool = False
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The compressed streams and the sequence lengths of one verified shard (with `tokenization`, the
    streams also hold `token_ids` [n_tokens] and `byte_spans` [n_tokens, 2], checked)."""
    limit = max_shard_bytes(shard.n_tokens, shard.n_sequences, k, tokenization=tokenization)
    if shard.bytes > limit:
        raise CacheCorruptionError(
            f"{shard.file}: the manifest claims {shard.bytes} bytes, more than {limit} possible for "
            f"{shard.n_tokens} positions; {_REBUILD}"
        )
    data = read_shard_file(directory / shard.file, limit)
    if len(data) != shard.bytes:
        raise CacheCorruptionError(
            f"{shard.file} is {len(data)} bytes but the manifest says {shard.bytes}: "
            f"the file is truncated or was replaced; {_REBUILD}"
        )
    if sha256_hex(data) != shard.sha256:
        raise CacheCorruptionError(
            f"{shard.file} fails its sha256 check: the file is corrupted or was altered; {_REBUILD}"
        )
    expected = {**SHARD_TENSORS, **(TOKENIZATION_TENSORS if tokenization else {})}
    tensors = parse_safetensors(data, source=shard.file, expected=expected)
    lengths = tensors.pop("sequence_lengths").astype(np.int64)
    if len(lengths) != shard.n_sequences or lengths.min() < 1 or int(lengths.sum()) != shard.n_tokens:
        raise CacheCorruptionError(f"{shard.file}: sequence lengths disagree with the manifest; {_REBUILD}")
    if tokenization:
        tensors["token_ids"], tensors["byte_spans"] = _checked_tokenization(tensors, shard)
    return tensors, lengths


def _checked_tokenization(tensors: dict[str, np.ndarray], shard: ShardInfo) -> tuple[np.ndarray, np.ndarray]:
    ids = tensors["token_ids"].astype(np.int64)
    spans = tensors["byte_spans"].astype(np.int64)
    if len(ids) != shard.n_tokens or len(spans) != 2 * shard.n_tokens:
        raise CacheCorruptionError(
            f"{shard.file}: the teacher's token ids or byte spans do not have one entry per position; "
            f"{_REBUILD}"
        )
    spans = spans.reshape(-1, 2)
    outside = (spans == -1).all(axis=1)
    inside = (spans[:, 0] >= 0) & (spans[:, 0] <= spans[:, 1])
    if (ids.size and ids.min() < 0) or not bool((outside | inside).all()):
        raise CacheCorruptionError(f"{shard.file}: invalid teacher token ids or byte spans; {_REBUILD}")
    return ids, spans


def shard_is_intact(directory: Path, shard: ShardInfo) -> bool:
    """True when the shard file exists with the manifest's size and sha256 (used to resume builds)."""
    path = directory / shard.file
    if not path.is_file() or path.stat().st_size != shard.bytes:
        return False
    return sha256_hex(read_shard_file(path, shard.bytes)) == shard.sha256
