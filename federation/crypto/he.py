"""CKKS aggregation with TenSEAL: clients encrypt pre-weighted updates, the server only adds.

Usage::

    keyring = Keyring.generate()                      # dealer (one client); see keys.py to share it
    blob = encrypt(keyring, update, weight=n_examples)  # every client
    total = aggregate(keyring.public_context(), blobs)  # server: parameters only, no key
    mean = decrypt_mean(keyring, total, len(update))    # clients; decrypt / decrypt_weight
    to_server = release(mean, decimals=...)             # round (or noise) before it leaves

The key material (`Keyring`, the server's `PublicContext`) is in he_keyring.py and the rounding of
decrypted values (`release`) in he_release.py; this module re-exports both with the operations.

Every client holds the one secret key (they must all decrypt the aggregate); the server
holds a context with the parameters only and can neither decrypt nor encrypt. Each update
carries its weight in one extra encrypted slot, so the server learns neither individual
updates nor dataset sizes (docs/threat-model.md says what it can still do).

Parameter choice (details and the error model in he_params.py). The server only adds, so
the defaults use one 60-bit data prime and a 20-bit special prime instead of a modulus chain:
a ciphertext costs ~log2(q)/2 bytes per value, measured 32 bytes per float32 parameter for
(60, 20) against 81 for TenSEAL's tutorial (60, 40, 40, 60) (benchmarks/he_agg.py).
Encryption is symmetric (with the secret key): every encrypting party holds that key anyway,
the fresh noise is ~10x smaller than public-key encryption's, it is ~2x faster, and no
public key exists that a server could encrypt with.

- `global_scale` trades precision for range: at N=8192, scale 2**35 and 10 clients the
  largest error over 4096 values is ~7e-8; `Keyring.noise_bound(n)` is a 7-sigma bound.
- A sum reaching q / (2 * scale) wraps around silently. The keyring fixes `max_clients`;
  `encrypt` refuses a client whose |weight * value| or weight exceeds `max_abs_update =
  max_abs_sum / max_clients`, and `aggregate` refuses more than `max_clients` updates, so
  honest inputs never wrap. Defaults (N=8192, (60, 20), scale 2**35, 64 clients):
  `max_abs_sum` = 2**23 ~ 8.4e6, `max_abs_update` ~ 1.3e5.
- `Keyring.for_payload(n_values, max_abs_update=..., abs_error=...)` picks the smallest
  ring holding a small payload in one ciphertext (N=2048/4096; N=8192 beyond, the fastest
  per value) and the fewest modulus bits meeting the error target: each bit saved is 1/16
  byte per value on the wire.

Decrypted values that go back to the server are passed through `release` first: CKKS is
not IND-CPA-D secure (Li & Micciancio, EUROCRYPT 2021): the exact decryption of a ciphertext
the adversary holds reveals the noise, and a few such pairs give the secret key by linear
algebra. Rounding far above the noise (Lattigo's mitigation) or adding flooding noise
(OpenFHE's) removes it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import tenseal as ts
import tenseal.sealapi  # noqa: F401  registers seal::Modulus, needed to read the coefficient moduli

from federation.crypto.codec import (
    PayloadFormatError,
    PayloadHeader,
    PayloadKind,
    chunk_at,
    iter_chunks,
    pack_payload,
    read_payload_header,
)
from federation.crypto.he_keyring import MAX_VALUES, Keyring, PublicContext, load_public_context
from federation.crypto.he_params import (
    CkksParameters,
    choose_parameters,
    choose_release_parameters,
)
from federation.crypto.he_release import mean_release_decimals, release, release_decimals

__all__ = [
    "CkksParameters",
    "InvalidCiphertextError",
    "Keyring",
    "PublicContext",
    "aggregate",
    "check_payload",
    "choose_parameters",
    "DecryptedAggregate",
    "check_ciphertext_parameters",
    "decrypt",
    "decrypt_aggregate",
    "decrypt_mean",
    "decrypt_weight",
    "encrypt",
    "choose_release_parameters",
    "load_public_context",
    "mean_release_decimals",
    "read_header",
    "release",
    "release_decimals",
]


class InvalidCiphertextError(ValueError):
    """One client's payload cannot be aggregated; `client_index` says whose."""

    def __init__(self, client_index: int, reason: str) -> None:
        super().__init__(f"client {client_index}: {reason}")
        self.client_index = client_index
        self.reason = reason


def check_payload(public: PublicContext, data: bytes) -> PayloadHeader:
    """Header and size checks of one payload (no deserialization); raises PayloadFormatError."""
    return read_payload_header(data, public.limits)


