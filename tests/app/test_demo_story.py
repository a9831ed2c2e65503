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
    assert attacks == ["memorization", "membership", "clone"]
    for entry in config.suite:
        raw = attack_config(config, entry, config.seed, tmp_path / "unused", get_attack(entry.attack))
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


def test_the_reference_attack_calibrates_away_what_the_loss_attack_cannot():
    """Templated records: each record's difficulty varies far more than the membership effect, so the plain
    loss attack is near chance while the teacher-calibrated ratio separates members exactly (the scores the
    demo's reference audit uses)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from attacks.membership.reference_attacks import reference_scores

    rng = np.random.default_rng(0)
    member = np.arange(200) < 100
    difficulty = rng.normal(3.0, 1.0, 200)
    model_loss = difficulty - 0.3 * member  # members 0.3 nats easier than the reference finds them
    assert roc_auc_score(member, reference_scores(model_loss, difficulty)) == 1.0
    assert roc_auc_score(member, -model_loss) < 0.7


def test_matched_utility_pairs_and_the_summary_say_which_comparisons_hold(tmp_path):
    import io

    from rich.console import Console

    from secure_kd.app.demo_story import DemoResult, DemoRow, _print_summary
    from secure_kd.app.demo_summary import matched_lines, plot

    rows = [
        DemoRow(model="teacher (SmolLM2-135M Q4_1)", perplexity=90.0, epsilon=None, exposure_bits=None,
                mia_auc=None, clone_agreement=None),
        DemoRow(model="KD student (JSD, cache)", perplexity=120.0, epsilon=None, exposure_bits=1.4,
                mia_auc=0.5, clone_agreement=0.2, reference_auc=0.52),
        DemoRow(model="KD + CE mix (0.5)", perplexity=100.0, epsilon=None, exposure_bits=3.0, mia_auc=0.6,
                clone_agreement=None, reference_auc=0.7),
        DemoRow(model="fine-tuned baseline", perplexity=35.0, epsilon=None, exposure_bits=9.97, mia_auc=0.76,
                clone_agreement=0.1, reference_auc=0.95),
        DemoRow(model="DP KD (target eps 8)", perplexity=400.0, epsilon=7.9, exposure_bits=1.0, mia_auc=0.5,
                clone_agreement=None, reference_auc=0.5, one_run_bound=0.0),
        DemoRow(model="federated x4 (CKKS+DP)", perplexity=130.0, epsilon=3.9, exposure_bits=1.2, mia_auc=0.5,
                clone_agreement=None),
    ]  # fmt: skip
    lines = matched_lines(rows)
    assert len(lines) == 10  # the 5 distilled models pairwise (the federated one shares the tokenizer)
    federated = "KD student (JSD, cache) vs federated x4 (CKKS+DP): perplexity ratio 1.08 (matched"
    assert any(line.startswith(federated) for line in lines)
    assert any(line.startswith("KD student (JSD, cache) vs KD + CE mix (0.5): perplexity ratio 1.20 (matched")
               for line in lines)  # fmt: skip
    assert any("vs fine-tuned baseline: perplexity ratio 3.43 (NOT matched" in line for line in lines)
    png = plot(rows, tmp_path)
    assert png is not None and Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    console = Console(file=io.StringIO(), width=250)
    _print_summary(
        DemoResult(rows=rows, stage_seconds={"x": 1.0}, reports={}, matched=lines, plot=png), console
    )
    text = " ".join(console.file.getvalue().split())
    assert "KD student / teacher held-out perplexity: 1.33x" in text
    assert "perplexity ratio 3.43 (NOT matched" in text and "privacy-utility plot" in text
