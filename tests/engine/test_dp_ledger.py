"""The on-disk privacy ledger: entries, idempotent advances, atomic private files, loud failures,
a hash chain that refuses edited files, one ledger per dataset."""

from __future__ import annotations

import json
import stat

import pytest
from opacus.accountants import RDPAccountant

from secure_kd.dp.config import PrivacyConfig
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
    lock = ledger.path.with_name(ledger.path.name + ".lock")
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    lines = [json.loads(line) for line in ledger.path.read_text().splitlines()]
    assert [next(k for k in line if k != "prev") for line in lines] == ["header", "entry", "end"]
    assert lines[1]["entry"]["steps"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_unreadable_ledger_is_an_error_not_a_fresh_start(tmp_path):
    ledger = Ledger.open("k", tmp_path)
    ledger.record(noise_multiplier=1.0, sample_rate=0.1, steps=3)
    ledger.path.write_text("{ not json")
    with pytest.raises(LedgerError, match="never repaired or reset automatically"):
        ledger.epsilon(1e-5)
    with pytest.raises(LedgerError, match="never repaired or reset automatically"):
        ledger.record(noise_multiplier=1.0, sample_rate=0.1, steps=1)


def test_ledger_keys_name_files_safely(tmp_path):
    for bad in ["../x", "", ".hidden", "a/b"]:
        with pytest.raises(LedgerError, match="names a file"):
            Ledger.open(bad, tmp_path)


def test_default_location_follows_secure_kd_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SECURE_KD_HOME", str(tmp_path))
    assert Ledger.open("abc").path == tmp_path / "privacy-ledgers" / "abc.jsonl"


def test_dataset_key_ignores_record_order_but_not_content():
    assert dataset_key(["b", "a", "c"]) == dataset_key(["a", "b", "c"])
    assert dataset_key(["a", "b"]) != dataset_key(["a", "b", "b"])
    assert len(dataset_key(["a"])) == 64


# -- integrity: the hash chain ----------------------------------------------------------------------------


def _three_entries(tmp_path) -> Ledger:
    ledger = Ledger.open("k", tmp_path, data_fingerprint="f" * 64)
    ledger.record(noise_multiplier=1.0, sample_rate=0.1, steps=30, entry_id="a")
    ledger.record(noise_multiplier=1.0, sample_rate=0.1, steps=20, entry_id="b")
    ledger.record(noise_multiplier=2.0, sample_rate=0.1, steps=10, entry_id="c")
    return ledger


def _lines(ledger: Ledger) -> list[str]:
    return ledger.path.read_text().splitlines()


TAMPERS = {
    # a naive edit of what was spent: the first entry's steps, the last one's noise, the header's data
    "fewer steps": lambda lines: [lines[0], lines[1].replace('"steps":30', '"steps":3'), *lines[2:]],
    "more noise": lambda lines: [
        *lines[:3],
        lines[3].replace('"noise_multiplier":2.0', '"noise_multiplier":20.0'),
        lines[4],
    ],
    "other data": lambda lines: [lines[0].replace("f" * 64, "e" * 64), *lines[1:]],
    "deleted entry": lambda lines: [lines[0], *lines[2:]],
    "deleted last entry": lambda lines: [*lines[:3], lines[4]],
    "reordered": lambda lines: [lines[0], lines[2], lines[1], *lines[3:]],
    "duplicated": lambda lines: [*lines[:2], lines[1], *lines[2:]],
    "truncated": lambda lines: lines[:4],
    "end count edited": lambda lines: [*lines[:4], lines[4].replace('"entries":3', '"entries":2')],
    "appended": lambda lines: [*lines, lines[1]],
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_a_tampered_ledger_is_refused_with_the_file_and_the_fix(tmp_path, tamper):
    ledger = _three_entries(tmp_path)
    assert ledger.total_steps() == 60
    edited = "\n".join(TAMPERS[tamper](_lines(ledger))) + "\n"
    assert edited != ledger.path.read_text()
    ledger.path.write_text(edited)
    for action in (ledger.entries, lambda: ledger.record(noise_multiplier=1.0, sample_rate=0.1, steps=1)):
        with pytest.raises(LedgerError) as info:
            action()
        message = str(info.value)
        assert str(ledger.path) in message and "fails its integrity check" in message
        assert "Restore it from a backup" in message and "unaccounted for" in message
    assert ledger.path.read_text() == edited  # refused, never rewritten


def test_the_refusal_names_the_line_that_breaks_the_chain(tmp_path):
    ledger = _three_entries(tmp_path)
    lines = _lines(ledger)
    lines[2] = lines[2].replace('"steps":20', '"steps":2')
    ledger.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerError, match="line 4 does not chain to line 3"):
        ledger.history()


def test_a_schema_1_ledger_is_still_read_and_converted_on_the_next_write(tmp_path):
    old = {
        "schema_version": 1,
        "key": "k",
        "entries": [
            {
                "entry_id": "r",
                "kind": "run",
                "noise_multiplier": 1.1,
                "sample_rate": 0.2,
                "steps": 7,
                "created": "2026-01-01T00:00:00+00:00",
                "updated": "2026-01-01T00:00:00+00:00",
            }
        ],
    }
    (tmp_path / "k.json").write_text(json.dumps(old))
    ledger = Ledger.open("k", tmp_path)
    assert ledger.history() == [(1.1, 0.2, 7)]  # an old ledger is never forgotten
    ledger.record(noise_multiplier=1.0, sample_rate=0.1, steps=2)
    assert ledger.history() == [(1.1, 0.2, 7), (1.0, 0.1, 2)]
    assert not (tmp_path / "k.json").exists() and (tmp_path / "k.json.migrated").is_file()


# -- one ledger per dataset -------------------------------------------------------------------------------


def test_a_user_key_names_the_data_it_was_first_used_with(tmp_path):
    ours, theirs = dataset_key(["a", "b"]), dataset_key(["c"])
    Ledger.open("patients", tmp_path, data_fingerprint=ours).record(
        noise_multiplier=1.0, sample_rate=0.1, steps=5
    )
    assert Ledger.open("patients", tmp_path, data_fingerprint=ours).total_steps() == 5
    with pytest.raises(LedgerError, match="'patients' is the ledger of other records") as info:
        Ledger.open("patients", tmp_path, data_fingerprint=theirs)
    assert "Omit ledger_key" in str(info.value)


def test_no_dataset_gets_a_second_ledger_under_another_key(tmp_path):
    fingerprint = dataset_key(["a", "b"])
    Ledger.open(fingerprint, tmp_path, data_fingerprint=fingerprint).record(
        noise_multiplier=1.0, sample_rate=0.1, steps=5
    )
    # a fresh user key on the same records would start their budget afresh
    with pytest.raises(LedgerError, match="already have a privacy ledger") as info:
        Ledger.open("fresh-start", tmp_path, data_fingerprint=fingerprint)
    assert "omit ledger_key" in str(info.value)

    other = dataset_key(["c"])
    Ledger.open("named", tmp_path, data_fingerprint=other).record(
        noise_multiplier=1.0, sample_rate=0.1, steps=1
    )
    # ... and the default key on records that already have a named ledger would, too
    with pytest.raises(LedgerError, match="set privacy.ledger_key: named"):
        Ledger.open(other, tmp_path, data_fingerprint=other)


@pytest.mark.parametrize("bad", ["$HOME$/ledgers", "${LEDGERS}", "$XDG_DATA_HOME/l"])
def test_a_dollar_in_the_ledger_dir_is_a_clear_error(tmp_path, monkeypatch, bad):
    monkeypatch.chdir(tmp_path)  # the old behaviour: a directory literally named "$HOME$" here
    with pytest.raises(ValueError, match="does not expand environment variables") as info:
        PrivacyConfig(noise_multiplier=1.0, ledger_dir=bad)
    assert "privacy.ledger_dir" in str(info.value) and "Write the path out" in str(info.value)
    with pytest.raises(LedgerError, match="does not expand environment variables"):
        Ledger.open("k", bad).record(noise_multiplier=1.0, sample_rate=0.1, steps=1)
    assert list(tmp_path.iterdir()) == []
