"""The authenticated key ceremony: round trip, tampering, key substitution, replay, stale (pre-rotation)
and expired bundles, key files."""

from __future__ import annotations

import dataclasses
import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ed25519

from federation.crypto import he
from federation.crypto.keys import (
    SEAL_SIGNATURE_DOMAIN,
    CeremonyError,
    ExpiredBundleError,
    KeySubstitutionError,
    OrgKeys,
    PublicBundle,
    SealedMessage,
    StaleBundleError,
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
        b"secure-kd/kex-key-signature/v2"
        + struct.pack("<H", len(org))
        + org
        + struct.pack("<H", 32)
        + bundle.kex_pub
        + struct.pack("<QQ", bundle.epoch, bundle.not_after)
    )
    ed25519.Ed25519PublicKey.from_public_bytes(bundle.identity_pub).verify(bundle.kex_sig, message)
    assert PublicBundle.from_json(bundle.to_json()) == bundle
    assert bundle.epoch == 1 and 89 * 86400 < bundle.not_after - time.time() <= 90 * 86400


def _trust_dir(directory: Path, *keys: OrgKeys) -> TrustStore:
    """The operator's trust/ as an organization holds it: one registered bundle per organization."""
    directory.mkdir(exist_ok=True)
    for k in keys:
        (directory / f"{k.org}.json").write_text(k.public_bundle().to_json())
    return TrustStore.from_directory(directory)


def test_a_stale_bundle_after_rotation_is_refused(tmp_path: Path):
    dealer, hospital = OrgKeys.generate("dealer"), OrgKeys.generate("hospital-b")
    before = _trust_dir(tmp_path / "trust", dealer, hospital)
    old = hospital.public_bundle()
    seal_for(old, dealer, RUN, b"ckks secret", trust=before)  # epoch 1 is current: fine

    # hospital-b rotates its key-exchange key (its old kex.pem may have leaked) and re-registers
    rotated = hospital.rotated()
    assert (rotated.epoch, rotated.identity_pub) == (
        2,
        hospital.identity_pub,
    ) and rotated.kex_pub != old.kex_pub
    after = _trust_dir(tmp_path / "trust", dealer, rotated)
    assert after.registered_epoch("hospital-b") == 2
    # a relay hands the dealer the old bundle: validly signed by the same identity, but stale
    with pytest.raises(StaleBundleError, match="epoch 1, but the registered one is epoch 2"):
        seal_for(old, dealer, RUN, b"ckks secret", trust=after)
    # relabelling the old bundle as epoch 3 (or 2) breaks its signature: the epoch is signed
    for epoch in (2, 3):
        with pytest.raises(KeySubstitutionError, match="not signed by its registered"):
            seal_for(dataclasses.replace(old, epoch=epoch), dealer, RUN, b"ckks secret", trust=after)
    blob = seal_for(rotated.public_bundle(), dealer, RUN, b"ckks secret", trust=after)
    assert open_from(dealer.public_bundle(), rotated, RUN, blob, trust=after) == b"ckks secret"
    with pytest.raises(CeremonyError, match="AES-GCM"):  # the old kex key opens nothing sealed since
        open_from(dealer.public_bundle(), hospital, RUN, blob, trust=after)
    # the same holds for the sender: a dealer bundle from before its rotation is refused by recipients
    new_dealer = dealer.rotated()
    both = _trust_dir(tmp_path / "trust", new_dealer, rotated)
    stale_blob = seal_for(rotated.public_bundle(), dealer, RUN, b"ckks secret", trust=after)
    with pytest.raises(StaleBundleError):
        open_from(dealer.public_bundle(), rotated, RUN, stale_blob, trust=both)
    # a second kex key signed for an epoch already registered is refused too
    forked = OrgKeys(
        "hospital-b", hospital.identity, OrgKeys.generate("x").kex, epoch=2, not_after=rotated.not_after
    )
    with pytest.raises(KeySubstitutionError, match="must raise the epoch"):
        seal_for(forked.public_bundle(), dealer, RUN, b"ckks secret", trust=after)


def test_an_expired_bundle_is_refused(tmp_path: Path):
    now = time.time()
    dealer = OrgKeys.generate("dealer")
    bank = OrgKeys.generate("bank-c", valid_days=1, now=now - 2 * 86400)  # expired a day ago
    trust = _trust_dir(tmp_path / "trust", dealer, bank)
    with pytest.raises(ExpiredBundleError, match="expired on .* rotate its keys"):
        seal_for(bank.public_bundle(), dealer, RUN, b"ckks secret", trust=trust)
    assert trust.verify(bank.public_bundle(), now=bank.not_after - 1)  # valid until not_after
    with pytest.raises(ExpiredBundleError):
        trust.verify(bank.public_bundle(), now=bank.not_after)
    # extending the expiry without the identity key breaks the signature
    extended = dataclasses.replace(bank.public_bundle(), not_after=int(now) + 86400)
    with pytest.raises(KeySubstitutionError, match="not signed"):
        trust.verify(extended)
    # after rotating, the organization is trusted again (newer epoch, fresh expiry)
    fresh_bank = bank.rotated()
    assert trust.verify(fresh_bank.public_bundle()).epoch == 2
    # an expired dealer is refused by the recipient as well
    old_dealer = OrgKeys.generate("dealer", valid_days=1, now=now - 2 * 86400)
    trust = _trust_dir(tmp_path / "trust2", old_dealer, fresh_bank)
    blob = seal_for(fresh_bank.public_bundle(), old_dealer, RUN, b"x", trust=trust)
    with pytest.raises(ExpiredBundleError, match="'dealer'"):
        open_from(old_dealer.public_bundle(), fresh_bank, RUN, blob, trust=trust)


def test_rotated_keys_round_trip_on_disk_and_old_format_bundles_are_refused(tmp_path: Path):
    keys = OrgKeys.generate("org-a")
    keys.save(tmp_path / "k")
    rotated = OrgKeys.load(tmp_path / "k").rotated()
    rotated.save(tmp_path / "k", overwrite=True)
    loaded = OrgKeys.load(tmp_path / "k")
    assert (loaded.epoch, loaded.not_after, loaded.kex_pub) == (2, rotated.not_after, rotated.kex_pub)
    assert loaded.identity_pub == keys.identity_pub
    v1 = json.loads(keys.public_bundle().to_json())
    v1 = {k: v for k, v in v1.items() if k not in ("epoch", "not_after")} | {"version": 1}
    with pytest.raises(ValueError, match="v1 carries no epoch or expiry"):
        PublicBundle.from_json(json.dumps(v1))


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
