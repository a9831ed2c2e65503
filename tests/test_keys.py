"""The authenticated key ceremony: round trip, tampering, key substitution, replay, key files."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ed25519

from federation import he
from federation.keys import (
    SEAL_SIGNATURE_DOMAIN,
    CeremonyError,
    KeySubstitutionError,
    OrgKeys,
    PublicBundle,
    SealedMessage,
    TrustStore,
    open_from,
    seal_for,
)

RUN = "run-2026-11-23"


@pytest.fixture(scope="module")
def orgs() -> dict[str, OrgKeys]:
    return {name: OrgKeys.generate(name) for name in ("dealer", "hospital-b", "bank-c")}


@pytest.fixture(scope="module")
def trust(orgs, tmp_path_factory) -> TrustStore:
    # Bundles are registered out of band: here, one JSON file per organization in a directory.
    directory = tmp_path_factory.mktemp("registered")
    for name, keys in orgs.items():
        (directory / f"{name}.json").write_text(keys.public_bundle().to_json())
    return TrustStore.from_directory(directory)


def _reseal(message: SealedMessage, signer: OrgKeys, **changes) -> bytes:
    edited = dataclasses.replace(message, **changes)
    signature = signer.sign(SEAL_SIGNATURE_DOMAIN + edited.signed_bytes())
    return dataclasses.replace(edited, signature=signature).to_bytes()


def test_keyring_reaches_another_client_and_decrypts_the_aggregate(orgs, trust):
    dealer, hospital = orgs["dealer"], orgs["hospital-b"]
    keyring = he.Keyring.generate(
        poly_modulus_degree=2048, coeff_mod_bit_sizes=(34, 20), global_scale=2.0**22
    )
    secret = keyring.secret_context()
    blob = seal_for(hospital.public_bundle(), dealer, RUN, secret, trust=trust)
    assert secret not in blob and secret[-64:] not in blob

    received = he.Keyring.from_secret_context(
        open_from(dealer.public_bundle(), hospital, RUN, blob, trust=trust)
    )
    assert received.key_id == keyring.key_id
    update = np.array([0.25, -1.5, 3.0])
    total = he.aggregate(
        keyring.public_context(), [he.encrypt(keyring, update, 2.0), he.encrypt(received, update, 1.0)]
    )
    np.testing.assert_allclose(he.decrypt(received, total, 3), 3.0 * update, atol=1e-3)


def test_bundle_signature_verifies_with_plain_ed25519_over_the_documented_message(orgs):
    bundle = orgs["bank-c"].public_bundle()
    org = bundle.org.encode()
    message = (
        b"secure-kd/kex-key-signature/v1"
        + struct.pack("<H", len(org))
        + org
        + struct.pack("<H", 32)
        + bundle.kex_pub
    )
    ed25519.Ed25519PublicKey.from_public_bytes(bundle.identity_pub).verify(bundle.kex_sig, message)
    assert PublicBundle.from_json(bundle.to_json()) == bundle


@pytest.mark.parametrize("region", ["ciphertext", "nonce", "ephemeral", "signature"])
def test_tampered_message_is_rejected(orgs, trust, region):
    dealer, hospital = orgs["dealer"], orgs["hospital-b"]
    message = SealedMessage.from_bytes(
        seal_for(hospital.public_bundle(), dealer, RUN, b"secret" * 100, trust=trust)
    )
    field = {
        "ciphertext": "ciphertext",
        "nonce": "nonce",
        "ephemeral": "ephemeral_pub",
        "signature": "signature",
    }[region]
    value = bytearray(getattr(message, field))
    value[len(value) // 2] ^= 0x01
    tampered = dataclasses.replace(message, **{field: bytes(value)}).to_bytes()
    with pytest.raises(CeremonyError, match="signature does not verify"):
        open_from(dealer.public_bundle(), hospital, RUN, tampered, trust=trust)


def test_tampered_ciphertext_fails_the_gcm_tag_even_when_re_signed(orgs, trust):
    # Isolates the AES-GCM check: the sender's signature is valid over the altered bytes.
    dealer, hospital = orgs["dealer"], orgs["hospital-b"]
    message = SealedMessage.from_bytes(
        seal_for(hospital.public_bundle(), dealer, RUN, b"payload", trust=trust)
    )
    flipped = bytes([message.ciphertext[0] ^ 0x80]) + message.ciphertext[1:]
    with pytest.raises(CeremonyError, match="AES-GCM") as caught:
        open_from(
            dealer.public_bundle(), hospital, RUN, _reseal(message, dealer, ciphertext=flipped), trust=trust
        )
    assert isinstance(caught.value.__cause__, InvalidTag)


def test_relay_substituting_the_recipient_kex_key_is_detected(orgs, trust):
    dealer, hospital = orgs["dealer"], orgs["hospital-b"]
    mallory = OrgKeys.generate("hospital-b")  # the relay's own keys, claiming hospital-b's name
    genuine = hospital.public_bundle()
    resigned = mallory.public_bundle()  # mallory's kex key, signed by mallory's identity
    unsigned = dataclasses.replace(genuine, kex_pub=mallory.kex_pub)  # genuine identity, old signature
    for forged, message in ((resigned, "registered one is"), (unsigned, "not signed by its registered")):
        with pytest.raises(KeySubstitutionError, match=message):
            seal_for(forged, dealer, RUN, b"ckks secret", trust=trust)
    # Had the dealer sealed to the substituted key, the real recipient could not open it either.
    naive = TrustStore({"hospital-b": mallory.identity_pub, "dealer": dealer.identity_pub})
    blob = seal_for(resigned, dealer, RUN, b"ckks secret", trust=naive)
    with pytest.raises(CeremonyError, match="AES-GCM"):
        open_from(dealer.public_bundle(), hospital, RUN, blob, trust=trust)


def test_sender_substitution_and_unknown_orgs_are_detected(orgs, trust):
    dealer, hospital = orgs["dealer"], orgs["hospital-b"]
    blob = seal_for(hospital.public_bundle(), dealer, RUN, b"ckks secret", trust=trust)
    impostor = OrgKeys.generate("dealer")
    with pytest.raises(KeySubstitutionError):
        open_from(impostor.public_bundle(), hospital, RUN, blob, trust=trust)
    # The impostor signs its own message as "dealer": the registered identity rejects it.
    forged = seal_for(hospital.public_bundle(), impostor, RUN, b"fake keyring", trust=trust)
    with pytest.raises(KeySubstitutionError):
        open_from(impostor.public_bundle(), hospital, RUN, forged, trust=trust)
    with pytest.raises(CeremonyError, match="signature does not verify"):
        open_from(dealer.public_bundle(), hospital, RUN, forged, trust=trust)
    stranger = OrgKeys.generate("stranger")
    with pytest.raises(KeySubstitutionError, match="not in the trust store"):
        seal_for(stranger.public_bundle(), dealer, RUN, b"x", trust=trust)


def test_replay_into_another_run_or_to_another_recipient_is_rejected(orgs, trust):
    dealer, hospital, bank = orgs["dealer"], orgs["hospital-b"], orgs["bank-c"]
    blob = seal_for(hospital.public_bundle(), dealer, RUN, b"ckks secret", trust=trust)
    with pytest.raises(CeremonyError, match="run"):
        open_from(dealer.public_bundle(), hospital, "another-run", blob, trust=trust)
    with pytest.raises(CeremonyError, match="recipient"):
        open_from(dealer.public_bundle(), bank, RUN, blob, trust=trust)
    # Even with the header rewritten and validly re-signed, the GCM associated data still binds
    # the original run and recipient.
    message = SealedMessage.from_bytes(blob)
    for changes, run, recipient in (
        ({"run_id": "another-run"}, "another-run", hospital),
        ({"recipient": "bank-c"}, RUN, bank),
    ):
        with pytest.raises(CeremonyError, match="AES-GCM"):
            open_from(
                dealer.public_bundle(), recipient, run, _reseal(message, dealer, **changes), trust=trust
            )


def test_malformed_and_oversized_messages(orgs, trust):
    dealer, hospital = orgs["dealer"], orgs["hospital-b"]
    blob = seal_for(hospital.public_bundle(), dealer, RUN, b"ckks secret", trust=trust)
    for bad in (b"", b"SKSL", blob[:-1], blob + b"\0", b"XXXX" + blob[4:]):
        with pytest.raises(CeremonyError):
            open_from(dealer.public_bundle(), hospital, RUN, bad, trust=trust)
    with pytest.raises(CeremonyError, match="over the 100-byte limit"):
        open_from(dealer.public_bundle(), hospital, RUN, blob, trust=trust, max_bytes=100)


def test_key_files_are_private_and_round_trip(tmp_path: Path):
    keys = OrgKeys.generate("org-a")
    directory = keys.save(tmp_path / "org-a")
    assert (directory / "identity.pem").stat().st_mode & 0o777 == 0o600
    assert (directory / "kex.pem").stat().st_mode & 0o777 == 0o600
    assert (directory / "bundle.json").stat().st_mode & 0o777 == 0o644
    assert directory.stat().st_mode & 0o777 == 0o700
    loaded = OrgKeys.load(directory)
    assert (loaded.identity_pub, loaded.kex_pub) == (keys.identity_pub, keys.kex_pub)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        keys.save(directory)

    (directory / "kex.pem").chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        OrgKeys.load(directory)


def test_passphrase_protected_keys(tmp_path: Path):
    keys = OrgKeys.generate("org-a")
    keys.save(tmp_path, passphrase=b"correct horse")
    assert b"ENCRYPTED PRIVATE KEY" in (tmp_path / "identity.pem").read_bytes()
    assert OrgKeys.load(tmp_path, passphrase=b"correct horse").identity_pub == keys.identity_pub
    with pytest.raises(ValueError, match="passphrase"):
        OrgKeys.load(tmp_path, passphrase=b"wrong")


def test_bundle_json_is_validated(orgs, tmp_path: Path):
    good = json.loads(orgs["dealer"].public_bundle().to_json())
    cases = {
        "exactly the fields": {**good, "extra": 1},
        "not valid base64": {**good, "kex_pub": "***"},
        "32 bytes": {**good, "kex_pub": "AAAA"},
        "organization name": {**good, "org": "../etc"},
    }
    for message, fields in cases.items():
        with pytest.raises(ValueError, match=message):
            PublicBundle.from_json(json.dumps(fields))
    # A registered bundle whose kex key was swapped after signing is refused at registration.
    (tmp_path / "dealer.json").write_text(json.dumps({**good, "kex_pub": good["identity_pub"]}))
    with pytest.raises(KeySubstitutionError):
        TrustStore.from_directory(tmp_path)


def test_trust_store_refuses_a_second_identity_for_an_org(orgs):
    store = TrustStore({"dealer": orgs["dealer"].identity_pub})
    with pytest.raises(KeySubstitutionError, match="already registered"):
        store.register("dealer", OrgKeys.generate("dealer").identity_pub)
