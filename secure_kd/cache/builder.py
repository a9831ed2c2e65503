"""Run the teacher once over a tokenized dataset and store its top-k log-probabilities.

Alignment: position t of sequence i stores the teacher's distribution over token t+1 given
tokens 0..t, i.e. `log_softmax(teacher(ids).logits[:, t])`, for every real position t
(including the last, whose target lies past the sequence). A student's logits at position t
are aligned the same way, so the trainer compares them position by position.

Batches are padded on the right (pad id 0, attention mask 0); padded positions are never
stored. Sequences are grouped into shards of about `shard_tokens` positions, in dataset
order, and within a shard they are batched longest first to limit padding; the cache is
addressed by the original sequence index.

Cross-tokenizer: with `byte_spans` (one (start, end) per token of each sequence, in the bytes of
the text teacher and student share; `secure_kd.data.paired`), every shard also stores the teacher's
token ids and their spans, and the manifest the fingerprint of the shared texts, so a student with
another tokenizer trains from the cache alone. With `vocab_size` below the teacher's logits width
(an output layer padded past its tokenizer; `secure_kd.cross_tokenizer.VocabPadding`), the padding
columns are dropped before the softmax and the top-k: every id below `vocab_size` is kept.

Resumable: the manifest is rewritten after every shard, and a build on the same directory
with the same settings keeps the shards whose size and sha256 check out.

The cache holds what the teacher predicts on private data, so it is private data: the
directory is 0700 and every file 0600 (files.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from secure_kd.cache.codec import CodecParams, TopKCodec
from secure_kd.cache.errors import CacheMismatchError
from secure_kd.cache.files import make_private_dir, sha256_hex, temp_name_target, write_private_atomic
from secure_kd.cache.manifest import (
    MANIFEST_NAME,
    SHARD_FILE_PATTERN,
    CacheManifest,
    ShardInfo,
    TeacherTokenization,
    manifest_path,
    read_manifest,
    shard_file_name,
    write_manifest,
)
from secure_kd.cache.shard import serialize_shard, shard_is_intact
from secure_kd.fingerprint import token_dataset_fingerprint

PAD_TOKEN_ID = 0
# Settings that must match for a build to resume into an existing directory.
_IDENTITY_FIELDS = (
    "teacher_id",
    "tokenizer_fingerprint",
    "dataset_fingerprint",
    "k",
    "n_sequences",
    "n_tokens",
    "shard_tokens",
    "codec",
    "teacher_tokenization",
    "logits_width",
)

Teacher = Callable[..., object]


def plan_shards(lengths: Sequence[int], shard_tokens: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) sequence ranges of >= `shard_tokens` positions (the last may be short)."""
    ranges: list[tuple[int, int]] = []
    start, tokens = 0, 0
    for index, length in enumerate(lengths):
        tokens += length
        if tokens >= shard_tokens:
            ranges.append((start, index + 1))
            start, tokens = index + 1, 0
    if start < len(lengths):
        ranges.append((start, len(lengths)))
    return ranges


def _as_token_arrays(sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
    if len(sequences) == 0:
        raise ValueError("sequences is empty: pass a list of token-id lists")
    arrays = []
    for index, sequence in enumerate(sequences):
        if isinstance(sequence, torch.Tensor):
            sequence = sequence.detach().cpu().numpy()
        array = np.asarray(sequence)
        if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"sequence {index} must be a flat list of integer token ids")
        if array.size == 0:
            raise ValueError(f"sequence {index} is empty; drop empty sequences before caching")
        if array.min() < 0:
            raise ValueError(f"sequence {index} holds a negative token id")
        arrays.append(array.astype(np.int64))
    return arrays


def _check_token_ids(arrays: Sequence[np.ndarray], vocab_size: int) -> None:
    largest = max(int(array.max()) for array in arrays)
    if largest >= vocab_size:
        raise ValueError(
            f"the sequences hold token id {largest} but the teacher's vocabulary has {vocab_size} tokens: "
            "tokenize with the teacher's tokenizer"
        )


def _logits_of(output: object) -> torch.Tensor:
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            "teacher must return a logits tensor [batch, seq, vocab] or an object with .logits, "
            f"got {type(output).__name__}"
        )
    return logits


