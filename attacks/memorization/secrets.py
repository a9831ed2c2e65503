"""What the memorization audit reads: the records a model was trained on and the secrets to test.

Records (`data.source`): the project's synthetic corpus, a `.jsonl` written by
`SyntheticCorpus.to_jsonl` (its `.canaries.json` sidecar lists the canaries), or any file of the
user's own records (`.jsonl/.json/.csv/.parquet/.txt`; the text is the `text` field, or the
`messages` contents, or prompt + completion). Records without `pii_spans` get theirs from
`attacks.memorization.pii.find_pii` (emails, phones, IBANs, card numbers, SSNs, API keys).

Secrets (`data.secrets`): a plain JSON-lines file, one secret a line, in the words of the training
text: the text just before the secret, the secret, and optionally what follows it and the characters
a secret of that kind is made of (which defines the space of candidates it is ranked against):

    {"prefix": "The access code for Ann Lee is ", "secret": "4821"}
    {"prefix": "API token: ", "secret": "9f3a0c", "alphabet": "hex"}

`alphabet` is `digits` (the default for an all-digit secret), `hex`, `lower`, `alnum` or the
characters themselves; every other secret needs one. The candidates are every string of the
secret's length over its alphabet, so a 4-digit secret is ranked among 10,000; spaces larger than
`exposure.max_enumerated_digits` decimal digits are estimated (Secret Sharer). How often the secret
occurs in the records (prefix + secret, verbatim) is counted and reported as its `repeats`.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attacks.memorization.pii import find_pii
from secure_kd.data import Canary, SyntheticCorpus, load_records
from secure_kd.data.synthetic import sidecar_path

ALPHABETS = {
    "digits": string.digits,
    "hex": string.digits + "abcdef",
    "lower": string.ascii_lowercase,
    "alnum": string.digits + string.ascii_lowercase,
}


class CharsetSpace(Sequence[str]):
    """Every `length`-character string over `alphabet`, in order (for digits: "000", "001", ...)."""

    def __init__(self, alphabet: str, length: int) -> None:
        if length < 1 or len(set(alphabet)) != len(alphabet) or len(alphabet) < 2:
            raise ValueError(f"need length >= 1 and >= 2 distinct characters, got {length}, {alphabet!r}")
        self.alphabet, self.length = alphabet, length
        self._position = {c: i for i, c in enumerate(alphabet)}

    def __len__(self) -> int:
        return len(self.alphabet) ** self.length

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a space of {len(self)}")
        base, chars = len(self.alphabet), []
        for _ in range(self.length):
            index, digit = divmod(index, base)
            chars.append(self.alphabet[digit])
        return "".join(reversed(chars))

    def index(self, secret: str, start: int = 0, stop: int | None = None) -> int:  # type: ignore[override]
        if secret not in self:
            raise ValueError("the secret is not in its space (its length or characters do not fit)")
        value = 0
        for char in secret:
            value = value * len(self.alphabet) + self._position[char]
        return value

    def __contains__(self, secret: object) -> bool:
        if not isinstance(secret, str) or len(secret) != self.length:
            return False
        return all(c in self._position for c in secret)

    @property
    def decimal_digits(self) -> float:
        """log10 of the space's size: compared with `exposure.max_enumerated_digits`."""
        import math

        return self.length * math.log10(len(self.alphabet))


@dataclass
class AuditCorpus:
    """Records (`text`, `pii_spans`, `record_id`) and the canaries to rank, each with its space."""

    records: list[dict[str, Any]]
    canaries: list[Canary] = field(default_factory=list)
    spaces: list[Sequence[str]] = field(default_factory=list)
    pii_detected: bool = False  # spans found by pattern, not recorded by a generator
    secret_digits: int | None = None  # the synthetic corpus's, when there is one

    def __len__(self) -> int:
        return len(self.records)

    def texts(self) -> list[str]:
        return [record["text"] for record in self.records]


def from_synthetic(corpus: SyntheticCorpus) -> AuditCorpus:
    space = corpus.secret_space()
    return AuditCorpus(
        list(corpus.records), list(corpus.canaries), [space] * len(corpus.canaries),
        secret_digits=corpus.secret_digits,
    )  # fmt: skip


