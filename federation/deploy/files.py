"""Deploying secure-kd across organizations with Flower's own deployment engine (`secure-kd deploy`).

One party (the operator) runs Flower's SuperLink; each organization runs a Flower SuperNode next to its
private data. Nothing here is a transport: the processes are `flower-superlink`, `flower-supernode`
and `flwr` (Flower 1.41); this module makes their keys and certificates and builds their command lines
(launchers in `federation.deploy.launch`). docs/deploy.md is the step-by-step.

Files (private keys are written 0600 in 0700 directories, and never replaced without `force`):

    operator: <dir>/ca.pem ca.key          a private CA (P-384 ECDSA, self-signed)
              <dir>/server.pem server.key  the SuperLink's TLS certificate, SANs = the given addresses and
                                           127.0.0.1 (the SuperLink itself listens on loopback only; the
                                           fleet gateway, federation.deploy.fleet_gateway, faces the network)
              <dir>/trust/<org>.json       registered organizations' identity bundles (HE key ceremony)
              <dir>/nodes/<org>.pub        registered organizations' SuperNode public keys
              <dir>/registry.json          org -> Flower node id, key fingerprints
    organization: <dir>/keys/              Ed25519 identity + X25519 key exchange (federation.crypto.identity)
              <dir>/node-auth/supernode.key  the SuperNode authentication key (OpenSSH, ECDSA P-384,
                                             the type `flower-supernode --auth-supernode-private-key` and
                                             `flwr supernode register` accept: a NIST curve, SSH format)
              <dir>/node-auth/supernode.pub
              <dir>/<org>.registration.json  the public bundle for the operator: public keys only
              <dir>/approved-apps.json       the FAB hashes this organization approved (app_gate.py)

Key rotation (`rotate_keys`): a new key-exchange key under the same identity, one epoch later, with a
new expiry (federation.crypto.identity); once the operator has registered the new bundle and every
organization holds the new trust/, a bundle of an older epoch is refused.

Removing an organization (`remove_org`) deletes its SuperNode key from the SuperLink (`flwr supernode
unregister`, done by the launcher) and its identity from the trust directory. The CKKS key is not
reused: every run starts with a fresh key ceremony in which the dealer seals the new secret only to
organizations in its trust store, so a removed organization cannot read later runs' aggregates.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.crypto.identity import DEFAULT_VALID_DAYS, OrgKeys, check_org
from secure_kd.paths import atomic_write_text

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
TRUST_DIR, NODES_DIR, REGISTRY = "trust", "nodes", "registry.json"
NODE_AUTH_DIR, NODE_KEY, NODE_PUB = "node-auth", "supernode.key", "supernode.pub"
LOOPBACK = "127.0.0.1"
REGISTRATION_FORMAT = "secure-kd/org-registration"
REGISTRATION_VERSION = 1
MAX_REGISTRATION_BYTES = 32 << 10


class DeployError(RuntimeError):
    """A deployment step that cannot proceed; the message says why and what to do."""


# -- files ---------------------------------------------------------------------------------------------
def _refuse_overwrite(paths: list[Path], force: bool, what: str) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise FileExistsError(
            f"{what} already exist ({', '.join(existing)}): refusing to replace them; pass --force to "
            "generate new ones (anything signed by or registered with the old ones stops working)"
        )


def write_file(path: Path, data: bytes, *, private: bool) -> None:
    """Atomic write; private files are created 0600 (never readable by others, even briefly)."""
    path.parent.mkdir(mode=0o700 if private else 0o755, parents=True, exist_ok=True)
    mode = 0o600 if private else 0o644
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), mode)
        handle.write(data)
    os.replace(tmp, path)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# -- the operator's CA and the SuperLink's certificate -------------------------------------------------
def _san(address: str) -> x509.GeneralName:
    host = address.strip()
    if host.startswith("[") and "]" in host:  # [::1]:9092
        host = host[1 : host.index("]")]
    elif host.count(":") == 1:  # host:port
        host = host.split(":", 1)[0]
    if not host:
        raise ValueError(f"--address {address!r} is empty: give a host name or an IP address")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


@dataclass(frozen=True)
class SuperLinkFiles:
    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.directory / CA_KEY

    @property
    def server_cert(self) -> Path:
        return self.directory / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.directory / SERVER_KEY

    @property
    def trust_dir(self) -> Path:
        return self.directory / TRUST_DIR

    @property
    def nodes_dir(self) -> Path:
        return self.directory / NODES_DIR

    @property
    def registry(self) -> Path:
        return self.directory / REGISTRY

    def read_registry(self) -> dict[str, dict]:
        return json.loads(self.registry.read_text()) if self.registry.is_file() else {}

    def write_registry(self, registry: dict[str, dict]) -> None:
        atomic_write_text(self.registry, json.dumps(registry, indent=2, sort_keys=True) + "\n")


def init_superlink(
    out: str | Path, addresses: list[str], *, force: bool = False, days: int = 365
) -> SuperLinkFiles:
    """A private CA and the SuperLink's server certificate for `addresses` (host names and/or IPs)."""
    if not addresses:
        raise ValueError("--address needs at least one host name or IP address the SuperNodes will dial")
    if days < 1:
        raise ValueError(f"--days must be >= 1, got {days}")
    names: list[x509.GeneralName] = []
    for address in [*addresses, LOOPBACK]:  # loopback: the local SuperLink behind the fleet gateway
        name = _san(address)
        if name not in names:
            names.append(name)
    files = SuperLinkFiles(Path(out))
    _refuse_overwrite([files.ca_key, files.server_key], force, "SuperLink keys")
    files.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "secure-kd SuperLink CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    first = names[0].value
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(first))]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    write_file(files.ca_key, _private_pem(ca_key), private=True)
    write_file(files.server_key, _private_pem(server_key), private=True)
    write_file(files.ca_cert, ca.public_bytes(serialization.Encoding.PEM), private=False)
    write_file(files.server_cert, server.public_bytes(serialization.Encoding.PEM), private=False)
    files.trust_dir.mkdir(mode=0o755, exist_ok=True)
    files.nodes_dir.mkdir(mode=0o755, exist_ok=True)
    return files


