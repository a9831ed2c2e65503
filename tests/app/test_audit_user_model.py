"""Auditing my own model (issue 19, item 4): a causal LM saved with save_pretrained plus a plain file of
its training records, `secure-kd audit --model DIR --data FILE --secrets FILE` with no config.

The model is a tiny Llama (hidden 64) trained here, with a tiny BPE tokenizer learned from canary-free
text, on Faker-made records written as plain JSON lines (`{"text": ...}`: no PII spans, no canary
sidecar), in which two secrets were inserted 12 times and once. The secrets file is the plain format
of docs/audit.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from apparatus.tiny_lm import TrainRecipe, build_model, resolve_tokenizer, tokenize_texts, train_causal_lm
from attacks.memorization.pii import find_pii
from secure_kd.app.cli import app
from secure_kd.app.report.config import AuditConfig
from secure_kd.app.report.plan import check_suite
from secure_kd.app.report.suites import DEFAULT_LM_SUITE
from secure_kd.config import TinyModelConfig
from secure_kd.data import generate_corpus

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
HIDDEN = 64
LEAK = ROOT / "configs" / "attacks" / "logit_leak.yaml"


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """(model dir, records file, secrets file, corpus) of a model that memorized its records."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("user")
    corpus = generate_corpus(24, seed=5, n_canaries=2, canary_repeats=[12, 1], secret_digits=2)
    records = root / "train.jsonl"
    records.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in corpus.records))
    secrets = root / "secrets.jsonl"
    secrets.write_text(
        "".join(json.dumps({"prefix": c.prefix, "secret": c.secret}) + "\n" for c in corpus.canaries)
    )
    tokenizer = resolve_tokenizer("tiny:400", generate_corpus(48, seed=6, n_canaries=0).texts())
    recipe = TrainRecipe(
        model=TinyModelConfig(hidden_size=HIDDEN, num_layers=2, num_heads=4),
        epochs=20,
        batch_size=16,
        lr=5e-3,
    )
    model = build_model(recipe, len(tokenizer), seed=0, pad_id=0)
    examples = tokenize_texts(corpus.texts(), tokenizer, 96)
    train_causal_lm(model, examples, recipe, pad_id=0, seed=0, device=torch.device("cpu"))
    model_dir = root / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return model_dir, records, secrets, corpus, model.eval(), tokenizer


def _naive_rank(model, tokenizer, prefix: str, secret: str) -> int:
    """Rank of the secret among all 2-digit candidates, one full forward pass per candidate."""
    head, gap = prefix.rstrip(), prefix[len(prefix.rstrip()) :]
    head_ids = tokenizer(head)["input_ids"]

    def nll(candidate: str) -> float:
        ids = tokenizer(head + gap + candidate)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        return -sum(float(logprobs[t - 1, ids[t]]) for t in range(len(head_ids), len(ids)))

    losses = {f"{i:02d}": nll(f"{i:02d}") for i in range(100)}
    return 1 + sum(loss < losses[secret] - 1e-9 for loss in losses.values())


def test_audit_of_my_model_with_no_config(user_model, tmp_path):
    model_dir, records, secrets, corpus, model, tokenizer = user_model
    out = tmp_path / "audit"
    args = ["audit", "--model", str(model_dir), "--data", str(records), "--secrets", str(secrets)]
    done = runner.invoke(app, [*args, "--out", str(out), "--no-progress"])
    assert done.exit_code == 0, done.output
    text = " ".join(done.output.split())
    assert f"ran: memorization on {model_dir} (the audited model)" in text
    assert "skipped: membership: membership inference needs records the model never trained on" in text
    saved = json.loads((out / "results.json").read_text())
    entries = {e["id"]: e for e in saved["entries"]}
    assert [e["attack"] for e in saved["entries"]] == [e["attack"] for e in DEFAULT_LM_SUITE]
    assert saved["model_kind"] == "causal_lm" and saved["failed"] == [] and saved["skipped"] == ["membership"]
    for name in ("memorization", "logit_leak", "clone"):
        assert entries[name]["ran_on"] == f"{model_dir} (the audited model)" and entries[name]["in_verdict"]
    assert entries["logit_leak"]["runs"][0]["result"]["estimated_hidden_size"] == HIDDEN  # the true width

    memorization = entries["memorization"]["runs"][0]["result"]
    assert memorization["secrets_file"] == str(records.with_name("secrets.jsonl"))
    assert memorization["pii_detected"] is True  # plain records: PII found by pattern
    per_canary = memorization["exposure"]
    assert (
        [c["repeats"] for c in per_canary]
        == [  # counted in the records by the test itself
            sum(c.prefix + c.secret in r["text"] for r in corpus.records) for c in corpus.canaries
        ]
        == [12, 1]
    )
    for reported, canary in zip(per_canary, corpus.canaries, strict=True):
        assert reported["n_candidates"] == 100
        assert reported["rank"] == _naive_rank(model, tokenizer, canary.prefix, canary.secret)
        assert reported["exposure"] == pytest.approx(math.log2(100) - math.log2(reported["rank"]))
    assert per_canary[0]["rank"] == 1  # inserted 12 times: memorized

    html = (out / "report.html").read_text(encoding="utf-8")
    ranks = ", ".join(str(c["rank"]) for c in per_canary)
    first = sum(c["rank"] == 1 for c in per_canary)
    assert (
        f"{first} of 2 secrets rank first among their candidates (ranks {ranks} of 100 candidates each)"
        in html
    )
    assert "membership inference needs records the model never trained on" in html
    # Nothing the report keeps is a PII value of the records or a secret in clear.
    written = html + (out / "results.json").read_text(encoding="utf-8")
    values = {r["text"][s["start"] : s["end"]] for r in corpus.records for s in find_pii(r["text"])}
    assert len(values) > 20
    leaked = [v for v in values if v in written]
    assert not leaked, leaked
    assert not [c.secret for c in corpus.canaries if f"<code>{c.secret}</code>" in written]


