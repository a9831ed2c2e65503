"""The synthetic corpus: determinism, exact PII spans, canary bookkeeping, splits, round trip."""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import datetime

import pytest

from secure_kd.data import PII_TYPES, TOPICS, SyntheticCorpus, generate_corpus

REPEATS = [1, 3, 5]


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus(300, seed=7, n_canaries=3, canary_repeats=REPEATS, secret_digits=4)


def test_same_seed_same_corpus_and_other_seed_other_corpus(corpus):
    again = generate_corpus(300, seed=7, n_canaries=3, canary_repeats=REPEATS, secret_digits=4)
    assert again.records == corpus.records and again.canaries == corpus.canaries
    other = generate_corpus(300, seed=8, n_canaries=3, canary_repeats=REPEATS, secret_digits=4)
    assert other.texts() != corpus.texts()
    assert [c.secret for c in other.canaries] != [c.secret for c in corpus.canaries]


def test_records_have_the_schema_and_several_topics(corpus):
    assert len(corpus) == 300 + sum(REPEATS)
    assert [r["record_id"] for r in corpus.records] == list(range(len(corpus)))
    counts = Counter(r["topic"] for r in corpus.records)
    assert set(counts) == set(TOPICS) | {"canary"} and counts["canary"] == sum(REPEATS)
    assert min(counts[t] for t in TOPICS) > 20
    assert len(set(corpus.texts())) > 290  # documents vary, they are not copies of a few templates


def test_every_pii_span_is_exact_and_well_formed(corpus):
    patterns = {
        "email": r"[a-z.]+@[a-z0-9.-]+\.[a-z]+",
        "iban": r"[A-Z]{2}\d{2}[A-Z0-9]{10,30}",
        "credit_card": r"\d{12,19}",
        "id_number": r"[A-Z]{2}-\d{6}",
        "phone": r"[\d()+\-. x]{7,}",
        "name": r"[A-Z][\w'.-]*( [\w'.-]+)+",
    }
    seen = Counter()
    for record in corpus.records:
        text, previous_end = record["text"], 0
        for span in sorted(record["pii_spans"], key=lambda s: s["start"]):
            assert span["type"] in PII_TYPES
            assert previous_end <= span["start"] < span["end"] <= len(text)  # inside, no overlap
            value = text[span["start"] : span["end"]]
            assert value == value.strip() and value
            if span["type"] in patterns:
                assert re.fullmatch(patterns[span["type"]], value), (span["type"], value)
            if span["type"] == "date":
                assert any(_parses(value, fmt) for fmt in ("%Y-%m-%d", "%B %d, %Y", "%d/%m/%Y")), value
            previous_end = span["end"]
            seen[span["type"]] += 1
    assert set(seen) == set(PII_TYPES)


def _parses(value, fmt):
    try:
        datetime.strptime(value, fmt)
    except ValueError:
        return False
    return True


def test_pii_spans_point_at_the_generated_values():
    """The document person's email is derived from the name spans of the same record."""
    corpus = generate_corpus(200, seed=3, n_canaries=0)
    checked = 0
    for record in corpus.records:
        values = {(s["type"], record["text"][s["start"] : s["end"]]) for s in record["pii_spans"]}
        names = [v for t, v in values if t == "name"]
        for kind, value in values:
            if kind == "email":
                local = value.split("@")[0]
                assert any(re.sub(r"[^a-z.]", "", n.lower().replace(" ", ".")) == local for n in names)
                checked += 1
    assert checked > 30


def test_canaries_are_inserted_exactly_repeats_times(corpus):
    texts = corpus.texts()
    assert [c.repeats for c in corpus.canaries] == REPEATS
    for canary in corpus.canaries:
        holders = [i for i, text in enumerate(texts) if canary.text in text]
        assert holders == list(canary.record_ids)
        assert len(holders) == canary.repeats
        assert canary.text == f"The access code for {canary.prefix[20:-4]} is {canary.secret}."
        assert (
            canary.text.startswith(canary.prefix) and canary.text[len(canary.prefix) :] == canary.secret + "."
        )
    assert len({c.secret for c in corpus.canaries}) == len({c.prefix for c in corpus.canaries}) == 3


def test_canary_record_spans_cover_name_and_secret(corpus):
    canary = corpus.canaries[0]
    record = corpus.records[canary.record_ids[0]]
    values = [(s["type"], record["text"][s["start"] : s["end"]]) for s in record["pii_spans"]]
    assert values == [
        ("name", canary.prefix[len("The access code for ") : -len(" is ")]),
        ("secret", canary.secret),
    ]


