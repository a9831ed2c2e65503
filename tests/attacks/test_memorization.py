"""Canary exposure, extraction flags and the `memorization` plugin, on tiny models and a tiny tokenizer."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from apparatus.canaries import measure_canary
from apparatus.tiny_lm import TrainRecipe, build_model, resolve_tokenizer, tokenize_texts, train_causal_lm
from attacks import get_attack
from attacks.memorization import (
    TrainingDataIndex,
    precision_at,
    sample_generations,
    targeted_canary_extraction,
    zlib_entropy_bits,
    zlib_ratio,
)
from attacks.memorization.discoverable import discoverable_memorization, pii_completion
from secure_kd.config import TinyModelConfig
from secure_kd.data import Canary, TokenizedExample, generate_corpus

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "attacks" / "memorization.yaml"


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models run several times faster on one intra-op thread than on two contended ones.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def memorizing_setup():
    """A corpus with 2 canaries inserted 12 times each, a tokenizer, an untrained and a trained model."""
    torch.set_num_threads(1)
    corpus = generate_corpus(24, seed=3, n_canaries=2, canary_repeats=12, secret_digits=3)
    # Trained on canary-free text: a vocabulary learned with the canaries can hold a secret as one token.
    tokenizer = resolve_tokenizer("tiny:400", generate_corpus(48, seed=4, n_canaries=0).texts())
    recipe = TrainRecipe(
        model=TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4), epochs=20, batch_size=16, lr=5e-3
    )
    untrained = build_model(recipe, len(tokenizer), seed=0, pad_id=0).eval()
    trained = build_model(recipe, len(tokenizer), seed=0, pad_id=0)
    train_causal_lm(
        trained,
        tokenize_texts(corpus.texts(), tokenizer, 64),
        recipe,
        pad_id=0,
        seed=0,
        device=torch.device("cpu"),
    )
    return corpus, tokenizer, untrained, trained


def _naive_secret_nll(model, tokenizer, head: str, candidate: str) -> float:
    """Total NLL of the candidate's tokens after the prefix, from one full forward pass per candidate."""
    head_ids = tokenizer(head)["input_ids"]
    full_ids = tokenizer(head + candidate)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([full_ids])).logits[0].double(), dim=-1)
    return -sum(float(logprobs[t - 1, full_ids[t]]) for t in range(len(head_ids), len(full_ids)))


def test_exposure_matches_a_naive_per_candidate_ranking():
    corpus = generate_corpus(8, seed=1, n_canaries=1, secret_digits=2)
    tokenizer = resolve_tokenizer("tiny:300", corpus.texts())
    model = build_model(
        TrainRecipe(model=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2)),
        len(tokenizer),
        seed=5,
        pad_id=0,
    ).eval()
    canary = corpus.canaries[0]
    report = measure_canary(model, tokenizer, canary, corpus.secret_space(), estimate_samples=0)

    head = canary.prefix.rstrip()
    losses = {s: _naive_secret_nll(model, tokenizer, head, " " + s) for s in corpus.secret_space()}
    rank = 1 + sum(1 for s, loss in losses.items() if loss < losses[canary.secret])
    assert report.rank == rank
    assert report.exposure == pytest.approx(math.log2(100) - math.log2(rank))
    assert report.canary_loss == pytest.approx(losses[canary.secret], rel=1e-4)
    assert report.n_candidates == 100 and report.estimate is None


def test_a_memorized_canary_is_exposed_and_an_untrained_model_is_not(memorizing_setup):
    corpus, tokenizer, untrained, trained = memorizing_setup
    space, max_bits = corpus.secret_space(), math.log2(1000)
    exposed = [measure_canary(trained, tokenizer, c, space).exposure for c in corpus.canaries]
    unexposed = [measure_canary(untrained, tokenizer, c, space).exposure for c in corpus.canaries]
    assert min(exposed) >= 0.9 * max_bits
    assert np.mean(unexposed) < 0.5 * max_bits


