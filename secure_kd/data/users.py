"""Which user each record belongs to: `data.user_field`, the unit of user-level DP.

`user_ids(records, field)` reads the field of every record and refuses, naming the field and the
record's position (never its content), a record without it, with a null or empty value, or with a
value that is not a string, integer or boolean. Values are compared as strings after their type
(`1` and `"1"` are two users, as they are in the file).

`assign_synthetic_users(corpus, n_users, seed)` gives the generated corpus a `user_id` field: record
counts per user are skewed (a few users hold many records, as in real customer or patient data),
and every insertion of one canary goes to one user, so a canary repeated k times is k records of one
person, the case record-level DP protects only at about k times epsilon.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from typing import Any

from secure_kd.fingerprint import text_dataset_fingerprint

SYNTHETIC_USER_FIELD = "user_id"


def user_key(value: Any, field: str, index: int, source: str) -> Hashable:
    """The user of one record, as a hashable key; a clear error for an unusable value."""
    if value is None:
        raise ValueError(
            f"data.user_field {field!r}: record {index} (0-based) of {source} has it null; every record "
            "needs its user. Fill it in, or drop the record"
        )
    if isinstance(value, bool | int):
        return (type(value).__name__, str(value))
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(
                f"data.user_field {field!r}: record {index} (0-based) of {source} has an empty value; "
                "every record needs its user. Fill it in, or drop the record"
            )
        return ("str", value)
    raise ValueError(
        f"data.user_field {field!r}: record {index} (0-based) of {source} holds a {type(value).__name__}, "
        "not a string or integer: a user id must be a plain value"
    )


def user_ids(records: Sequence[dict], field: str, *, source: str = "data.train") -> list[Hashable]:
    """One user key per record (see the module docstring); refuses a record without the field."""
    keys = []
    for index, record in enumerate(records):
        if field not in record:
            raise ValueError(
                f"data.user_field {field!r}: record {index} (0-based) of {source} has no field {field!r}. "
                "Every record needs its user: add the field, or name the right one in data.user_field"
            )
        keys.append(user_key(record[field], field, index, source))
    return keys


def assign_synthetic_users(
    records: list[dict], canary_record_ids: Sequence[Sequence[int]], n_users: int, seed: int
):
    """Copies of `records` with a `user_id` in [0, n_users): skewed counts, each canary's records to one user.

    `canary_record_ids[c]` are the `record_id`s of canary c's insertions. User weights follow 1/(rank+1)
    (Zipf-like), drawn with `seed`; with fewer records than users some users hold none.
    """
    if n_users < 1:
        raise ValueError(f"data.synthetic.n_users must be >= 1, got {n_users}")
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(n_users)]
    by_record: dict[int, int] = {}
    for ids in canary_record_ids:
        owner = rng.choices(range(n_users), weights)[0]
        for record_id in ids:
            by_record[record_id] = owner
    out = []
    for record in records:
        user = by_record.get(record["record_id"])
        if user is None:
            user = rng.choices(range(n_users), weights)[0]
        out.append({**record, SYNTHETIC_USER_FIELD: f"user-{user:04d}"})
    return out


def grouping_fingerprint(texts: Sequence[str], keys: Sequence[Hashable]) -> str:
    """sha256 of how the records' texts are grouped into users (user ids, order and names do not matter).

    Recorded in a user-level ledger entry: user-level stretches compose only over one grouping."""
    groups: dict[Hashable, list[str]] = {}
    for text, key in zip(texts, keys, strict=True):
        groups.setdefault(key, []).append(text)
    members = sorted(text_dataset_fingerprint(sorted(group)) for group in groups.values())
    return text_dataset_fingerprint(members)


__all__ = ["SYNTHETIC_USER_FIELD", "assign_synthetic_users", "grouping_fingerprint", "user_ids", "user_key"]
