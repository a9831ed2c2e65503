"""CKKS aggregation with TenSEAL: clients encrypt pre-weighted updates, the server only adds.

Usage::

    keyring = Keyring.generate()                      # dealer (one client); see keys.py to share it
    blob = encrypt(keyring, update, weight=n_examples)  # every client
    total = aggregate(keyring.public_context(), blobs)  # server: parameters only, no key
    mean = decrypt_mean(keyring, total, len(update))    # clients; decrypt / decrypt_weight
    to_server = release(mean, decimals=...)             # round (or noise) before it leaves

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
import secrets
from collections import Counter
from dataclasses import dataclass

import numpy as np
import tenseal as ts
import tenseal.sealapi  # noqa: F401  registers seal::Modulus, needed to read the coefficient moduli

from federation.crypto.codec import (
    KEY_ID_BYTES,
    FramedContext,
    PayloadFormatError,
    PayloadHeader,
    PayloadKind,
    PayloadLimits,
    chunk_at,
    iter_chunks,
    pack_context,
    pack_payload,
    read_payload_header,
    unpack_context,
)
from federation.crypto.he_params import (
    RELEASE_MARGIN_BITS,
    SPECIAL_PRIME_BITS,
    CkksParameters,
    choose_parameters,
    choose_release_parameters,
)

# Most values one payload may hold (200M float32 parameters is ~6 GB on the wire).
MAX_VALUES = 200_000_000

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


def _context_parameters(context: ts.Context, max_clients: int) -> CkksParameters:
    seal_context = context.seal_context().data
    degree = seal_context.first_context_data().parms().poly_modulus_degree()
    moduli = seal_context.key_context_data().parms().coeff_modulus()
    return CkksParameters(
        poly_modulus_degree=degree,
        coeff_mod_bit_sizes=tuple(m.bit_count() for m in moduli),
        global_scale=context.global_scale,
        max_clients=max_clients,
    )


class Keyring:
    """The clients' CKKS key material. Build with `generate`, `for_payload` or
    `from_secret_context`; it never leaves a client except sealed (federation/crypto/keys.py)."""

    def __init__(self, context: ts.Context, parameters: CkksParameters, key_id: bytes) -> None:
        if not context.is_private():
            raise ValueError("a Keyring needs a context with the secret key")
        if len(key_id) != KEY_ID_BYTES:
            raise ValueError(f"key_id must be {KEY_ID_BYTES} bytes")
        self._context = context
        self.parameters = parameters
        self.key_id = key_id

    @classmethod
    def generate(
        cls,
        *,
        poly_modulus_degree: int = 8192,
        coeff_mod_bit_sizes: tuple[int, ...] = (60, SPECIAL_PRIME_BITS),
        global_scale: float = 2.0**35,
        max_clients: int = 64,
    ) -> Keyring:
        parameters = CkksParameters(
            poly_modulus_degree=poly_modulus_degree,
            coeff_mod_bit_sizes=tuple(coeff_mod_bit_sizes),
            global_scale=global_scale,
            max_clients=max_clients,
        )
        return cls.from_parameters(parameters)

    @classmethod
    def from_parameters(cls, parameters: CkksParameters) -> Keyring:
        context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            parameters.poly_modulus_degree,
            coeff_mod_bit_sizes=list(parameters.coeff_mod_bit_sizes),
            encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
            n_threads=1,
        )
        context.global_scale = parameters.global_scale
        return cls(context, parameters, secrets.token_bytes(KEY_ID_BYTES))

    @classmethod
    def for_payload(
        cls, n_values: int, *, max_abs_update: float, abs_error: float = 1e-6, max_clients: int = 64
    ) -> Keyring:
        """Generate a keyring with `choose_parameters(...)`."""
        return cls.from_parameters(
            choose_parameters(
                n_values, max_abs_update=max_abs_update, abs_error=abs_error, max_clients=max_clients
            )
        )

    @classmethod
    def from_secret_context(cls, data: bytes) -> Keyring:
        framed = unpack_context(data, secret=True)
        context = _load_tenseal_context(framed, secret=True)
        return cls(context, _context_parameters(context, framed.max_clients), framed.key_id)

    def public_context(self) -> bytes:
        """Parameters only: no secret key, no Galois or relinearization keys (there is no public key
        under symmetric encryption). This is all the server needs to add ciphertexts."""
        raw = self._context.serialize(
            save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
        )
        return pack_context(self._framed(raw, secret=False))

    def secret_context(self) -> bytes:
        """The whole key: send it only sealed to another client (federation.crypto.keys.seal_for)."""
        raw = self._context.serialize(
            save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
        )
        return pack_context(self._framed(raw, secret=True))

    def _framed(self, raw: bytes, *, secret: bool) -> FramedContext:
        return FramedContext(
            self.key_id, secret, self.parameters.poly_modulus_degree, self.parameters.max_clients, raw
        )

    @property
    def slots(self) -> int:
        return self.parameters.slots

    @property
    def max_abs_sum(self) -> float:
        return self.parameters.max_abs_sum

    @property
    def max_abs_update(self) -> float:
        return self.parameters.max_abs_update

    def noise_bound(self, n_clients: int) -> float:
        return self.parameters.noise_bound(n_clients)

    def _limits(self) -> PayloadLimits:
        return PayloadLimits(self.key_id, self.slots, self.parameters.max_ciphertext_bytes(), MAX_VALUES)

    def __repr__(self) -> str:
        p = self.parameters
        return (
            f"Keyring(key_id={self.key_id.hex()[:12]}, N={p.poly_modulus_degree}, "
            f"coeff_mod_bit_sizes={p.coeff_mod_bit_sizes}, scale=2**{math.log2(p.global_scale):g})"
        )


def _load_tenseal_context(framed: FramedContext, *, secret: bool) -> ts.Context:
    try:
        context = ts.context_from(framed.tenseal_bytes, n_threads=1)
    except Exception as error:  # TenSEAL raises ValueError or RuntimeError on bad bytes
        raise PayloadFormatError(f"not a valid TenSEAL context: {error}") from error
    if context.is_private() != secret:
        raise PayloadFormatError(
            "the public context holds a secret key: the server must never receive it"
            if context.is_private()
            else "the secret context holds no secret key"
        )
    degree = context.seal_context().data.first_context_data().parms().poly_modulus_degree()
    if degree != framed.poly_modulus_degree:
        raise PayloadFormatError(
            f"context header says N={framed.poly_modulus_degree}, the context has N={degree}"
        )
    return context


@dataclass(frozen=True)
class PublicContext:
    """What the server holds: a TenSEAL context that can add but not decrypt or encrypt."""

    context: ts.Context
    key_id: bytes
    parameters: CkksParameters

    @property
    def limits(self) -> PayloadLimits:
        return PayloadLimits(
            self.key_id, self.parameters.slots, self.parameters.max_ciphertext_bytes(), MAX_VALUES
        )


def load_public_context(data: bytes) -> PublicContext:
    """Load `keyring.public_context()` bytes; refuses anything holding a secret key."""
    framed = unpack_context(data, secret=False)
    context = _load_tenseal_context(framed, secret=False)
    return PublicContext(context, framed.key_id, _context_parameters(context, framed.max_clients))


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


def release_decimals(error_bound: float, *, margin_bits: int = RELEASE_MARGIN_BITS) -> int:
    """Decimals for `release` that round at least 2**margin_bits above `error_bound` (for a
    mean: keyring.noise_bound(n_clients) / total_weight). A value then changes with the noise
    only when it lies within the noise of a rounding boundary, with probability ~2**-margin_bits
    for values spread over the grid."""
    if not (error_bound > 0 and math.isfinite(error_bound)):
        raise ValueError(f"error_bound must be a positive finite number, got {error_bound}")
    return math.floor(-math.log10(error_bound * 2.0**margin_bits))


def mean_release_decimals(
    parameters: CkksParameters,
    total_weight: float,
    *,
    max_decimals: int,
    margin_bits: int = RELEASE_MARGIN_BITS,
) -> int:
    """Decimals at which a decrypted mean of `total_weight` may leave a client: at most `max_decimals`,
    and a grid at least 2**margin_bits above the noise of the mean, bounded by the noise of an aggregate
    of `parameters.max_clients` fresh updates (the most an honest aggregate sums) over the weight."""
    if not (total_weight > 0 and math.isfinite(total_weight)):
        raise ValueError("total_weight must be a positive finite number")
    bound = parameters.noise_bound(parameters.max_clients) / total_weight
    return min(max_decimals, release_decimals(bound, margin_bits=margin_bits))


def read_header(keyring: Keyring, ciphertext: bytes) -> PayloadHeader:
    """The checked header of a payload made under `keyring` (no ciphertext is parsed)."""
    return _header_for(keyring, ciphertext, None)


def release(values, *, decimals: int, noise_std: float = 0.0, seed: int | None = None) -> np.ndarray:
    """Prepare decrypted values to leave the clients (for the server, a report, a final model).

    CKKS decryptions carry the encryption noise, and an adversary holding a ciphertext and its
    exact decryption can recover the secret key (Li & Micciancio 2021). Rounding to `decimals`
    (see `release_decimals`) drops the noise bits, as Lattigo's DecodeAndRound does;
    `noise_std` > 0 first adds Gaussian flooding noise, OpenFHE's provable mitigation when
    its standard deviation is far above `Keyring.noise_bound` (the statistical distance it
    leaves shrinks with bound / noise_std). Use both when values are released repeatedly."""
    array = np.asarray(values, dtype=np.float64)
    if not (noise_std >= 0 and math.isfinite(noise_std)):
        raise ValueError(f"noise_std must be a non-negative finite number, got {noise_std}")
    if noise_std > 0:
        # Flooding noise must be unpredictable to whoever sees the result: seed only for tests.
        rng = np.random.default_rng(seed if seed is not None else secrets.randbits(128))
        array = array + rng.normal(0.0, noise_std, size=array.shape)
    return np.round(array, decimals)
