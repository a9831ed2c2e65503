"""The privacy ledger of one private dataset, on disk, shared by every run and federated round.

One file per dataset (`secure_kd.dp.ledger_file`: hash-chained JSON lines, mode 0600) under
`$SECURE_KD_HOME/privacy-ledgers/` or a directory of your choice. Its key is by default the
fingerprint of the dataset's records before any split (so a new seed, held-out fraction or
`max_records` draws on the same budget); a user-supplied key is accepted only for the data it was
first used with, and no dataset gets two ledgers in one directory (`Ledger.open` refuses both). Each
entry is one stretch of DP-SGD on that dataset: a training run (advanced as it goes; resuming from a
checkpoint continues the same entry, so epsilon after a resume equals that of an uninterrupted run)
or a federated round. Epsilon is always recomputed by an Opacus accountant from all entries together.

Every write holds an exclusive lock on `<key>.jsonl.lock` and replaces the file atomically. A DP run
reserves each step with `reserve` before the step's noise is drawn: the budget check and the write
happen under the one lock, so concurrent runs on a dataset never exceed its budget together. A
ledger that cannot be read or fails its chain is an error, never silently reset (that would forget
spent privacy).

Federation layer, per round of DP training done outside `DPDistiller`:

    ledger = Ledger.open(dataset_key, directory)
    ledger.record(noise_multiplier=sigma, sample_rate=q, steps=local_steps, kind="federated_round",
                  entry_id=f"{run_id}-round-{r}")   # idempotent if the round is retried
    eps = ledger.epsilon(delta)
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from secure_kd.dp import ledger_file
from secure_kd.dp.accounting import History, epsilon, epsilons
from secure_kd.dp.config import LEDGER_KEY_PATTERN, check_ledger_dir
from secure_kd.dp.ledger_file import LedgerEntry, LedgerError, LedgerFile
from secure_kd.fingerprint import text_dataset_fingerprint
from secure_kd.paths import home_dir

try:
    import fcntl
except ImportError:  # Windows: atomic replace still holds, concurrent writers are not serialized
    fcntl = None  # type: ignore[assignment]

LEDGER_SUFFIX = ".jsonl"

__all__ = ["Ledger", "LedgerEntry", "LedgerError", "dataset_key", "default_ledger_dir"]


def default_ledger_dir() -> Path:
    return home_dir() / "privacy-ledgers"


def dataset_key(texts: Sequence[str]) -> str:
    """The default ledger key: sha256 of the records' texts, sorted, so order and tokenizer do not matter.

    Give it every record of the dataset before any train/held-out split or truncation: the split is
    seed-dependent, and a ledger keyed on one side of it would start afresh with every new seed."""
    return text_dataset_fingerprint(sorted(texts))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _short(fingerprint: str) -> str:
    return fingerprint[:12]


class Ledger:
    """What one private dataset has spent. Every read goes to disk, so concurrent writers are seen."""

    def __init__(self, path: Path, key: str, data_fingerprint: str | None = None) -> None:
        self.path, self.key, self.data_fingerprint = Path(path), key, data_fingerprint

    @classmethod
    def open(
        cls, key: str, directory: str | Path | None = None, *, data_fingerprint: str | None = None
    ) -> Ledger:
        """The ledger `key` in `directory`; with `data_fingerprint` (the `dataset_key` of the records
        trained on), refuse a ledger that names other data and a second ledger for the same data."""
        if not LEDGER_KEY_PATTERN.match(key):
            raise LedgerError(
                f"ledger key {key!r} must be 1-128 letters, digits, '.', '_' or '-' (it names a file)"
            )
        if directory is not None:
            check_ledger_dir(str(directory), LedgerError)
        root = Path(directory).expanduser() if directory is not None else default_ledger_dir()
        ledger = cls(root / f"{key}{LEDGER_SUFFIX}", key, data_fingerprint)
        if data_fingerprint is not None:
            ledger._check_names_this_data()
        return ledger

    @property
    def _legacy_path(self) -> Path:
        return self.path.with_name(f"{self.key}.json")  # schema 1

    def _check_names_this_data(self) -> None:
        fingerprint = self.data_fingerprint
        own = self._read()
        if own.data_fingerprint is not None and own.data_fingerprint != fingerprint:
            raise LedgerError(
                f"privacy.ledger_key {self.key!r} is the ledger of other records (fingerprint "
                f"{_short(own.data_fingerprint)}..., {self.path}), not of these "
                f"({_short(fingerprint)}...): a ledger counts the privacy spent on one dataset. Omit "
                "ledger_key (the default key is the records' fingerprint), or choose a key of its own for "
                "this dataset"
            )
        if not self.path.parent.is_dir():
            return
        for other in sorted(self.path.parent.glob(f"*{LEDGER_SUFFIX}")):
            if other == self.path:
                continue
            header = ledger_file.read_header(other)
            if header is not None and header.data_fingerprint == fingerprint and header.key != self.key:
                hint = (
                    "omit ledger_key"
                    if header.key == fingerprint
                    else f"set privacy.ledger_key: {header.key}"
                )
                raise LedgerError(
                    f"these records (fingerprint {_short(fingerprint)}...) already have a privacy ledger, "
                    f"{other} (key {header.key!r}); a second ledger would start their budget afresh. "
                    f"Use that one: {hint}"
                )

    # -- reading -------------------------------------------------------------------------------------
    def _read(self) -> LedgerFile:
        data = ledger_file.read(self.path, self._legacy_path)
        if data is None:
            return LedgerFile(key=self.key, data_fingerprint=self.data_fingerprint)
        if data.key != self.key:
            raise LedgerError(
                f"privacy ledger {self.path} belongs to key {data.key!r}, not {self.key!r}: it was renamed "
                f"or copied; give it back its name ({data.key}{LEDGER_SUFFIX})"
            )
        return data

    def entries(self) -> list[LedgerEntry]:
        return list(self._read().entries)

    def history(self, *, exclude: str | None = None) -> History:
        """Opacus' history format, in ledger order; `exclude` leaves one entry out (a run's own)."""
        return _history(self.entries(), exclude)

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        return epsilon(self.history(), delta, accountant)

    def epsilons(self, delta: float) -> dict[str, float | None]:
        return epsilons(self.history(), delta)

    def total_steps(self) -> int:
        return sum(e.steps for e in self.entries())

    # -- writing -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if not self.path.parent.is_dir():
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if fcntl is None:
            yield
            return
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _write(self, data: LedgerFile) -> None:
        if data.data_fingerprint is None:
            data.data_fingerprint = self.data_fingerprint
        ledger_file.write(self.path, data)
        if self._legacy_path.exists():  # converted to schema 2: keep the old file, out of the way
            os.replace(self._legacy_path, self._legacy_path.with_name(self._legacy_path.name + ".migrated"))

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
        sampling: Literal["poisson", "shuffle"] | None = None,
        unit: Literal["record", "user"] | None = None,
        n_users: int | None = None,
        max_records_per_user: int | None = None,
        user_grouping: str | None = None,
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
                        sampling=sampling,
                        unit=unit,
                        n_users=n_users,
                        max_records_per_user=max_records_per_user,
                        user_grouping=user_grouping,
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
            self._write(data)
        return resolved

    def reserve(self, entry_id: str, steps: int, fits: Callable[[History, int], bool] | None = None) -> bool:
        """Advance entry `entry_id` to `steps` if `fits(history of the other entries, steps)`; under the lock.

        Returns True when the entry holds at least `steps` afterwards (already, after a resume, or now),
        False, writing nothing, when the budget check refuses. Reading the ledger, checking the budget
        and writing happen under one lock, so two runs cannot both take the last step that fits.
        """
        with self._locked():
            data = self._read()
            found = next((e for e in data.entries if e.entry_id == entry_id), None)
            if found is None:
                raise LedgerError(f"privacy ledger {self.path} has no entry {entry_id!r} to reserve steps in")
            if steps <= found.steps:
                return True
            if fits is not None and not fits(_history(data.entries, entry_id), steps):
                return False
            found.steps, found.updated = steps, _now()
            self._write(data)
        return True


def _history(entries: list[LedgerEntry], exclude: str | None) -> History:
    return [
        (e.noise_multiplier, e.sample_rate, e.steps) for e in entries if e.steps > 0 and e.entry_id != exclude
    ]