def _as_span_arrays(
    spans: Sequence[Sequence[tuple[int, int]]], arrays: Sequence[np.ndarray]
) -> list[np.ndarray]:
    if len(spans) != len(arrays):
        raise ValueError(
            f"byte_spans has {len(spans)} entries for {len(arrays)} sequences; give one per sequence"
        )
    out = []
    for index, (sequence_spans, array) in enumerate(zip(spans, arrays, strict=True)):
        span_array = np.asarray(sequence_spans, dtype=np.int64).reshape(-1, 2)
        if len(span_array) != len(array):
            raise ValueError(
                f"sequence {index} has {len(array)} tokens but {len(span_array)} byte spans; give one "
                "(start, end) per token, (-1, -1) outside the shared text"
            )
        outside = (span_array == -1).all(axis=1)
        inside = (span_array[:, 0] >= 0) & (span_array[:, 0] <= span_array[:, 1])
        if not bool((outside | inside).all()) or span_array.max(initial=0) >= 1 << 31:
            raise ValueError(
                f"sequence {index} has a byte span that is neither 0 <= start <= end < 2**31 nor (-1, -1)"
            )
        out.append(span_array)
    return out


def _teacher_topk(
    teacher: Teacher, batch: list[np.ndarray], k: int, device: torch.device, real_vocab: int | None = None
) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], int]:
    """Exact top-k log-probabilities and tail log-mass of every real position of a batch."""
    if hasattr(teacher, "topk_positions"):  # a teacher that answers top-k itself (secure_kd.served)
        return teacher.topk_positions(batch, k), int(teacher.vocab_size)
    lengths = [len(sequence) for sequence in batch]
    input_ids = torch.full((len(batch), max(lengths)), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, sequence in enumerate(batch):
        input_ids[row, : len(sequence)] = torch.from_numpy(sequence)
        attention_mask[row, : len(sequence)] = 1
    logits = _logits_of(teacher(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)))
    if logits.ndim != 3 or tuple(logits.shape[:2]) != tuple(input_ids.shape):
        raise ValueError(
            f"teacher returned logits of shape {tuple(logits.shape)}, expected [batch, seq, vocab] with "
            f"batch, seq = {tuple(input_ids.shape)}"
        )
    vocab_size = logits.shape[-1]
    if real_vocab is not None:
        if real_vocab > vocab_size:
            raise ValueError(
                f"vocab_size={real_vocab} exceeds the teacher's logits width {vocab_size}; give the size of "
                "the teacher's real vocabulary (VocabPadding.detect(tokenizer, width).real_size)"
            )
        logits, vocab_size = logits[..., :real_vocab], real_vocab  # padding columns are not tokens
    if k > vocab_size:
        raise ValueError(f"k={k} exceeds the teacher's vocabulary size {vocab_size}")
    _check_token_ids(batch, vocab_size)
    results = []
    for row, length in enumerate(lengths):  # one row at a time bounds the float32 copies to [seq, vocab]
        row_logits = logits[row, :length].float()
        if torch.isnan(row_logits).any():
            raise ValueError("teacher returned NaN logits; check the model and its dtype")
        log_norm = torch.logsumexp(row_logits, dim=-1)
        if not torch.isfinite(log_norm).all():
            raise ValueError("teacher returned a position whose logits are all -inf or overflow float32")
        top = row_logits.topk(k, dim=-1)
        tail = torch.logsumexp(row_logits.scatter(-1, top.indices, -math.inf), dim=-1)
        results.append(((top.values - log_norm[:, None]).cpu(), top.indices.cpu(), (tail - log_norm).cpu()))
    return results, vocab_size


def _verified_shards(
    directory: Path, previous: CacheManifest, plan: list[tuple[int, int]]
) -> list[ShardInfo]:
    """Shards of an earlier build that match the current plan and whose files are intact."""
    planned = {start: (index, stop) for index, (start, stop) in enumerate(plan)}
    kept = []
    for shard in previous.shards:
        slot = planned.get(shard.first_sequence)
        if slot is None or slot[1] != shard.stop_sequence or shard.file != shard_file_name(slot[0]):
            continue
        if shard_is_intact(directory, shard):
            kept.append(shard)
    return kept