def test_secret_space_and_secret_index(corpus):
    space = corpus.secret_space()
    assert len(space) == 10**4
    assert space[0] == "0000" and space[9999] == "9999" and space[-1] == "9999" and space[42] == "0042"
    assert list(space[:3]) == ["0000", "0001", "0002"]
    for canary in corpus.canaries:
        assert space[canary.secret_index] == canary.secret
        assert space.index(canary.secret) == canary.secret_index
    assert len(generate_corpus(5, seed=0, n_canaries=1, secret_digits=2).secret_space()) == 100
    candidates = corpus.candidate_texts(corpus.canaries[1])
    assert len(candidates) == 10**4
    assert candidates[corpus.canaries[1].secret_index] == corpus.canaries[1].text


def test_split_keeps_canaries_out_of_heldout(corpus):
    train, heldout = corpus.split(0.25, seed=1)
    assert len(train) + len(heldout) == len(corpus)
    assert len(heldout) == round(0.25 * 300)  # of the 300 documents; canary records stay in train
    assert heldout.canaries == [] and train.canaries == corpus.canaries
    assert not any("The access code for" in text for text in heldout.texts())
    assert {r["record_id"] for r in train.records}.isdisjoint(r["record_id"] for r in heldout.records)
    canary_ids = {i for c in corpus.canaries for i in c.record_ids}
    assert canary_ids <= {r["record_id"] for r in train.records}
    assert corpus.split(0.25, seed=1)[1].records == heldout.records
    assert corpus.split(0.25, seed=2)[1].records != heldout.records
    with pytest.raises(ValueError, match="heldout_fraction must be in"):
        corpus.split(1.0, seed=0)


def test_inline_canaries_live_inside_host_documents():
    corpus = generate_corpus(50, seed=5, n_canaries=2, canary_repeats=[2, 4], canary_placement="inline")
    assert len(corpus) == 50
    for canary in corpus.canaries:
        for record_id in canary.record_ids:
            record = corpus.records[record_id]
            assert record["topic"] in TOPICS and record["text"].endswith(" " + canary.text)
            secret_spans = [
                s for s in record["pii_spans"] if record["text"][s["start"] : s["end"]] == canary.secret
            ]
            assert secret_spans and secret_spans[-1]["end"] == len(record["text"]) - 1
    _, heldout = corpus.split(0.5, seed=0)
    assert not any("The access code for" in text for text in heldout.texts())


def test_jsonl_round_trip(tmp_path, corpus):
    path = tmp_path / "corpus.jsonl"
    sidecar = corpus.to_jsonl(path)
    assert sidecar == tmp_path / "corpus.canaries.json"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == corpus.records
    loaded = SyntheticCorpus.from_jsonl(path)
    assert loaded.records == corpus.records and loaded.canaries == corpus.canaries
    assert loaded.secret_digits == 4 and loaded.seed == 7


def test_round_trip_refuses_tampered_records_and_missing_sidecar(tmp_path, corpus):
    path = tmp_path / "corpus.jsonl"
    sidecar = corpus.to_jsonl(path)
    path.write_text(path.read_text(encoding="utf-8").replace("access code", "door code", 1), encoding="utf-8")
    with pytest.raises(ValueError, match="records were changed"):
        SyntheticCorpus.from_jsonl(path)
    sidecar.unlink()
    with pytest.raises(FileNotFoundError, match="corpus.canaries.json does not exist"):
        SyntheticCorpus.from_jsonl(path)


def test_two_thousand_records(corpus):
    big = generate_corpus(2000, seed=0, n_canaries=4, canary_repeats=[1, 2, 4, 8])
    assert len(big) == 2015 and len(set(big.texts())) > 1990


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_canaries": 2, "canary_repeats": [1]}, "canary_repeats has 1 counts but n_canaries is 2"),
        ({"n_canaries": 1, "canary_repeats": 0}, "repeat count must be >= 1"),
        ({"canary_format": "no secret here {name}"}, "exactly once"),
        ({"n_canaries": 11, "secret_digits": 1}, "11 distinct secrets do not fit in 1 digits"),
        ({"topics": ["weather"]}, "available: support, hr"),
        ({"canary_placement": "inline", "canary_repeats": 20}, "one host per insertion"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_corpus(10, seed=0, **kwargs)
