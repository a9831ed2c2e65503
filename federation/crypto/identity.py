"""Organization identities for the key ceremony: signed key bundles, private key files, trust.

Each organization owns two key pairs, generated on its own machine:

- an Ed25519 identity key, registered out of band (like its Flower SuperNode key) in every
  peer's `TrustStore`;
- an X25519 key-exchange key, whose public half is signed by the identity key over
  (domain tag, org, kex public key, epoch, expiry) and published as a `PublicBundle`.

The epoch counts key rotations (`OrgKeys.rotated()`: a new kex key, epoch + 1, a new expiry,
the same identity) and the expiry (`not_after`, Unix seconds) bounds how long a bundle is
good for. A bundle is trusted only if its identity key is the registered one, its signature
verifies under it, its epoch is not older than the registered bundle's (a bundle from before
a rotation is a `StaleBundleError`), and it has not expired (`ExpiredBundleError`); anything
else is a `KeySubstitutionError`. federation/crypto/keys.py uses these to seal the CKKS secret
context from one client to another.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import secrets
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

KEX_SIGNATURE_DOMAIN = b"secure-kd/kex-key-signature/v2"
BUNDLE_FORMAT = "secure-kd/public-bundle"
FORMAT_VERSION = 2
DEFAULT_VALID_DAYS = 90
MAX_VALID_DAYS = 3650
MAX_BUNDLE_BYTES = 16 << 10
IDENTITY_FILE = "identity.pem"
KEX_FILE = "kex.pem"
BUNDLE_FILE = "bundle.json"
KEY_BYTES = 32
SIGNATURE_BYTES = 64

_ORG_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class CeremonyError(Exception):
    """A sealed message that must not be trusted: tampered, replayed, malformed or misaddressed."""


class KeySubstitutionError(CeremonyError):
    """A public bundle that does not verify under the organization's registered identity key."""


class StaleBundleError(KeySubstitutionError):
    """A correctly signed bundle from before the organization's last key rotation (older epoch)."""


class ExpiredBundleError(KeySubstitutionError):
    """A correctly signed bundle whose validity (`not_after`) has passed."""


def check_org(org: str) -> str:
    if not isinstance(org, str) or not _ORG_PATTERN.fullmatch(org):
        raise ValueError(
            f"organization name {org!r} must be 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return org


def length_prefixed(*fields: bytes) -> bytes:
    return b"".join(struct.pack("<H", len(field)) + field for field in fields)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, name: str, length: int) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"bundle field {name!r} must be a base64 string")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"bundle field {name!r} is not valid base64") from error
    if len(data) != length:
        raise ValueError(f"bundle field {name!r} must decode to {length} bytes, got {len(data)}")
    return data


def _kex_signed_message(org: str, kex_pub: bytes, epoch: int, not_after: int) -> bytes:
    return (
        KEX_SIGNATURE_DOMAIN + length_prefixed(org.encode(), kex_pub) + struct.pack("<QQ", epoch, not_after)
    )


