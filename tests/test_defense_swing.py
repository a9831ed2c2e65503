"""Swing distillation: detectors, per-token scores, the target transform, and the defense end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from defenses.swing import SwingConfig, SwingSettings, scored_examples
from defenses.swing_privacy import (
    SwingTargets,
    content_keys,
    detect_spans,
    position_scores,
    private_spans,
    spans_to_token_scores,
    swing_teacher_logits,
    token_privacy_scores,
)
from secure_kd.losses import forward_kl

PLANTED = {
    "email": "jane.doe@example.com",
    "phone": "555-123-4567",
    "card": "4111 1111 1111 1111",
    "iban": "GB33BUKB20201555555555",
    "ssn": "123-45-6789",
    "url_secret": "https://x.io/reset?token=abc123XYZ",
}
TEXT = (
    f"Mail {PLANTED['email']} or call {PLANTED['phone']}. Card {PLANTED['card']}, "
    f"account {PLANTED['iban']}, SSN {PLANTED['ssn']}; reset at {PLANTED['url_secret']} today."
)


def _offsets(needle: str) -> tuple[int, int]:
    start = TEXT.index(needle)
    return start, start + len(needle)


def test_each_detector_finds_its_planted_span_exactly():
    found = detect_spans(TEXT)
    for name, value in PLANTED.items():
        start, end = _offsets(value)
        assert (start, end, 1.0) in found[name], (name, found[name])
    # "digits" catches each 3+ digit run; the email, with no digits, is caught by no other detector
    assert all(TEXT[s:e].isdigit() and e - s >= 3 for s, e, _ in found["digits"])
    email = _offsets(PLANTED["email"])
    others = [s for n, spans in found.items() if n != "email" for s in spans]
    assert not any(s < email[1] and e > email[0] for s, e, _ in others)
    assert detect_spans("Nothing private in this sentence.") == {name: [] for name in found}


def test_unknown_detector_and_bad_spans_are_user_errors():
    with pytest.raises(ValueError, match="unknown detectors"):
        detect_spans(TEXT, ["email", "passport"])
    with pytest.raises(ValueError, match="outside the text"):
        private_spans("abc", detectors=[], known_spans=[(0, 9, 1.0)])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        private_spans("abc", detectors=[], known_spans=[(0, 1, 1.5)])
    with pytest.raises(ValidationError, match="max_temperature"):
        SwingSettings(base_temperature=2.0, max_temperature=1.0)
    with pytest.raises(ValidationError, match="unknown detectors"):
        SwingSettings(detectors=["passport"])


def test_spans_become_token_scores_by_overlap():
    offsets = [(0, 4), (4, 5), (5, 9), (9, 12), (12, 12)]  # the last one is a zero-width special token
    scores = spans_to_token_scores(offsets, [(6, 10, 0.5), (8, 9, 0.9), (11, 12, 1.0)])
    assert scores == [0.0, 0.0, 0.9, 1.0, 0.0]


class _FakeNER:
    def __init__(self, spans):
        self.calls, self._spans = 0, spans

    def spans(self, text):
        self.calls += 1
        return self._spans


def test_token_scores_mark_exactly_the_tokens_of_the_planted_spans(tiny_tokenizer):
    ids, scores = token_privacy_scores(TEXT, tiny_tokenizer, detectors=["email"])
    encoded = tiny_tokenizer(TEXT, return_offsets_mapping=True)
    assert ids == encoded["input_ids"] and len(scores) == len(ids)
    start, end = _offsets(PLANTED["email"])
    expected = [1.0 if s < end and e > start else 0.0 for s, e in encoded["offset_mapping"]]
    assert scores == expected and sum(expected) >= 3
    marked = "".join(tiny_tokenizer.decode([i]) for i, s in zip(ids, scores, strict=True) if s > 0)
    assert PLANTED["email"] in marked
    # the NER hook is consulted only when given, and its scores are kept as they are
    name = (TEXT.index("Mail"), TEXT.index("Mail") + 4, 0.3)
    ner = _FakeNER([name])
    _, with_ner = token_privacy_scores(TEXT, tiny_tokenizer, detectors=[], ner=ner)
    assert ner.calls == 1 and max(with_ner) == pytest.approx(0.3) and with_ner[0] == pytest.approx(0.3)


def test_position_scores_are_shifted_onto_the_predicting_logits():
    scores = position_scores([[0.0, 0.0, 1.0, 0.5], [0.0, 0.7]], seq_len=4)
    assert scores.tolist() == [[0.0, 1.0, 0.5, 0.0], [pytest.approx(0.7), 0.0, 0.0, 0.0]]


def _hand_kl(teacher_row: torch.Tensor, student_row: torch.Tensor) -> float:
    p = torch.softmax(teacher_row.double(), -1)
    log_q = torch.log_softmax(student_row.double(), -1)
    return float((p * (p.log() - log_q)).sum())


def test_swing_changes_only_private_positions_and_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 5, 11, generator=g) * 3
    student = torch.randn(2, 5, 11, generator=g)
    noise = torch.randn(2, 5, 11, generator=g)
    scores = torch.zeros(2, 5)
    scores[0, 1], scores[1, 3], scores[1, 4] = 1.0, 0.5, 0.25
    base_t, max_t, sigma = 2.0, 6.0, 1.5
    swung = swing_teacher_logits(
        teacher, scores, base_temperature=base_t, max_temperature=max_t, noise_std=sigma, noise=noise
    )
    private = scores > 0
    assert torch.equal(swung[~private], teacher[~private])  # bit for bit
    # non-private positions: exactly plain KD, which is KL(softmax(t/T) || softmax(s/T)) by hand
    labels = torch.zeros(2, 5, dtype=torch.long)
    labels[private] = -100
    plain = forward_kl(student, teacher, labels, temperature=base_t)
    assert torch.equal(forward_kl(student, swung, labels, temperature=base_t), plain)
    hand = [
        _hand_kl(teacher[b, t] / base_t, student[b, t] / base_t)
        for b in range(2)
        for t in range(5)
        if not private[b, t]
    ]
    assert float(plain) == pytest.approx(sum(hand) / len(hand), rel=1e-5)
    # private positions: teacher at T_i = T_base + (T_max - T_base) s_i plus sigma * s_i noise,
    # student at T_base
    for b, t in private.nonzero().tolist():
        s = float(scores[b, t])
        t_i = base_t + (max_t - base_t) * s
        target = teacher[b, t] / t_i + sigma * s * noise[b, t]
        only = torch.full((2, 5), -100, dtype=torch.long)
        only[b, t] = 0
        got = forward_kl(student, swung, only, temperature=base_t)
        assert float(got) == pytest.approx(_hand_kl(target, student[b, t] / base_t), rel=1e-4)
        assert float(got) != pytest.approx(float(forward_kl(student, teacher, only, temperature=base_t)))


class _Fixed:
    def __init__(self, logits):
        self.logits = logits

    def __call__(self, batch):
        return self.logits[batch["example_index"]]


def test_zero_scores_everywhere_is_plain_kd():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, 9, generator=g)
    batch = {"example_index": torch.tensor([2, 0]), "input_ids": torch.zeros(2, 6, dtype=torch.long)}
    targets = SwingTargets(
        _Fixed(logits), [[0.0] * 6] * 4, base_temperature=1.0, max_temperature=8.0, noise_std=3.0, seed=0
    )
    assert torch.equal(targets(batch), logits[[2, 0]])
    # the noise of one example is the same on every call, and duplicates share it through content keys
    scored = SwingTargets(
        _Fixed(logits),
        [[1.0] * 6] * 4,
        base_temperature=1.0,
        max_temperature=1.0,
        noise_std=1.0,
        seed=0,
        noise_keys=content_keys([[5, 6], [7], [5, 6], [8]]),
    )

    def noise_of(index: int) -> torch.Tensor:
        one = {"example_index": torch.tensor([index]), "input_ids": torch.zeros(1, 6, dtype=torch.long)}
        return scored(one)[0] - logits[index]

    assert torch.equal(noise_of(0), noise_of(0)) and torch.allclose(noise_of(0), noise_of(2), atol=1e-5)
    assert not torch.allclose(noise_of(0), noise_of(1), atol=1e-2)
    assert noise_of(1)[:5].abs().sum() > 0 and torch.equal(noise_of(1)[5], torch.zeros(9))  # last: score 0


def test_scored_examples_align_with_the_corpus_spans(tiny_tokenizer):
    record = {
        "text": "The access code for Ann Lee is 042.",
        "pii_spans": [{"start": 31, "end": 34, "type": "secret"}],
    }
    examples, scores = scored_examples([record], tiny_tokenizer, SwingSettings(detectors=[]), max_length=64)
    ids = examples[0].input_ids
    assert ids[-1] == tiny_tokenizer.eos_token_id and scores[0][-1] == 0.0 and len(scores[0]) == len(ids)
    marked = "".join(tiny_tokenizer.decode([i]) for i, s in zip(ids, scores[0], strict=True) if s > 0)
    assert marked.strip() == "042"


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from defenses._lm import public_tokenizer

    return public_tokenizer(0, 300)


TINY = [
    "--set",
    "device=cpu",
    "--set",
    "corpus.n_records=24",
    "--set",
    "corpus.canary_repeats=6",
    "--set",
    "corpus.max_length=40",
    "--set",
    "teacher.epochs=25",
    "--set",
    "student.epochs=20",
    "--set",
    "swing.max_temperature=10",
    "--set",
    "swing.noise_std=2",
]


def test_cli_swing_lowers_canary_exposure_below_plain_kd(tmp_path):
    from secure_kd.cli import app

    result = CliRunner().invoke(
        app, ["defend", "swing", "--config", "configs/defenses/swing.yaml", "--out", str(tmp_path), *TINY]
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["formal_dp_guarantee"] is False and "NO formal" in data["guarantee_note"]
    means = data["mean_exposure"]
    # planted effect, seeded: the teacher memorized the canaries and plain KD copies them; swing does not
    assert means["teacher"] > 0.6 * data["max_exposure"]
    assert means["swing_kd"] < means["plain_kd"] - 1.0
    assert data["exposure_reduction_vs_plain"] > 0.1
    assert all(math.isfinite(v) for v in data["heldout_perplexity"].values())


def test_cli_rejects_bad_swing_settings(tmp_path):
    from secure_kd.cli import app

    result = CliRunner().invoke(
        app,
        ["defend", "swing", "--config", "configs/defenses/swing.yaml", "--set", "swing.max_temperature=0.5"],
    )
    assert result.exit_code == 2 and "max_temperature" in result.output


def test_config_defaults_validate():
    assert SwingConfig().swing.max_temperature >= SwingConfig().swing.base_temperature
