"""Errors raised by the logit cache. All are ValueErrors: they describe bad input, not bugs."""

from __future__ import annotations

REBUILD_HINT = (
    "rebuild the cache: delete its directory and run the same `secure-kd distill` job again "
    "(kd.teacher_targets: cache builds it), or call secure_kd.cache.build_cache"
)


class CacheError(ValueError):
    """Base class of every logit-cache error."""


class CacheMismatchError(CacheError):
    """The cache was built for another tokenizer, dataset, teacher, k or build configuration."""


class CacheCorruptionError(CacheError):
    """A cache file is damaged or was altered: wrong checksum, truncated, or malformed."""


class CacheIncompleteError(CacheError):
    """The cache build was interrupted; resume it by running the same build again."""