def _utc(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def key_fingerprint(public_key: bytes) -> str:
    """SHA-256 of a raw public key, hex: what organizations compare out of band."""
    return hashlib.sha256(public_key).hexdigest()


@dataclass(frozen=True)
class PublicBundle:
    """An organization's public keys, as published to peers through the server."""

    org: str
    identity_pub: bytes
    kex_pub: bytes
    epoch: int
    not_after: int  # Unix seconds (UTC) after which the bundle is refused
    kex_sig: bytes

    def __post_init__(self) -> None:
        check_org(self.org)
        for name, value in (("epoch", self.epoch), ("not_after", self.not_after)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**63:
                raise ValueError(f"bundle field {name!r} must be a positive integer, got {value!r}")
        for name, value, length in (
            ("identity_pub", self.identity_pub, KEY_BYTES),
            ("kex_pub", self.kex_pub, KEY_BYTES),
            ("kex_sig", self.kex_sig, SIGNATURE_BYTES),
        ):
            if not isinstance(value, bytes) or len(value) != length:
                raise ValueError(f"{name} must be {length} raw bytes")

    def signed_message(self) -> bytes:
        return _kex_signed_message(self.org, self.kex_pub, self.epoch, self.not_after)

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.not_after

    def check_not_expired(self, now: float | None = None) -> None:
        if self.expired(now):
            raise ExpiredBundleError(
                f"{self.org!r}'s key bundle (epoch {self.epoch}) expired on {_utc(self.not_after)}: the "
                "organization must rotate its keys (`secure-kd deploy rotate-keys`) and re-register the "
                "new bundle with the operator"
            )

    def verify_signature(self, identity_pub: bytes) -> None:
        """Check kex_sig under `identity_pub` (the registered key, not the bundle's own claim); the
        signature covers the org, the kex key, the epoch and the expiry."""
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(identity_pub).verify(
                self.kex_sig, self.signed_message()
            )
        except InvalidSignature as error:
            raise KeySubstitutionError(
                f"the key-exchange key in {self.org!r}'s bundle is not signed by its registered identity key "
                f"({key_fingerprint(identity_pub)[:16]}): the bundle was altered or substituted"
            ) from error

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": BUNDLE_FORMAT,
                "version": FORMAT_VERSION,
                "org": self.org,
                "identity_pub": _b64(self.identity_pub),
                "kex_pub": _b64(self.kex_pub),
                "epoch": self.epoch,
                "not_after": self.not_after,
                "kex_sig": _b64(self.kex_sig),
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, data: str | bytes) -> PublicBundle:
        if len(data) > MAX_BUNDLE_BYTES:
            raise ValueError(f"bundle is {len(data)} bytes, over the {MAX_BUNDLE_BYTES}-byte limit")
        try:
            fields = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"bundle is not valid JSON: {error}") from error
        if isinstance(fields, dict) and fields.get("format") == BUNDLE_FORMAT and fields.get("version") == 1:
            raise ValueError(
                "bundle format v1 carries no epoch or expiry, so it stays valid after a key rotation: "
                "make new keys (`secure-kd deploy init-org --force`) and register the new bundle"
            )
        expected = {"format", "version", "org", "identity_pub", "kex_pub", "epoch", "not_after", "kex_sig"}
        if not isinstance(fields, dict) or set(fields) != expected:
            got = sorted(fields) if isinstance(fields, dict) else type(fields).__name__
            raise ValueError(f"bundle must have exactly the fields {sorted(expected)}, got {got}")
        if fields["format"] != BUNDLE_FORMAT or fields["version"] != FORMAT_VERSION:
            raise ValueError(
                f"bundle format {fields['format']!r} v{fields['version']}; "
                f"expected {BUNDLE_FORMAT!r} v{FORMAT_VERSION}"
            )
        return cls(
            org=fields["org"],
            identity_pub=_unb64(fields["identity_pub"], "identity_pub", KEY_BYTES),
            kex_pub=_unb64(fields["kex_pub"], "kex_pub", KEY_BYTES),
            epoch=fields["epoch"],
            not_after=fields["not_after"],
            kex_sig=_unb64(fields["kex_sig"], "kex_sig", SIGNATURE_BYTES),
        )


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(descriptor, mode)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _read_private(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: generate the organization's keys with OrgKeys.generate(...).save()"
        )
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"{path} has mode {mode:o}, readable by others: run `chmod 600 {path}`")
    return path.read_bytes()


def _expiry(valid_days: float, now: float | None) -> int:
    if not 0 < valid_days <= MAX_VALID_DAYS:
        raise ValueError(f"key validity must be between 0 and {MAX_VALID_DAYS} days, got {valid_days}")
    return int((time.time() if now is None else now) + valid_days * 86400)


