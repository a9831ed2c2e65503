"""PII in a user's own records, found by pattern, and redaction of what an audit reports.

The synthetic corpus records every PII span as it writes it; a user's records come without spans.
`find_pii(text)` finds what a pattern can: email addresses, phone numbers, IBANs (checked with the
ISO 13616 mod-97 test), payment card numbers (checked with the Luhn test) and US social security
numbers, and API keys of the common `sk_...` shapes. Names, street addresses and free-text
identifiers have no reliable pattern and are not found; the exposure of a given secret
(`data.secrets`) and the near-duplicate check cover what patterns miss. On 300 synthetic records the
patterns found every email, phone, IBAN and card number the generator wrote, with no false positive
(tests/attacks/test_memorization.py).

`redact(value)` keeps a value's shape (its separators and length) and its first character and
masks the rest, so a report can say "an email address of this record came out" without printing
it. `redact_text(text, values)` masks every known value and everything `find_pii` finds in a text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "\u2022"  # bullet

_PATTERNS: dict[str, re.Pattern[str]] = {
    "email": re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
    "iban": re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"),
    # 13-19 digits in one run or in groups of 4 (Amex: 4-6-5), then the Luhn test
    "credit_card": re.compile(
        r"\b(?:\d{13,19}|\d{4}(?:[ -]\d{4}){2,3}(?:[ -]\d{1,3})?|\d{4}[ -]\d{6}[ -]\d{5})\b"
    ),
    "ssn": re.compile(r"\b\d{3}-\d{2}-\d{4}\b"),
    "api_key": re.compile(r"\b(?:sk|pk|rk|ghp|xox[abp])[_-][A-Za-z0-9_-]{16,}\b"),
    "phone": re.compile(
        r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?(?:\d{2,4}(?:[ .-]\d{2,5}){1,4}|\d{10,11})"
        r"(?:\s?(?:x|ext\.?)\s?\d{1,5})?(?![\w])"
    ),
}
_CHECKS = {
    "iban": lambda value: _iban_ok(value),
    "credit_card": lambda value: _luhn_ok(value),
    "phone": lambda value: sum(c.isdigit() for c in value) >= 7 and not _DATE.fullmatch(value),
}
_DATE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{4}")


def _luhn_ok(value: str) -> bool:
    digits = [int(c) for c in value if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for position, digit in enumerate(reversed(digits)):
        if position % 2:
            digit *= 2
            digit -= 9 if digit > 9 else 0
        total += digit
    return total % 10 == 0


def _iban_ok(value: str) -> bool:
    compact = value.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    number = "".join(str(int(c, 36)) for c in moved)
    return int(number) % 97 == 1


def find_pii(text: str) -> list[dict[str, int | str]]:
    """Non-overlapping `{start, end, type}` spans, earlier patterns first (an IBAN is not a phone)."""
    spans: list[dict[str, int | str]] = []
    taken: list[tuple[int, int]] = []
    for kind, pattern in _PATTERNS.items():
        check = _CHECKS.get(kind)
        for match in pattern.finditer(text):
            start, end = match.span()
            if check is not None and not check(match.group()):
                continue
            if any(start < b and a < end for a, b in taken):
                continue
            taken.append((start, end))
            spans.append({"start": start, "end": end, "type": kind})
    return sorted(spans, key=lambda s: int(s["start"]))


def redact(value: str) -> str:
    """First character kept, every other letter or digit masked, separators kept: `j•••.•••@•••.•••`."""
    out = []
    for position, char in enumerate(value):
        out.append(char if position == 0 or not char.isalnum() else MASK)
    return "".join(out)


def redact_text(text: str, values: Iterable[str] = ()) -> str:
    """`text` with every given value (longest first) and every pattern-found PII value masked."""
    for value in sorted({v for v in values if v}, key=len, reverse=True):
        text = text.replace(value, MASK * len(value))
    for span in reversed(find_pii(text)):
        start, end = int(span["start"]), int(span["end"])
        text = text[:start] + MASK * (end - start) + text[end:]
    return text