def test_secret_sharer_estimate_is_flagged_and_bounded(memorizing_setup):
    corpus, tokenizer, _, trained = memorizing_setup
    canary = corpus.canaries[0]
    report = measure_canary(
        trained, tokenizer, canary, corpus.secret_space(), enumerate_space=False, estimate_samples=200
    )
    assert report.exposure is None and report.rank is None
    assert report.estimate is not None and report.estimate.is_estimate
    assert report.estimate.max_bits_supported_by_samples == pytest.approx(math.log2(200))
    # A memorized canary beats every sample, so the fitted tail puts it far beyond the samples' reach.
    assert math.log2(200) < report.estimate.value <= math.log2(1000) + 1e-9
    assert sum(report.histogram.counts) == 200
    with pytest.raises(ValueError, match="estimate_samples"):
        measure_canary(
            trained, tokenizer, canary, corpus.secret_space(), enumerate_space=False, estimate_samples=5
        )


def test_greedy_decoding_from_the_prefix_extracts_only_memorized_canaries(memorizing_setup):
    corpus, tokenizer, untrained, trained = memorizing_setup
    common = dict(n_samples=4, top_k=0, temperature=1.0, seed=0, device=torch.device("cpu"))
    assert all(
        r.greedy_extracted for r in targeted_canary_extraction(trained, tokenizer, corpus.canaries, **common)
    )
    assert not any(
        r.greedy_extracted
        for r in targeted_canary_extraction(untrained, tokenizer, corpus.canaries, **common)
    )


