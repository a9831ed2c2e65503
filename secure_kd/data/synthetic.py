"""A seeded synthetic corpus with PII spans and Secret-Sharer canaries (Carlini et al., 2019).

Records are Faker-made business documents (see `documents.py`). Canaries are sentences of a fixed
format, "The access code for {name} is {secret}.", whose secret is `secret_digits` random digits,
so the whole secret space (10**digits candidates) can be enumerated and a model's exposure to each
canary measured (`secure_kd.metrics.exposure`). Each canary is inserted a known number of times at
seeded places, recorded in `corpus.canaries`.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from faker import Faker

from secure_kd.data.documents import TOPICS, DocumentBuilder, make_document
from secure_kd.fingerprint import text_dataset_fingerprint
from secure_kd.paths import atomic_write_text

if TYPE_CHECKING:
    import datasets

DEFAULT_CANARY_FORMAT = "The access code for {name} is {secret}."
CANARY_TOPIC = "canary"
_SIDECAR_KIND = "secure-kd/synthetic-corpus-canaries"
_SIDECAR_VERSION = 1


@dataclass(frozen=True)
class Canary:
    """One inserted canary: `text == prefix + secret + <rest of the format>`.

    record_ids: the `record_id` of every record that holds it (one per insertion).
    repeats:    how many times it was inserted (`len(record_ids)`).
    """

    prefix: str
    secret: str
    text: str
    record_ids: tuple[int, ...]
    repeats: int

    @property
    def secret_index(self) -> int:
        """Position of `secret` in `SecretSpace` order (the digits read as a number)."""
        return int(self.secret)


class SecretSpace(Sequence[str]):
    """All `digits`-digit strings in increasing order ("000", "001", ..., "999"), computed lazily."""

    def __init__(self, digits: int) -> None:
        if digits < 1:
            raise ValueError(f"secret_digits must be >= 1, got {digits}")
        self.digits = digits

    def __len__(self) -> int:
        return 10**self.digits

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"secret index {index} out of range for {self.digits} digits")
        return f"{index:0{self.digits}d}"

    def index(self, secret: str, start: int = 0, stop: int | None = None) -> int:  # type: ignore[override]
        if len(secret) != self.digits or not secret.isdigit():
            raise ValueError(f"{secret!r} is not a {self.digits}-digit secret")
        return int(secret)

    def __contains__(self, secret: object) -> bool:
        return isinstance(secret, str) and len(secret) == self.digits and secret.isdigit()


@dataclass
class SyntheticCorpus:
    """Records `{"text", "pii_spans": [{"start", "end", "type"}], "record_id", "topic"}` and canaries.

    `record_id` is a record's identity (stable across `split`); `topic` is its template family,
    or "canary" for a canary inserted as a record of its own.
    """

    records: list[dict[str, Any]]
    canaries: list[Canary] = field(default_factory=list)
    secret_digits: int = 4
    canary_format: str = DEFAULT_CANARY_FORMAT
    seed: int | None = None

    def __len__(self) -> int:
        return len(self.records)

    def texts(self) -> list[str]:
        return [record["text"] for record in self.records]

    def secret_space(self) -> SecretSpace:
        """Every candidate secret, in order; `canary.secret_index` is the canary's position in it."""
        return SecretSpace(self.secret_digits)

    def candidate_texts(self, canary: Canary) -> list[str]:
        """The canary's text with every candidate secret in its place, in secret-space order."""
        suffix = canary.text[len(canary.prefix) + len(canary.secret) :]
        return [canary.prefix + secret + suffix for secret in self.secret_space()]

    def to_dataset(self) -> datasets.Dataset:
        import datasets

        return datasets.Dataset.from_list(self.records)

    def split(self, heldout_fraction: float, seed: int) -> tuple[SyntheticCorpus, SyntheticCorpus]:
        """(train, heldout): held-out takes `heldout_fraction` of the records without a canary.

        Every canary stays in train, so held-out records are true non-members (perplexity,
        membership-inference baselines). Both parts keep the corpus order and the `record_id`s.
        """
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        with_canary = {record_id for canary in self.canaries for record_id in canary.record_ids}
        candidates = [r["record_id"] for r in self.records if r["record_id"] not in with_canary]
        n_heldout = round(heldout_fraction * len(candidates))
        heldout_ids = set(random.Random(seed).sample(candidates, n_heldout))
        train = [r for r in self.records if r["record_id"] not in heldout_ids]
        heldout = [r for r in self.records if r["record_id"] in heldout_ids]
        return replace(self, records=train), replace(self, records=heldout, canaries=[])

    def to_jsonl(self, path: str | Path) -> Path:
        """Write records to `path` (JSON lines) and canary metadata to the sidecar
        `<path without suffix>.canaries.json`; returns the sidecar path. Both writes are atomic."""
        path = Path(path)
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in self.records)
        sidecar = {
            "kind": _SIDECAR_KIND,
            "version": _SIDECAR_VERSION,
            "seed": self.seed,
            "secret_digits": self.secret_digits,
            "canary_format": self.canary_format,
            "n_records": len(self.records),
            "text_fingerprint": text_dataset_fingerprint(self.texts()),
            "canaries": [asdict(canary) for canary in self.canaries],
        }
        atomic_write_text(path, lines)
        atomic_write_text(sidecar_path(path), json.dumps(sidecar, indent=2) + "\n")
        return sidecar_path(path)

    @classmethod
    def from_jsonl(cls, path: str | Path) -> SyntheticCorpus:
        """Read what `to_jsonl` wrote; refuses a records file that no longer matches its sidecar."""
        path = Path(path)
        meta_path = sidecar_path(path)
        for needed in (path, meta_path):
            if not needed.is_file():
                raise FileNotFoundError(
                    f"{needed} does not exist (SyntheticCorpus.to_jsonl writes both files)"
                )
        with path.open(encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("kind") != _SIDECAR_KIND or meta.get("version") != _SIDECAR_VERSION:
            raise ValueError(f"{meta_path} is not a version-{_SIDECAR_VERSION} canary sidecar of secure-kd")
        if text_dataset_fingerprint(record["text"] for record in records) != meta["text_fingerprint"]:
            raise ValueError(f"{path} does not match {meta_path}: the records were changed after writing")
        canaries = [
            Canary(c["prefix"], c["secret"], c["text"], tuple(c["record_ids"]), c["repeats"])
            for c in meta["canaries"]
        ]
        return cls(records, canaries, meta["secret_digits"], meta["canary_format"], meta["seed"])


def sidecar_path(path: str | Path) -> Path:
    """`corpus.jsonl` -> `corpus.canaries.json`."""
    path = Path(path)
    return path.with_name(path.stem + ".canaries.json")


def _render_canary(canary_format: str, name: str, secret: str) -> tuple[str, str, list[dict[str, Any]]]:
    """(text, prefix, pii spans) of one canary; the prefix is the text before the secret."""
    builder = DocumentBuilder()
    prefix = None
    for piece in re.split(r"(\{name\}|\{secret\})", canary_format):
        if piece == "{name}":
            builder.pii("name", name)
        elif piece == "{secret}":
            prefix = "".join(builder.parts)
            builder.pii("secret", secret)
        elif piece:
            builder.text(piece)
    text, spans = builder.build()
    if prefix is None:
        raise ValueError(f"canary_format must contain '{{secret}}', got {canary_format!r}")
    return text, prefix, spans


def _repeat_counts(n_canaries: int, canary_repeats: int | Sequence[int]) -> list[int]:
    counts = [canary_repeats] * n_canaries if isinstance(canary_repeats, int) else list(canary_repeats)
    if len(counts) != n_canaries:
        raise ValueError(f"canary_repeats has {len(counts)} counts but n_canaries is {n_canaries}")
    if any(count < 1 for count in counts):
        raise ValueError(f"every canary repeat count must be >= 1, got {counts}")
    return counts


def generate_corpus(
    n_records: int,
    *,
    seed: int,
    n_canaries: int = 4,
    canary_repeats: int | Sequence[int] = 1,
    secret_digits: int = 4,
    canary_format: str = DEFAULT_CANARY_FORMAT,
    canary_placement: Literal["record", "inline"] = "record",
    topics: Sequence[str] = TOPICS,
    locale: str = "en_US",
) -> SyntheticCorpus:
    """Generate `n_records` documents plus the canary insertions, all from `seed`.

    - Documents: one of `topics` each (support, hr, medical, invoice, it_access), with names,
      emails, phone numbers, addresses, dates, IBANs, card numbers, ID numbers and secrets, each
      recorded as an exact span. Faker is seeded per call (`seed_instance`), never globally.
    - Canaries: `n_canaries` distinct names and distinct secrets; canary `i` is inserted
      `canary_repeats` times (or `canary_repeats[i]`). `canary_placement="record"` adds each
      insertion as a record of its own (topic "canary") at a seeded position, so the corpus has
      `n_records + sum(repeats)` records; "inline" appends it to the end of a seeded, distinct
      host document (which keeps its topic).
    - `record_id` is the final position in the corpus. The same arguments give the same corpus
      (for one Faker version).
    """
    if n_records < 1:
        raise ValueError(f"n_records must be >= 1, got {n_records}")
    if n_canaries < 0:
        raise ValueError(f"n_canaries must be >= 0, got {n_canaries}")
    if secret_digits < 1:
        raise ValueError(f"secret_digits must be >= 1, got {secret_digits}")
    if n_canaries > 10**secret_digits:
        raise ValueError(f"{n_canaries} distinct secrets do not fit in {secret_digits} digits")
    if canary_format.count("{secret}") != 1:
        raise ValueError(f"canary_format must contain '{{secret}}' exactly once, got {canary_format!r}")
    unknown = [topic for topic in topics if topic not in TOPICS]
    if unknown or not topics:
        raise ValueError(f"unknown or no topics {unknown}; available: {', '.join(TOPICS)}")
    if canary_placement not in ("record", "inline"):
        raise ValueError(f"canary_placement must be 'record' or 'inline', got {canary_placement!r}")
    counts = _repeat_counts(n_canaries, canary_repeats)
    if canary_placement == "inline" and sum(counts) > n_records:
        raise ValueError(
            f"inline placement needs one host per insertion: {sum(counts)} > n_records={n_records}"
        )

    fake = Faker(locale)
    fake.seed_instance(seed)
    rng = random.Random(f"secure-kd-synthetic:{seed}")

    documents = []
    for _ in range(n_records):
        topic = rng.choice(list(topics))
        text, spans = make_document(topic, fake, rng)
        documents.append({"text": text, "pii_spans": spans, "topic": topic})

    names: list[str] = []
    while len(names) < n_canaries:
        name = fake.name()
        if name not in names:
            names.append(name)
    secrets = [f"{index:0{secret_digits}d}" for index in rng.sample(range(10**secret_digits), n_canaries)]
    rendered = [
        _render_canary(canary_format, name, secret) for name, secret in zip(names, secrets, strict=True)
    ]

    # one entry per insertion, in a seeded order
    insertions = [canary for canary, count in enumerate(counts) for _ in range(count)]
    rng.shuffle(insertions)
    placed: dict[int, list[int]] = {canary: [] for canary in range(n_canaries)}

    if canary_placement == "record":
        total = n_records + len(insertions)
        slots = sorted(rng.sample(range(total), len(insertions)))
        slot_canary = dict(zip(slots, insertions, strict=True))
        source = iter(documents)
        records = []
        for position in range(total):
            if position in slot_canary:
                text, _, spans = rendered[slot_canary[position]]
                records.append({"text": text, "pii_spans": [dict(s) for s in spans], "topic": CANARY_TOPIC})
                placed[slot_canary[position]].append(position)
            else:
                records.append(next(source))
    else:
        records = documents
        hosts = rng.sample(range(n_records), len(insertions))
        for host, canary in zip(hosts, insertions, strict=True):
            text, _, spans = rendered[canary]
            offset = len(records[host]["text"]) + 1
            records[host]["text"] += " " + text
            records[host]["pii_spans"] += [
                {**span, "start": span["start"] + offset, "end": span["end"] + offset} for span in spans
            ]
            placed[canary].append(host)

    records = [
        {"text": r["text"], "pii_spans": r["pii_spans"], "record_id": i, "topic": r["topic"]}
        for i, r in enumerate(records)
    ]
    canaries = [
        Canary(prefix, secret, text, tuple(sorted(placed[i])), counts[i])
        for i, ((text, prefix, _), secret) in enumerate(zip(rendered, secrets, strict=True))
    ]
    return SyntheticCorpus(records, canaries, secret_digits, canary_format, seed)