def encrypt(keyring: Keyring, vector, weight: float) -> bytes:
    """Encrypt `weight * vector` followed by `weight`, N/2 values per ciphertext."""
    values = np.asarray(vector, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(
            f"vector must be a non-empty 1-D array, got shape {values.shape}: flatten it first "
            "(e.g. np.concatenate([p.ravel() for p in params]))"
        )
    weight = float(weight)
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(
            f"weight must be a positive finite number (e.g. the number of examples), got {weight}"
        )
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ValueError(
            f"vector holds {bad.size} non-finite values (first at index {bad[0]}): NaN/inf cannot be summed"
        )
    if values.size > MAX_VALUES:
        raise ValueError(f"vector has {values.size} values; at most {MAX_VALUES} per payload")
    flat = np.empty(values.size + 1)
    np.multiply(values, weight, out=flat[:-1])
    flat[-1] = weight
    largest = float(np.abs(flat).max())
    if largest > keyring.max_abs_update:
        raise ValueError(
            f"|weight * value| or weight reaches {largest:.4g}, over the keyring's max_abs_update="
            f"{keyring.max_abs_update:.4g} (max_abs_sum / max_clients): the encrypted sum could wrap around. "
            "Normalize the weights, or use a keyring with a smaller global_scale or max_clients "
            "(Keyring.for_payload)"
        )
    slots = keyring.slots
    chunks = [
        ts.ckks_vector(keyring._context, flat[start : start + slots].tolist()).serialize()
        for start in range(0, flat.size, slots)
    ]
    return pack_payload(PayloadKind.UPDATE, keyring.key_id, values.size, 1, slots, chunks)


def _expected_chunk_size(header: PayloadHeader, index: int) -> int:
    total = header.n_values + 1
    return min(header.slots, total - index * header.slots)


def check_ciphertext_parameters(context: ts.Context, vector: ts.CKKSVector) -> None:
    """Raise PayloadFormatError unless `vector` is one fresh-level ciphertext of `context`: its scale,
    modulus level, ring, two polynomials, NTT form, and not transparent (a trivial ciphertext).

    Adding a ciphertext at another scale or level fails inside SEAL at the *next* addition, which
    would blame whichever payload came second; checking each one against the context first names the
    payload that is wrong."""
    parts = vector.ciphertext()
    if len(parts) != 1:
        raise PayloadFormatError(f"holds {len(parts)} SEAL ciphertexts, expected one")
    ct = parts[0]
    seal_context = context.seal_context().data
    expected = seal_context.first_context_data().parms()
    if ct.scale != context.global_scale:
        raise PayloadFormatError(
            f"scale 2**{math.log2(ct.scale):.4g} differs from the context's "
            f"2**{math.log2(context.global_scale):.4g}"
        )
    if ct.parms_id() != seal_context.first_parms_id() or ct.coeff_modulus_size() != len(
        expected.coeff_modulus()
    ):
        raise PayloadFormatError("made at another modulus level than the context's data level")
    if ct.poly_modulus_degree() != expected.poly_modulus_degree():
        raise PayloadFormatError(
            f"ring degree {ct.poly_modulus_degree()}, the context has {expected.poly_modulus_degree()}"
        )
    if ct.size() != 2:
        raise PayloadFormatError(f"has {ct.size()} polynomials; a fresh or summed ciphertext has 2")
    if not ct.is_ntt_form():
        raise PayloadFormatError("is not in NTT form")
    if ct.is_transparent():
        raise PayloadFormatError("is transparent (a trivial ciphertext anyone can make without the key)")


def _load_chunk(context: ts.Context, data: bytes, header: PayloadHeader, index: int) -> ts.CKKSVector:
    vector = ts.ckks_vector_from(context, data)
    expected = _expected_chunk_size(header, index)
    if vector.size() != expected:
        raise PayloadFormatError(
            f"ciphertext {index} holds {vector.size()} values, the layout needs {expected}"
        )
    try:
        check_ciphertext_parameters(context, vector)
    except PayloadFormatError as error:
        raise PayloadFormatError(f"ciphertext {index} {error}") from None
    return vector


def aggregate(public_context: bytes | PublicContext, ciphertexts: list[bytes]) -> bytes:
    """Sum client payloads (or earlier aggregates) under the public context (its bytes, or
    `load_public_context(bytes)` loaded once per run).

    Every header is checked before any ciphertext is parsed; a bad payload raises
    InvalidCiphertextError naming the client index, so the caller can drop it and retry."""
    public = (
        public_context if isinstance(public_context, PublicContext) else load_public_context(public_context)
    )
    if isinstance(ciphertexts, bytes | bytearray) or not len(ciphertexts):
        raise ValueError("ciphertexts must be a non-empty list of payloads (one per client)")
    headers: list[PayloadHeader] = []
    for index, data in enumerate(ciphertexts):
        try:
            headers.append(check_payload(public, data))
        except PayloadFormatError as error:
            raise InvalidCiphertextError(index, str(error)) from error
    layouts = Counter(h.layout for h in headers)
    expected_layout = layouts.most_common(1)[0][0]
    for index, header in enumerate(headers):
        if header.layout != expected_layout:
            raise InvalidCiphertextError(
                index,
                f"layout (n_values, slots, ciphertexts)={header.layout} differs from the other clients' "
                f"{expected_layout}: every client must encrypt a vector of the same length",
            )
    contributors = sum(h.n_contributors for h in headers)
    if contributors > public.parameters.max_clients:
        raise ValueError(
            f"{contributors} updates exceed the keyring's max_clients={public.parameters.max_clients}: "
            "the sum could wrap around; generate the keyring with a larger max_clients"
        )
    first = headers[0]
    streams = [iter_chunks(data, header) for data, header in zip(ciphertexts, headers, strict=True)]
    summed: list[bytes] = []
    for chunk_index in range(first.n_chunks):
        total = None
        for client_index, stream in enumerate(streams):
            try:
                vector = _load_chunk(public.context, next(stream), first, chunk_index)
                if total is None:
                    total = vector
                else:
                    total.add_(vector)
            except Exception as error:  # TenSEAL/SEAL raise ValueError or RuntimeError
                raise InvalidCiphertextError(client_index, f"ciphertext {chunk_index}: {error}") from error
        summed.append(total.serialize())
    return pack_payload(
        PayloadKind.AGGREGATE, public.key_id, first.n_values, contributors, first.slots, summed
    )


def _decrypt_chunk(keyring: Keyring, data: bytes, header: PayloadHeader, index: int) -> np.ndarray:
    try:
        vector = _load_chunk(keyring._context, data, header, index)
        return np.asarray(vector.decrypt(), dtype=np.float64)
    except PayloadFormatError:
        raise
    except Exception as error:
        raise PayloadFormatError(
            f"ciphertext {index} does not decrypt under this keyring: {error}"
        ) from error


def _header_for(keyring: Keyring, ciphertext: bytes, length: int | None) -> PayloadHeader:
    header = read_payload_header(ciphertext, keyring._limits())
    if length is not None and length != header.n_values:
        raise ValueError(f"the payload holds {header.n_values} values, but length={length} was asked for")
    return header


def decrypt(keyring: Keyring, ciphertext: bytes, length: int) -> np.ndarray:
    """The weighted sum sum_i(weight_i * vector_i), float64, of an aggregate (or one update)."""
    header = _header_for(keyring, ciphertext, length)
    parts = [
        _decrypt_chunk(keyring, chunk, header, index)
        for index, chunk in enumerate(iter_chunks(ciphertext, header))
    ]
    return np.concatenate(parts)[:length]


def decrypt_weight(keyring: Keyring, ciphertext: bytes) -> float:
    """The total weight sum_i(weight_i); the mean update is decrypt(...) / decrypt_weight(...)."""
    header = _header_for(keyring, ciphertext, None)
    last = header.n_chunks - 1
    values = _decrypt_chunk(keyring, chunk_at(ciphertext, header, last), header, last)
    return float(values[header.n_values - last * header.slots])


@dataclass(frozen=True)
class DecryptedAggregate:
    """A decrypted payload: the weighted mean, the total weight, and the header's contributor count.
    Raw decryptions carry the CKKS noise: pass `mean` through `release` before anything derived
    from it leaves the key holders."""

    mean: np.ndarray
    weight: float
    n_contributors: int


def decrypt_aggregate(keyring: Keyring, ciphertext: bytes, length: int) -> DecryptedAggregate:
    """Decrypt each ciphertext once: sum_i(w_i v_i) / sum_i(w_i), sum_i(w_i) and the header's count.

    Errors never carry decrypted values (an error that reaches the server would be a decryption
    oracle): a non-positive or non-finite total weight is refused by name only."""
    header = _header_for(keyring, ciphertext, length)
    flat = np.concatenate(
        [
            _decrypt_chunk(keyring, chunk, header, index)
            for index, chunk in enumerate(iter_chunks(ciphertext, header))
        ]
    )
    weight = float(flat[length])
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(
            "the decrypted total weight is not a positive number: the aggregate is corrupt or was built "
            "from other inputs"
        )
    mean = flat[:length] / weight
    if not np.all(np.isfinite(mean)):
        raise ValueError("the decrypted aggregate holds non-finite values")
    return DecryptedAggregate(mean, weight, header.n_contributors)


def decrypt_mean(keyring: Keyring, ciphertext: bytes, length: int) -> np.ndarray:
    """decrypt(...) / decrypt_weight(...), decrypting each ciphertext once."""
    return decrypt_aggregate(keyring, ciphertext, length).mean


def read_header(keyring: Keyring, ciphertext: bytes) -> PayloadHeader:
    """The checked header of a payload made under `keyring` (no ciphertext is parsed)."""
    return _header_for(keyring, ciphertext, None)
