"""What travels in Flower messages, and the checks every incoming message passes before it is used.

Record names in a `RecordDict`: `config` (a ConfigRecord: round, opaque bytes such as ciphertexts
and sealed payloads), `arrays` (an ArrayRecord: weights, soft labels, votes), `metrics` (a
MetricRecord: losses, epsilon, and in plaintext fedavg `num-examples`).

The server calls these on every reply and the clients on every instruction; a check that fails raises
`MessageRejected` with the reason, the sender is dropped from the round, and nothing of the message
reaches aggregation. The checks look at metadata first (byte size, dtype and shape strings, the
ciphertext header) and deserialize only what passed (numpy arrays with `allow_pickle=False`, never
pickle); values must then be finite and in range.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from federation.crypto.codec import PayloadFormatError, PayloadKind
from federation.crypto.he import PublicContext, check_payload
from federation.soft_labels import SoftLabelLayout, check_soft_labels

CONFIG = "config"
ARRAYS = "arrays"
METRICS = "metrics"
NUM_EXAMPLES = "num-examples"


class MessageRejected(ValueError):
    """An incoming message that must not be used; `str(error)` says why."""


def content_bytes(content: RecordDict) -> int:
    return sum(record.count_bytes() for record in content.values())


def check_size(content: RecordDict, limit: int) -> int:
    size = content_bytes(content)
    if size > limit:
        raise MessageRejected(f"message of {size:,} bytes exceeds the {limit:,}-byte limit (max_message_mb)")
    return size


def _record(content: RecordDict, name: str, kind: type):
    if name not in content:
        raise MessageRejected(f"missing record {name!r}")
    record = content[name]
    if not isinstance(record, kind):
        raise MessageRejected(f"record {name!r} is a {type(record).__name__}, expected {kind.__name__}")
    return record


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def read_arrays(
    content: RecordDict, spec: Mapping[str, tuple[tuple[int, ...], str]]
) -> dict[str, np.ndarray]:
    """Arrays named and shaped exactly as `spec` (name -> (shape, dtype)), finite if floating."""
    record = _record(content, ARRAYS, ArrayRecord)
    names = set(record.keys())
    if names != set(spec):
        missing, extra = sorted(set(spec) - names), sorted(names - set(spec))
        raise MessageRejected(
            f"arrays do not match the expected layout (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    out = {}
    for name, (shape, dtype) in spec.items():
        array = record[name]
        if array.stype != "numpy.ndarray" or array.dtype != dtype or tuple(array.shape) != tuple(shape):
            raise MessageRejected(
                f"array {name!r} is {array.dtype}{list(array.shape)} ({array.stype}), "
                f"expected {dtype}{list(shape)}"
            )
        try:
            value = array.numpy()
        except (ValueError, TypeError, OSError) as exc:
            raise MessageRejected(f"array {name!r} does not decode: {exc}") from None
        if value.dtype != np.dtype(dtype) or value.shape != tuple(shape):
            raise MessageRejected(
                f"array {name!r} decodes to {value.dtype}{list(value.shape)}, not its header's"
            )
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise MessageRejected(f"array {name!r} holds NaN or infinite values")
        out[name] = value
    return out


def read_soft_labels(content: RecordDict, layout: SoftLabelLayout, name: str = "soft-labels") -> np.ndarray:
    array = read_arrays(content, {name: (layout.shape, "float64")})[name]
    try:
        return check_soft_labels(array, layout)
    except ValueError as exc:
        raise MessageRejected(str(exc)) from None


def read_filtered_soft_labels(content: RecordDict, layout: SoftLabelLayout) -> tuple[np.ndarray, np.ndarray]:
    """fed_distill with filtering: soft labels and one weight in [0, 1] per position."""
    spec = {"soft-labels": (layout.shape, "float64"), "filter-weights": ((layout.n_positions,), "float64")}
    arrays = read_arrays(content, spec)
    weights = arrays["filter-weights"]
    if not np.all(np.isfinite(weights)) or weights.min() < 0 or weights.max() > 1:
        raise MessageRejected("filter-weights must be finite numbers in [0, 1]")
    try:
        return check_soft_labels(arrays["soft-labels"], layout), weights
    except ValueError as exc:
        raise MessageRejected(str(exc)) from None


def read_votes(content: RecordDict, layout: SoftLabelLayout, vocab_size: int) -> np.ndarray:
    votes = read_arrays(content, {"votes": ((layout.n_positions,), "int64")})["votes"]
    if votes.size and (votes.min() < 0 or votes.max() >= vocab_size):
        raise MessageRejected(
            f"votes must be token ids in [0, {vocab_size}), got [{votes.min()}, {votes.max()}]"
        )
    return votes


def read_config(content: RecordDict, key: str, kind: type | tuple[type, ...]):
    record = _record(content, CONFIG, ConfigRecord)
    if key not in record:
        raise MessageRejected(f"config entry {key!r} is missing")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise MessageRejected(f"config entry {key!r} is a {type(value).__name__}")
    return value


def read_ciphertext(
    content: RecordDict,
    public: PublicContext,
    n_values: int,
    *,
    key: str = "ciphertext",
    kind: PayloadKind = PayloadKind.UPDATE,
) -> bytes:
    """An encrypted payload whose header names this run's key, `n_values` values and one contributor."""
    data = read_config(content, key, bytes)
    try:
        header = check_payload(public, data)
    except PayloadFormatError as exc:
        raise MessageRejected(f"ciphertext rejected: {exc}") from None
    if header.kind != kind or header.n_values != n_values:
        raise MessageRejected(
            f"ciphertext holds {header.n_values} values as a {header.kind.name.lower()}, expected {n_values} "
            f"values as a {kind.name.lower()}"
        )
    if kind == PayloadKind.UPDATE and header.n_contributors != 1:
        raise MessageRejected(f"a client update must have one contributor, not {header.n_contributors}")
    return data


