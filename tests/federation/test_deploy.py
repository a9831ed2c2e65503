"""`secure-kd deploy`: CA and server certificate, organization keys and bundles, registration, rotation and
removal (with a new CKKS ceremony the removed organization cannot read), the Fleet-only gateway, the app
gate, node binding against the operator's registry, the dealer's recipients, node config, refusal
messages, CLI. The real SuperLink/SuperNode processes are in test_deploy_integration.py."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import stat
import sys

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from federation.client.workspace import OrgWorkspace, node_org_index
from federation.config import FederatedJob, load_federated_job
from federation.crypto.he import Keyring, decrypt, encrypt
from federation.crypto.identity import OrgKeys, TrustStore
from federation.crypto.keys import CeremonyError, KeySubstitutionError, open_from, seal_for
from federation.deploy.app_gate import approve, gated_commands
from federation.deploy.files import (
    DeployError,
    init_org,
    init_superlink,
    node_key_fingerprint,
    rotate_keys,
    write_demo_data,
)
from federation.deploy.launch import (
    approved_apps_file,
    explain_refusal,
    gateway_command,
    launch,
    superlink_command,
    supernode_command,
)
from federation.deploy.registry import Registration, add_org, copy_trust, remove_org
from secure_kd.app.cli import app

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


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
    # the SuperLink listens on loopback behind the fleet gateway: 127.0.0.1 is always a name of it
    public = init_superlink(tmp_path / "public", ["link.example.org"])
    names = x509.load_pem_x509_certificate(public.server_cert.read_bytes()).extensions
    assert names.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.IPAddress
    ) == [ipaddress.ip_address("127.0.0.1")]
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
    command = superlink_command(link.directory, port=12345)
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation", "--ssl-certfile"):
        assert flag in command
    assert "--insecure" not in command
    assert command[command.index("--host") + 1] == "127.0.0.1"  # never a public interface
    org = init_org("alpha", tmp_path / "alpha")
    data = tmp_path / "alpha.jsonl"
    data.write_text('{"text": "x"}\n')
    common = dict(org="alpha", superlink="127.0.0.1:1", ca_cert=link.ca_cert, data=data)
    with pytest.raises(Exception, match="trust"):
        supernode_command(org.directory, trust_dir=link.trust_dir, **common)
    add_org(link.directory, Registration.load(org.registration))
    with pytest.raises(DeployError, match="approved no app"):  # no approved app: no SuperNode
        supernode_command(org.directory, trust_dir=link.trust_dir, **common)
    approve(approved_apps_file(org.directory), "ab" * 32)
    command = supernode_command(
        org.directory, trust_dir=link.trust_dir, clientappio_port=23456, **common,
        extra_node_config={"policy-max-epsilon": "8", "policy-protection": "ckks"},
    )  # fmt: skip
    assert command[command.index("--auth-supernode-private-key") + 1] == str(org.node_key.resolve())
    assert "--insecure" not in command
    # the app gate comes first on the SuperNode's PATH, and it answers for every task command Flower has
    path = command[1].removeprefix("PATH=").split(":")
    gate = org.directory.resolve() / "app-gate"
    assert path[0] == str(gate)
    assert sorted(p.name for p in gate.iterdir()) == sorted(gated_commands())
    assert gated_commands()["flwr-clientapp"] == "clientapp"
    assert {mode for name, mode in gated_commands().items() if name != "flwr-clientapp"} == {"refuse"}
    import tomli

    config = tomli.loads((org.directory / "node-config.toml").read_text())
    assert config == {
        "org-name": "alpha",
        "org-dir": str(org.directory.resolve()),
        "data-path": str(data.resolve()),
        "trust-dir": str(link.trust_dir.resolve()),
        "policy-max-epsilon": "8",
        "policy-protection": "ckks",
    }
    # the organization's policy keys pass through, checked before the SuperNode starts
    for bad, reason in (
        ({"policy-bogus": "1"}, "not a policy key"),
        ({"policy-dp-required": "maybe"}, "true or false"),
    ):
        with pytest.raises(DeployError, match=reason):
            supernode_command(org.directory, trust_dir=link.trust_dir, extra_node_config=bad, **common)
    with pytest.raises(DeployError, match="set by the launcher"):
        supernode_command(
            org.directory, trust_dir=link.trust_dir, extra_node_config={"data-path": "/x"}, **common
        )
    # the SuperNode key can come from stdin (the key file then need not be readable by the SuperNode)
    org.node_key.rename(tmp_path / "elsewhere.key")
    command = supernode_command(org.directory, trust_dir=link.trust_dir, node_key="-", **common)
    assert command[command.index("--auth-supernode-private-key") + 1] == "/dev/stdin"


def test_a_certificate_without_the_loopback_name_is_refused(tmp_path):
    link = init_superlink(tmp_path / "link", ["127.0.0.1"])
    key = serialization.load_pem_private_key(link.ca_key.read_bytes(), None)
    ca = x509.load_pem_x509_certificate(link.ca_cert.read_bytes())
    server_key = serialization.load_pem_private_key(link.server_key.read_bytes(), None)
    old = x509.load_pem_x509_certificate(link.server_cert.read_bytes())
    # a certificate from before this change: only the public name
    reissued = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(old.not_valid_before_utc)
        .not_valid_after(old.not_valid_after_utc)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("link.example.org")]), critical=False)
        .sign(key, hashes.SHA384())
    )
    link.server_cert.write_bytes(reissued.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(DeployError, match="does not name 127.0.0.1"):
        superlink_command(link.directory)
    with pytest.raises(DeployError, match="does not name 127.0.0.1"):
        gateway_command(link.directory, listen="0.0.0.0:9092")


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
    from federation.run_config import job_from_run_config

    monkeypatch.chdir(tmp_path)  # the ClientApp's working directory is not the project
    job = job_from_run_config({"config": "configs/deploy-tiny.yaml", "overrides": "rounds=1;out=/tmp/x"})
    assert job.organizations == ["alpha", "beta"] and job.rounds == 1 and job.out == "/tmp/x"
    # refused either way: the path, or (with the run-config hardening) without quoting the file
    with pytest.raises(ValueError, match="does not exist|loading a job from outside the app"):
        job_from_run_config({"config": "configs/no-such-job.yaml"})


# -- item: the Control API is not reachable through the public (fleet) address ------------------------------
def _fake_superlink():
    """An upstream that records what reaches it and answers every request with its path."""
    seen: list[tuple[str, str, bytes, dict]] = []

    async def upstream(scope, receive, send):
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        seen.append((scope["method"], scope["path"], body, headers))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-upstream", b"1")]})
        await send({"type": "http.response.body", "body": b"ok " + scope["path"].encode()})

    return upstream, seen


def _through_gateway(requests: list[tuple[str, str, bytes]]):
    import asyncio

    import httpx

    from federation.deploy.fleet_gateway import FleetGateway

    upstream, seen = _fake_superlink()

    async def go():
        inner = httpx.AsyncClient(transport=httpx.ASGITransport(app=upstream))
        gateway = FleetGateway("http://superlink", client=inner)
        outer = httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="https://gw")
        answers = []
        for method, path, body in requests:
            answers.append(await outer.request(method, path, content=body, headers={"x-flwr-sig": "s1"}))
        await inner.aclose()
        return answers, gateway.refused

    answers, refused = asyncio.run(go())
    return answers, seen, refused


def test_gateway_forwards_the_fleet_api_and_refuses_the_control_and_runtime_apis():
    fleet = [
        ("POST", "/v1/fleet/pull-messages", b"\x08\x01"),
        ("POST", "/v1/fleet/push-object", b"x" * 70000),
    ]
    refused = [
        ("POST", "/v1/control/start-run", b"fab"),  # flwr run
        ("POST", "/v1/control/list-runs", b""),  # flwr ls
        ("POST", "/v1/control/stream-logs", b""),  # flwr log
        ("POST", "/v1/control/register-node", b"key"),  # flwr supernode register
        ("POST", "/v1/fleet/register-node", b""),  # disabled with node auth: not forwarded either
        ("POST", "/v1/fleet/../control/start-run", b""),
        ("POST", "/v1/fleet/pull-messages/", b""),
        ("POST", "/v1/fleet/pull-messages?x=1", b""),
        ("GET", "/v1/fleet/pull-messages", b""),
        ("GET", "/docs", b""),
        ("GET", "/health", b""),
    ]
    from federation.deploy.fleet_gateway import REFUSED

    answers, seen, count = _through_gateway(fleet + refused)
    for answer, (_, path, _) in zip(answers[:2], fleet, strict=True):
        assert answer.status_code == 200 and answer.content == b"ok " + path.encode()
        assert answer.headers["x-upstream"] == "1"
    assert [(m, p, b) for m, p, b, _ in seen] == fleet  # bodies intact, nothing else reached the SuperLink
    assert all(h["x-flwr-sig"] == "s1" for *_, h in seen)  # node-auth headers pass through
    for answer in answers[2:]:
        assert answer.status_code == 403 and answer.content == REFUSED
    assert count == len(refused)


def test_gateway_refuses_an_oversized_request_before_the_superlink_reads_it():
    import asyncio

    import httpx

    from federation.deploy.fleet_gateway import FleetGateway

    upstream, seen = _fake_superlink()

    async def go():
        inner = httpx.AsyncClient(transport=httpx.ASGITransport(app=upstream))
        gateway = FleetGateway("http://superlink", client=inner, max_request_bytes=1000)
        outer = httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="https://gw")
        return [await outer.post("/v1/fleet/push-object", content=b"x" * n) for n in (1000, 1001)]

    fits, too_large = asyncio.run(go())
    assert fits.status_code == 200 and too_large.status_code == 413
    assert [len(body) for _, _, body, _ in seen] == [1000]


def test_gateway_paths_are_fleet_routes_flower_serves():
    from flwr.superlink.routers.fleet.router import router
    from flwr.supernode.fleet_http_client import FleetHttpClient

    from federation.deploy.fleet_gateway import FLEET_PATHS

    served = {route.path for route in router.routes}
    assert FLEET_PATHS <= served
    assert served - FLEET_PATHS == {"/v1/fleet/register-node", "/v1/fleet/unregister-node"}
    # every path Flower's SuperNode client uses with an authentication key is forwarded
    import inspect
    import re

    used = set(re.findall(r'path="(/v1/fleet/[a-z-]+)"', inspect.getsource(FleetHttpClient)))
    assert used - FLEET_PATHS == {"/v1/fleet/register-node", "/v1/fleet/unregister-node"}


# -- item: each organization runs only the apps it approved ----------------------------------------
def _tiny_app(directory, marker: str):
    directory.mkdir(parents=True)
    (directory / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "tinyapp"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
        '[tool.flwr.app]\npublisher = "someone"\n\n'
        '[tool.flwr.app.components]\nserverapp = "tinyapp.server:app"\nclientapp = "tinyapp.client:app"\n'
    )
    (directory / "tinyapp").mkdir()
    (directory / "tinyapp" / "__init__.py").write_text("")
    (directory / "tinyapp" / "client.py").write_text(f"MARKER = {marker!r}\n")
    (directory / "tinyapp" / "server.py").write_text("")
    return directory


def test_approve_app_records_the_hash_flwr_run_submits(tmp_path):
    import hashlib

    from flwr.cli.build import build_fab_from_disk

    from federation.deploy.app_gate import load_approved

    app_dir = _tiny_app(tmp_path / "app", "reviewed")
    result = CliRunner().invoke(
        app, ["deploy", "approve-app", "--org-dir", str(tmp_path / "alpha"), "--app", str(app_dir)]
    )
    assert result.exit_code == 0, result.output
    expected = hashlib.sha256(build_fab_from_disk(app_dir)).hexdigest()  # what `flwr run app` sends
    approved = load_approved(tmp_path / "alpha" / "approved-apps.json")
    assert list(approved) == [expected] and approved[expected]["fab_id"] == "someone/tinyapp==1.0.0"
    assert result.output.strip().endswith(expected)
    # one changed byte in the app is another hash: not approved
    (app_dir / "tinyapp" / "client.py").write_text("MARKER = 'changed'\n")
    assert hashlib.sha256(build_fab_from_disk(app_dir)).hexdigest() not in approved
    revoked = CliRunner().invoke(
        app, ["deploy", "approve-app", "--org-dir", str(tmp_path / "alpha"), "--sha256", expected, "--revoke"]
    )
    assert revoked.exit_code == 0 and load_approved(tmp_path / "alpha" / "approved-apps.json") == {}
    bad = CliRunner().invoke(app, ["deploy", "approve-app", "--org-dir", str(tmp_path), "--sha256", "xyz"])
    assert bad.exit_code == 2 and "SHA-256" in bad.output


def test_app_gate_installs_only_approved_fabs(tmp_path, monkeypatch):
    """The hook inside Flower's flwr-clientapp: an unapproved FAB is refused before it is installed."""
    import hashlib

    import flwr.supernode.runtime.run_clientapp as runtime
    from flwr.cli.build import build_fab_from_disk

    from federation.deploy.app_gate import AppNotApproved, install_gate

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    good = build_fab_from_disk(_tiny_app(tmp_path / "good", "reviewed"))
    evil = build_fab_from_disk(_tiny_app(tmp_path / "evil", "steal kex.pem"))
    approved = tmp_path / "approved-apps.json"
    approve(approved, hashlib.sha256(good).hexdigest())
    original = runtime.install_from_fab
    monkeypatch.setattr(runtime, "install_from_fab", original)
    install_gate(approved)
    assert runtime.install_from_fab is not original
    with pytest.raises(AppNotApproved, match=f"sha256:{hashlib.sha256(evil).hexdigest()}"):
        runtime.install_from_fab(evil, skip_prompt=True)
    assert not (tmp_path / "flwr-home").exists() or not any((tmp_path / "flwr-home").rglob("client.py"))
    installed = runtime.install_from_fab(good, skip_prompt=True)
    assert (installed / "tinyapp" / "client.py").read_text() == "MARKER = 'reviewed'\n"
    # no list, or no hook in Flower: fail closed
    with pytest.raises(SystemExit):
        install_gate(None)


