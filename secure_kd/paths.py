"""Where secure-kd keeps downloaded assets and converted models, and atomic file writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def home_dir() -> Path:
    """`$SECURE_KD_HOME`, else `~/.cache/secure-kd`."""
    return Path(os.environ.get("SECURE_KD_HOME", Path.home() / ".cache" / "secure-kd")).expanduser()


def atomic_write_text(path: Path, text: str, *, mode: int = 0o644) -> None:
    """Write `text` to a temp file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write `data` to a fresh temp file beside `path` (a random name created with O_EXCL and mode
    0600, so nothing planted at a fixed name is followed or read early), fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj, *, mode: int = 0o644) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", mode=mode)
