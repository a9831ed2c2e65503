"""The demo's audit stage aims every attack at the student directory and the demo's corpus files.

The demo itself needs the real teacher (minutes on CPU); here each suite entry of
configs/demo-audit.yaml is resolved for a tiny local model directory and validated by its attack."""

from __future__ import annotations

from pathlib import Path

from attacks import get_attack
from secure_kd.app.demo_story import demo_audit_config
from secure_kd.app.report.audit import attack_config
from secure_kd.config import TinyModelConfig
from secure_kd.data import train_tiny_tokenizer
from secure_kd.data.synthetic import generate_corpus
from secure_kd.models import build_tiny


def test_every_demo_audit_entry_targets_the_student_and_validates(tmp_path):
    private = generate_corpus(24, seed=0, n_canaries=2, canary_repeats=2, secret_digits=3)
    private_path = tmp_path / "private.jsonl"
    private.to_jsonl(private_path)
    heldout_path = tmp_path / "heldout.jsonl"
    generate_corpus(12, seed=1, n_canaries=0).to_jsonl(heldout_path)
    tokenizer = train_tiny_tokenizer([r["text"] for r in private.records], vocab_size=300)
    model_dir = tmp_path / "student"
    build_tiny(
        TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2), len(tokenizer), seed=0
    ).save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)

    config = demo_audit_config(tmp_path / "audit", str(model_dir), private_path, heldout_path)
    attacks = [entry.attack for entry in config.suite]
    assert attacks == ["memorization", "membership", "logit_leak", "clone"]
    for entry in config.suite:
        raw = attack_config(config, entry, config.seed, tmp_path / "unused")
        parsed = get_attack(entry.attack).Config.model_validate(raw)
        dumped = parsed.model_dump(mode="json")
        target = {"memorization": ("model", "source"), "membership": ("target", "source")}.get(
            entry.attack, ("victim", "source")
        )
        assert dumped[target[0]][target[1]] == str(model_dir)
        if entry.attack == "membership":
            assert Path(dumped["data"]["members"]) == private_path
            assert Path(dumped["data"]["nonmembers"]) == heldout_path
        if entry.attack == "memorization":
            assert Path(dumped["data"]["source"]) == private_path


def test_the_demo_summary_states_every_canarys_rank(tmp_path):
    """Issue 19: the README said the baseline ranks every secret first of 1,000; the demo's own audit
    put them at ranks 3, 23, 4 and 1, with greedy extraction 1 of 4. The summary now prints them."""
    import io
    import math

    from rich.console import Console

    from secure_kd.app.demo_story import DemoResult, DemoRow, _canaries, _print_summary
    from secure_kd.app.report.audit import AuditResult, EntryResult, SeedRun

    ranks, greedy = [3, 23, 4, 1], [False, False, False, True]
    result = {
        "exposure": [
            {"prefix": f"p{i} ", "secret": f"{i:03d}", "repeats": 4, "n_candidates": 1000, "rank": r,
             "exposure": math.log2(1000) - math.log2(r), "max_exposure": math.log2(1000), "estimate": None}
            for i, r in enumerate(ranks)
        ],
        "extraction": {"canary_extraction": [{"secret": "x", "greedy_extracted": g, "sampled_rate": 0.0}
                                             for g in greedy]},
    }  # fmt: skip
    run = SeedRun(seed=0, status="ok", dir=str(tmp_path), seconds=1.0, result=result)
    audit = AuditResult(
        model="m", teacher=None, data=None, entries=[EntryResult(id="memorization", attack="memorization",
        status="ok", runs=[run])], measurements=[], verdicts=[], overall=None, failed=[], config={},
        provenance={}, privacy_ledger=[], seconds=1.0,
    )  # fmt: skip
    figures = _canaries(audit)
    assert figures["canary_ranks"] == ranks and figures["canaries_greedy_extracted"] == 1
    row = DemoRow(model="fine-tuned baseline", perplexity=34.5, epsilon=None, exposure_bits=9.97,
                  mia_auc=0.76, clone_agreement=0.09, **figures)  # fmt: skip
    console = Console(file=io.StringIO(), width=200)
    _print_summary(DemoResult(rows=[row], stage_seconds={"x": 1.0}, reports={}), console)
    text = console.file.getvalue()
    text = " ".join(text.split())
    assert (
        "canaries, fine-tuned baseline: 1 of 4 secrets rank first among their candidates (ranks 3, 23, 4, "
        "1 of 1,000 candidates each); greedy decoding from the text before the secret gives 1 of 4 away."
    ) in text
