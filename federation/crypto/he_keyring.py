"""The clients' CKKS key material and the server's public context (TenSEAL).

`Keyring` holds the secret context every client decrypts with (`generate`, `for_payload`,
`from_parameters`, `from_secret_context`); it never leaves a client except sealed
(federation/crypto/keys.py). `PublicContext` is what the server holds: the parameters only, with no
secret, public, relinearization or Galois key, so it can neither decrypt nor encrypt. Both are framed
and checked on load (federation/crypto/codec.py). Operations on ciphertexts: federation/crypto/he.py.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import tenseal as ts
import tenseal.sealapi  # noqa: F401  registers seal::Modulus, needed to read the coefficient moduli

from federation.crypto.codec import (
    KEY_ID_BYTES,
    FramedContext,
    PayloadFormatError,
    PayloadLimits,
    pack_context,
    unpack_context,
)
from federation.crypto.he_params import SPECIAL_PRIME_BITS, CkksParameters, choose_parameters

# Most values one payload may hold (200M float32 parameters is ~6 GB on the wire).
MAX_VALUES = 200_000_000


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
