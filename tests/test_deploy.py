"""`secure-kd deploy`: CA and server certificate, organization keys and bundles, registration and removal
(with a new CKKS ceremony the removed organization cannot read), node config, refusal messages, CLI.
The real SuperLink/SuperNode processes are in test_deploy_integration.py."""

from __future__ import annotations

import base64
import ipaddress
import json
import stat
import sys

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from federation.config import FederatedJob, load_federated_job
from federation.deploy import (
    DeployError,
    Registration,
    add_org,
    copy_trust,
    init_org,
    init_superlink,
    node_key_fingerprint,
    remove_org,
    write_demo_data,
)
from federation.deploy_launch import explain_refusal, launch, superlink_command, supernode_command
from federation.he import Keyring, decrypt, encrypt
from federation.identity import OrgKeys, TrustStore
from federation.keys import CeremonyError, KeySubstitutionError, open_from, seal_for
from federation.workspace import OrgWorkspace, node_org_index
from secure_kd.cli import app

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_and_server_certificate(tmp_path):
    files = init_superlink(tmp_path / "link", ["127.0.0.1", "superlink.example.org:9093", "[::1]:9093"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert sans.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    key = serialization.load_pem_private_key(files.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    assert _mode(files.ca_key) == _mode(files.server_key) == 0o600
    assert _mode(files.directory) == 0o700
    # another CA's certificate does not verify
    other = init_superlink(tmp_path / "other", ["127.0.0.1"])
    with pytest.raises((ValueError, Exception)):
        server.verify_directly_issued_by(x509.load_pem_x509_certificate(other.ca_cert.read_bytes()))


def test_keys_are_never_overwritten_without_force(tmp_path):
    files = init_superlink(tmp_path / "link", ["127.0.0.1"])
    before = files.ca_key.read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        init_superlink(tmp_path / "link", ["127.0.0.1"])
    assert files.ca_key.read_bytes() == before
    init_superlink(tmp_path / "link", ["127.0.0.1"], force=True)
    assert files.ca_key.read_bytes() != before
    org = init_org("alpha", tmp_path / "alpha")
    node_key = org.node_key.read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        init_org("alpha", tmp_path / "alpha")
    assert org.node_key.read_bytes() == node_key
    init_org("alpha", tmp_path / "alpha", force=True)
    assert org.node_key.read_bytes() != node_key
    with pytest.raises(ValueError, match="--address"):
        init_superlink(tmp_path / "none", [])


def test_org_bundle_holds_public_keys_only(tmp_path):
    files = init_org("alpha", tmp_path / "alpha")
    assert _mode(files.node_key) == 0o600
    assert _mode(files.keys_dir / "identity.pem") == _mode(files.keys_dir / "kex.pem") == 0o600
    text = files.registration.read_text()
    fields = json.loads(text)
    assert set(fields) == {"format", "version", "org", "node_public_key", "identity_bundle"}
    assert "PRIVATE" not in text
    # the node key is the type Flower wants (SSH, ECDSA on a NIST curve) and matches the private key
    public = serialization.load_ssh_public_key(fields["node_public_key"].encode())
    private = serialization.load_ssh_private_key(files.node_key.read_bytes(), None)
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
    assert public.public_numbers() == private.public_key().public_numbers()
    # no private scalar or private key bytes anywhere in the bundle
    keys = OrgKeys.load(files.keys_dir)
    secrets = [
        private.private_numbers().private_value.to_bytes(48, "big"),
        keys.identity.private_bytes_raw(),
        keys.kex.private_bytes_raw(),
    ]
    for secret in secrets:
        for encoded in (secret.hex(), base64.b64encode(secret).decode(), str(int.from_bytes(secret, "big"))):
            assert encoded not in text
    registration = Registration.load(files.registration)
    assert registration.org == "alpha" and registration.bundle.identity_pub == keys.identity_pub
    assert node_key_fingerprint(fields["node_public_key"]).startswith("SHA256:")


def test_registration_rejects_tampered_or_foreign_bundles(tmp_path):
    files = init_org("alpha", tmp_path / "alpha")
    fields = json.loads(files.registration.read_text())
    other = OrgKeys.generate("alpha").public_bundle()
    fields["identity_bundle"]["kex_pub"] = base64.b64encode(other.kex_pub).decode()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(fields))
    with pytest.raises(KeySubstitutionError):
        Registration.load(bad)
    fields = json.loads(files.registration.read_text())
    fields["node_private_key"] = "x"
    bad.write_text(json.dumps(fields))
    with pytest.raises(ValueError, match="exactly the fields"):
        Registration.load(bad)


def _ceremony(dealer: OrgKeys, recipients: list[OrgKeys], trust: TrustStore, run: str, n_values: int):
    """What client_app.keygen / keyshare do: a fresh keyring sealed to each registered recipient."""
    ring = Keyring.for_payload(n_values, max_abs_update=10.0, max_clients=4)
    sealed = {
        r.org: seal_for(r.public_bundle(), dealer, run, ring.secret_context(), trust=trust)
        for r in recipients
    }
    return ring, sealed


def test_removed_org_cannot_read_the_next_ceremony(tmp_path):
    link = init_superlink(tmp_path / "link", ["127.0.0.1"])
    orgs = {name: init_org(name, tmp_path / name) for name in ("alpha", "beta", "gamma")}
    for files in orgs.values():
        add_org(link.directory, Registration.load(files.registration))
    keys = {name: OrgKeys.load(files.keys_dir) for name, files in orgs.items()}
    n = 64
    trust = TrustStore.from_directory(link.trust_dir)
    old_ring, old_sealed = _ceremony(keys["alpha"], [keys["beta"], keys["gamma"]], trust, "run-1", n)
    gamma_old = Keyring.from_secret_context(
        open_from(keys["alpha"].public_bundle(), keys["gamma"], "run-1", old_sealed["gamma"], trust=trust)
    )
    assert gamma_old.key_id == old_ring.key_id  # gamma was a member of run 1

    entry = remove_org(link.directory, "gamma")
    assert entry["node_key_fingerprint"].startswith("SHA256:")
    assert sorted(p.stem for p in link.trust_dir.glob("*.json")) == ["alpha", "beta"]
    org_trust = copy_trust(link.directory, tmp_path / "alpha-trust")
    trust = TrustStore.from_directory(org_trust)
    assert "gamma" not in trust and trust.orgs == ["alpha", "beta"]
    with pytest.raises(KeySubstitutionError, match="not in the trust store"):
        seal_for(keys["gamma"].public_bundle(), keys["alpha"], "run-2", b"secret", trust=trust)

    new_ring, new_sealed = _ceremony(keys["alpha"], [keys["beta"]], trust, "run-2", n)
    beta_new = Keyring.from_secret_context(
        open_from(keys["alpha"].public_bundle(), keys["beta"], "run-2", new_sealed["beta"], trust=trust)
    )
    assert new_ring.key_id == beta_new.key_id != old_ring.key_id
    with pytest.raises(CeremonyError):  # beta's sealed share is not for gamma
        open_from(keys["alpha"].public_bundle(), keys["gamma"], "run-2", new_sealed["beta"], trust=trust)

    values = np.linspace(-1, 1, n)
    blob = encrypt(beta_new, values, weight=1.0)
    np.testing.assert_allclose(decrypt(new_ring, blob, n), values, atol=1e-4)
    with pytest.raises(ValueError):  # the old key is refused by key id...
        decrypt(gamma_old, blob, n)
    # ...and, relabelled to pass that check, its secret key decrypts noise, not the values
    forged = Keyring(gamma_old._context, gamma_old.parameters, new_ring.key_id)
    assert forged.parameters == new_ring.parameters
    assert np.max(np.abs(decrypt(forged, blob, n) - values)) > 1.0


def test_node_config_names_the_org_and_its_data_file(tmp_path):
    job = load_federated_job(ROOT / "configs" / "deploy-tiny.yaml", [f"out={tmp_path / 'run'}"])
    assert node_org_index(job, {"org-name": "beta"}) == 1
    assert node_org_index(job, {"partition-id": 0}) == 0
    with pytest.raises(ValueError, match="not an organization"):
        node_org_index(job, {"org-name": "mallory"})
    with pytest.raises(ValueError, match="disagree"):
        node_org_index(job, {"org-name": "beta", "partition-id": 0})
    data = tmp_path / "beta.jsonl"
    texts = [f"record number {i} of beta about topic {i % 3}" for i in range(20)]
    data.write_text("".join(json.dumps({"text": t, "topic": str(i % 3)}) + "\n" for i, t in enumerate(texts)))
    ws = OrgWorkspace(job, 1, tmp_path / "beta", data_path=str(data))
    own = ws.own_data
    assert sorted(r["text"] for r in own.train + own.heldout) == sorted(texts)  # exactly the file
    assert len(own.heldout) == round(job.partition.heldout_fraction * 20)
    assert ws.private[2] == [r["text"] for r in own.train]
    simulated = OrgWorkspace(job, 1, tmp_path / "sim").own_data  # no data-path: the job's split, as before
    assert simulated == ws.public.split.organizations[1]


def test_organizations_field_is_validated():
    with pytest.raises(ValueError, match="distinct names"):
        FederatedJob(n_organizations=2, organizations=["alpha", "alpha"])
    with pytest.raises(ValueError, match="organization name"):
        FederatedJob(n_organizations=2, organizations=["alpha", "bad name"])
    assert FederatedJob(n_organizations=2).org_name(1) == "org-1"


def test_launcher_commands(tmp_path):
    link = init_superlink(tmp_path / "link", ["127.0.0.1"])
    command = superlink_command(link.directory, host="127.0.0.1", port=12345)
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation", "--ssl-certfile"):
        assert flag in command
    assert "--insecure" not in command
    org = init_org("alpha", tmp_path / "alpha")
    data = tmp_path / "alpha.jsonl"
    data.write_text('{"text": "x"}\n')
    with pytest.raises(Exception, match="trust"):
        supernode_command(
            org.directory, org="alpha", superlink="127.0.0.1:1", ca_cert=link.ca_cert, data=data,
            trust_dir=link.trust_dir,
        )  # fmt: skip
    add_org(link.directory, Registration.load(org.registration))
    command = supernode_command(
        org.directory, org="alpha", superlink="127.0.0.1:1", ca_cert=link.ca_cert, data=data,
        trust_dir=link.trust_dir, clientappio_port=23456,
    )  # fmt: skip
    assert command[command.index("--auth-supernode-private-key") + 1] == str(org.node_key.resolve())
    assert "--insecure" not in command
    import tomli

    config = tomli.loads((org.directory / "node-config.toml").read_text())
    assert config == {
        "org-name": "alpha",
        "org-dir": str(org.directory.resolve()),
        "data-path": str(data.resolve()),
        "trust-dir": str(link.trust_dir.resolve()),
    }


def test_refusals_are_explained():
    # lines Flower 1.41 printed here for an unregistered SuperNode and for one without TLS
    failed = "ERROR : Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n"
    unregistered = failed + "[code: 2004] Failed to activate SuperNode."
    plaintext = failed + "Server disconnected without sending a response."
    assert "not registered" in explain_refusal(unregistered)
    assert "TLS" in explain_refusal(plaintext)
    assert "does not verify" in explain_refusal("ssl.SSLCertVerificationError: certificate verify failed")
    assert explain_refusal("all good") is None


def test_launch_explains_a_refusal_followed_by_a_long_helper_traceback(tmp_path):
    # seen in CI: the SuperNode printed its TLS reason, then the flower-superexec it had started
    # printed a long ConnectError traceback; the reason must still be the TLS one
    script = tmp_path / "fake_supernode.py"
    script.write_text(
        "print('Server disconnected without sending a response.')\n"
        "for i in range(200):\n"
        "    print(f'  File \"x.py\", line {i}, in handle_request')\n"
        "print('httpcore.ConnectError: [Errno 111] Connection refused')\n"
        "raise SystemExit(1)\n"
    )
    with pytest.raises(DeployError, match="TLS handshake did not happen"):
        launch([sys.executable, str(script)], log_path=tmp_path / "fake.log", timeout_s=60)
    assert "Connection refused" in (tmp_path / "fake.log").read_text()  # the log keeps every line


def test_cli_init_commands(tmp_path):
    runner = CliRunner()
    link = tmp_path / "link"
    result = runner.invoke(
        app, ["deploy", "init-superlink", "--out", str(link), "--address", "127.0.0.1,localhost"]
    )
    assert result.exit_code == 0, result.output
    sans = x509.load_pem_x509_certificate(
        (link / "server.pem").read_bytes()
    ).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert sans.value.get_values_for_type(x509.DNSName) == ["localhost"]
    again = runner.invoke(app, ["deploy", "init-superlink", "--out", str(link), "--address", "127.0.0.1"])
    assert again.exit_code == 2 and "--force" in again.output
    result = runner.invoke(app, ["deploy", "init-org", "--org", "alpha", "--out", str(tmp_path / "alpha")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "alpha" / "alpha.registration.json").is_file()
    bad = runner.invoke(app, ["deploy", "init-org", "--org", "no way", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "organization name" in bad.output


def test_demo_data_is_each_organizations_partition(tmp_path):
    job = load_federated_job(ROOT / "configs" / "deploy-tiny.yaml", [f"out={tmp_path / 'run'}"])
    paths = write_demo_data(job, tmp_path / "data")
    assert sorted(paths) == ["alpha", "beta"]
    ws = OrgWorkspace(job, 0, tmp_path / "a")
    lines = [json.loads(line) for line in paths["alpha"].read_text().splitlines()]
    expected = ws.public.split.organizations[0]
    assert lines == [json.loads(json.dumps(r, sort_keys=True)) for r in expected.train + expected.heldout]
    assert _mode(paths["alpha"]) == 0o600


def test_run_config_job_path_is_read_from_the_app(tmp_path, monkeypatch):
    from federation.server_app import job_from_run_config

    monkeypatch.chdir(tmp_path)  # the ClientApp's working directory is not the project
    job = job_from_run_config({"config": "configs/deploy-tiny.yaml", "overrides": "rounds=1;out=/tmp/x"})
    assert job.organizations == ["alpha", "beta"] and job.rounds == 1 and job.out == "/tmp/x"
    with pytest.raises(ValueError, match="does not exist"):
        job_from_run_config({"config": "configs/no-such-job.yaml"})
