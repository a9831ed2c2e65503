"""The privileged-context leakage audit (attacks.memorization.privileged): known answers on models that
certainly hold / do not hold the canaries, the interval over seeds against scipy, and (slow) the
experiment's finding that the privileged context leaks into a student that never saw it."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from attacks.memorization.privileged import mean_interval, privileged_leakage
from secure_kd.config import KDConfig, TinyModelConfig, TrainConfig
from secure_kd.data import Canary, TokenizedExample, train_tiny_tokenizer
from secure_kd.data.synthetic import SecretSpace
from secure_kd.models import build_tiny
from secure_kd.trainer import fit_in_scratch

ROOT = Path(__file__).resolve().parents[2]


def _canaries() -> list[Canary]:
    secrets = ["417", "089", "652"]
    names = ["kalomi", "rutesa", "poneda"]
    out = []
    for i, (name, secret) in enumerate(zip(names, secrets, strict=True)):
        prefix = f"Q: code of {name}? A: the code of {name} is "
        out.append(
            Canary(prefix=prefix, secret=secret, text=prefix + secret + ".", record_ids=(i,), repeats=1)
        )
    return out


def test_leakage_is_full_in_a_model_trained_on_the_canaries_and_chance_in_an_untrained_one():
    canaries = _canaries()
    public = [
        f"Q: code of {n}? A: the code of {n} is {d}{d + 1}{d + 2}."
        for n in ("vida", "zufe")
        for d in range(7)
    ]
    tokenizer = train_tiny_tokenizer(public * 20, vocab_size=300)  # no canary in the tokenizer's text
    untrained = build_tiny(TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2), len(tokenizer), seed=0)
    trained = build_tiny(TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2), len(tokenizer), seed=0)
    examples = []
    for i, c in enumerate(canaries):
        ids = list(tokenizer(c.text)["input_ids"]) + [tokenizer.eos_token_id]
        examples.append(TokenizedExample(ids, ids, i))
    train = TrainConfig(max_steps=150, batch_size=3, lr=1e-2, schedule="constant")
    fit_in_scratch(
        trained,
        examples,
        KDConfig(kd_weight=0.0, ce_weight=1.0, top_k=None),
        train,
        pad_id=tokenizer.pad_token_id,
        seed=0,
        device="cpu",
    )
    space = SecretSpace(3)
    held = privileged_leakage(trained, tokenizer, canaries, space)
    assert held.extracted == 3 and held.extraction_rate == 1.0
    assert all(e == pytest.approx(math.log2(1000)) for e in held.exposures)  # rank 1 of 1000
    none = privileged_leakage(untrained, tokenizer, canaries, space)
    assert none.extracted == 0 and none.mean_exposure < 5.0 and none.n_candidates == 1000


def test_mean_interval_is_the_student_t_interval():
    from scipy import stats

    values = [1.0, 2.5, 4.0, 3.0]
    got = mean_interval(values)
    low, high = stats.t.interval(0.95, 3, loc=2.625, scale=stats.sem(values))
    assert got["mean"] == pytest.approx(2.625)
    assert got["ci"] == pytest.approx([low, high])
    assert mean_interval([2.0])["ci"] is None


@pytest.mark.slow
def test_the_privileged_context_leaks_into_the_self_distilled_student(tmp_path):
    """The experiment at one seed, 5 epochs: all-token self-distillation exposes the codes that were
    only in the teacher's context far above the student trained without the context."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "experiments"))
    import self_distill_leakage

    out = tmp_path / "r.json"
    self_distill_leakage.main(["--seeds", "0", "--epochs", "5", "--shares", "0.25", "--out", str(out)])
    summary = json.loads(out.read_text())["summary"]
    leaked = summary["all_tokens@5ep"]["mean_exposure"]["mean"]
    baseline = summary["no_privileged@5ep"]["mean_exposure"]["mean"]
    assert leaked > baseline + 3.0
    torch.set_num_threads(1)
