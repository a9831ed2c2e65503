"""Swing distillation: detectors, per-token scores, the target transform, and the defense end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from defenses.swing import SwingConfig, SwingSettings, scored_examples
from secure_kd.losses import forward_kl
from secure_kd.swing_targets import (
    SwingTargets,
    content_keys,
    detect_spans,
    position_scores,
    private_spans,
    spans_to_token_scores,
    swing_teacher_logits,
    token_privacy_scores,
)

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
    settings = SwingSettings(detectors=[], use_known_spans=True)
    examples, scores = scored_examples([record], tiny_tokenizer, settings, max_length=64)
    ids = examples[0].input_ids
    assert ids[-1] == tiny_tokenizer.eos_token_id and scores[0][-1] == 0.0 and len(scores[0]) == len(ids)
    marked = "".join(tiny_tokenizer.decode([i]) for i, s in zip(ids, scores[0], strict=True) if s > 0)
    assert marked.strip() == "042"


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from apparatus.tiny_lm import public_tokenizer

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
    from secure_kd.app.cli import app

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
    from secure_kd.app.cli import app

    result = CliRunner().invoke(
        app,
        ["defend", "swing", "--config", "configs/defenses/swing.yaml", "--set", "swing.max_temperature=0.5"],
    )
    assert result.exit_code == 2 and "max_temperature" in result.output


def test_config_defaults_validate():
    assert SwingConfig().swing.max_temperature >= SwingConfig().swing.base_temperature


# --------------------------------------------------------------------------- the swing_kd experiment

ROOT = Path(__file__).resolve().parents[2]


def _experiment():
    spec = importlib.util.spec_from_file_location(
        "swing_kd_experiment", ROOT / "benchmarks/experiments/swing_kd.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the configs' annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_experiment_interval_and_chance_level_by_hand():
    exp = _experiment()
    got = exp.t_interval([0.7, 0.8], 0.95)
    # two values: mean 0.75, sd 0.1 / sqrt(2), t(0.975, 1 df) = 12.7062
    assert got["mean"] == pytest.approx(0.75) and got["sd"] == pytest.approx(0.0707107, rel=1e-5)
    assert got["ci"] == pytest.approx([0.75 - 0.635310, 0.75 + 0.635310], rel=1e-5)
    assert exp.t_interval([0.5], 0.95)["ci"] is None
    # exposure of a uniformly ranked secret among 4: mean of log2(4 / r), r = 1..4
    assert exp.chance_exposure(4) == pytest.approx(sum(math.log2(4 / r) for r in range(1, 5)) / 4)
    assert exp.chance_exposure(1000) == pytest.approx(1.4364, abs=1e-4)


def test_experiment_config_keeps_the_arms_apart(tmp_path):
    exp = _experiment()
    base = yaml.safe_load((ROOT / "configs/experiments/swing_kd.yaml").read_text())
    cfg = exp.ExperimentConfig.model_validate(base)
    assert cfg.arms[0] == "detectors" and cfg.headline in cfg.grid and len(cfg.seeds) >= 3
    assert cfg.defense.corpus.n_canaries >= 4
    for change, message in (
        (
            {"defense": {**base["defense"], "swing": {**base["defense"]["swing"], "use_known_spans": True}}},
            "per arm",
        ),
        ({"arms": ["oracle"]}, "headline arm"),
        ({"headline": {"max_temperature": 3.0, "noise_std": 0.0}}, "not one of the grid points"),
        ({"seeds": [0, 0]}, "repeat"),
    ):
        with pytest.raises(ValidationError, match=message):
            exp.ExperimentConfig.model_validate({**base, **change})


def test_experiment_runs_both_arms_over_seeds_and_labels_them(tmp_path):
    exp = _experiment()
    config = {
        "out": str(tmp_path / "swing.json"),
        "seeds": [0, 1],
        "defense": {
            "device": "cpu",
            "corpus": {
                "n_records": 12,
                "n_canaries": 2,
                "canary_repeats": 4,
                "max_length": 40,
                "tokenizer_vocab": 300,
            },
            "teacher": {"model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2}, "epochs": 12},
            "student": {"model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2}, "epochs": 4},
        },
        "grid": [{"max_temperature": 10.0, "noise_std": 2.0}],
        "headline": {"max_temperature": 10.0, "noise_std": 2.0},
        "dp": [],
        "extraction_samples": 2,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert exp.main(["--config", str(path)]) == 0
    data = json.loads((tmp_path / "swing.json").read_text())
    assert data["headline"]["model"] == "swing_detectors_T10_sigma2"
    assert data["headline"]["oracle_counterpart"] == "swing_oracle_T10_sigma2"
    assert "upper bound" in data["arms"]["oracle"] and data["seeds"] == [0, 1]
    per_seed = [seed["models"] for seed in data["per_seed"]]
    for models in per_seed:
        detectors, oracle = models["swing_detectors_T10_sigma2"], models["swing_oracle_T10_sigma2"]
        # the regexes find the canaries' digits but not their names; the oracle marks both
        assert (
            detectors["canary_secret_tokens_marked"] == 1.0 and detectors["canary_name_tokens_marked"] == 0.0
        )
        assert oracle["canary_name_tokens_marked"] == 1.0
        assert oracle["private_token_fraction"] > detectors["private_token_fraction"]
        plain = models["plain_kd"]
        for row in (detectors, oracle):  # each seed against its own plain-KD student
            expected = (plain["mean_exposure"] - row["mean_exposure"]) / plain["mean_exposure"]
            assert row["exposure_reduction_vs_plain"] == pytest.approx(expected)
            assert row["perplexity_ratio_vs_plain"] == pytest.approx(
                row["heldout_perplexity"] / plain["heldout_perplexity"]
            )
    headline = data["summary"]["swing_detectors_T10_sigma2"]["exposure_reduction_vs_plain"]
    values = [models["swing_detectors_T10_sigma2"]["exposure_reduction_vs_plain"] for models in per_seed]
    assert headline["mean"] == pytest.approx(sum(values) / 2) and headline["n"] == 2
    half = 12.7062 * abs(values[0] - values[1]) / 2  # t(0.975, 1) * sd / sqrt(2), sd = |a - b| / sqrt(2)
    assert headline["ci"] == pytest.approx(
        [headline["mean"] - half, headline["mean"] + half], rel=1e-4, abs=1e-9
    )
    assert len(data["summary"]["plain_kd"]["canary_exposures"]) == 4  # 2 seeds x 2 canaries


def test_readme_swing_rows_are_the_detector_headline_of_the_committed_results():
    """The results headline the detectors-only arm with its interval and label the oracle arm, and the
    README's headline figure is the same one."""
    data = json.loads((ROOT / "benchmarks/results/swing_kd.json").read_text())
    readme = (ROOT / "docs" / "results.md").read_text()
    assert data["headline"]["model"].startswith("swing_detectors_") and len(data["seeds"]) >= 3
    reduction = data["headline"]["exposure_reduction_vs_plain"]
    low, high = reduction["ci"]
    finding = next(line for line in readme.splitlines() if line.startswith("| swing distillation cuts"))
    assert f"{reduction['mean']:.0%} (95% CI {low:.0%} to {high:.0%})" in finding
    assert "detectors only" in finding and "oracle" in finding
    ratio = data["headline"]["perplexity_ratio_vs_plain"]["mean"]
    assert f"{ratio:.2f}x" in finding
    oracle = data["summary"][data["headline"]["oracle_counterpart"]]["exposure_reduction_vs_plain"]
    section = readme[readme.index("**Swing distillation vs plain KD") :]
    section = section[: section.index("\n\n**", 10)]
    assert f"{oracle['mean']:.0%}" in section and "oracle" in section and "upper bound" in section
    headline = next(
        line for line in (ROOT / "README.md").read_text().splitlines() if "swing distillation, canary" in line
    )
    assert (
        f"{reduction['mean']:.0%} (95% CI {low:.0%} to {high:.0%})" in headline
        and "detectors only" in headline
    )
