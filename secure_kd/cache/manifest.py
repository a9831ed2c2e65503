"""The cache manifest: what was cached, with which teacher, tokenizer and codec, and where.

`manifest.json` is validated by pydantic with unknown keys refused. It lists every shard with
its sequence range, size and sha256; during a build it is rewritten after each shard, so an
interrupted build can resume from the shards it lists (`complete` is false until the end).

A cache for a student with another tokenizer (`teacher_tokenization` set) also stores, per position,
the teacher's token id and that token's byte span in the text both tokenizers share, so the student
can align its own tokenization with the cached one without the teacher. `logits_width` records a
teacher whose output layer is wider than its tokenizer (padding columns, trimmed before the top-k).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from secure_kd.cache.codec import CodecParams
from secure_kd.cache.errors import REBUILD_HINT, CacheCorruptionError
from secure_kd.cache.files import read_bounded, write_private_atomic

MANIFEST_NAME = "manifest.json"
CACHE_FORMAT = "secure-kd-logit-cache"
SCHEMA_VERSION = 1
MAX_MANIFEST_BYTES = 64 << 20
SHARD_FILE_PATTERN = r"^shard-[0-9]{5,}\.safetensors$"


def shard_file_name(shard_index: int) -> str:
    return f"shard-{shard_index:05d}.safetensors"


class ShardInfo(BaseModel):
    """One shard: sequences [first_sequence, first_sequence + n_sequences) of the dataset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(pattern=SHARD_FILE_PATTERN, description="file name inside the cache directory")
    first_sequence: int = Field(ge=0)
    n_sequences: int = Field(ge=1)
    n_tokens: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(gt=0)

    @property
    def stop_sequence(self) -> int:
        return self.first_sequence + self.n_sequences


class TeacherTokenization(BaseModel):
    """The teacher's tokenization stored next to its top-k (shard tensors `token_ids`, `byte_spans`).

    token_ids[t] is the teacher's token at position t (so the target of position t is token t + 1);
    byte_spans[t] its [start, end) in the UTF-8 bytes of the shared text, (-1, -1) outside it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    text_fingerprint: str = Field(
        min_length=1, description="sha256 of the shared texts the byte spans index (secure_kd.data.paired)"
    )


class CacheManifest(BaseModel):
    """Everything needed to check that a cache fits a training run, and to read it."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["secure-kd-logit-cache"] = CACHE_FORMAT
    schema_version: Literal[1] = SCHEMA_VERSION
    teacher_id: str = Field(min_length=1)
    tokenizer_fingerprint: str = Field(min_length=1)
    dataset_fingerprint: str = Field(min_length=1)
    alignment: Literal["next-token"] = Field(
        "next-token",
        description="position t holds the teacher's distribution over token t+1 given tokens <= t "
        "(the teacher's logits[:, t])",
    )
    k: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    n_sequences: int = Field(ge=1)
    n_tokens: int = Field(ge=1)
    shard_tokens: int = Field(ge=1, description="target number of positions per shard")
    codec: CodecParams
    shards: list[ShardInfo]
    complete: bool
    teacher_check: dict[str, Any] | None = Field(
        None,
        description="a teacher's record of itself, checked on every build (a served teacher: its answers "
        "on a probe text, the KL to an in-process reference, tokens/s; secure_kd.served.teacher)",
    )
    teacher_tokenization: TeacherTokenization | None = Field(
        None, description="set when the shards also hold the teacher's token ids and byte spans"
    )
    logits_width: int | None = Field(
        None, ge=1, description="the teacher's logits width when padding columns past vocab_size were trimmed"
    )

    @model_validator(mode="after")
    def _consistent(self) -> CacheManifest:
        if self.k > self.vocab_size:
            raise ValueError(f"k={self.k} exceeds vocab_size={self.vocab_size}")
        if self.logits_width is not None and self.logits_width < self.vocab_size:
            raise ValueError(f"logits_width={self.logits_width} is below vocab_size={self.vocab_size}")
        previous_stop = 0
        for shard in self.shards:
            if shard.first_sequence < previous_stop:
                raise ValueError("shards must be sorted by first_sequence and must not overlap")
            previous_stop = shard.stop_sequence
        if previous_stop > self.n_sequences:
            raise ValueError(f"shards cover sequences past n_sequences={self.n_sequences}")
        if len({shard.file for shard in self.shards}) != len(self.shards):
            raise ValueError("two shards share a file name")
        if self.complete:
            covered = sum(shard.n_sequences for shard in self.shards)
            tokens = sum(shard.n_tokens for shard in self.shards)
            if covered != self.n_sequences or tokens != self.n_tokens:
                raise ValueError(
                    f"a complete cache must cover all {self.n_sequences} sequences and {self.n_tokens} "
                    f"tokens; its shards cover {covered} and {tokens}"
                )
        return self

    @property
    def total_bytes(self) -> int:
        """Bytes of all shard files (the manifest itself excluded)."""
        return sum(shard.bytes for shard in self.shards)

    @property
    def bytes_per_token(self) -> float:
        """Shard bytes per stored position."""
        stored = sum(shard.n_tokens for shard in self.shards)
        return self.total_bytes / stored if stored else 0.0


def manifest_path(directory: Path) -> Path:
    return Path(directory) / MANIFEST_NAME


def read_manifest(directory: str | Path) -> CacheManifest:
    """Load and validate `<directory>/manifest.json`; errors name the problem and the fix."""
    path = manifest_path(Path(directory))
    if not path.exists():
        raise FileNotFoundError(
            f"no logit cache at {directory} ({MANIFEST_NAME} not found); "
            "build one with `secure-kd distill` and kd.teacher_targets: cache, or secure_kd.cache.build_cache"
        )
    data = read_bounded(path, MAX_MANIFEST_BYTES, what="cache manifest")
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheCorruptionError(f"{path}: not valid JSON ({exc}); rebuild the cache") from None
    try:
        return CacheManifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(top level)'}: {error['msg']}"
            for error in exc.errors()
        )
        raise CacheCorruptionError(
            f"{path} is not a valid logit-cache manifest ({problems}). It was edited, damaged or written "
            f"by another version of secure-kd; {REBUILD_HINT}"
        ) from None


def write_manifest(directory: Path, manifest: CacheManifest) -> None:
    write_private_atomic(manifest_path(directory), manifest.model_dump_json(indent=2).encode("utf-8"))
