"""The operator's registry of organizations: registration bundles, the trust directory, Flower node ids.

    Registration.load(path)               an organization's <org>.registration.json, parsed and checked
    add_org / remove_org / set_node_id    the operator's trust/, nodes/ and registry.json (deploy_cli runs
                                          `flwr supernode register|unregister` around them)
    copy_trust(superlink_dir, dest)       mirror trust/ into an organization's trust directory

registry.json maps each organization to its Flower node id and key fingerprints, and the key epoch of
its registered bundle; `secure-kd deploy run` hands the org -> node id map to the ServerApp
(federation.deploy.node_binding), so a node that claims another organization's name is refused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.crypto.identity import PublicBundle, check_org
from federation.deploy.files import (
    MAX_REGISTRATION_BYTES,
    REGISTRATION_FORMAT,
    REGISTRATION_VERSION,
    DeployError,
    SuperLinkFiles,
    node_key_fingerprint,
    write_file,
)


@dataclass(frozen=True)
class Registration:
    """An organization's public registration bundle, parsed and checked."""

    org: str
    node_public_key: str  # one OpenSSH line, ecdsa-sha2-nistp384
    bundle: PublicBundle

    @classmethod
    def load(cls, path: str | Path) -> Registration:
        path = Path(path)
        data = path.read_bytes()
        if len(data) > MAX_REGISTRATION_BYTES:
            raise ValueError(f"{path} is {len(data)} bytes: not a registration bundle")
        try:
            fields = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not JSON: {error}") from error
        expected = {"format", "version", "org", "node_public_key", "identity_bundle"}
        if not isinstance(fields, dict) or set(fields) != expected:
            raise ValueError(
                f"{path} must have exactly the fields {sorted(expected)} "
                "(it is made by `secure-kd deploy init-org`)"
            )
        if (fields["format"], fields["version"]) != (REGISTRATION_FORMAT, REGISTRATION_VERSION):
            raise ValueError(f"{path}: format {fields['format']!r} v{fields['version']} is not supported")
        org = check_org(fields["org"])
        line = fields["node_public_key"]
        try:
            key = serialization.load_ssh_public_key(str(line).encode())
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path}: node_public_key is not an OpenSSH public key: {error}") from error
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in (
            "secp256r1",
            "secp384r1",
            "secp521r1",
        ):
            raise ValueError(f"{path}: node_public_key must be an ECDSA key on a NIST curve (Flower's rule)")
        bundle = PublicBundle.from_json(json.dumps(fields["identity_bundle"]))
        if bundle.org != org:
            raise ValueError(f"{path}: the identity bundle names {bundle.org!r}, the registration {org!r}")
        bundle.verify_signature(bundle.identity_pub)
        bundle.check_not_expired()
        return cls(org, line.strip(), bundle)

    @property
    def node_key_fingerprint(self) -> str:
        return node_key_fingerprint(self.node_public_key)

    @property
    def identity_fingerprint(self) -> str:
        return hashlib.sha256(self.bundle.identity_pub).hexdigest()


def is_rotation(entry: dict, registration: Registration) -> bool:
    """`registration` is `entry`'s organization after `rotate-keys`: the same SuperNode key and identity,
    a newer key epoch."""
    return (
        entry.get("node_key_fingerprint") == registration.node_key_fingerprint
        and entry.get("identity_fingerprint") == registration.identity_fingerprint
        and registration.bundle.epoch > int(entry.get("epoch", 0))
    )


def add_org(superlink_dir: str | Path, registration: Registration, *, force: bool = False) -> SuperLinkFiles:
    """Operator: store an organization's public keys (the Flower registration is `flwr supernode
    register nodes/<org>.pub`, run by the launcher); the identity bundle goes to the trust directory
    that every organization copies. A rotation (`is_rotation`) replaces the bundle without `force`; a
    bundle older than the registered one is refused even with it."""
    files = SuperLinkFiles(Path(superlink_dir))
    registry = files.read_registry()
    entry = registry.get(registration.org)
    if entry is not None and entry.get("identity_fingerprint") == registration.identity_fingerprint:
        if registration.bundle.epoch < int(entry.get("epoch", 0)):
            raise DeployError(
                f"{registration.org}'s bundle is key epoch {registration.bundle.epoch}, older than the "
                f"registered epoch {entry['epoch']}: an old registration file (ask for the current one)"
            )
    if entry is not None and not force and not is_rotation(entry, registration):
        raise FileExistsError(
            f"{registration.org} is already registered; remove it first (`secure-kd deploy remove-org`) or "
            "pass --force to replace its keys (new keys from `init-org --force`; a `rotate-keys` bundle "
            "needs no --force)"
        )
    write_file(
        files.trust_dir / f"{registration.org}.json", registration.bundle.to_json().encode(), private=False
    )
    write_file(
        files.nodes_dir / f"{registration.org}.pub",
        (registration.node_public_key + "\n").encode(),
        private=False,
    )
    registry[registration.org] = {
        "node_key_fingerprint": registration.node_key_fingerprint,
        "identity_fingerprint": registration.identity_fingerprint,
        "epoch": registration.bundle.epoch,
        "not_after": registration.bundle.not_after,
        "node_id": registry.get(registration.org, {}).get("node_id"),
    }
    files.write_registry(registry)
    return files


def set_node_id(superlink_dir: str | Path, org: str, node_id: int | None) -> None:
    files = SuperLinkFiles(Path(superlink_dir))
    registry = files.read_registry()
    registry.setdefault(org, {})["node_id"] = node_id
    files.write_registry(registry)


def remove_org(superlink_dir: str | Path, org: str) -> dict:
    """Operator: forget `org`'s public keys; returns its registry entry (with the Flower node id to
    unregister). Organizations must also delete `<trust-dir>/<org>.json` from their own trust dirs."""
    check_org(org)
    files = SuperLinkFiles(Path(superlink_dir))
    registry = files.read_registry()
    if org not in registry:
        known = ", ".join(sorted(registry)) or "none"
        raise DeployError(f"{org} is not registered in {files.registry} (registered: {known})")
    entry = registry.pop(org)
    (files.trust_dir / f"{org}.json").unlink(missing_ok=True)
    (files.nodes_dir / f"{org}.pub").unlink(missing_ok=True)
    files.write_registry(registry)
    return entry


def copy_trust(superlink_dir: str | Path, destination: str | Path) -> Path:
    """The operator's trust directory, mirrored (stale bundles removed) into an organization's."""
    source = SuperLinkFiles(Path(superlink_dir)).trust_dir
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    wanted = {p.name for p in source.glob("*.json")}
    for stale in destination.glob("*.json"):
        if stale.name not in wanted:
            stale.unlink()
    for name in wanted:
        shutil.copyfile(source / name, destination / name)
    return destination
