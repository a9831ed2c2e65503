"""Offline teacher logit cache: run the teacher once, store its top-k log-probabilities.

    manifest = build_cache(teacher, sequences, "cache/", k=64, teacher_id=...,
                           tokenizer_fingerprint=tokenizer_fingerprint(tok))
    cache = LogitCache.open("cache/", expect_tokenizer=..., expect_dataset=...)
    targets = cache.batch([0, 1, 2])      # TopKLogits [3, seq, 64]

Position t of a sequence holds the teacher's distribution over token t+1 given tokens <= t.
Token ids are stored exactly; log-probabilities with an 8-bit non-uniform quantizer (mean KL
to the exact renormalized top-k ~3e-4 at k=64); about 108 bytes per position at k=64 and
vocab 49,152 on realistic synthetic logits (benchmarks/cache.py).

A cache for a student with another tokenizer (`build_cache(..., byte_spans=, text_fingerprint=)`)
also stores the teacher's token ids and their byte spans in the shared text, so the student aligns
with it without the teacher (`LogitCache.teacher_tokens`, `secure_kd.cross_teacher.CachedCrossTeacher`);
those token ids are the training text itself. `vocab_size=` drops a padded teacher's extra columns.

A cache of teacher outputs on private data is private data: directory 0700, files 0600.
"""

from secure_kd.cache.builder import build_cache, plan_shards
from secure_kd.cache.codec import CODEC_NAME, CodecParams, TopKCodec
from secure_kd.cache.errors import CacheCorruptionError, CacheError, CacheIncompleteError, CacheMismatchError
from secure_kd.cache.manifest import CacheManifest, ShardInfo, read_manifest
from secure_kd.cache.quantizer import LogProbQuantizer
from secure_kd.cache.reader import LogitCache
from secure_kd.cache.synthetic import SyntheticLogitShape, SyntheticTeacher, synthetic_logits

__all__ = [
    "CODEC_NAME",
    "CacheCorruptionError",
    "CacheError",
    "CacheIncompleteError",
    "CacheManifest",
    "CacheMismatchError",
    "CodecParams",
    "LogProbQuantizer",
    "LogitCache",
    "ShardInfo",
    "SyntheticLogitShape",
    "SyntheticTeacher",
    "TopKCodec",
    "build_cache",
    "plan_shards",
    "read_manifest",
    "synthetic_logits",
]
