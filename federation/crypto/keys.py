"""The authenticated key ceremony: how the CKKS secret context reaches the other clients.

The dealer (one client) generates the CKKS keyring (federation/crypto/he.py) and, for each other
client, calls `seal_for(recipient_bundle, dealer_keys, run_id, keyring.secret_context(),
trust=trust)`; the server relays the bytes; the recipient calls `open_from(...)` and
`Keyring.from_secret_context(...)`. Identities, bundles and the trust store are in
federation/crypto/identity.py (re-exported here).

Sealing is ECIES-style: an ephemeral X25519 key agrees a secret with the recipient's signed
kex key, HKDF-SHA256 (info: run id, sender, recipient and the public keys) derives an
AES-256-GCM key, the associated data binds the same fields, and the sender's identity key
signs the whole message. So a relaying server cannot:

- substitute a recipient's kex key (the bundle must verify under the registered identity;
  re-signing with another identity is a `KeySubstitutionError`), nor hand over a bundle from
  before the recipient's last key rotation (`StaleBundleError`) or an expired one
  (`ExpiredBundleError`): both ends check the other's bundle against their trust store;
- forge or alter a message (the Ed25519 signature and the GCM tag both fail);
- replay a message into another run or to another recipient (the names are in the signed
  header and in the GCM associated data; `open_from` checks them against its own).
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from federation.crypto.identity import (
    KEY_BYTES,
    SIGNATURE_BYTES,
    CeremonyError,
    ExpiredBundleError,
    KeySubstitutionError,
    OrgKeys,
    PublicBundle,
    StaleBundleError,
    TrustStore,
    key_fingerprint,
    length_prefixed,
)

__all__ = [
    "CeremonyError",
    "ExpiredBundleError",
    "KeySubstitutionError",
    "OrgKeys",
    "PublicBundle",
    "SealedMessage",
    "StaleBundleError",
    "TrustStore",
    "key_fingerprint",
    "open_from",
    "seal_for",
]

SEAL_SIGNATURE_DOMAIN = b"secure-kd/sealed-message-signature/v1"
SEAL_AAD_DOMAIN = b"secure-kd/sealed-message-aad/v1"
SEAL_KDF_DOMAIN = b"secure-kd/sealed-message-key/v1"
SEALED_MAGIC = b"SKSL"
FORMAT_VERSION = 1
MAX_SEALED_BYTES = 64 << 20
_NONCE_BYTES = 12


def _check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not 1 <= len(run_id.encode()) <= 256:
        raise ValueError(f"run_id must be a non-empty string of at most 256 bytes, got {run_id!r}")
    return run_id


@dataclass(frozen=True)
class SealedMessage:
    """The relayed bytes, parsed. The signature covers every field before it."""

    run_id: str
    sender: str
    recipient: str
    ephemeral_pub: bytes
    nonce: bytes
    ciphertext: bytes
    signature: bytes

    def signed_bytes(self) -> bytes:
        header = SEALED_MAGIC + bytes([FORMAT_VERSION])
        names = length_prefixed(self.run_id.encode(), self.sender.encode(), self.recipient.encode())
        body = self.ephemeral_pub + self.nonce + struct.pack("<I", len(self.ciphertext)) + self.ciphertext
        return header + names + body

    def to_bytes(self) -> bytes:
        return self.signed_bytes() + self.signature

    @classmethod
    def from_bytes(cls, blob: bytes, *, max_bytes: int = MAX_SEALED_BYTES) -> SealedMessage:
        if not isinstance(blob, bytes | bytearray):
            raise CeremonyError(f"sealed message must be bytes, got {type(blob).__name__}")
        if len(blob) > max_bytes:
            raise CeremonyError(f"sealed message is {len(blob)} bytes, over the {max_bytes}-byte limit")
        try:
            if blob[:4] != SEALED_MAGIC or blob[4] != FORMAT_VERSION:
                raise CeremonyError("not a secure-kd sealed message of format version 1")
            offset = 5
            names = []
            for _ in range(3):
                (length,) = struct.unpack_from("<H", blob, offset)
                names.append(bytes(blob[offset + 2 : offset + 2 + length]).decode("utf-8"))
                offset += 2 + length
            ephemeral_pub = bytes(blob[offset : offset + KEY_BYTES])
            nonce = bytes(blob[offset + KEY_BYTES : offset + KEY_BYTES + _NONCE_BYTES])
            offset += KEY_BYTES + _NONCE_BYTES
            (length,) = struct.unpack_from("<I", blob, offset)
            offset += 4
            ciphertext = bytes(blob[offset : offset + length])
            signature = bytes(blob[offset + length :])
        except (IndexError, struct.error, UnicodeDecodeError) as error:
            raise CeremonyError(f"malformed sealed message: {error}") from error
        if len(ciphertext) != length or len(signature) != SIGNATURE_BYTES or len(nonce) != _NONCE_BYTES:
            raise CeremonyError("malformed sealed message: truncated or with trailing bytes")
        return cls(names[0], names[1], names[2], ephemeral_pub, nonce, ciphertext, signature)


def _context_fields(
    run_id: str, sender: PublicBundle, recipient: str, recipient_kex_pub: bytes, ephemeral_pub: bytes
) -> bytes:
    return (
        length_prefixed(run_id.encode(), sender.org.encode(), recipient.encode())
        + sender.identity_pub
        + recipient_kex_pub
        + ephemeral_pub
    )


def _derive_key(shared_secret: bytes, context_fields: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=SEAL_KDF_DOMAIN + context_fields
    ).derive(shared_secret)


def seal_for(
    recipient_bundle: PublicBundle, sender_keys: OrgKeys, run_id: str, payload: bytes, *, trust: TrustStore
) -> bytes:
    """Encrypt `payload` to the recipient's registered kex key, bound to this run and both orgs."""
    _check_run_id(run_id)
    if not isinstance(payload, bytes | bytearray):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) > MAX_SEALED_BYTES - 4096:
        raise ValueError(
            f"payload is {len(payload)} bytes; sealed messages are limited to {MAX_SEALED_BYTES}"
        )
    recipient = trust.verify(recipient_bundle)
    sender_bundle = sender_keys.public_bundle()
    ephemeral = x25519.X25519PrivateKey.generate()
    ephemeral_pub = ephemeral.public_key().public_bytes_raw()
    try:
        shared = ephemeral.exchange(x25519.X25519PublicKey.from_public_bytes(recipient.kex_pub))
    except ValueError as error:
        raise KeySubstitutionError(
            f"{recipient.org!r}'s kex key is not usable for X25519: {error}"
        ) from error
    fields = _context_fields(run_id, sender_bundle, recipient.org, recipient.kex_pub, ephemeral_pub)
    nonce = secrets.token_bytes(_NONCE_BYTES)
    ciphertext = AESGCM(_derive_key(shared, fields)).encrypt(nonce, bytes(payload), SEAL_AAD_DOMAIN + fields)
    unsigned = SealedMessage(run_id, sender_bundle.org, recipient.org, ephemeral_pub, nonce, ciphertext, b"")
    signature = sender_keys.sign(SEAL_SIGNATURE_DOMAIN + unsigned.signed_bytes())
    return SealedMessage(
        run_id, sender_bundle.org, recipient.org, ephemeral_pub, nonce, ciphertext, signature
    ).to_bytes()


