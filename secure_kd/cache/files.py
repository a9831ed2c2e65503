"""Private, atomic, size-bounded file access for the cache directory.

A cache of teacher outputs on private data is itself private data: the directory is created
with mode 0700 and every file with mode 0600, whatever the umask. Files are written to a
temporary name in the same directory, flushed, then renamed, so a reader never sees half a
file. Reads are bounded before anything is parsed.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

import numpy as np
import safetensors.numpy

from secure_kd.cache.errors import REBUILD_HINT, CacheCorruptionError

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
MAX_SAFETENSORS_HEADER_BYTES = 1 << 20
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.\d+\.tmp$")


def make_private_dir(path: Path) -> None:
    """Create `path` (and parents) if needed and restrict it to its owner (0700)."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    if not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    os.chmod(path, PRIVATE_DIR_MODE)


def temp_name_target(name: str) -> str | None:
    """The file a leftover temporary file was meant to become, or None if `name` is not one."""
    match = _TEMP_NAME.match(name)
    return match.group("target") if match else None


def write_private_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600: temporary file, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)  # the umask may have narrowed it; never widen past 0600
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_bounded(path: Path, max_bytes: int, *, what: str) -> bytes:
    """Read a regular file of at most `max_bytes` bytes; larger or special files are refused."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CacheCorruptionError(f"{what} {path} is missing; {REBUILD_HINT}") from None
    if not stat.S_ISREG(info.st_mode):
        raise CacheCorruptionError(f"{what} {path} is not a regular file")
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise CacheCorruptionError(f"{what} {path} is larger than the {max_bytes} bytes allowed for it")
    return data


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_safetensors(data: bytes, *, source: str, expected: dict[str, np.dtype]) -> dict[str, np.ndarray]:
    """Parse an in-memory safetensors file holding exactly the 1-D tensors named in `expected`.

    The header length is checked against the data before the header is parsed, and tensor
    sizes are bounded by the data itself, so a hostile file cannot request more memory
    than it occupies.
    """
    if len(data) < 8:
        raise CacheCorruptionError(f"{source}: truncated (no safetensors header)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > MAX_SAFETENSORS_HEADER_BYTES or 8 + header_len > len(data):
        raise CacheCorruptionError(f"{source}: invalid safetensors header length {header_len}")
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as exc:  # safetensors raises its own error types for malformed data
        raise CacheCorruptionError(f"{source}: not a valid safetensors file ({exc})") from None
    if set(tensors) != set(expected):
        raise CacheCorruptionError(f"{source}: holds tensors {sorted(tensors)}, expected {sorted(expected)}")
    for name, dtype in expected.items():
        if tensors[name].dtype != dtype or tensors[name].ndim != 1:
            raise CacheCorruptionError(f"{source}: tensor {name!r} must be 1-D {np.dtype(dtype).name}")
    return tensors
