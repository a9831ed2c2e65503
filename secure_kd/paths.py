"""Where secure-kd keeps downloaded assets and converted models, atomic file writes, private directories.

Private outputs (checkpoints, results.json, privacy.json, an organization's directory, exported
records) are files of mode 0600 in directories of mode 0700: `private_dir` creates such a directory
or tightens an existing one, `atomic_write_text(..., mode=PRIVATE_FILE_MODE)` writes such a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def home_dir() -> Path:
    """`$SECURE_KD_HOME`, else `~/.cache/secure-kd`."""
    return Path(os.environ.get("SECURE_KD_HOME", Path.home() / ".cache" / "secure-kd")).expanduser()


def private_dir(path: str | Path) -> Path:
    """Create `path` (and its parents) if needed and restrict it to its owner (0700), also if it existed."""
    path = Path(path)
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    if path.is_symlink() or not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory: give a directory for private files")
    os.chmod(path, PRIVATE_DIR_MODE)  # mkdir's mode is narrowed by the umask and never applies to what exists
    return path


def chmod_private_tree(root: str | Path) -> None:
    """Every directory under `root` (included) 0700, every file 0600 (no symlinks are followed)."""
    root = Path(root)
    for directory, _dirs, files in os.walk(root):
        os.chmod(directory, PRIVATE_DIR_MODE)
        for name in files:
            path = Path(directory) / name
            if not path.is_symlink():
                os.chmod(path, PRIVATE_FILE_MODE)


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
