"""The on-disk form of a privacy ledger: hash-chained JSON lines, verified on every read.

`<key>.jsonl`, mode 0600, one JSON object per line:

    {"header": {"format": "secure-kd privacy ledger", "schema_version": 2, "key": ...,
                "data_fingerprint": ...}, "prev": "000...0"}        (one line in the file)
    {"entry": {...one run or federated round...}, "prev": "<sha256 of the line above>"}
    ...
    {"end": {"entries": <number of entry lines>}, "prev": "<sha256 of the line above>"}

Every line carries the sha256 of the line before it and the last line closes the file, so editing a
number, deleting, reordering or duplicating a line, truncating the file or appending to it breaks
the chain, and the ledger is refused with the line that fails. The chain has no secret: someone who
recomputes the hashes after an edit, or deletes the file, is not detected (docs/privacy.md says what
the ledger protects against). The whole file is rewritten to a temporary name and renamed, so a crash
never leaves half a ledger.

Schema 1 (`<key>.json`, one JSON document, no chain) is still read; the next write converts it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from secure_kd.paths import atomic_write_text

LEDGER_FORMAT = "secure-kd privacy ledger"
LEDGER_SCHEMA_VERSION = 2
MAX_LEDGER_BYTES = 16 * 1024 * 1024
MAX_HEADER_BYTES = 4096
GENESIS = "0" * 64


class LedgerError(ValueError):
    """A ledger file is unreadable, fails its integrity check, or an update contradicts it."""


class LedgerEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entry_id: str
    kind: Literal["run", "federated_round", "external"] = "external"
    label: str = ""
    noise_multiplier: float = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=0)
    max_grad_norm: float | None = None
    n_records: int | None = None
    sampling: Literal["poisson", "shuffle"] | None = None
    # user-level DP (secure_kd.dp.user_level): the unit (None = record), and for users their number,
    # the records per user per step and a fingerprint of the grouping of records into users
    unit: Literal["record", "user"] | None = None
    n_users: int | None = None
    max_records_per_user: int | None = None
    user_grouping: str | None = None
    created: str
    updated: str


_USER_FIELDS = ("unit", "n_users", "max_records_per_user", "user_grouping")


def _entry_body(entry: LedgerEntry) -> dict:
    """An entry as written: the user-level fields only when set, so record-level lines keep their form."""
    body = entry.model_dump(mode="json")
    for name in _USER_FIELDS:
        if body[name] is None:
            del body[name]
    return body


class LedgerHeader(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["secure-kd privacy ledger"] = LEDGER_FORMAT
    schema_version: int = LEDGER_SCHEMA_VERSION
    key: str
    data_fingerprint: str | None = None


class LedgerEnd(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entries: int = Field(ge=0)


class LedgerFile(BaseModel):
    """What a ledger holds, once its chain is verified."""

    key: str
    data_fingerprint: str | None = None
    entries: list[LedgerEntry] = []


class _Line(BaseModel):
    model_config = ConfigDict(extra="forbid")

    header: LedgerHeader | None = None
    entry: LedgerEntry | None = None
    end: LedgerEnd | None = None
    prev: str


class _LegacyFile(BaseModel):  # schema 1
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1]
    key: str
    entries: list[LedgerEntry] = []


def _digest(line: str) -> str:
    return hashlib.sha256(line.encode("utf-8")).hexdigest()


def _dump(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def encode(data: LedgerFile) -> str:
    """The chained text of `data`: header, one line per entry, end."""
    header = LedgerHeader(key=data.key, data_fingerprint=data.data_fingerprint)
    bodies = [{"header": header.model_dump(mode="json")}]
    bodies += [{"entry": _entry_body(e)} for e in data.entries]
    bodies.append({"end": {"entries": len(data.entries)}})
    lines, prev = [], GENESIS
    for body in bodies:
        line = _dump({**body, "prev": prev})
        lines.append(line)
        prev = _digest(line)
    return "\n".join(lines) + "\n"


def broken(path: Path, where: str) -> LedgerError:
    return LedgerError(
        f"privacy ledger {path} fails its integrity check ({where}): it was edited, truncated or "
        "corrupted outside secure-kd. It records privacy already spent, so it is never repaired or "
        "reset automatically. Restore it from a backup. Only if none exists: move it away knowingly "
        f"(e.g. to {path.name}.broken): every earlier run on this dataset is then unaccounted for, "
        "so lower target_epsilon by what they spent"
    )


def decode(text: str, path: Path) -> LedgerFile:
    """Verify the chain of a schema-2 ledger and return its contents; LedgerError naming the line."""
    if not text.endswith("\n"):
        raise broken(path, "the last line is incomplete")
    lines = text[:-1].split("\n")
    prev, parsed = GENESIS, []
    for number, line in enumerate(lines, start=1):
        try:
            item = _Line.model_validate(json.loads(line))
        except (json.JSONDecodeError, ValidationError):
            raise broken(path, f"line {number} is not a ledger line") from None
        if item.prev != prev:
            raise broken(path, f"line {number} does not chain to line {number - 1}")
        parsed.append(item)
        prev = _digest(line)
    kinds = ["header" if i.header else "entry" if i.entry else "end" if i.end else "?" for i in parsed]
    if len(parsed) < 2 or kinds[0] != "header" or kinds[-1] != "end" or set(kinds[1:-1]) - {"entry"}:
        raise broken(path, "it is not one header, entry lines and one end line")
    if sum(1 for i in parsed if i.header or i.end) != 2 or any(
        sum(x is not None for x in (i.header, i.entry, i.end)) != 1 for i in parsed
    ):
        raise broken(path, "a line holds more than one part")
    entries = [i.entry for i in parsed[1:-1]]
    if parsed[-1].end.entries != len(entries):
        raise broken(
            path, f"the end line counts {parsed[-1].end.entries} entries, the file has {len(entries)}"
        )
    ids = [e.entry_id for e in entries]
    if len(set(ids)) != len(ids):
        raise broken(path, "an entry appears twice")
    header = parsed[0].header
    if header.schema_version != LEDGER_SCHEMA_VERSION:
        raise LedgerError(
            f"privacy ledger {path} has schema {header.schema_version}; this version of secure-kd reads "
            f"{LEDGER_SCHEMA_VERSION}: use the secure-kd version that wrote it"
        )
    return LedgerFile(key=header.key, data_fingerprint=header.data_fingerprint, entries=entries)


def _bounded_text(path: Path) -> str:
    if path.stat().st_size > MAX_LEDGER_BYTES:
        raise LedgerError(
            f"privacy ledger {path} is larger than {MAX_LEDGER_BYTES} bytes; refusing to read it"
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise broken(path, "it is not UTF-8 text") from None


def read(path: Path, legacy: Path | None = None) -> LedgerFile | None:
    """The verified contents of `path`, or of the schema-1 file `legacy`; None when neither exists."""
    if path.exists():
        return decode(_bounded_text(path), path)
    if legacy is None or not legacy.exists():
        return None
    try:
        old = _LegacyFile.model_validate(json.loads(_bounded_text(legacy)))
    except (json.JSONDecodeError, ValidationError):
        raise LedgerError(
            f"privacy ledger {legacy} is unreadable: it records privacy already spent, so it is never "
            "reset automatically: restore it from a backup, or move it away knowingly (every earlier run "
            "on this dataset is then unaccounted for)"
        ) from None
    return LedgerFile(key=old.key, entries=old.entries)


def read_header(path: Path) -> LedgerHeader | None:
    """The first line of a schema-2 ledger (to find which data a ledger names), None if not one."""
    try:
        with open(path, encoding="utf-8") as handle:
            first = handle.readline(MAX_HEADER_BYTES)
        return _Line.model_validate(json.loads(first)).header
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValidationError):
        return None


def write(path: Path, data: LedgerFile) -> None:
    atomic_write_text(path, encode(data), mode=0o600)