def open_from(
    sender_bundle: PublicBundle,
    recipient_keys: OrgKeys,
    run_id: str,
    blob: bytes,
    *,
    trust: TrustStore,
    max_bytes: int = MAX_SEALED_BYTES,
) -> bytes:
    """Verify and decrypt a message sealed by `sender_bundle`'s org for `recipient_keys`' org in `run_id`."""
    _check_run_id(run_id)
    message = SealedMessage.from_bytes(blob, max_bytes=max_bytes)
    for what, got, expected in (
        ("run", message.run_id, run_id),
        ("sender", message.sender, sender_bundle.org),
        ("recipient", message.recipient, recipient_keys.org),
    ):
        if got != expected:
            raise CeremonyError(
                f"message was sealed with {what} {got!r}, but this is {what} {expected!r}: "
                "replayed or misrouted"
            )
    sender = trust.verify(sender_bundle)
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(sender.identity_pub).verify(
            message.signature, SEAL_SIGNATURE_DOMAIN + message.signed_bytes()
        )
    except InvalidSignature as error:
        raise CeremonyError(
            f"signature does not verify under {sender.org!r}'s identity key: message tampered"
        ) from error
    try:
        shared = recipient_keys.kex.exchange(x25519.X25519PublicKey.from_public_bytes(message.ephemeral_pub))
    except ValueError as error:
        raise CeremonyError(f"invalid ephemeral key in sealed message: {error}") from error
    # Rebuilt from what this recipient expects, not from the message: any mismatch fails the tag.
    fields = _context_fields(
        run_id, sender, recipient_keys.org, recipient_keys.kex_pub, message.ephemeral_pub
    )
    try:
        return AESGCM(_derive_key(shared, fields)).decrypt(
            message.nonce, message.ciphertext, SEAL_AAD_DOMAIN + fields
        )
    except InvalidTag as error:
        raise CeremonyError(
            "AES-GCM authentication failed: the ciphertext was tampered with, or it was sealed for another "
            "run, recipient or key"
        ) from error