# -- an organization's keys and its public registration bundle ------------------------------------------
@dataclass(frozen=True)
class OrgFiles:
    directory: Path
    org: str

    @property
    def keys_dir(self) -> Path:
        return self.directory / "keys"  # = federation.client.workspace.KEYS_DIR under the SuperNode's org-dir

    @property
    def node_key(self) -> Path:
        return self.directory / NODE_AUTH_DIR / NODE_KEY

    @property
    def node_pub(self) -> Path:
        return self.directory / NODE_AUTH_DIR / NODE_PUB

    @property
    def registration(self) -> Path:
        return self.directory / f"{self.org}.registration.json"


def node_key_fingerprint(ssh_public_key: str) -> str:
    """SHA-256 of the OpenSSH public key line's key blob, as `ssh-keygen -lf` prints it (base64)."""
    import base64

    blob = base64.b64decode(ssh_public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _write_registration(files: OrgFiles, ssh_public: str, keys: OrgKeys) -> None:
    registration = {
        "format": REGISTRATION_FORMAT,
        "version": REGISTRATION_VERSION,
        "org": keys.org,
        "node_public_key": ssh_public,
        "identity_bundle": json.loads(keys.public_bundle().to_json()),
    }
    write_file(files.registration, (json.dumps(registration, indent=2) + "\n").encode(), private=False)


def init_org(
    org: str, out: str | Path, *, force: bool = False, valid_days: float = DEFAULT_VALID_DAYS
) -> OrgFiles:
    """The organization's SuperNode key pair and HE identity keys (epoch 1, valid `valid_days`)."""
    check_org(org)
    files = OrgFiles(Path(out), org)
    _refuse_overwrite(
        [files.node_key, files.keys_dir / "identity.pem", files.keys_dir / "kex.pem"],
        force,
        f"{org}'s keys",
    )
    files.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    node_key = ec.generate_private_key(ec.SECP384R1())
    ssh_private = node_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    ssh_public = node_key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    write_file(files.node_key, ssh_private, private=True)
    write_file(files.node_pub, ssh_public + f" secure-kd:{org}\n".encode(), private=False)
    keys = OrgKeys.generate(org, valid_days=valid_days)
    keys.save(files.keys_dir, overwrite=force)
    _write_registration(files, ssh_public.decode(), keys)
    return files


def rotate_keys(org_dir: str | Path, *, valid_days: float = DEFAULT_VALID_DAYS) -> tuple[OrgFiles, OrgKeys]:
    """A new key-exchange key (epoch + 1, new expiry) under the organization's identity; the SuperNode
    key stays. Rewrites `<org>.registration.json`, which the operator registers again."""
    directory = Path(org_dir)
    keys_dir = directory / "keys"
    if not (keys_dir / "bundle.json").is_file():
        raise DeployError(
            f"{keys_dir} holds no keys: run `secure-kd deploy init-org --out {directory}` first"
        )
    rotated = OrgKeys.load(keys_dir).rotated(valid_days=valid_days)
    files = OrgFiles(directory, rotated.org)
    if not files.node_pub.is_file():
        raise DeployError(f"{files.node_pub} is missing: this is not a directory made by `init-org`")
    ssh_public = " ".join(files.node_pub.read_text().split()[:2])
    rotated.save(keys_dir, overwrite=True)
    _write_registration(files, ssh_public, rotated)
    return files, rotated


def write_demo_data(job, out: str | Path) -> dict[str, Path]:
    """Demo only: each organization's share of the job's synthetic corpus as its own JSONL file
    (`<out>/<org>.jsonl`), to stand in for the private data a real organization already has."""
    from federation.partition import federated_split

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for index, own in enumerate(federated_split(job).organizations):
        path = out / f"{job.org_name(index)}.jsonl"
        lines = [json.dumps(record, sort_keys=True) for record in own.train + own.heldout]
        write_file(path, ("\n".join(lines) + "\n").encode(), private=True)
        paths[job.org_name(index)] = path
    return paths