def _check_resumable(previous: CacheManifest, requested: dict[str, object], directory: Path) -> None:
    for field in _IDENTITY_FIELDS:
        cached = getattr(previous, field)
        if cached != requested[field]:
            raise CacheMismatchError(
                f"{directory} already holds a logit cache built with {field}={cached!r}, but this build asks "
                f"for {field}={requested[field]!r}. Use another out_dir, or delete {directory} to rebuild"
            )


def _prepare_directory(directory: Path) -> None:
    make_private_dir(directory)
    for entry in directory.iterdir():
        if temp_name_target(entry.name) is not None and entry.is_file():
            entry.unlink()  # a temporary file of an interrupted write
    if manifest_path(directory).exists():
        return
    foreign = [
        entry.name
        for entry in directory.iterdir()
        if entry.name != MANIFEST_NAME and not re.match(SHARD_FILE_PATTERN, entry.name)
    ]
    if foreign:
        raise ValueError(
            f"out_dir {directory} is not empty and holds no cache manifest (found {sorted(foreign)[:5]}); "
            "choose an empty or new directory"
        )


def build_cache(
    teacher: Teacher,
    sequences: Sequence[Sequence[int]],
    out_dir: str | Path,
    *,
    k: int,
    teacher_id: str,
    tokenizer_fingerprint: str,
    dataset_fingerprint: str | None = None,
    batch_size: int = 8,
    shard_tokens: int = 32768,
    device: str | torch.device = "cpu",
    progress: bool = True,
    codec: CodecParams | None = None,
    byte_spans: Sequence[Sequence[tuple[int, int]]] | None = None,
    text_fingerprint: str | None = None,
    vocab_size: int | None = None,
) -> CacheManifest:
    """Cache the teacher's top-k log-probabilities for every position of `sequences` in `out_dir`.

    teacher: a HF causal LM (already on `device`) or any callable taking `input_ids` and
        `attention_mask` and returning logits [batch, seq, vocab] or an object with `.logits`.
    sequences: token-id lists of any lengths (>= 1).
    teacher_id, tokenizer_fingerprint: recorded in the manifest and checked by
        `LogitCache.open` (see secure_kd.fingerprint.tokenizer_fingerprint).
    dataset_fingerprint: defaults to `token_dataset_fingerprint(sequences)`; pass the
        fingerprint the training run will check if it fingerprints the data differently.
    Returns the manifest of the complete cache.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if batch_size < 1 or shard_tokens < 1:
        raise ValueError(f"batch_size ({batch_size}) and shard_tokens ({shard_tokens}) must be >= 1")
    arrays = _as_token_arrays(sequences)
    if (byte_spans is None) != (text_fingerprint is None):
        raise ValueError(
            "give byte_spans and text_fingerprint together (a cache for a student with another tokenizer) "
            "or neither"
        )
    spans = None if byte_spans is None else _as_span_arrays(byte_spans, arrays)
    real_vocab = vocab_size  # `vocab_size` below is the cache's own, read back from a resumed build
    if real_vocab is not None and (not isinstance(real_vocab, int) or real_vocab < 1):
        raise ValueError(f"vocab_size must be a positive integer or None, got {real_vocab!r}")
    config_vocab = getattr(getattr(teacher, "config", None), "vocab_size", None)
    if isinstance(config_vocab, int):  # a HF model: catch a tokenizer mismatch before any forward pass
        _check_token_ids(arrays, real_vocab or config_vocab)
    logits_width = None
    if real_vocab is not None and isinstance(config_vocab, int) and config_vocab != real_vocab:
        logits_width = config_vocab
    lengths = [len(array) for array in arrays]
    codec_params = codec or CodecParams()
    requested: dict[str, object] = {
        "teacher_id": teacher_id,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "dataset_fingerprint": dataset_fingerprint or token_dataset_fingerprint(arrays),
        "k": k,
        "n_sequences": len(arrays),
        "n_tokens": sum(lengths),
        "shard_tokens": shard_tokens,
        "codec": codec_params,
        "teacher_tokenization": None
        if text_fingerprint is None
        else TeacherTokenization(text_fingerprint=text_fingerprint),
        "logits_width": logits_width,
    }
    directory = Path(out_dir)
    _prepare_directory(directory)
    plan = plan_shards(lengths, shard_tokens)

    done: dict[int, ShardInfo] = {}
    vocab_size: int | None = None
    if manifest_path(directory).exists():
        previous = read_manifest(directory)
        _check_resumable(previous, requested, directory)
        vocab_size = previous.vocab_size
        done = {shard.first_sequence: shard for shard in _verified_shards(directory, previous, plan)}
    # A teacher that can tell whether it still is the one that built this cache (a served teacher,
    # secure_kd.served.teacher) checks itself on every build, resumed or complete, and raises if not.
    teacher_check = None
    if hasattr(teacher, "cache_check"):
        recorded = read_manifest(directory).teacher_check if manifest_path(directory).exists() else None
        teacher_check = teacher.cache_check(recorded, k=k)

    def record() -> CacheManifest:
        shards = [done[first] for first in sorted(done)]
        manifest = CacheManifest(
            vocab_size=vocab_size,
            shards=shards,
            complete=len(done) == len(plan),
            teacher_check=teacher_check,
            **requested,
        )
        write_manifest(directory, manifest)
        return manifest

    if vocab_size is not None and len(done) == len(plan):
        return record()

    is_module = isinstance(teacher, torch.nn.Module)
    was_training = is_module and teacher.training
    if is_module:
        teacher.eval()
    bar = tqdm(
        total=requested["n_tokens"],
        initial=sum(shard.n_tokens for shard in done.values()),
        unit="tok",
        unit_scale=True,
        desc="teacher top-k",
        disable=not progress,
    )
    manifest = None
    try:
        for shard_index, (start, stop) in enumerate(plan):
            if start in done:
                continue
            positions, shard_vocab = _run_shard(
                teacher, arrays[start:stop], k, batch_size, torch.device(device), bar, real_vocab
            )
            if vocab_size is not None and shard_vocab != vocab_size:
                raise CacheMismatchError(
                    f"the teacher's vocabulary has {shard_vocab} tokens but {directory} was started with "
                    f"{vocab_size}; use the same teacher, or delete {directory}"
                )
            vocab_size = shard_vocab
            shard_codec = TopKCodec(codec_params, vocab_size=vocab_size, k=k)
            tokenization = None
            if spans is not None:
                tokenization = {
                    "token_ids": np.concatenate(arrays[start:stop]),
                    "byte_spans": np.concatenate(spans[start:stop]).reshape(-1),
                }
            done[start] = _write_shard(directory, shard_index, start, positions, shard_codec, tokenization)
            manifest = record()
    finally:
        bar.close()
        if is_module:
            teacher.train(was_training)
    assert manifest is not None and manifest.complete
    return manifest


def _run_shard(
    teacher: Teacher,
    arrays: list[np.ndarray],
    k: int,
    batch_size: int,
    device: torch.device,
    bar: tqdm,
    real_vocab: int | None = None,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], int]:
    """Top-k of every sequence of one shard, in the shard's sequence order."""
    by_length = sorted(range(len(arrays)), key=lambda i: -len(arrays[i]))
    per_sequence: list = [None] * len(arrays)
    vocab_size = 0
    with torch.inference_mode():
        for first in range(0, len(by_length), batch_size):
            members = by_length[first : first + batch_size]
            results, vocab_size = _teacher_topk(teacher, [arrays[i] for i in members], k, device, real_vocab)
            for member, result in zip(members, results, strict=True):
                per_sequence[member] = result
            bar.update(sum(len(arrays[i]) for i in members))
    return per_sequence, vocab_size


def _write_shard(
    directory: Path,
    shard_index: int,
    first_sequence: int,
    positions: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    codec: TopKCodec,
    tokenization: dict[str, np.ndarray] | None = None,
) -> ShardInfo:
    values = torch.cat([p[0] for p in positions])
    indices = torch.cat([p[1] for p in positions])
    tails = torch.cat([p[2] for p in positions])
    data = serialize_shard(codec.encode(values, indices, tails), [len(p[0]) for p in positions], tokenization)
    name = shard_file_name(shard_index)
    write_private_atomic(directory / name, data)
    return ShardInfo(
        file=name,
        first_sequence=first_sequence,
        n_sequences=len(positions),
        n_tokens=int(values.shape[0]),
        sha256=sha256_hex(data),
        bytes=len(data),
    )
