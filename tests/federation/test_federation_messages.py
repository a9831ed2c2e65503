"""Validation of incoming messages: a message that fails never yields values to aggregate."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from federation.crypto.he import Keyring, encrypt, load_public_context
from federation.messages import (
    MessageRejected,
    check_size,
    read_arrays,
    read_ciphertext,
    read_metrics,
    read_soft_labels,
    read_votes,
    to_array_record,
)
from federation.soft_labels import SoftLabelLayout

SPEC = {"w": ((2, 3), "float32"), "b": ((3,), "float32")}


def _content(**arrays):
    return RecordDict({"arrays": to_array_record(arrays)})


def _good():
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, dtype=np.float32)}


def test_well_formed_arrays_pass_unchanged():
    out = read_arrays(_content(**_good()), SPEC)
    np.testing.assert_array_equal(out["w"], np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(out["b"], [1, 1, 1])


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda a: a.update(w=np.full((2, 3), np.nan, dtype=np.float32)), "NaN or infinite"),
        (lambda a: a.update(b=np.array([1, np.inf, 0], dtype=np.float32)), "NaN or infinite"),
        (lambda a: a.update(w=np.zeros((3, 2), dtype=np.float32)), "expected float32[2, 3]"),
        (lambda a: a.update(w=np.zeros((2, 3), dtype=np.float64)), "expected float32[2, 3]"),
        (lambda a: a.pop("b"), "missing ['b']"),
        (lambda a: a.update(extra=np.zeros(1, dtype=np.float32)), "unexpected ['extra']"),
    ],
)
def test_malformed_arrays_are_rejected(mutate, words):
    arrays = _good()
    mutate(arrays)
    with pytest.raises(MessageRejected, match=words.replace("[", r"\[").replace("]", r"\]")):
        read_arrays(_content(**arrays), SPEC)


def test_header_that_lies_about_its_array_is_rejected():
    lying = Array(
        dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=Array(np.zeros(4, np.float32)).data
    )
    content = RecordDict({"arrays": ArrayRecord({"w": lying, "b": Array(np.ones(3, np.float32))})})
    with pytest.raises(MessageRejected, match="decodes to"):
        read_arrays(content, SPEC)


def test_size_limit_counts_every_record():
    content = RecordDict({"config": ConfigRecord({"pad": b"x" * 5000}), "arrays": to_array_record(_good())})
    assert check_size(content, 10_000) > 5000
    with pytest.raises(MessageRejected, match="exceeds the 4,096-byte limit"):
        check_size(content, 4096)


def test_metrics_must_be_known_finite_scalars():
    ok = RecordDict({"metrics": MetricRecord({"train-loss": 1.5, "num-examples": 10})})
    assert read_metrics(ok, ["num-examples"], ["train-loss"]) == {"train-loss": 1.5, "num-examples": 10.0}
    for bad, words in (
        ({"train-loss": float("nan"), "num-examples": 1}, "finite"),
        ({"num-examples": 1, "secret": 3.0}, "unexpected"),
        ({"train-loss": 1.0}, "missing"),
    ):
        with pytest.raises(MessageRejected, match=words):
            read_metrics(RecordDict({"metrics": MetricRecord(bad)}), ["num-examples"], ["train-loss"])


def _layout(positions=3, k=2):
    return SoftLabelLayout(
        index=tuple(range(k)), lengths=(positions + 1,), positions=(tuple(range(positions)),), fingerprint="f"
    )


def test_soft_labels_must_be_distributions_in_the_shared_layout():
    layout = _layout()
    good = np.array([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(read_soft_labels(_content(**{"soft-labels": good}), layout), good)
    for bad, words in (
        (good[:2], r"expected float64\[3, 3\]"),
        (good * 2, "probabilities"),
        (good - 0.1, "probabilities"),
        (np.full((3, 3), 0.2), "sum to 1"),
    ):
        with pytest.raises(MessageRejected, match=words):
            read_soft_labels(_content(**{"soft-labels": bad}), layout)


def test_votes_must_be_token_ids():
    layout = _layout()
    np.testing.assert_array_equal(read_votes(_content(votes=np.array([0, 5, 9])), layout, 10), [0, 5, 9])
    with pytest.raises(MessageRejected, match=r"token ids in \[0, 10\)"):
        read_votes(_content(votes=np.array([0, 10, 1])), layout, 10)
    with pytest.raises(MessageRejected, match="expected int64"):
        read_votes(_content(votes=np.array([0.0, 1.0, 2.0])), layout, 10)


def test_ciphertexts_are_checked_against_the_run_key_and_layout():
    keyring = Keyring.for_payload(16, max_abs_update=10.0, max_clients=4)
    public = load_public_context(keyring.public_context())
    good = encrypt(keyring, np.ones(16), weight=1.0)
    content = lambda blob: RecordDict({"config": ConfigRecord({"ciphertext": blob})})  # noqa: E731
    assert read_ciphertext(content(good), public, 16) == good
    with pytest.raises(MessageRejected, match="expected 8 values"):
        read_ciphertext(content(good), public, 8)
    with pytest.raises(MessageRejected, match="ciphertext rejected"):
        read_ciphertext(content(b"\xff" * 64), public, 16)
    other = encrypt(Keyring.for_payload(16, max_abs_update=10.0, max_clients=4), np.ones(16), weight=1.0)
    with pytest.raises(MessageRejected, match="ciphertext rejected"):
        read_ciphertext(content(other), public, 16)
    with pytest.raises(MessageRejected, match="is a str"):
        read_ciphertext(RecordDict({"config": ConfigRecord({"ciphertext": "text"})}), public, 16)