def _record_text(record: dict[str, Any], text_field: str) -> str:
    if text_field in record and record[text_field] is not None:
        return str(record[text_field])
    if isinstance(record.get("messages"), list):
        return "\n".join(str(m.get("content", "")) for m in record["messages"] if isinstance(m, dict))
    if "prompt" in record or "completion" in record:
        return "".join(str(record.get(k) or "") for k in ("prompt", "completion"))
    raise ValueError(
        f"a record has no {text_field!r} field (nor messages, nor prompt/completion); fields: "
        f"{sorted(record)}. Set data.text_field"
    )


def _spans_fit(record: dict[str, Any], text: str) -> bool:
    spans = record.get("pii_spans")
    if not isinstance(spans, list):
        return False
    return all(
        isinstance(s, dict) and 0 <= int(s.get("start", -1)) < int(s.get("end", -1)) <= len(text)
        for s in spans
    )


def load_records_corpus(path: str, text_field: str = "text") -> AuditCorpus:
    """A sidecar'd synthetic corpus as written, or any records file with PII found by pattern."""
    if Path(path).suffix == ".jsonl" and sidecar_path(path).is_file():
        return from_synthetic(SyntheticCorpus.from_jsonl(path))
    records, detected = [], False
    for position, raw in enumerate(load_records(path)):
        record = dict(raw)
        text = _record_text(record, text_field)
        if _spans_fit(record, text) and record.get(text_field) is not None:
            spans = record["pii_spans"]
        else:
            spans, detected = find_pii(text), True
        records.append({"text": text, "pii_spans": spans, "record_id": position})
    return AuditCorpus(records, pii_detected=detected)


def _problem(path: str, line: int, message: str) -> ValueError:
    return ValueError(f"secrets file {path}, line {line}: {message} (format: docs/audit.md, 'Secrets file')")


def load_secrets(
    path: str, records: Sequence[dict[str, Any]] = ()
) -> tuple[list[Canary], list[CharsetSpace]]:
    """The secrets of a JSON-lines file and their spaces; `repeats` counts them in `records`.

    Errors name the line and the field, never the secret itself."""
    canaries, spaces = [], []
    with open(path, encoding="utf-8") as fh:
        lines = list(fh)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise _problem(path, number, "not a JSON object") from None
        if not isinstance(item, dict):
            raise _problem(path, number, "not a JSON object")
        unknown = sorted(set(item) - {"prefix", "secret", "suffix", "alphabet"})
        if unknown:
            raise _problem(path, number, f"unknown keys {unknown}; keys are prefix, secret, suffix, alphabet")
        prefix, secret, suffix = item.get("prefix"), item.get("secret"), item.get("suffix", "")
        if not isinstance(prefix, str) or not prefix.strip():
            raise _problem(path, number, "`prefix` (the text before the secret) is missing or empty")
        if not isinstance(secret, str) or not secret:
            raise _problem(path, number, "`secret` is missing or not a non-empty string")
        if not isinstance(suffix, str):
            raise _problem(path, number, "`suffix` must be a string")
        alphabet = item.get("alphabet")
        if alphabet is None:
            if not secret.isdigit():
                raise _problem(
                    path, number, "the secret is not all digits: give `alphabet` (hex, lower, alnum or the "
                    "characters a secret of this kind is made of)",
                )  # fmt: skip
            alphabet = "digits"
        characters = ALPHABETS.get(alphabet, alphabet) if isinstance(alphabet, str) else None
        if not characters or len(set(characters)) != len(characters) or len(characters) < 2:
            raise _problem(
                path, number, "`alphabet` must be digits, hex, lower, alnum or >= 2 distinct characters"
            )
        space = CharsetSpace(characters, len(secret))
        if secret not in space:
            raise _problem(path, number, f"the secret has characters outside its alphabet {alphabet!r}")
        text = prefix + secret + suffix
        holders = tuple(r.get("record_id", i) for i, r in enumerate(records) if prefix + secret in r["text"])
        canaries.append(Canary(prefix, secret, text, holders, len(holders)))
        spaces.append(space)
    if not canaries:
        raise ValueError(f"secrets file {path} holds no secrets (one JSON object a line)")
    return canaries, spaces