def test_discoverable_memorization_matches_a_manual_greedy_loop(memorizing_setup):
    corpus, tokenizer, _, trained = memorizing_setup
    examples = tokenize_texts(corpus.texts(), tokenizer, 64)[:12] + [
        TokenizedExample([5, 6, 7], [5, 6, 7], 99)
    ]
    prefix, suffix = 6, 4
    found = discoverable_memorization(
        trained, examples, prefix_tokens=prefix, suffix_tokens=suffix, pad_id=0, device=torch.device("cpu")
    )
    expected = []
    for example in examples[:-1]:
        ids = list(example.input_ids[:prefix])
        with torch.no_grad():
            for _ in range(suffix):
                ids.append(int(trained(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        expected.append(float(ids[prefix:] == example.input_ids[prefix : prefix + suffix]))
    assert found[:-1].tolist() == expected and math.isnan(found[-1])
    assert 0 < sum(expected)  # the repeated canary records are memorized


def test_pii_completion_finds_memorized_canary_secrets_only_in_the_trained_model(memorizing_setup):
    corpus, tokenizer, untrained, trained = memorizing_setup
    canary_records = [corpus.records[c.record_ids[0]] for c in corpus.canaries]
    cpu = torch.device("cpu")
    secrets = [
        s
        for s in pii_completion(trained, tokenizer, canary_records, min_chars=3, device=cpu)
        if s["type"] == "secret"
    ]
    assert [s["value"] for s in secrets] == [c.secret for c in corpus.canaries]
    assert all(s["completed"] for s in secrets)
    assert not any(
        s["completed"] for s in pii_completion(untrained, tokenizer, canary_records, min_chars=3, device=cpu)
    )


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(memorizing_setup):
    _, tokenizer, untrained, _ = memorizing_setup
    prompts = [[5, 6], [7, 8], [9]]
    common = dict(max_new_tokens=6, top_k=20, temperature=1.0, eos_id=None, pad_id=0)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = sample_generations(untrained, prompts, seed=7, **common)
    assert torch.rand(1) == expected_next
    assert sample_generations(untrained, prompts, seed=7, **common) == first
    assert sample_generations(untrained, prompts, seed=8, **common) != first
    assert [seq[: len(p)] for seq, p in zip(first, prompts, strict=True)] == prompts


def test_left_padded_batches_decode_like_one_prompt_at_a_time(memorizing_setup):
    corpus, tokenizer, _, trained = memorizing_setup
    prompts = [
        tokenizer(text)["input_ids"][:length]
        for text, length in zip(corpus.texts(), (3, 11, 1, 7, 5), strict=False)
    ]
    common = dict(max_new_tokens=6, top_k=0, temperature=1.0, seed=0, eos_id=None, pad_id=0, greedy=True)
    batched = sample_generations(trained, prompts, **common)
    assert batched == [sample_generations(trained, [prompt], **common)[0] for prompt in prompts]


RECORDS = [
    {
        "text": "Invoice XT-1 for Maria Lopez: card 4948924115781567 charged for a blue router "
        "on Monday morning.",
        "pii_spans": [{"start": 17, "end": 28, "type": "name"}, {"start": 35, "end": 51, "type": "card"}],
        "record_id": 10,
    },
    {
        "text": "Support ticket for Omar Diaz about a broken kettle delivered late to the old warehouse.",
        "pii_spans": [{"start": 19, "end": 28, "type": "name"}],
        "record_id": 11,
    },
    {
        "text": "Support ticket for Ana Ruiz about a broken kettle delivered late to the old warehouse.",
        "pii_spans": [{"start": 19, "end": 27, "type": "name"}],
        "record_id": 12,
    },
]
CANARY = Canary("The access code for Jane Roe is ", "1234", "The access code for Jane Roe is 1234.", (13,), 1)


def test_extraction_flags_exact_secrets_near_duplicates_and_not_unrelated_text():
    index = TrainingDataIndex(RECORDS, [CANARY], ngram=3, threshold=0.5, min_pii_chars=6)
    leaked_card = index.check("the system printed 4948924115781567 twice")
    assert leaked_card.exact_pii == ["4948924115781567"] and leaked_card.flagged
    # 8 of its 14 word trigrams are in record 10 and in no other record.
    near = index.check(
        "Invoice XT-1 for Mario Lopez: card number charged for a blue router on Monday morning"
    )
    assert near.near_duplicate_of == 10 and near.overlap == pytest.approx(8 / 14)
    assert not near.exact_pii and near.flagged
    assert index.check("The access code for Jane Roe is 1234.").canaries == [0]
    unrelated = index.check("Weather today is sunny with light winds from the west and 1234 clouds.")
    assert not unrelated.flagged and unrelated.overlap == 0.0
    # Boilerplate shared by two records says nothing about either: not a near-duplicate.
    assert index.check("a broken kettle delivered late to the old warehouse").near_duplicate_of is None


def test_zlib_ratio_matches_hand_values():
    # zlib of b"" is 8 bytes: 2 header + 2 (empty fixed-Huffman block) + 4 Adler-32.
    assert zlib_entropy_bits("") == 64
    # b"abc": 2 header + 5 (3-bit block header, three 8-bit literals, 7-bit end code = 34 bits) + 4 Adler-32.
    assert zlib_entropy_bits("abc") == 88
    assert zlib_ratio(2.2, "abc") == pytest.approx(0.025)


def test_precision_at_counts_flagged_among_the_lowest_scores():
    scores = np.array([3.0, 1.0, 2.0, 0.0])
    flagged = np.array([False, True, False, True])
    assert precision_at(scores, flagged, [2, 3, 10]) == {2: 1.0, 3: pytest.approx(2 / 3), 10: 0.5}


def test_memorization_plugin_runs_from_the_example_config(tmp_path):
    plugin = get_attack("memorization")
    raw = yaml.safe_load(CONFIG.read_text())
    raw["out"] = str(tmp_path / "memorization")
    result = plugin.run(plugin.Config.model_validate(raw))
    written = json.loads((tmp_path / "memorization" / "results.json").read_text())
    assert written["kind"] == "memorization" and "schema_version" in written
    by_repeats = result.mean_exposure_by_repeats
    assert by_repeats[16] > by_repeats[1]
    assert by_repeats[16] == pytest.approx(math.log2(1000))
    extraction = result.extraction
    assert extraction is not None and extraction.n_generations == raw["extraction"]["n_samples"]
    assert set(extraction.precision_at) == {"perplexity", "zlib", "reference"}
    assert [c.repeats for c in extraction.canary_extraction] == [1, 2, 8, 16]


# --------------------------------------------------------------------------- a user's own records and secrets


def test_charset_space_orders_like_the_digit_secret_space_and_counts_by_hand():
    from attacks.memorization.secrets import CharsetSpace
    from secure_kd.data.synthetic import SecretSpace

    digits, reference = CharsetSpace("0123456789", 3), SecretSpace(3)
    assert len(digits) == 1000 and list(digits[:12]) == list(reference[:12]) and digits[999] == "999"
    assert digits.index("449") == reference.index("449") == 449
    hexa = CharsetSpace("0123456789abcdef", 2)
    assert len(hexa) == 256 and hexa[0] == "00" and hexa[0x3F] == "3f" and hexa.index("ff") == 255
    assert "3g" not in hexa and "123" not in hexa


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_a_secrets_file_is_read_and_its_errors_name_the_line_not_the_secret(tmp_path):
    from attacks.memorization.secrets import load_secrets

    records = [{"text": "PIN 0042. PIN 0042 again", "record_id": 0}, {"text": "nothing", "record_id": 1},
               {"text": "PIN 0042.", "record_id": 2}, {"text": "token: 9f3a", "record_id": 3}]  # fmt: skip
    good = _write_lines(tmp_path / "s.jsonl", [
        json.dumps({"prefix": "PIN ", "secret": "0042", "suffix": "."}), "",
        json.dumps({"prefix": "token: ", "secret": "9f3a", "alphabet": "hex"}),
    ])  # fmt: skip
    canaries, spaces = load_secrets(str(good), records)
    assert [c.repeats for c in canaries] == [2, 1] and canaries[0].record_ids == (0, 2)
    assert canaries[0].text == "PIN 0042." and [len(s) for s in spaces] == [10_000, 16**4]
    for line, expected in (
        (
            {"prefix": "Key ", "secret": "s3cr3t-value"},
            "line 1: the secret is not all digits: give `alphabet`",
        ),
        ({"prefix": "Key ", "secret": "s3cr3t-value", "alphabet": "digits"}, "outside its alphabet"),
        ({"secret": "s3cr3t-value"}, "`prefix`"),
        ({"prefix": "Key ", "secret": "s3cr3t-value", "note": 1}, "unknown keys ['note']"),
    ):
        bad = _write_lines(tmp_path / "bad.jsonl", [json.dumps(line)])
        with pytest.raises(ValueError, match=re.escape(expected)) as caught:
            load_secrets(str(bad))
        assert "s3cr3t-value" not in str(caught.value)


def test_pii_patterns_find_what_the_generator_wrote():
    """Against the synthetic generator's own spans: every email, phone, IBAN and card number, and
    nothing it did not write."""
    from attacks.memorization.pii import find_pii

    corpus = generate_corpus(300, seed=3, n_canaries=0)
    found_types = {"email", "phone", "iban", "credit_card"}
    missed, extra, total = [], [], 0
    for record in corpus.records:
        truth = {(s["start"], s["end"]): s["type"] for s in record["pii_spans"]}
        found = {(s["start"], s["end"]): s["type"] for s in find_pii(record["text"])}
        for span, kind in truth.items():
            if kind in found_types:
                total += 1
                if found.get(span) != kind:
                    missed.append(record["text"][span[0] : span[1]])
        extra += [record["text"][a:b] for (a, b), kind in found.items() if (a, b) not in truth]
    assert total > 400 and not missed and not extra


def test_redaction_keeps_shape_and_hides_the_value():
    from attacks.memorization.extraction import ScoredGeneration, TrainingDataIndex
    from attacks.memorization.pii import redact, redact_text
    from attacks.memorization.redaction import pii_findings

    dot = "\u2022"
    assert redact("john.smith@example.com") == f"j{dot * 3}.{dot * 5}@{dot * 7}.{dot * 3}"
    email = "ann.lee@example.org"
    records = [{"text": f"Write to {email} today.", "pii_spans": [{"start": 9, "end": 9 + len(email),
                "type": "email"}], "record_id": 7}]  # fmt: skip
    index = TrainingDataIndex(records)
    generated = f"mail {email} or call 555-867-5309"
    scored = [ScoredGeneration(text=generated, log_perplexity=1.0, zlib_ratio=0.1, reference_ratio=None,
                               flags=index.check(generated))]  # fmt: skip
    (finding,) = pii_findings(scored, index, records)
    assert (finding.type, finding.n_generations, finding.record_ids, finding.n_chars) == ("email", 1, [7], 19)
    assert email not in finding.model_dump_json() and finding.redacted.startswith("a")
    masked = redact_text(generated, [email])
    assert email not in masked and "555-867-5309" not in masked and masked.startswith("mail ")
