"""Wire formats of the homomorphic-aggregation layer: framed CKKS payloads and contexts.

Nothing here is cryptography; it is the byte layout that `federation/crypto/he.py` puts around
TenSEAL's serialized objects, and the size checks made before any of those bytes reach a
deserializer. Both formats are little-endian, versioned and self-describing; neither uses
pickle.

Encrypted payload (a client update or an aggregate)::

    magic    4s   b"SKHE"
    version  u8   1
    kind     u8   1 = client update, 2 = aggregate of updates
    reserved u16  0
    key_id   16s  identifies the keyring (random, chosen by the dealer)
    n_values u64  length of the plaintext vector (the encrypted weight comes after it)
    n_contributors u32  1 for an update, the number of updates summed for an aggregate
    slots    u32  values per ciphertext (half the ring degree)
    n_chunks u32  ceil((n_values + 1) / slots)
    n_chunks x u32  byte length of each serialized ciphertext
    the serialized ciphertexts, back to back

Framed context (public: parameters only; secret: parameters and the secret key)::

    magic    4s   b"SKCX"
    version  u8   1
    secret   u8   0 = public, 1 = holds the secret key
    reserved u16  0
    key_id   16s
    poly_modulus_degree u32
    max_clients u32  the most updates one aggregate may sum (overflow bound, see he.py)
    n_bytes  u64  length of the TenSEAL context that follows
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

PAYLOAD_MAGIC = b"SKHE"
CONTEXT_MAGIC = b"SKCX"
FORMAT_VERSION = 1
KEY_ID_BYTES = 16

_PAYLOAD_HEADER = struct.Struct("<4sBBH16sQIII")
_CHUNK_LENGTH = struct.Struct("<I")
_CONTEXT_HEADER = struct.Struct("<4sBBH16sIIQ")

# TenSEAL wraps each SEAL ciphertext in a protobuf message with its size and scale; 145 bytes
# were measured, this leaves room for version drift without admitting a second polynomial.
CIPHERTEXT_OVERHEAD_BYTES = 4096
# A chunk shorter than this cannot hold a ciphertext (TenSEAL accepts b"" as an empty vector).
MIN_CIPHERTEXT_BYTES = 64
# Public contexts hold parameters only (~100 bytes); Galois keys alone would be ~17 MB.
MAX_PUBLIC_CONTEXT_BYTES = 1 << 20
MAX_SECRET_CONTEXT_BYTES = 64 << 20


class PayloadFormatError(ValueError):
    """Bytes that are not a well-formed payload or context of this format."""


class PayloadKind(IntEnum):
    UPDATE = 1
    AGGREGATE = 2


def max_ciphertext_bytes(poly_modulus_degree: int, n_data_primes: int) -> int:
    """Upper bound on one serialized fresh ciphertext: two polynomials of N 64-bit words per
    data prime (SEAL's compression only shrinks this), plus the TenSEAL wrapper."""
    return 2 * poly_modulus_degree * n_data_primes * 8 + CIPHERTEXT_OVERHEAD_BYTES


def chunk_count(n_values: int, slots: int) -> int:
    """Ciphertexts needed for `n_values` values plus the encrypted weight."""
    return -(-(n_values + 1) // slots)


@dataclass(frozen=True)
class PayloadHeader:
    kind: PayloadKind
    key_id: bytes
    n_values: int
    n_contributors: int
    slots: int
    chunk_lengths: tuple[int, ...]

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_lengths)

    @property
    def layout(self) -> tuple[int, int, int]:
        """What must agree between payloads that are summed."""
        return (self.n_values, self.slots, self.n_chunks)


@dataclass(frozen=True)
class PayloadLimits:
    """What the receiver accepts; checked on the header, before any ciphertext is parsed."""

    key_id: bytes
    slots: int
    max_chunk_bytes: int
    max_values: int


def pack_payload(
    kind: PayloadKind, key_id: bytes, n_values: int, n_contributors: int, slots: int, chunks: list[bytes]
) -> bytes:
    if len(key_id) != KEY_ID_BYTES:
        raise ValueError(f"key_id must be {KEY_ID_BYTES} bytes, got {len(key_id)}")
    if len(chunks) != chunk_count(n_values, slots):
        raise ValueError(
            f"{len(chunks)} ciphertexts for {n_values} values at {slots} slots; "
            f"expected {chunk_count(n_values, slots)}"
        )
    header = _PAYLOAD_HEADER.pack(
        PAYLOAD_MAGIC, FORMAT_VERSION, int(kind), 0, key_id, n_values, n_contributors, slots, len(chunks)
    )
    lengths = b"".join(_CHUNK_LENGTH.pack(len(chunk)) for chunk in chunks)
    return b"".join([header, lengths, *chunks])


def read_payload_header(data: bytes, limits: PayloadLimits) -> PayloadHeader:
    """Parse and check a payload's header against `limits` and the payload's own length.

    Raises PayloadFormatError naming the first field that is wrong."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise PayloadFormatError(f"expected bytes, got {type(data).__name__}")
    if len(data) < _PAYLOAD_HEADER.size:
        raise PayloadFormatError(f"{len(data)} bytes is shorter than the {_PAYLOAD_HEADER.size}-byte header")
    magic, version, kind, _, key_id, n_values, n_contributors, slots, n_chunks = _PAYLOAD_HEADER.unpack_from(
        data
    )
    if magic != PAYLOAD_MAGIC:
        raise PayloadFormatError(
            f"bad magic {magic!r}: not a secure-kd CKKS payload (expected {PAYLOAD_MAGIC!r})"
        )
    if version != FORMAT_VERSION:
        raise PayloadFormatError(
            f"payload format version {version}; this build reads version {FORMAT_VERSION}"
        )
    if kind not in PayloadKind._value2member_map_:
        raise PayloadFormatError(f"unknown payload kind {kind}")
    if key_id != limits.key_id:
        raise PayloadFormatError(
            f"made under keyring {key_id.hex()[:12]}, expected {limits.key_id.hex()[:12]}: "
            "re-encrypt with this run's keyring"
        )
    if slots != limits.slots:
        raise PayloadFormatError(f"{slots} slots per ciphertext; this keyring has {limits.slots}")
    if not 1 <= n_values <= limits.max_values:
        raise PayloadFormatError(f"n_values={n_values} outside [1, {limits.max_values}]")
    if n_contributors < 1:
        raise PayloadFormatError("n_contributors must be at least 1")
    if n_chunks != chunk_count(n_values, slots):
        raise PayloadFormatError(
            f"{n_chunks} ciphertexts declared for {n_values} values; the layout needs "
            f"{chunk_count(n_values, slots)}"
        )
    table_end = _PAYLOAD_HEADER.size + n_chunks * _CHUNK_LENGTH.size
    if len(data) < table_end:
        raise PayloadFormatError(f"truncated: {len(data)} bytes, the length table alone ends at {table_end}")
    lengths = struct.unpack_from(f"<{n_chunks}I", data, _PAYLOAD_HEADER.size)
    for index, length in enumerate(lengths):
        if not MIN_CIPHERTEXT_BYTES <= length <= limits.max_chunk_bytes:
            raise PayloadFormatError(
                f"ciphertext {index} is {length} bytes; a ciphertext of this keyring is "
                f"{MIN_CIPHERTEXT_BYTES}..{limits.max_chunk_bytes} bytes"
            )
    expected = table_end + sum(lengths)
    if len(data) != expected:
        raise PayloadFormatError(
            f"payload is {len(data)} bytes but its header accounts for {expected}: "
            + ("truncated" if len(data) < expected else "trailing bytes")
        )
    return PayloadHeader(PayloadKind(kind), key_id, n_values, n_contributors, slots, tuple(lengths))


def iter_chunks(data: bytes, header: PayloadHeader):
    """Yield the serialized ciphertexts of a payload whose header was checked."""
    offset = _PAYLOAD_HEADER.size + header.n_chunks * _CHUNK_LENGTH.size
    view = memoryview(data)
    for length in header.chunk_lengths:
        yield bytes(view[offset : offset + length])
        offset += length


def chunk_at(data: bytes, header: PayloadHeader, index: int) -> bytes:
    offset = _PAYLOAD_HEADER.size + header.n_chunks * _CHUNK_LENGTH.size + sum(header.chunk_lengths[:index])
    return bytes(memoryview(data)[offset : offset + header.chunk_lengths[index]])


@dataclass(frozen=True)
class FramedContext:
    key_id: bytes
    secret: bool
    poly_modulus_degree: int
    max_clients: int
    tenseal_bytes: bytes


def pack_context(context: FramedContext) -> bytes:
    header = _CONTEXT_HEADER.pack(
        CONTEXT_MAGIC,
        FORMAT_VERSION,
        int(context.secret),
        0,
        context.key_id,
        context.poly_modulus_degree,
        context.max_clients,
        len(context.tenseal_bytes),
    )
    return header + context.tenseal_bytes


def unpack_context(data: bytes, *, secret: bool) -> FramedContext:
    """Parse a framed context, refusing one of the wrong kind (public vs secret) or size."""
    limit = MAX_SECRET_CONTEXT_BYTES if secret else MAX_PUBLIC_CONTEXT_BYTES
    what = "secret" if secret else "public"
    if not isinstance(data, bytes | bytearray | memoryview):
        raise PayloadFormatError(f"expected the {what} context as bytes, got {type(data).__name__}")
    if len(data) > limit:
        raise PayloadFormatError(
            f"{what} context is {len(data)} bytes, over the {limit}-byte limit"
            + (
                ""
                if secret
                else ": a public context holds parameters only (were Galois or secret keys saved?)"
            )
        )
    if len(data) < _CONTEXT_HEADER.size:
        raise PayloadFormatError(
            f"{len(data)} bytes is shorter than the {_CONTEXT_HEADER.size}-byte context header"
        )
    magic, version, is_secret, _, key_id, degree, max_clients, n_bytes = _CONTEXT_HEADER.unpack_from(data)
    if magic != CONTEXT_MAGIC:
        raise PayloadFormatError(
            f"bad magic {magic!r}: not a secure-kd CKKS context (expected {CONTEXT_MAGIC!r})"
        )
    if version != FORMAT_VERSION:
        raise PayloadFormatError(
            f"context format version {version}; this build reads version {FORMAT_VERSION}"
        )
    if is_secret not in (0, 1):
        raise PayloadFormatError(f"bad secret flag {is_secret}")
    if bool(is_secret) != secret:
        raise PayloadFormatError(
            "this is a secret context (it holds the secret key); the server must only ever get "
            "keyring.public_context()"
            if is_secret
            else "this is a public context without the secret key; clients need keyring.secret_context()"
        )
    if len(data) != _CONTEXT_HEADER.size + n_bytes:
        raise PayloadFormatError(
            f"context is {len(data)} bytes but its header accounts for {_CONTEXT_HEADER.size + n_bytes}"
        )
    if max_clients < 1:
        raise PayloadFormatError("max_clients must be at least 1")
    tenseal_bytes = bytes(memoryview(data)[_CONTEXT_HEADER.size :])
    return FramedContext(key_id, bool(is_secret), degree, max_clients, tenseal_bytes)
