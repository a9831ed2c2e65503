"""The privacy ledger of one private dataset, on disk, shared by every run and federated round.

One JSON file per dataset key (by default a fingerprint of the records) under
`$SECURE_KD_HOME/privacy-ledgers/` or a directory of your choice. Each entry is one stretch of
DP-SGD on that dataset: a training run (updated in place as it advances; resuming from a checkpoint
continues the same entry, so epsilon after a resume equals that of an uninterrupted run) or a
federated round. Epsilon is always recomputed by an Opacus accountant from all entries together.

Writes take an exclusive lock on `<key>.json.lock` and replace the file atomically; a ledger that
cannot be read is an error, never silently reset (that would forget spent privacy).

Federation layer, per round of DP training done outside `DPDistiller`:

    ledger = Ledger.open(dataset_key, directory)
    ledger.record(noise_multiplier=sigma, sample_rate=q, steps=local_steps, kind="federated_round",
                  entry_id=f"{run_id}-round-{r}")   # idempotent if the round is retried
    eps = ledger.epsilon(delta)
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from secure_kd.dp.accounting import History, epsilon, epsilons
from secure_kd.dp.config import LEDGER_KEY_PATTERN
from secure_kd.fingerprint import text_dataset_fingerprint
from secure_kd.paths import atomic_write_json, home_dir

try:
    import fcntl
except ImportError:  # Windows: atomic replace still holds, concurrent writers are not serialized
    fcntl = None  # type: ignore[assignment]

LEDGER_SCHEMA_VERSION = 1
MAX_LEDGER_BYTES = 16 * 1024 * 1024


class LedgerError(ValueError):
    """A ledger file is unreadable or an update contradicts it."""


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
    created: str
    updated: str


class LedgerFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = LEDGER_SCHEMA_VERSION
    key: str
    entries: list[LedgerEntry] = []


def default_ledger_dir() -> Path:
    return home_dir() / "privacy-ledgers"


def dataset_key(texts: Sequence[str]) -> str:
    """The default ledger key: sha256 of the records' texts, sorted, so order and tokenizer do not matter."""
    return text_dataset_fingerprint(sorted(texts))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Ledger:
    """What one private dataset has spent. Every read goes to disk, so concurrent writers are seen."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = Path(path), key

    @classmethod
    def open(cls, key: str, directory: str | Path | None = None) -> Ledger:
        if not LEDGER_KEY_PATTERN.match(key):
            raise LedgerError(
                f"ledger key {key!r} must be 1-128 letters, digits, '.', '_' or '-' (it names a file)"
            )
        root = Path(directory).expanduser() if directory is not None else default_ledger_dir()
        return cls(root / f"{key}.json", key)

    # -- reading -------------------------------------------------------------------------------------
    def _read(self) -> LedgerFile:
        if not self.path.exists():
            return LedgerFile(key=self.key)
        if self.path.stat().st_size > MAX_LEDGER_BYTES:
            raise LedgerError(
                f"privacy ledger {self.path} is larger than {MAX_LEDGER_BYTES} bytes; refusing to read it"
            )
        try:
            data = LedgerFile.model_validate(json.loads(self.path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, ValidationError, UnicodeDecodeError) as exc:
            raise LedgerError(
                f"privacy ledger {self.path} is unreadable ({exc.__class__.__name__}); it records privacy "
                "already spent, so it is never reset automatically: restore it from a backup, or move it "
                "away knowingly (every earlier run on this dataset is then unaccounted for)"
            ) from None
        if data.key != self.key:
            raise LedgerError(f"privacy ledger {self.path} belongs to key {data.key!r}, not {self.key!r}")
        if data.schema_version != LEDGER_SCHEMA_VERSION:
            raise LedgerError(
                f"privacy ledger {self.path} has schema {data.schema_version}, this version reads "
                f"{LEDGER_SCHEMA_VERSION}"
            )
        return data

    def entries(self) -> list[LedgerEntry]:
        return list(self._read().entries)

    def history(self, *, exclude: str | None = None) -> History:
        """Opacus' history format, in ledger order; `exclude` leaves one entry out (a run's own)."""
        return [
            (e.noise_multiplier, e.sample_rate, e.steps)
            for e in self.entries()
            if e.steps > 0 and e.entry_id != exclude
        ]

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        return epsilon(self.history(), delta, accountant)

    def epsilons(self, delta: float) -> dict[str, float | None]:
        return epsilons(self.history(), delta)

    def total_steps(self) -> int:
        return sum(e.steps for e in self.entries())

    # -- writing -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            yield
            return
        with open(self.path.with_name(self.path.name + ".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def record(
        self,
        *,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        kind: Literal["run", "federated_round", "external"] = "external",
        label: str = "",
        entry_id: str | None = None,
        max_grad_norm: float | None = None,
        n_records: int | None = None,
    ) -> str:
        """Add an entry, or advance an existing one (`entry_id`) to `steps`; returns the entry id.

        Advancing keeps the larger step count, so replaying steps after a resume, or recording a
        retried federated round again, never counts them twice and never forgets any. An existing
        entry must keep its noise multiplier and sample rate.
        """
        if steps < 0:
            raise LedgerError(f"steps must be >= 0, got {steps}")
        with self._locked():
            data = self._read()
            now = _now()
            found = next((e for e in data.entries if entry_id is not None and e.entry_id == entry_id), None)
            resolved = entry_id or uuid.uuid4().hex
            if found is None:
                data.entries.append(
                    LedgerEntry(
                        entry_id=resolved,
                        kind=kind,
                        label=label,
                        noise_multiplier=noise_multiplier,
                        sample_rate=sample_rate,
                        steps=steps,
                        max_grad_norm=max_grad_norm,
                        n_records=n_records,
                        created=now,
                        updated=now,
                    )
                )
            else:
                if (found.noise_multiplier, found.sample_rate) != (noise_multiplier, sample_rate):
                    raise LedgerError(
                        f"ledger entry {resolved} was recorded with noise_multiplier="
                        f"{found.noise_multiplier}, sample_rate={found.sample_rate}; it cannot continue with "
                        f"{noise_multiplier}, {sample_rate}: record a new entry instead"
                    )
                if steps > found.steps:
                    found.steps, found.updated = steps, now
            atomic_write_json(self.path, data.model_dump(mode="json"), mode=0o600)
        return resolved