class OrgKeys:
    """One organization's private keys. They never leave it; only `public_bundle()` does.

    `epoch` and `not_after` are signed into the bundle: `rotated()` makes the next epoch."""

    def __init__(
        self,
        org: str,
        identity: ed25519.Ed25519PrivateKey,
        kex: x25519.X25519PrivateKey,
        *,
        epoch: int = 1,
        not_after: int | None = None,
    ) -> None:
        self.org = check_org(org)
        self.identity = identity
        self.kex = kex
        self.epoch = epoch
        self.not_after = _expiry(DEFAULT_VALID_DAYS, None) if not_after is None else not_after

    @classmethod
    def generate(
        cls, org: str, *, valid_days: float = DEFAULT_VALID_DAYS, now: float | None = None
    ) -> OrgKeys:
        return cls(
            org,
            ed25519.Ed25519PrivateKey.generate(),
            x25519.X25519PrivateKey.generate(),
            epoch=1,
            not_after=_expiry(valid_days, now),
        )

    def rotated(self, *, valid_days: float = DEFAULT_VALID_DAYS, now: float | None = None) -> OrgKeys:
        """A new key-exchange key under the same identity, one epoch later, with a fresh expiry: once
        peers hold the new bundle, every bundle of an older epoch is refused."""
        return OrgKeys(
            self.org,
            self.identity,
            x25519.X25519PrivateKey.generate(),
            epoch=self.epoch + 1,
            not_after=_expiry(valid_days, now),
        )

    @property
    def identity_pub(self) -> bytes:
        return self.identity.public_key().public_bytes_raw()

    @property
    def kex_pub(self) -> bytes:
        return self.kex.public_key().public_bytes_raw()

    def public_bundle(self) -> PublicBundle:
        message = _kex_signed_message(self.org, self.kex_pub, self.epoch, self.not_after)
        return PublicBundle(
            self.org, self.identity_pub, self.kex_pub, self.epoch, self.not_after, self.identity.sign(message)
        )

    def sign(self, message: bytes) -> bytes:
        return self.identity.sign(message)

    def save(
        self, directory: str | Path, *, passphrase: bytes | None = None, overwrite: bool = False
    ) -> Path:
        """Write identity.pem and kex.pem (PKCS#8, mode 0600, encrypted when a passphrase is
        given) and bundle.json (public) into `directory`, atomically."""
        directory = Path(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        paths = [directory / IDENTITY_FILE, directory / KEX_FILE, directory / BUNDLE_FILE]
        existing = [str(p) for p in paths if p.exists()]
        if existing and not overwrite:
            raise FileExistsError(
                f"keys already exist ({', '.join(existing)}); pass overwrite=True to replace them"
            )
        encryption = (
            serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
        )
        for path, key in ((paths[0], self.identity), (paths[1], self.kex)):
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
            _write_atomically(path, pem, 0o600)
        _write_atomically(paths[2], self.public_bundle().to_json().encode(), 0o644)
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, passphrase: bytes | None = None) -> OrgKeys:
        directory = Path(directory)
        bundle = PublicBundle.from_json((directory / BUNDLE_FILE).read_bytes())
        keys = []
        for name, key_type in (
            (IDENTITY_FILE, ed25519.Ed25519PrivateKey),
            (KEX_FILE, x25519.X25519PrivateKey),
        ):
            try:
                key = serialization.load_pem_private_key(_read_private(directory / name), password=passphrase)
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"cannot load {directory / name}: {error} (wrong or missing passphrase?)"
                ) from error
            if not isinstance(key, key_type):
                raise ValueError(
                    f"{directory / name} holds a {type(key).__name__}, expected {key_type.__name__}"
                )
            keys.append(key)
        loaded = cls(bundle.org, *keys, epoch=bundle.epoch, not_after=bundle.not_after)
        if loaded.public_bundle() != bundle:
            raise ValueError(f"{directory / BUNDLE_FILE} does not match the private keys next to it")
        return loaded


