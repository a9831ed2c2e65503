"""`federation.he`: the stable name (DESIGN.md) of the CKKS aggregation in `federation.crypto.he`.

    ring = Keyring.generate(...)            # a client; ring.public_context() holds no secret key
    blob = encrypt(ring, vector, weight)    # Enc(weight * vector)
    total = aggregate(ring.public_context(), [blob, ...])   # the server: adds only
    decrypt(ring, total, length)            # a client: the weighted sum

Only these names are re-exported; everything else of the layer is imported from `federation.crypto.*`.
"""

from federation.crypto.he import (
    InvalidCiphertextError,
    Keyring,
    PublicContext,
    aggregate,
    check_payload,
    decrypt,
    decrypt_mean,
    decrypt_weight,
    encrypt,
    load_public_context,
)

__all__ = [
    "InvalidCiphertextError",
    "Keyring",
    "PublicContext",
    "aggregate",
    "check_payload",
    "decrypt",
    "decrypt_mean",
    "decrypt_weight",
    "encrypt",
    "load_public_context",
]
