"""CKKS aggregation: sums against numpy, the server's context, wire-format validation, release."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import tenseal as ts

from federation.crypto import codec, he
from federation.crypto.codec import PayloadFormatError


@pytest.fixture(scope="module")
def keyring() -> he.Keyring:
    return he.Keyring.generate()


@pytest.fixture(scope="module")
def small_keyring() -> he.Keyring:
    # N=2048: 1024 values per ciphertext, so short vectors already span several ciphertexts.
    return he.Keyring.generate(
        poly_modulus_degree=2048, coeff_mod_bit_sizes=(34, 20), global_scale=2.0**22, max_clients=8
    )


def _clients(n_clients: int, length: int, seed: int) -> tuple[list[np.ndarray], list[float]]:
    rng = np.random.default_rng(seed)
    vectors = [rng.uniform(-1.0, 1.0, length).astype(np.float32) for _ in range(n_clients)]
    weights = [float(w) for w in rng.integers(1, 50, n_clients)]
    return vectors, weights


def _plain_weighted_sum(vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    total = np.zeros(vectors[0].shape, dtype=np.float64)
    for vector, weight in zip(vectors, weights, strict=True):
        total += weight * vector.astype(np.float64)
    return total


def test_aggregate_equals_plaintext_weighted_sum_and_mean(keyring):
    vectors, weights = _clients(4, 9000, seed=0)  # 9001 slots -> 3 ciphertexts at N=8192
    blobs = [he.encrypt(keyring, v, w) for v, w in zip(vectors, weights, strict=True)]
    total = he.aggregate(keyring.public_context(), blobs)

    summed = he.decrypt(keyring, total, 9000)
    error = np.abs(summed - _plain_weighted_sum(vectors, weights)).max()
    assert error <= keyring.noise_bound(4)
    assert error < 1e-6
    # The bound is a 7-sigma bound of the model, not a vacuous one.
    assert error > keyring.noise_bound(4) / 50

    assert he.decrypt_weight(keyring, total) == pytest.approx(sum(weights), abs=1e-6)
    mean = he.decrypt_mean(keyring, total, 9000)
    reference_mean = np.average(np.stack(vectors).astype(np.float64), axis=0, weights=weights)
    np.testing.assert_allclose(mean, reference_mean, atol=1e-8)
    np.testing.assert_allclose(summed / he.decrypt_weight(keyring, total), reference_mean, atol=1e-8)


def test_tutorial_parameters_at_scale_2_40_reach_1e_6():
    keyring = he.Keyring.generate(coeff_mod_bit_sizes=(60, 40, 40, 60), global_scale=2.0**40)
    vectors, weights = _clients(3, 5000, seed=1)
    total = he.aggregate(
        keyring.public_context(), [he.encrypt(keyring, v, w) for v, w in zip(vectors, weights, strict=True)]
    )
    assert np.abs(he.decrypt(keyring, total, 5000) - _plain_weighted_sum(vectors, weights)).max() < 1e-6


@pytest.mark.parametrize("length", [1, 1023, 1024, 2500])
def test_long_vectors_and_weight_slot_across_ciphertext_boundaries(small_keyring, length):
    # 1023 values + weight fill one ciphertext exactly; at 1024 the weight starts a second one.
    vectors, weights = _clients(3, length, seed=length)
    blobs = [he.encrypt(small_keyring, v, w) for v, w in zip(vectors, weights, strict=True)]
    header = he.check_payload(he.load_public_context(small_keyring.public_context()), blobs[0])
    assert header.n_chunks == math.ceil((length + 1) / 1024)
    total = he.aggregate(small_keyring.public_context(), blobs)
    np.testing.assert_allclose(
        he.decrypt(small_keyring, total, length), _plain_weighted_sum(vectors, weights), atol=1e-3
    )
    assert he.decrypt_weight(small_keyring, total) == pytest.approx(sum(weights), abs=1e-3)


def test_one_client(keyring):
    vector = np.linspace(-2.0, 2.0, 17)
    total = he.aggregate(keyring.public_context(), [he.encrypt(keyring, vector, 3.0)])
    np.testing.assert_allclose(he.decrypt(keyring, total, 17), 3.0 * vector, atol=1e-6)
    assert he.decrypt_weight(keyring, total) == pytest.approx(3.0, abs=1e-6)


def test_aggregates_of_aggregates_add_up(small_keyring):
    vectors, weights = _clients(4, 300, seed=7)
    blobs = [he.encrypt(small_keyring, v, w) for v, w in zip(vectors, weights, strict=True)]
    public = small_keyring.public_context()
    total = he.aggregate(public, [he.aggregate(public, blobs[:2]), he.aggregate(public, blobs[2:])])
    assert he.check_payload(he.load_public_context(public), total).n_contributors == 4
    np.testing.assert_allclose(
        he.decrypt(small_keyring, total, 300), _plain_weighted_sum(vectors, weights), atol=1e-3
    )


def test_mixed_layouts_name_the_odd_client(small_keyring):
    blobs = [he.encrypt(small_keyring, np.ones(n), 1.0) for n in (500, 500, 499, 500)]
    with pytest.raises(he.InvalidCiphertextError, match="client 2") as caught:
        he.aggregate(small_keyring.public_context(), blobs)
    assert caught.value.client_index == 2


def test_payload_from_another_keyring_is_rejected(small_keyring):
    other = he.Keyring.generate(poly_modulus_degree=2048, coeff_mod_bit_sizes=(34, 20), global_scale=2.0**22)
    blobs = [he.encrypt(small_keyring, np.ones(10), 1.0), he.encrypt(other, np.ones(10), 1.0)]
    with pytest.raises(he.InvalidCiphertextError, match="client 1.*keyring") as caught:
        he.aggregate(small_keyring.public_context(), blobs)
    assert caught.value.client_index == 1


def test_more_updates_than_max_clients_is_refused():
    keyring = he.Keyring.generate(
        poly_modulus_degree=2048, coeff_mod_bit_sizes=(34, 20), global_scale=2.0**22, max_clients=2
    )
    blobs = [he.encrypt(keyring, np.ones(4), 1.0) for _ in range(3)]
    with pytest.raises(ValueError, match="max_clients=2"):
        he.aggregate(keyring.public_context(), blobs)


def test_server_context_holds_no_secret_and_cannot_decrypt_or_encrypt(keyring):
    public_bytes = keyring.public_context()
    # A secret key alone is N coefficients of 8 bytes; Galois keys would be megabytes.
    assert len(public_bytes) < 8 * keyring.parameters.poly_modulus_degree
    assert len(public_bytes) < 1 << 20
    server = he.load_public_context(public_bytes)
    assert not server.context.is_private()
    assert not server.context.has_secret_key()
    assert not server.context.has_galois_keys()
    assert len(keyring.secret_context()) > 8 * keyring.parameters.poly_modulus_degree

    total = he.aggregate(public_bytes, [he.encrypt(keyring, np.arange(5.0), 2.0)])
    header = he.check_payload(server, total)
    first_chunk = next(codec.iter_chunks(total, header))
    on_server = ts.ckks_vector_from(server.context, first_chunk)
    with pytest.raises(ValueError, match="secret"):
        on_server.decrypt()
    with pytest.raises(ValueError):
        ts.ckks_vector(server.context, [1.0, 2.0])
    with pytest.raises(PayloadFormatError, match="without the secret key"):
        he.Keyring.from_secret_context(public_bytes)
    public_frame = codec.unpack_context(public_bytes, secret=False)
    relabelled = codec.pack_context(
        codec.FramedContext(keyring.key_id, True, 8192, 64, public_frame.tenseal_bytes)
    )
    with pytest.raises(PayloadFormatError, match="holds no secret key"):
        he.Keyring.from_secret_context(relabelled)


def test_server_refuses_a_context_that_carries_the_secret_key(keyring):
    with pytest.raises(PayloadFormatError, match="secret context"):
        he.load_public_context(keyring.secret_context())
    # A secret TenSEAL context relabelled as public in the frame is caught by TenSEAL's own flag.
    secret_frame = codec.unpack_context(keyring.secret_context(), secret=True)
    relabelled = codec.pack_context(
        codec.FramedContext(secret_frame.key_id, False, 8192, 64, secret_frame.tenseal_bytes)
    )
    with pytest.raises(PayloadFormatError, match="holds a secret key"):
        he.load_public_context(relabelled)


def test_secret_context_round_trip_decrypts_other_clients_updates(keyring):
    copy = he.Keyring.from_secret_context(keyring.secret_context())
    assert copy.key_id == keyring.key_id and copy.parameters == keyring.parameters
    total = he.aggregate(keyring.public_context(), [he.encrypt(keyring, np.full(8, 0.5), 4.0)])
    np.testing.assert_allclose(he.decrypt(copy, total, 8), np.full(8, 2.0), atol=1e-6)


def _refuse_deserialization(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("deserialized bytes that should have been rejected from the header")

    monkeypatch.setattr(ts, "ckks_vector_from", refuse)
    monkeypatch.setattr(ts, "context_from", refuse)


def test_oversized_and_malformed_payloads_fail_before_deserialization(small_keyring, monkeypatch):
    public = small_keyring.public_context()
    good = he.encrypt(small_keyring, np.ones(10), 1.0)
    header_size = struct.calcsize("<4sBBH16sQIII")
    oversized_chunk = bytearray(good)
    struct.pack_into("<I", oversized_chunk, header_size, 10 << 20)  # first ciphertext length: 10 MiB
    oversized_vector = bytearray(good)
    struct.pack_into("<Q", oversized_vector, 24, he.MAX_VALUES + 1)  # n_values
    bad_payloads = {
        "bad magic": b"XXXX" + good[4:],
        "version": good[:4] + bytes([9]) + good[5:],
        "truncated": good[: len(good) - 100],
        "trailing": good + b"\0",
        "shorter than": good[:10],
        "ciphertext 0 is": bytes(oversized_chunk),
        "n_values=": bytes(oversized_vector),
    }
    loaded = he.load_public_context(public)
    _refuse_deserialization(monkeypatch)
    for reason, payload in bad_payloads.items():
        with pytest.raises(he.InvalidCiphertextError, match=f"client 1: .*{reason}"):
            he.aggregate(loaded, [good, payload])
    with pytest.raises(PayloadFormatError, match="over the"):
        he.load_public_context(public + bytes(codec.MAX_PUBLIC_CONTEXT_BYTES))


def test_garbage_ciphertext_bytes_name_the_client(small_keyring):
    good = he.encrypt(small_keyring, np.ones(10), 1.0)
    header = he.check_payload(he.load_public_context(small_keyring.public_context()), good)
    start = len(good) - header.chunk_lengths[0]
    garbage = good[:start] + bytes(
        np.random.default_rng(0).integers(0, 256, header.chunk_lengths[0], np.uint8)
    )
    with pytest.raises(he.InvalidCiphertextError, match="client 1: ciphertext 0") as caught:
        he.aggregate(small_keyring.public_context(), [good, garbage])
    assert caught.value.client_index == 1


@pytest.mark.parametrize(
    ("vector", "weight", "message"),
    [
        (np.ones((2, 3)), 1.0, "1-D"),
        (np.array([]), 1.0, "1-D"),
        (np.array([1.0, np.nan]), 1.0, "non-finite.*index 1"),
        (np.ones(3), 0.0, "weight must be a positive"),
        (np.ones(3), float("inf"), "weight must be a positive"),
        (np.full(3, 1e5), 10.0, "max_abs_update"),
    ],
)
def test_encrypt_rejects_bad_input(keyring, vector, weight, message):
    with pytest.raises(ValueError, match=message):
        he.encrypt(keyring, vector, weight)


def test_sum_at_the_advertised_range_decrypts_correctly():
    keyring = he.Keyring.generate(
        poly_modulus_degree=2048, coeff_mod_bit_sizes=(34, 20), global_scale=2.0**22, max_clients=4
    )
    # 34-bit prime >= 2**33, so values up to 2**33 / 2 / 2**22 = 2**10 decode; 4 clients share it.
    assert keyring.max_abs_sum == 2.0**10
    values = np.array([keyring.max_abs_update, -keyring.max_abs_update, 1.0])
    total = he.aggregate(keyring.public_context(), [he.encrypt(keyring, values, 1.0) for _ in range(4)])
    np.testing.assert_allclose(he.decrypt(keyring, total, 3), [1024.0, -1024.0, 4.0], atol=1e-3)


def test_choose_parameters_matches_a_hand_computed_case():
    # n=1000 fits N=2048, but 7 sigma = 7 * sqrt(10 * 2048 * 10.32 / 2) needs scale 2**33 for 1e-6,
    # and 33 + ceil(log2(10 * 100)) + 2 = 45 data bits + 20 > 54: so N=4096, (45, 20), 2**33.
    params = he.choose_parameters(1000, max_abs_update=100.0, abs_error=1e-6, max_clients=10)
    assert params.poly_modulus_degree == 4096
    assert params.coeff_mod_bit_sizes == (45, 20)
    assert params.global_scale == 2.0**33
    assert params.noise_bound(10) <= 1e-6
    keyring = he.Keyring.from_parameters(params)
    vectors = [np.random.default_rng(i).uniform(-100, 100, 1000) for i in range(10)]
    total = he.aggregate(keyring.public_context(), [he.encrypt(keyring, v, 1.0) for v in vectors])
    assert np.abs(he.decrypt(keyring, total, 1000) - np.sum(vectors, axis=0)).max() <= 1e-6


def test_choose_parameters_refuses_what_float64_cannot_hold():
    with pytest.raises(ValueError, match="2\\*\\*45"):
        he.choose_parameters(10, max_abs_update=1e6, abs_error=1e-12)
    with pytest.raises(ValueError, match="poly_modulus_degree"):
        he.Keyring.generate(poly_modulus_degree=3000)
    with pytest.raises(ValueError, match="allows 54"):
        he.Keyring.generate(poly_modulus_degree=2048)


def test_release_rounding_removes_the_encryption_noise(keyring):
    values = np.random.default_rng(3).integers(-1000, 1000, 4000) / 100.0
    first = he.decrypt(keyring, he.encrypt(keyring, values, 1.0), 4000)
    second = he.decrypt(keyring, he.encrypt(keyring, values, 1.0), 4000)
    assert not np.array_equal(first, second)  # the noise differs between encryptions
    decimals = he.release_decimals(keyring.noise_bound(1), margin_bits=10)
    assert decimals >= 2
    np.testing.assert_array_equal(he.release(first, decimals=2), values)
    np.testing.assert_array_equal(he.release(first, decimals=2), he.release(second, decimals=2))


def test_release_decimals_and_flooding_noise():
    # 1e-9 * 2**20 = 1.05e-3, so rounding to 2 decimals (0.01) is the finest grid 2**20 above it.
    assert he.release_decimals(1e-9, margin_bits=20) == 2
    assert he.release_decimals(3e-9, margin_bits=0) == 8
    flooded = he.release(np.zeros(20000), decimals=6, noise_std=0.5, seed=1)
    assert abs(flooded.std() - 0.5) < 0.02
    np.testing.assert_array_equal(flooded, he.release(np.zeros(20000), decimals=6, noise_std=0.5, seed=1))
    with pytest.raises(ValueError, match="noise_std"):
        he.release(np.zeros(2), decimals=2, noise_std=-1.0)


def _encrypt_at_scale(keyring: he.Keyring, vector: np.ndarray, weight: float, scale: float) -> bytes:
    """What `he.encrypt` sends, but with each ciphertext encoded at `scale` (a deviating client)."""
    flat = np.append(np.asarray(vector, dtype=np.float64) * weight, weight)
    slots = keyring.slots
    chunks = [
        ts.ckks_vector(keyring._context, flat[i : i + slots].tolist(), scale=scale).serialize()
        for i in range(0, flat.size, slots)
    ]
    return codec.pack_payload(codec.PayloadKind.UPDATE, keyring.key_id, len(vector), 1, slots, chunks)


def test_a_first_client_at_another_scale_is_dropped_and_the_honest_ones_kept(small_keyring):
    # before: the first payload became the running total and SEAL's "scale mismatch" fired when the
    # second was added, so the honest second client was blamed, then the third, leaving the bad one
    from federation.server.aggregation import aggregate_encrypted

    vectors, weights = _clients(3, 50, seed=7)
    bad = _encrypt_at_scale(small_keyring, vectors[0], weights[0], small_keyring.parameters.global_scale / 8)
    honest = [he.encrypt(small_keyring, v, w) for v, w in zip(vectors[1:], weights[1:], strict=True)]
    public = he.load_public_context(small_keyring.public_context())
    with pytest.raises(he.InvalidCiphertextError, match="scale 2\\*\\*19 differs") as caught:
        he.aggregate(public, [bad, *honest])
    assert caught.value.client_index == 0
    total, rejected = aggregate_encrypted(public, {"first": bad, "second": honest[0], "third": honest[1]})
    assert set(rejected) == {"first"}
    expected = _plain_weighted_sum(vectors[1:], weights[1:])
    np.testing.assert_allclose(he.decrypt(small_keyring, total, 50), expected, atol=1e-3)
    assert he.read_header(small_keyring, total).n_contributors == 2