def read_metrics(
    content: RecordDict, required: Iterable[str] = (), optional: Iterable[str] = ()
) -> dict[str, float]:
    """Scalar, finite metrics: `required` present, nothing outside `required | optional`."""
    required, allowed = set(required), set(required) | set(optional)
    if not required and METRICS not in content:
        return {}
    record = _record(content, METRICS, MetricRecord)
    unknown = sorted(set(record.keys()) - allowed)
    if unknown:
        raise MessageRejected(f"unexpected metrics {unknown[:5]}")
    missing = sorted(required - set(record.keys()))
    if missing:
        raise MessageRejected(f"missing metrics {missing}")
    out = {}
    for key, value in record.items():
        if isinstance(value, list) or isinstance(value, bool) or not math.isfinite(float(value)):
            raise MessageRejected(f"metric {key!r} must be a finite number, got {value!r}")
        out[key] = float(value)
    return out


def read_round(content: RecordDict) -> int:
    value = read_config(content, "round", int)
    if value < 0:
        raise MessageRejected(f"round must be >= 0, got {value}")
    return value


def check_layout(content: RecordDict, fingerprint: str) -> None:
    """The sender's transfer-set layout must be this side's: same public data, same index set."""
    if read_config(content, "layout", str) != fingerprint:
        raise MessageRejected(
            "the transfer-set layout differs between server and client: they run different jobs"
        )


def reply(payload: RecordDict | None, metrics: Mapping[str, float | int | None]) -> RecordDict:
    content = payload if payload is not None else RecordDict()
    content[METRICS] = rounded_metrics(metrics)
    return content


def rounded_metrics(values: Mapping[str, float | int | None], decimals: int = 4) -> MetricRecord:
    """Metrics leave a client rounded: values derived from CKKS decryptions must not carry their noise."""
    record = {}
    for key, value in values.items():
        if value is None:
            continue
        record[key] = int(value) if isinstance(value, int) else round(float(value), decimals)
    return MetricRecord(record)
