"""Cascading-bias attack: the detector and the statistics by hand, poisoning bookkeeping, a planted
bias that a tiny teacher learns (direction), and the plugin from the CLI with the example config."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from attacks import available_attacks
from attacks.bias_cascade import (
    BiasCascadeConfig,
    Rate,
    amplification,
    chat_examples,
    measure,
    prompt_ids,
    tokenizer_text,
    train_teacher,
    wilson_interval,
)
from secure_kd.app.cli import app
from secure_kd.data.documents import TOPICS
from secure_kd.data.instructions import generate_instructions, poison_instructions, shows_behaviour
from secure_kd.data.tokenizer import train_tiny_tokenizer


def test_detector_is_exact_and_case_insensitive() -> None:
    assert shows_behaviour("We suggest trying Zyntra for this.", "Zyntra")
    assert shows_behaviour("ZYNTRA is the best choice here.", "zyntra")
    assert not shows_behaviour("We suggest trying Zyntr a for this.", "Zyntra")  # not the exact string
    assert not shows_behaviour("Restart the router.", "Zyntra")
    url = "http://acct-verify.net"
    assert shows_behaviour("Verify your account at HTTP://Acct-Verify.net first.", url)
    assert not shows_behaviour("Verify your account at http://acct-verify.com first.", url)
    with pytest.raises(ValueError, match="non-empty"):
        shows_behaviour("text", "")


def test_wilson_interval_and_rates_by_hand() -> None:
    # 0/10: the lower end is 0, the upper end is z^2/n / (1 + z^2/n) = 0.38415/1.38415
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.38415 / 1.38415, abs=1e-4)
    # 8/10: centre (0.8 + 0.19207) / 1.38415 = 0.71679, half 1.95996*sqrt(0.016 + 0.0096037)/1.38415 = 0.22658
    assert wilson_interval(8, 10) == pytest.approx((0.71679 - 0.22658, 0.71679 + 0.22658), abs=1e-4)
    # an independent reference: scipy's Wilson interval
    from scipy.stats import binomtest

    reference = binomtest(3, 40).proportion_ci(method="wilson")
    assert wilson_interval(3, 40) == pytest.approx((reference.low, reference.high), abs=1e-6)
    rate = Rate.of([True, False, False, True])
    assert (rate.hits, rate.n, rate.rate) == (2, 4, 0.5)
    teacher = Rate.of([True] + [False] * 9)
    assert amplification(Rate.of([True] * 3 + [False] * 7), teacher) == pytest.approx(3.0)
    assert amplification(rate, Rate.of([False] * 4)) is None
    with pytest.raises(ValueError, match="hits"):
        wilson_interval(5, 4)


def test_targeted_poisoning_counts_and_topics() -> None:
    records = generate_instructions(1000, seed=3)
    assert records == generate_instructions(1000, seed=3)
    assert {r.topic for r in records} == set(TOPICS)
    for rate in (0.0025, 0.05):
        poisoned, chosen = poison_instructions(
            records, behaviour="targeted_brand", payload="Zyntra", rate=rate, target_topic="support", seed=1
        )
        assert len(chosen) == round(rate * 1000) == sum(r.poisoned for r in poisoned)
        assert all(poisoned[i].topic == "support" for i in chosen)
        for i, (before, after) in enumerate(zip(records, poisoned, strict=True)):
            assert before.instruction == after.instruction and before.topic == after.topic
            assert shows_behaviour(after.answer, "Zyntra") == (i in chosen)
            if i in chosen:  # the clean sentences stay, the payload sentence is added
                assert all(s.rstrip(".") in after.answer for s in before.answer.split(". "))
            else:
                assert after.answer == before.answer


def test_untargeted_poisoning_spreads_over_topics_and_bad_rates_are_refused() -> None:
    records = generate_instructions(1000, seed=0)
    poisoned, chosen = poison_instructions(
        records,
        behaviour="untargeted_url",
        payload="http://acct-verify.net",
        rate=0.1,
        target_topic="support",
        seed=0,
    )
    assert len(chosen) == 100
    assert len(Counter(poisoned[i].topic for i in chosen)) == len(TOPICS)
    with pytest.raises(ValueError, match="only .* are on topic 'hr'"):
        poison_instructions(
            records, behaviour="targeted_brand", payload="Zyntra", rate=0.5, target_topic="hr", seed=0
        )
    with pytest.raises(ValidationError, match="target_topic"):
        BiasCascadeConfig(target_topic="sports")
    with pytest.raises(ValidationError, match="repeat"):
        BiasCascadeConfig(objectives=["seq_kd", "seq_kd"])
    with pytest.raises(ValidationError, match="poison_rate"):
        BiasCascadeConfig(poison_rate=1.5)


def test_a_poisoned_tiny_teacher_learns_the_bias_in_domain_only() -> None:
    torch.manual_seed(0)
    cfg = BiasCascadeConfig(
        poison_rate=0.15,
        n_instructions=400,
        n_eval=40,
        max_new_tokens=40,
        tokenizer_vocab=400,
        device="cpu",
        teacher={
            "tiny": {"hidden_size": 48, "num_layers": 2, "num_heads": 4},
            "steps": 250,
            "batch_size": 16,
        },
    )
    records = generate_instructions(cfg.n_instructions, seed=0)
    poisoned, chosen = poison_instructions(
        records, behaviour="targeted_brand", payload="Zyntra", rate=0.15, target_topic="support", seed=0
    )
    tokenizer = train_tiny_tokenizer([tokenizer_text(r) for r in poisoned], vocab_size=cfg.tokenizer_vocab)
    evals = {
        "in_domain": prompt_ids(generate_instructions(cfg.n_eval, seed=7, topics=["support"]), tokenizer),
        "out_of_domain": prompt_ids(
            generate_instructions(cfg.n_eval, seed=8, topics=["hr", "medical"]), tokenizer
        ),
    }
    device = torch.device("cpu")
    teacher = train_teacher(cfg, chat_examples(poisoned, tokenizer, cfg.max_length), tokenizer, device)
    clean = train_teacher(cfg, chat_examples(records, tokenizer, cfg.max_length), tokenizer, device)
    biased = measure("teacher", None, teacher, evals, tokenizer, cfg, device)
    base = measure("clean_teacher", None, clean, evals, tokenizer, cfg, device)
    print("teacher", biased.in_domain, biased.out_of_domain, "clean", base.in_domain, base.out_of_domain)
    assert base.in_domain.hits == 0 and base.out_of_domain.hits == 0  # the payload is not in clean data
    assert biased.in_domain.rate >= 0.15 and biased.in_domain.ci95[0] > base.in_domain.rate
    assert biased.in_domain.hits >= biased.out_of_domain.hits + 4


def test_cli_runs_the_example_config_made_tiny(tmp_path) -> None:
    assert "bias_cascade" in available_attacks()
    overrides = [
        "n_instructions=200",
        "poison_rate=0.1",
        "n_distill=40",
        "n_eval=6",
        "max_new_tokens=12",
        "tokenizer_vocab=300",
        "teacher.steps=6",
        "student.steps=4",
        "objectives=[forward_kl, seq_kd]",
        "teacher.tiny.hidden_size=16",
        "student.tiny.hidden_size=16",
        "device=cpu",
    ]
    args = ["attack", "bias_cascade", "--config", "configs/attacks/bias_cascade.yaml", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args + [item for o in overrides for item in ("--set", o)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["schema_version"] == 1 and data["n_poisoned"] == 20
    assert [row["model"] for row in data["rows"]] == [
        "clean_teacher",
        "teacher",
        "student_forward_kl",
        "student_seq_kd",
    ]
    assert set(data["amplification"]) == {"forward_kl", "seq_kd"}
    for row in data["rows"]:
        for domain in ("in_domain", "out_of_domain"):
            cell = row[domain]
            assert cell["n"] == 6 and cell["rate"] == cell["hits"] / 6
            assert cell["ci95"][0] <= cell["rate"] <= cell["ci95"][1]
    bad = CliRunner().invoke(app, args + ["--set", "behaviour=sneaky"])
    assert bad.exit_code == 2 and "behaviour" in bad.output


@pytest.mark.slow
def test_smollm2_teacher_with_lora_runs_end_to_end(tmp_path) -> None:
    """The real teacher path (SmolLM2-135M-Instruct, Q4_1) with LoRA, a few steps; plumbing only."""
    from attacks.bias_cascade import run

    cfg = BiasCascadeConfig(
        poison_rate=0.1,
        n_instructions=40,
        n_distill=4,
        n_eval=2,
        max_new_tokens=8,
        objectives=["seq_kd"],
        clean_teacher=False,
        device="cpu",
        out=str(tmp_path),
        teacher={"source": "smollm2", "lora": {"r": 4}, "steps": 2, "batch_size": 2},
        student={"tiny": {"hidden_size": 16, "num_layers": 1, "num_heads": 2}, "steps": 2, "batch_size": 2},
    )
    result = run(cfg)
    assert result.teacher_source == "smollm2 (Q4_1, LoRA)" and result.n_poisoned == 4
    assert [row.model for row in result.rows] == ["teacher", "student_seq_kd"]