def test_configs_audit_yaml_on_my_model_skips_what_cannot_apply(user_model):
    """configs/audit.yaml with --model DIR used to fail 4 of 6 attacks and run backdoor and adversarial
    on a digits CNN as if about the user's model."""
    model_dir, records, secrets, *_ = user_model
    overrides = ["--set", f"model={model_dir}", "--set", f"data={records}", "--set", f"secrets={secrets}"]
    done = runner.invoke(app, ["validate", str(ROOT / "configs/audit.yaml"), *overrides])
    assert done.exit_code == 0, done.output
    text = " ".join(done.output.split())
    assert (
        "backdoor: will be skipped: backdoor has no field for the audited model: it attacks a digits CNN"
        in text
    )
    assert (
        f"adversarial: will be skipped: adversarial attacks a digits_cnn; {model_dir} is a causal_lm" in text
    )
    config = AuditConfig.model_validate(
        {
            **yaml.safe_load((ROOT / "configs/audit.yaml").read_text()),
            "model": str(model_dir),
            "data": str(records),
            "secrets": str(secrets),
        }
    )
    plans = {p.entry.name: p for p in check_suite(config)}
    assert {name for name, p in plans.items() if p.error} == set()
    without_secrets = AuditConfig.model_validate({**config.model_dump(), "secrets": None})
    (memorization,) = [p for p in check_suite(without_secrets) if p.entry.attack == "memorization"]
    assert "exposure needs secrets to rank" in memorization.error  # extraction is off in audit.yaml
    without_secrets = AuditConfig.model_validate({**config.model_dump(), "secrets": None})
    (memorization,) = [p for p in check_suite(without_secrets) if p.entry.attack == "memorization"]
    assert "exposure needs secrets to rank" in memorization.error  # extraction is off in audit.yaml
    assert {name for name, p in plans.items() if p.skipped} == {"membership", "backdoor", "adversarial"}
    for name in ("memorization", "logit_leak", "clone"):
        assert plans[name].ran_on == f"{model_dir} (the audited model)"


def test_target_none_runs_on_its_own_target_outside_the_verdict(user_model, tmp_path):
    model_dir, *_ = user_model
    config = AuditConfig.model_validate(
        {"model": str(model_dir), "out": str(tmp_path), "suite": [
            {"attack": "logit_leak", "target": "none", "config_file": str(LEAK)}
        ]}
    )  # fmt: skip
    (plan,) = check_suite(config)
    assert plan.ran_on == "a tiny random Llama" and plan.in_verdict is False and plan.skipped is None


def test_no_config_and_no_model_is_a_user_error(tmp_path):
    done = runner.invoke(app, ["audit", "--out", str(tmp_path / "o"), "--no-progress"])
    assert done.exit_code == 2 and "no suite and no model" in done.output and "--model DIR" in done.output
    assert not (tmp_path / "o").exists()


def test_the_default_suite_file_is_the_built_in_suite():
    written = yaml.safe_load((ROOT / "configs/audit-lm.yaml").read_text())
    assert written["suite"] == DEFAULT_LM_SUITE and written["kind"] == "audit"
