"""Read a logit cache: `LogitCache.open(dir, expect_tokenizer=..., expect_dataset=...)`.

Opening checks the manifest against what the training run uses (tokenizer, dataset, k,
optionally the teacher) and refuses a mismatch with `CacheMismatchError`. Shards are read
lazily: the first access to a sequence loads its shard, checks size and sha256, decodes it
to compact arrays (int32 ids, 8-bit codes) and keeps it in a memory-bounded LRU; values are
dequantized per request.

Padding in `batch`: positions past a sequence's end hold the uniform distribution over the
vocabulary (ids 0..k-1, log-probability -log(vocab_size) each, the rest of the mass in the
tail): finite, normalized, so no objective produces NaN or inf there even unmasked. The
trainer masks them anyway (labels -100); `lengths` gives the real lengths.

A cache built with the teacher's tokenization (`manifest.teacher_tokenization`) also returns, per
sequence, the teacher's token ids and their byte spans in the shared text (`teacher_tokens`,
`teacher_tokens_batch`): all a student with another tokenizer needs to align with the cached top-k.
`open(..., expect_text=...)` checks that the spans index the texts the student trains on.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from secure_kd.cache.codec import DecodedBlock, TopKCodec
from secure_kd.cache.errors import (
    REBUILD_HINT,
    CacheCorruptionError,
    CacheError,
    CacheIncompleteError,
    CacheMismatchError,
)
from secure_kd.cache.manifest import CacheManifest, ShardInfo, read_manifest
from secure_kd.cache.shard import load_shard
from secure_kd.topk import TopKLogits

_REBUILD = REBUILD_HINT


@dataclass(frozen=True)
class _LoadedShard:
    block: DecodedBlock
    offsets: np.ndarray  # [n_sequences + 1] start of each sequence's rows in the block
    token_ids: np.ndarray | None = None  # [n_tokens] int64, the teacher's tokens (tokenization caches)
    byte_spans: np.ndarray | None = None  # [n_tokens, 2] int64


class LogitCache:
    """Random access to cached teacher top-k log-probabilities, by sequence index."""

    def __init__(self, directory: Path, manifest: CacheManifest, *, memory_budget_bytes: int) -> None:
        self.directory = directory
        self.manifest = manifest
        self.memory_budget_bytes = memory_budget_bytes
        self._codec = TopKCodec(manifest.codec, vocab_size=manifest.vocab_size, k=manifest.k)
        self._shard_starts = [shard.first_sequence for shard in manifest.shards]
        self._loaded: OrderedDict[int, _LoadedShard] = OrderedDict()

    @classmethod
    def open(
        cls,
        directory: str | Path,
        *,
        expect_tokenizer: str,
        expect_dataset: str,
        expect_k: int | None = None,
        expect_teacher: str | None = None,
        expect_text: str | None = None,
        memory_budget_bytes: int = 1 << 30,
    ) -> LogitCache:
        """Open the cache in `directory` after checking it was built for this run.

        expect_tokenizer / expect_dataset: the fingerprints of the tokenizer and dataset in use
        (secure_kd.fingerprint); expect_k / expect_teacher: checked when given.
        expect_text: the fingerprint of the shared texts (secure_kd.data.PairedData.text_fingerprint) for
            a student with another tokenizer: the cache must hold the teacher's tokenization of them.
        memory_budget_bytes: decoded shards kept in memory (about 5 bytes per entry); a shard
            larger than the budget is refused before it is decompressed.
        """
        if not expect_tokenizer or not expect_dataset:
            raise ValueError(
                "LogitCache.open needs expect_tokenizer and expect_dataset: the fingerprints of this run's "
                "tokenizer and dataset (secure_kd.fingerprint), so a cache built for other data is refused"
            )
        directory = Path(directory)
        manifest = read_manifest(directory)
        if not manifest.complete:
            raise CacheIncompleteError(
                f"the cache build in {directory} was interrupted after {len(manifest.shards)} shard(s); "
                "run the same build again (the same `secure-kd distill` job, or build_cache) to resume it"
            )
        checks = [
            (
                "tokenizer fingerprint",
                manifest.tokenizer_fingerprint,
                expect_tokenizer,
                f"use the tokenizer the cache was built with, or {_REBUILD} with this tokenizer",
            ),
            (
                "dataset fingerprint",
                manifest.dataset_fingerprint,
                expect_dataset,
                f"pass the dataset the cache was built from, or {_REBUILD} over this dataset",
            ),
            (
                "k (top-k size)",
                manifest.k,
                expect_k,
                f"set top_k to {manifest.k}, or {_REBUILD} with k={expect_k}",
            ),
            (
                "teacher",
                manifest.teacher_id,
                expect_teacher,
                f"use that teacher, or {_REBUILD} with this teacher",
            ),
        ]
        tokenization = manifest.teacher_tokenization
        if expect_text is not None:
            if tokenization is None:
                raise CacheMismatchError(
                    f"logit cache {directory} holds no teacher tokenization (token ids and byte spans), "
                    f"which a student with another tokenizer needs; {_REBUILD} for this student "
                    "(secure-kd distill with student.tokenizer set builds it with the spans)"
                )
            checks.append(
                (
                    "shared-text fingerprint",
                    tokenization.text_fingerprint,
                    expect_text,
                    f"train on the texts the cache was built from, or {_REBUILD} over these texts",
                )
            )
        for what, cached, expected, fix in checks:
            if expected is not None and cached != expected:
                raise CacheMismatchError(
                    f"logit cache {directory} was built with {what} {cached}, "
                    f"but this run uses {expected}; {fix}"
                )
        if memory_budget_bytes < 1:
            raise ValueError(f"memory_budget_bytes must be positive, got {memory_budget_bytes}")
        return cls(directory, manifest, memory_budget_bytes=memory_budget_bytes)

    # -- properties ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.manifest.n_sequences

    @property
    def k(self) -> int:
        return self.manifest.k

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def has_teacher_tokens(self) -> bool:
        """True when the cache stores the teacher's token ids and byte spans."""
        return self.manifest.teacher_tokenization is not None

    @property
    def bytes_per_token(self) -> float:
        """Total shard bytes divided by the number of cached positions."""
        return self.manifest.bytes_per_token

    # -- access ----------------------------------------------------------------------------------

    def __getitem__(self, index: int) -> TopKLogits:
        """TopKLogits [length_i, k] of sequence `index`: float32 values sorted descending, int64 ids."""
        rows = self._rows(index)
        return self._codec.to_topk(*rows)

    def sequence_length(self, index: int) -> int:
        shard, local = self._locate(index)
        offsets = self._shard(shard).offsets
        return int(offsets[local + 1] - offsets[local])

    def lengths(self, indices: Sequence[int]) -> list[int]:
        return [self.sequence_length(index) for index in indices]

    def batch(self, indices: Sequence[int], pad_to: int | None = None) -> TopKLogits:
        """TopKLogits [len(indices), seq, k] for several sequences, right-padded (see module doc).

        seq is the longest of the sequences, or `pad_to` when given (it must not be shorter).
        """
        indices = list(indices)
        if not indices:
            raise ValueError("batch() needs at least one sequence index")
        parts = [self._rows(index) for index in indices]
        lengths = [len(part[2]) for part in parts]
        seq = max(lengths)
        if pad_to is not None:
            if pad_to < seq:
                raise ValueError(f"pad_to={pad_to} is shorter than the longest sequence in the batch ({seq})")
            seq = pad_to
        values, ids = self._codec.to_arrays(
            np.concatenate([part[0] for part in parts]),
            np.concatenate([part[1] for part in parts]),
            np.concatenate([part[2] for part in parts]),
        )
        k = self.k
        padded_values = np.full((len(indices), seq, k), -math.log(self.vocab_size), dtype=np.float32)
        padded_ids = np.empty((len(indices), seq, k), dtype=np.int64)
        padded_ids[:] = np.arange(k, dtype=np.int64)
        start = 0
        for row, length in enumerate(lengths):
            padded_values[row, :length] = values[start : start + length]
            padded_ids[row, :length] = ids[start : start + length]
            start += length
        return TopKLogits(values=torch.from_numpy(padded_values), indices=torch.from_numpy(padded_ids))

    def teacher_tokens(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The teacher's token ids [length] and byte spans [length, 2] (int64) of sequence `index`."""
        if not self.has_teacher_tokens:
            raise CacheMismatchError(
                f"logit cache {self.directory} holds no teacher tokenization; {_REBUILD} with byte spans"
            )
        shard_index, local = self._locate(index)
        loaded = self._shard(shard_index)
        start, stop = int(loaded.offsets[local]), int(loaded.offsets[local + 1])
        assert loaded.token_ids is not None and loaded.byte_spans is not None
        return loaded.token_ids[start:stop], loaded.byte_spans[start:stop]

    def teacher_tokens_batch(
        self, indices: Sequence[int], pad_to: int | None = None, *, pad_id: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Right-padded teacher token ids [B, seq] (pad_id), byte spans [B, seq, 2] ((-1, -1) on the
        padding) and the real lengths, for several sequences (seq as in `batch`)."""
        parts = [self.teacher_tokens(index) for index in indices]
        if not parts:
            raise ValueError("teacher_tokens_batch() needs at least one sequence index")
        lengths = [len(ids) for ids, _ in parts]
        seq = max(lengths) if pad_to is None else pad_to
        if seq < max(lengths):
            raise ValueError(f"pad_to={pad_to} is shorter than the longest sequence in the batch")
        ids = torch.full((len(parts), seq), pad_id, dtype=torch.long)
        spans = torch.full((len(parts), seq, 2), -1, dtype=torch.long)
        for row, (row_ids, row_spans) in enumerate(parts):
            ids[row, : len(row_ids)] = torch.from_numpy(row_ids)
            spans[row, : len(row_ids)] = torch.from_numpy(row_spans)
        return ids, spans, lengths

    def verify(self) -> None:
        """Load and decode every shard once: raises CacheCorruptionError naming a damaged shard."""
        for shard_index in range(len(self.manifest.shards)):
            self._shard(shard_index)

    # -- internals -------------------------------------------------------------------------------

    def _locate(self, index: int) -> tuple[int, int]:
        if not isinstance(index, int | np.integer):
            raise TypeError(f"sequence index must be an integer, got {type(index).__name__}")
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"sequence index {index} out of range for a cache of {n} sequences")
        index = int(index) % n
        shard_index = bisect.bisect_right(self._shard_starts, index) - 1
        return shard_index, index - self.manifest.shards[shard_index].first_sequence

    def _rows(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        shard_index, local = self._locate(index)
        loaded = self._shard(shard_index)
        start, stop = int(loaded.offsets[local]), int(loaded.offsets[local + 1])
        block = loaded.block
        return block.ids[start:stop], block.value_codes[start:stop], block.tail_codes[start:stop]

    def _shard(self, shard_index: int) -> _LoadedShard:
        if shard_index in self._loaded:
            self._loaded.move_to_end(shard_index)
            return self._loaded[shard_index]
        shard: ShardInfo = self.manifest.shards[shard_index]
        tokenization = self.has_teacher_tokens
        per_token = self.k * (1 + np.dtype(self._codec.id_dtype).itemsize) + 1 + (24 if tokenization else 0)
        decoded_bytes = shard.n_tokens * per_token
        if decoded_bytes > self.memory_budget_bytes:  # checked before decompressing anything
            raise CacheError(
                f"{shard.file} would decode to {decoded_bytes} bytes, more than memory_budget_bytes="
                f"{self.memory_budget_bytes}: open the cache with a larger budget, or rebuild it with a "
                "smaller shard_tokens"
            )
        streams, lengths = load_shard(self.directory, shard, self.k, tokenization=tokenization)
        token_ids, byte_spans = streams.pop("token_ids", None), streams.pop("byte_spans", None)
        if token_ids is not None and token_ids.size and int(token_ids.max()) >= self.vocab_size:
            raise CacheCorruptionError(
                f"{shard.file}: a teacher token id is past the vocabulary ({self.vocab_size}); {_REBUILD}"
            )
        block = self._codec.decode(streams, shard.n_tokens, source=shard.file)
        loaded = _LoadedShard(
            block=block,
            offsets=np.concatenate([[0], np.cumsum(lengths)]),
            token_ids=token_ids,
            byte_spans=byte_spans,
        )
        self._loaded[shard_index] = loaded
        while len(self._loaded) > 1 and self._memory_in_use() > self.memory_budget_bytes:
            self._loaded.popitem(last=False)
        return loaded

    def _memory_in_use(self) -> int:
        extra = sum(
            loaded.token_ids.nbytes + loaded.byte_spans.nbytes
            for loaded in self._loaded.values()
            if loaded.token_ids is not None and loaded.byte_spans is not None
        )
        return sum(loaded.block.nbytes for loaded in self._loaded.values()) + extra