def test_gate_stubs_refuse_every_other_task_type(tmp_path):
    import subprocess

    from federation.deploy.app_gate import write_gate

    gate = write_gate(tmp_path / "gate", tmp_path / "approved-apps.json")
    done = subprocess.run([str(gate / "flwr-agentapp"), "--token", "t"], capture_output=True, text=True)
    assert done.returncode == 1 and "refused a flwr-agentapp task" in done.stderr
    script = (gate / "flwr-clientapp").read_text()
    assert f"SECURE_KD_APPROVED_APPS={tmp_path / 'approved-apps.json'}" in script and " -P " in script


# -- item: an organization's name is bound to its registered Flower node ------------------------------
def _as_superlink(run_id: int = 1) -> None:
    """Messages are made inside a Flower task; tests make them in the task the ServerApp would be."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID


class HelloGrid:
    """Answers `query.hello` per node with a canned reply (what each SuperNode's ClientApp would say)."""

    def __init__(self, replies: dict[int, dict]) -> None:
        self.replies = replies
        _as_superlink()

    def get_node_ids(self):
        return list(self.replies)

    def send_and_receive(self, messages, *, timeout=None):
        import uuid

        from flwr.app import ConfigRecord, Message, RecordDict

        from federation.messages import CONFIG

        out = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            content = RecordDict({CONFIG: ConfigRecord(self.replies[message.metadata.dst_node_id])})
            out.append(Message(content, reply_to=message))
        return out


def test_an_impostor_node_claiming_another_orgs_name_is_refused(tmp_path):
    from federation.deploy.node_binding import format_node_ids, parse_node_ids
    from federation.server.app import introduce
    from federation.server.session import Session

    job = load_federated_job(ROOT / "configs" / "deploy-tiny.yaml", [f"out={tmp_path / 'run'}"])
    alpha, beta = OrgKeys.generate("alpha"), OrgKeys.generate("beta")
    genuine = {"org": "alpha", "index": 0, "bundle": alpha.public_bundle().to_json()}
    # node 5 is admitted by the SuperLink (its own key is registered, e.g. as "mallory") and replays
    # alpha's public bundle in its hello; alpha's real SuperNode is node 9
    replies = {
        5: genuine,
        9: genuine,
        12: {"org": "beta", "index": 1, "bundle": beta.public_bundle().to_json()},
    }
    unbound = Session(HelloGrid(replies), job, 1, data=object())
    introduce(unbound)
    assert unbound.orgs[5].name == "alpha" and 9 not in unbound.orgs  # without the registry: first node wins

    registry = {"alpha": {"node_id": 9}, "beta": {"node_id": 12}, "gamma": {"node_id": None}}
    session = Session(HelloGrid(replies), job, 1, data=object())
    session.expected_nodes = parse_node_ids(format_node_ids(registry))
    setup = introduce(session)
    assert {node: org.name for node, org in session.orgs.items()} == {9: "alpha", 12: "beta"}
    assert setup["node_binding"] == "registry"
    (dropped,) = session._drops
    assert dropped.org == "node-5" and "alpha is registered as node 9" in dropped.reason
    # a node claiming an organization that has no registered node is refused too
    session = Session(HelloGrid(replies), job, 1, data=object())
    session.expected_nodes = {"alpha": 9}
    with pytest.raises(Exception, match="min_clients"):
        introduce(session)
    reasons = {d.org: d.reason for d in session._drops}
    assert "beta, which has no registered node" in reasons["node-12"]


def test_run_config_hands_the_registry_to_the_server_app():
    from flwr.common.config import parse_config_args

    from federation.deploy.launch import run_config
    from federation.deploy.node_binding import NODE_IDS_KEY, parse_node_ids

    text = run_config("configs/deploy-tiny.yaml", ["rounds=1", "out=/srv/run"], "alpha=9;beta=12")
    parsed = parse_config_args([text])  # what `flwr run --run-config` makes of it
    assert parsed == {
        "config": "configs/deploy-tiny.yaml",
        "overrides": "rounds=1;out=/srv/run",
        NODE_IDS_KEY: "alpha=9;beta=12",
    }
    assert parse_node_ids(parsed[NODE_IDS_KEY]) == {"alpha": 9, "beta": 12}
    # Flower refuses run-config keys the app does not declare ("Invalid run configuration")
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(parsed) <= set(declared) and declared[NODE_IDS_KEY] == ""
    for bad in ("alpha=9;alpha=10", "alpha=9;beta=9", "alpha", "alpha=-1", "bad name=3"):
        with pytest.raises(ValueError):
            parse_node_ids(bad)
    with pytest.raises(ValueError, match="single quote"):
        run_config("x.yaml", ["out=it's"])


# -- item: the dealer seals the CKKS key to the job's organizations only ------------------------------
def test_the_dealer_seals_the_ckks_key_only_to_the_jobs_organizations(tmp_path):
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from federation.client.app import _expected_payload, keygen
    from federation.messages import CONFIG, MessageRejected

    job = load_federated_job(ROOT / "configs" / "deploy-tiny.yaml", [f"out={tmp_path / 'run'}"])
    keys = {name: OrgKeys.generate(name) for name in ("alpha", "beta", "outsider")}
    trust = tmp_path / "trust"  # the outsider is a registered organization, but not in this job
    trust.mkdir()
    for name, k in keys.items():
        (trust / f"{name}.json").write_text(k.public_bundle().to_json())
    ws = OrgWorkspace(job, 0, tmp_path / "alpha")
    keys["alpha"].save(ws.keys_dir)
    context = Context(
        run_id=7, node_id=1, node_config={"trust-dir": str(trust)}, state=RecordDict(), run_config={}
    )

    _as_superlink(7)

    def ask(recipients):
        content = {"round": 0, "n-values": _expected_payload(ws), "recipients": recipients}
        return keygen(ws, Message(RecordDict({CONFIG: ConfigRecord(content)}), 1, "query"), context)

    bundles = {name: k.public_bundle().to_json() for name, k in keys.items()}
    for recipients, reason in (
        ([bundles["beta"], bundles["outsider"]], "'outsider', which is not another organization of this job"),
        ([bundles["alpha"]], "'alpha', which is not another"),  # itself
        ([bundles["beta"], bundles["beta"]], "twice"),
    ):
        with pytest.raises(MessageRejected, match=reason):
            ask(recipients)
        assert not (ws.root / "ckks-secret.bin").exists()  # nothing dealt
    reply = ask([bundles["beta"]])
    (sealed,) = reply[CONFIG]["sealed"]
    secret = open_from(
        keys["alpha"].public_bundle(), keys["beta"], "7", sealed, trust=TrustStore.from_directory(trust)
    )
    assert secret == (ws.root / "ckks-secret.bin").read_bytes()


def test_the_ckks_secret_is_written_through_a_fresh_temp_name(tmp_path):
    job = load_federated_job(ROOT / "configs" / "deploy-tiny.yaml", [f"out={tmp_path / 'run'}"])
    ws = OrgWorkspace(job, 0, tmp_path / "alpha")
    outside = tmp_path / "planted"
    outside.write_bytes(b"not the secret")
    (ws.root / ".ckks-secret.bin.tmp").symlink_to(outside)  # a link at the old fixed temp name
    ws.save_secret_context(b"the CKKS secret")
    assert outside.read_bytes() == b"not the secret"  # the link was not followed
    target = ws.root / "ckks-secret.bin"
    assert not target.is_symlink() and target.read_bytes() == b"the CKKS secret" and _mode(target) == 0o600
    assert sorted(p.name for p in ws.root.iterdir() if p.name.startswith(".")) == [".ckks-secret.bin.tmp"]


# -- item: rotation and expiry at registration -----------------------------------------------------------
def test_rotated_bundles_are_registered_and_stale_or_expired_ones_refused(tmp_path):
    import shutil
    import time

    from federation.crypto.identity import ExpiredBundleError, StaleBundleError

    link = init_superlink(tmp_path / "link", ["127.0.0.1"])
    org = init_org("alpha", tmp_path / "alpha")
    first = tmp_path / "alpha-epoch1.json"
    shutil.copyfile(org.registration, first)
    add_org(link.directory, Registration.load(first))
    files, rotated = rotate_keys(org.directory)
    assert rotated.epoch == 2 and Registration.load(files.registration).bundle.epoch == 2
    add_org(link.directory, Registration.load(files.registration))  # a rotation needs no --force
    entry = link.read_registry()["alpha"]
    assert entry["epoch"] == 2
    trust = TrustStore.from_directory(copy_trust(link.directory, tmp_path / "beta-trust"))
    with pytest.raises(StaleBundleError):  # the epoch-1 bundle, e.g. replayed by a relay
        trust.verify(Registration.load(first).bundle)
    assert trust.verify(rotated.public_bundle()).epoch == 2
    with pytest.raises(DeployError, match="older than the registered epoch 2"):  # even with force
        add_org(link.directory, Registration.load(first), force=True)
    # a registration whose bundle has expired is refused
    old = OrgKeys.generate("beta", valid_days=1, now=time.time() - 3 * 86400)
    fields = json.loads(org.registration.read_text())
    fields.update(org="beta", identity_bundle=json.loads(old.public_bundle().to_json()))
    expired = tmp_path / "beta.registration.json"
    expired.write_text(json.dumps(fields))
    with pytest.raises(ExpiredBundleError):
        Registration.load(expired)
    result = CliRunner().invoke(
        app, ["deploy", "register-org", "--superlink-dir", str(link.directory), "--bundle", str(expired)]
    )
    assert result.exit_code == 2 and "expired" in result.output
    result = CliRunner().invoke(app, ["deploy", "rotate-keys", "--org-dir", str(org.directory)])
    assert result.exit_code == 0 and "key epoch 3" in result.output


def test_node_config_and_the_deploy_cli_keep_private_things_private(tmp_path):
    """Issue 13 item 9: node config (data path, policy, ledger dir) is 0600; issue 19 item 3: the deploy
    sub-app, like every typer app, prints no traceback locals."""
    from federation.deploy.cli import deploy_app
    from federation.deploy.launch import write_node_config

    old = os.umask(0o022)
    try:
        path = write_node_config(tmp_path, {"org-name": "alpha", "data-path": "/srv/alpha.jsonl"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # 0644 before
    assert deploy_app.pretty_exceptions_enable is False and deploy_app.pretty_exceptions_show_locals is False