class TrustStore:
    """Registered identity keys, org -> Ed25519 public key, obtained out of band; with a registered
    bundle (`from_bundles`, `from_directory`) also its epoch and kex key: older epochs are refused."""

    def __init__(self, identities: dict[str, bytes] | None = None) -> None:
        self._identities: dict[str, bytes] = {}
        self._registered: dict[str, PublicBundle] = {}
        for org, identity_pub in (identities or {}).items():
            self.register(org, identity_pub)

    def register(self, org: str, identity_pub: bytes) -> None:
        check_org(org)
        if len(identity_pub) != KEY_BYTES:
            raise ValueError(f"identity key for {org!r} must be {KEY_BYTES} raw bytes")
        known = self._identities.get(org)
        if known is not None and not hmac.compare_digest(known, identity_pub):
            raise KeySubstitutionError(f"{org!r} is already registered with a different identity key")
        self._identities[org] = bytes(identity_pub)

    def register_bundle(self, bundle: PublicBundle) -> None:
        """Register `bundle`'s identity and its epoch (a self-signed bundle; an expired one is kept, so
        that an organization that rotated since is still recognized)."""
        bundle.verify_signature(bundle.identity_pub)
        self.register(bundle.org, bundle.identity_pub)
        known = self._registered.get(bundle.org)
        if known is not None and known.epoch > bundle.epoch:
            return
        if known is not None and known.epoch == bundle.epoch and known != bundle:
            raise KeySubstitutionError(f"{bundle.org!r} has two different bundles for epoch {bundle.epoch}")
        self._registered[bundle.org] = bundle

    @classmethod
    def from_bundles(cls, bundles: list[PublicBundle]) -> TrustStore:
        store = cls()
        for bundle in bundles:
            store.register_bundle(bundle)
        return store

    @classmethod
    def from_directory(cls, directory: str | Path) -> TrustStore:
        """Register the identity of every `*.json` bundle in `directory` (each must be self-consistent)."""
        paths = sorted(Path(directory).glob("*.json"))
        if not paths:
            raise FileNotFoundError(
                f"no *.json bundles in {directory}: copy each organization's bundle.json there"
            )
        bundles = []
        for path in paths:
            try:
                bundles.append(PublicBundle.from_json(path.read_bytes()))
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from error
        return cls.from_bundles(bundles)

    @property
    def orgs(self) -> list[str]:
        return sorted(self._identities)

    def __contains__(self, org: object) -> bool:
        return org in self._identities

    def identity_pub(self, org: str) -> bytes:
        if org not in self._identities:
            raise KeySubstitutionError(
                f"organization {org!r} is not in the trust store: register its identity key out of band first"
            )
        return self._identities[org]

    def registered_epoch(self, org: str) -> int | None:
        known = self._registered.get(org)
        return None if known is None else known.epoch

    def verify(self, bundle: PublicBundle, *, now: float | None = None) -> PublicBundle:
        """Return `bundle` if it carries the registered identity key, a valid signature, an epoch no
        older than the registered bundle's (the same kex key at the same epoch) and has not expired."""
        registered = self.identity_pub(bundle.org)
        if not hmac.compare_digest(registered, bundle.identity_pub):
            raise KeySubstitutionError(
                f"{bundle.org!r}'s bundle carries identity key {key_fingerprint(bundle.identity_pub)[:16]} "
                f"but the registered one is {key_fingerprint(registered)[:16]}: a relay substituted the keys"
            )
        bundle.verify_signature(registered)
        known = self._registered.get(bundle.org)
        if known is not None and bundle.epoch < known.epoch:
            raise StaleBundleError(
                f"{bundle.org!r}'s bundle is from key epoch {bundle.epoch}, but the registered one is epoch "
                f"{known.epoch}: a bundle from before a key rotation (replayed, or the sender's keys are out "
                "of date)"
            )
        if (
            known is not None
            and bundle.epoch == known.epoch
            and not hmac.compare_digest(bundle.kex_pub, known.kex_pub)
        ):
            raise KeySubstitutionError(
                f"{bundle.org!r}'s bundle for epoch {bundle.epoch} carries another kex key than the "
                "registered one: a key rotation must raise the epoch"
            )
        bundle.check_not_expired(now)
        return bundle
