"""The on-disk privacy ledger: entries, idempotent advances, atomic private files, loud failures."""

from __future__ import annotations

import json
import stat

import pytest
from opacus.accountants import RDPAccountant

from secure_kd.dp.ledger import Ledger, LedgerError, dataset_key


def test_runs_and_rounds_add_up_in_one_ledger(tmp_path):
    ledger = Ledger.open("patients-2024", tmp_path)
    run = ledger.record(kind="run", noise_multiplier=1.2, sample_rate=0.05, steps=0)
    ledger.record(entry_id=run, kind="run", noise_multiplier=1.2, sample_rate=0.05, steps=30)
    ledger.record(
        kind="federated_round", noise_multiplier=0.8, sample_rate=0.1, steps=4, entry_id="flwr-7-round-1"
    )
    # a reopened handle (another process) sees the same history
    again = Ledger.open("patients-2024", tmp_path)
    assert again.history() == [(1.2, 0.05, 30), (0.8, 0.1, 4)]
    assert again.history(exclude=run) == [(0.8, 0.1, 4)]
    assert again.total_steps() == 34

    reference = RDPAccountant()
    for _ in range(30):
        reference.step(noise_multiplier=1.2, sample_rate=0.05)
    for _ in range(4):
        reference.step(noise_multiplier=0.8, sample_rate=0.1)
    assert again.epsilon(1e-5) == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)


def test_advancing_an_entry_keeps_the_larger_step_count(tmp_path):
    ledger = Ledger.open("k", tmp_path)
    entry = ledger.record(noise_multiplier=1.0, sample_rate=0.1, steps=7, entry_id="round-3")
    ledger.record(noise_multiplier=1.0, sample_rate=0.1, steps=5, entry_id=entry)  # a replay after resume
    ledger.record(noise_multiplier=1.0, sample_rate=0.1, steps=7, entry_id=entry)  # a retried round
    assert ledger.history() == [(1.0, 0.1, 7)]
    with pytest.raises(LedgerError, match="cannot continue with"):
        ledger.record(noise_multiplier=2.0, sample_rate=0.1, steps=9, entry_id=entry)


def test_ledger_file_is_private_and_never_half_written(tmp_path):
    ledger = Ledger.open("k", tmp_path)
    ledger.record(noise_multiplier=1.0, sample_rate=0.1, steps=1)
    assert stat.S_IMODE(ledger.path.stat().st_mode) == 0o600
    assert json.loads(ledger.path.read_text())["entries"][0]["steps"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_unreadable_ledger_is_an_error_not_a_fresh_start(tmp_path):
    ledger = Ledger.open("k", tmp_path)
    ledger.record(noise_multiplier=1.0, sample_rate=0.1, steps=3)
    ledger.path.write_text("{ not json")
    with pytest.raises(LedgerError, match="never reset automatically"):
        ledger.epsilon(1e-5)
    with pytest.raises(LedgerError, match="never reset automatically"):
        ledger.record(noise_multiplier=1.0, sample_rate=0.1, steps=1)


def test_ledger_keys_name_files_safely(tmp_path):
    for bad in ["../x", "", ".hidden", "a/b"]:
        with pytest.raises(LedgerError, match="names a file"):
            Ledger.open(bad, tmp_path)


def test_default_location_follows_secure_kd_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SECURE_KD_HOME", str(tmp_path))
    assert Ledger.open("abc").path == tmp_path / "privacy-ledgers" / "abc.json"


def test_dataset_key_ignores_record_order_but_not_content():
    assert dataset_key(["b", "a", "c"]) == dataset_key(["a", "b", "c"])
    assert dataset_key(["a", "b"]) != dataset_key(["a", "b", "b"])
    assert len(dataset_key(["a"])) == 64
