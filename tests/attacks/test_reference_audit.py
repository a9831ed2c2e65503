"""`secure-kd audit --model --reference --members --nonmembers` on known answers (tiny Llamas).

Models: a byte-level BPE tokenizer and two "base" Llamas trained on public synthetic records (other
seeds than the private ones); a target = base 0 fine-tuned on the members (10 epochs: must come out
high; 2 epochs: the templated-text case, where the loss attack is weak). Members and non-members are
records of the synthetic corpus, which share most of their tokens (templates). The reference is base 0
(what the target was fine-tuned from); base 1, which never saw the records, must come out at chance.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from apparatus.tiny_lm import (
    TrainRecipe,
    build_model,
    pad_token_id,
    public_texts,
    tokenize_texts,
    train_causal_lm,
)
from secure_kd.app.cli import app
from secure_kd.config import TinyModelConfig
from secure_kd.data import generate_corpus, train_tiny_tokenizer

N = 100
MAX_LENGTH = 64
RECIPE = TrainRecipe(model=TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4), epochs=4, lr=3e-3)
CPU = torch.device("cpu")


def _train(model, texts, tokenizer, epochs: float, seed: int):
    pad = pad_token_id(tokenizer)
    recipe = RECIPE.model_copy(update={"epochs": epochs})
    train_causal_lm(
        model, tokenize_texts(texts, tokenizer, MAX_LENGTH), recipe, pad_id=pad, seed=seed, device=CPU
    )
    return model


def _save(model, tokenizer, path: Path) -> str:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("reference_audit")
    texts = generate_corpus(2 * N, seed=7, n_canaries=0).texts()
    public = public_texts(400, 0)
    tokenizer = train_tiny_tokenizer(public[:200], 512)
    pad = pad_token_id(tokenizer)
    base0 = _train(build_model(RECIPE, len(tokenizer), seed=0, pad_id=pad), public[:150], tokenizer, 4, 0)
    base1 = _train(build_model(RECIPE, len(tokenizer), seed=1, pad_id=pad), public[150:300], tokenizer, 4, 1)
    models = {
        "base0": _save(base0, tokenizer, root / "base0"),
        "base1": _save(base1, tokenizer, root / "base1"),
    }
    for epochs in (2, 10):
        tuned = _train(copy.deepcopy(base0), texts[:N], tokenizer, epochs, 3)
        models[f"tuned{epochs}"] = _save(tuned, tokenizer, root / f"tuned{epochs}")
    # a reference with another tokenizer (trained on other public text, another vocabulary size)
    other = train_tiny_tokenizer(public[200:], 384)
    other_pad = pad_token_id(other)
    ref_other = _train(build_model(RECIPE, len(other), seed=2, pad_id=other_pad), public[:150], other, 4, 2)
    models["other_tokenizer"] = _save(ref_other, other, root / "other_tokenizer")
    for name, rows in (("members", texts[:N]), ("nonmembers", texts[N:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return root, models, texts


def _audit(zoo, target: str, reference: str, out: Path, *extra: str):
    root, models, _ = zoo
    args = [
        "audit", "--model", models[target], "--reference", models[reference],
        "--members", str(root / "members.jsonl"), "--nonmembers", str(root / "nonmembers.jsonl"),
        "--out", str(out), "--no-progress", "--set", "n_bootstrap=300", *extra,
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    return result


def _attacks(out: Path) -> dict:
    data = json.loads((out / "results.json").read_text())
    return {a["name"]: a for a in data["attacks"]}, data


def test_a_model_fine_tuned_for_several_epochs_comes_out_high(zoo, tmp_path):
    result = _audit(zoo, "tuned10", "base0", tmp_path)
    assert result.exit_code == 0, result.output
    attacks, data = _attacks(tmp_path)
    assert attacks["reference"]["auc"] >= 0.9
    assert attacks["reference"]["auc_ci"][0] > 0.8
    assert data["comparison"] == "per-token" and (data["n_members"], data["n_nonmembers"]) == (N, N)
    assert not attacks["reference"]["tpr_at_0_1pct_fpr_headline"]  # 100 non-members: not a headline
    assert (
        "n/a (< 10,000 non-members)" in result.output and "TPR at 0.1% FPR is not a headline" in result.output
    )
    _, _, texts = zoo
    assert not any(t[:40] in result.output for t in texts)  # nothing of a record is printed


def test_the_same_architecture_never_trained_on_the_records_comes_out_at_chance(zoo, tmp_path):
    result = _audit(zoo, "base1", "base0", tmp_path)
    assert result.exit_code == 0, result.output
    attacks, _ = _attacks(tmp_path)
    for name in ("reference", "loss", "rmia"):
        low, high = attacks[name]["auc_ci"]
        assert low <= 0.5 <= high, (name, attacks[name])


def test_the_reference_attack_beats_the_loss_attack_on_templated_records(zoo, tmp_path):
    result = _audit(zoo, "tuned2", "base0", tmp_path)
    assert result.exit_code == 0, result.output
    attacks, _ = _attacks(tmp_path)
    assert attacks["reference"]["auc"] > attacks["loss"]["auc"] + 0.08, (
        attacks["reference"],
        attacks["loss"],
    )
    assert attacks["reference"]["auc_ci"][0] > 0.5 + 1e-9


def test_a_resumed_audit_reuses_the_cached_scores_and_runs_no_forward(zoo, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    calls = []
    forward = LlamaForCausalLM.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", counted)
    assert _audit(zoo, "tuned2", "base0", tmp_path).exit_code == 0
    first, data1 = _attacks(tmp_path)
    assert len(calls) == 2 * -(-2 * N // 16)  # one forward per batch of 16, per model
    calls.clear()
    assert _audit(zoo, "tuned2", "base0", tmp_path).exit_code == 0
    second, data2 = _attacks(tmp_path)
    assert calls == [] and data2["n_forwards"] == 0 and all(data2["cache_hits"].values())
    assert second == first
    # another max length is another key: scored again
    assert _audit(zoo, "tuned2", "base0", tmp_path, "--set", "max_length=32").exit_code == 0
    assert len(calls) > 0


def test_a_reference_with_another_tokenizer_is_compared_per_byte(zoo, tmp_path):
    result = _audit(zoo, "tuned10", "other_tokenizer", tmp_path)
    assert result.exit_code == 0, result.output
    attacks, data = _attacks(tmp_path)
    assert data["comparison"] == "per-byte" and "per-byte" in result.output
    assert attacks["reference"]["auc"] >= 0.8
    refused = _audit(zoo, "tuned10", "other_tokenizer", tmp_path / "refused", "--set", "tokenizers=same")
    assert refused.exit_code == 2 and "another tokenizer" in refused.output


def test_several_references_are_averaged(zoo, tmp_path):
    root, models, _ = zoo
    result = _audit(zoo, "tuned10", "base0", tmp_path, "--reference", models["base1"])
    assert result.exit_code == 0, result.output
    attacks, data = _attacks(tmp_path)
    assert (
        data["references"] == [models["base0"], models["base1"]]
        and len(set(data["reference_fingerprints"])) == 2
    )
    assert attacks["reference"]["auc"] >= 0.85 and attacks["rmia"]["auc"] >= 0.85


def _one_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


def test_bad_input_gets_one_clear_error(zoo, tmp_path):
    root, models, _ = zoo
    base = ["audit", "--model", models["tuned2"], "--reference", models["base0"], "--out", str(tmp_path)]
    members, nonmembers = str(root / "members.jsonl"), str(root / "nonmembers.jsonl")
    runner = CliRunner()
    missing = runner.invoke(app, [*base, "--members", members, "--nonmembers", str(root / "nope.jsonl")])
    assert "--nonmembers" in _one_error(missing) and "does not exist" in _one_error(missing)
    (tmp_path / "empty.jsonl").write_text("")
    empty = runner.invoke(
        app, [*base, "--members", str(tmp_path / "empty.jsonl"), "--nonmembers", nonmembers]
    )
    assert "--members" in _one_error(empty) and "empty" in _one_error(empty)
    no_flag = runner.invoke(app, [*base, "--members", members])
    assert "--nonmembers" in _one_error(no_flag)
    bad_model = runner.invoke(
        app, ["audit", "--model", str(tmp_path), "--reference", models["base0"], "--members", members,
              "--nonmembers", nonmembers, "--out", str(tmp_path)],
    )  # fmt: skip
    assert "--model" in _one_error(bad_model) and "config.json" in _one_error(bad_model)
    # a directory whose tokenizer is not the model's (ids beyond its vocabulary)
    mixed = Path(tmp_path / "mixed")
    mixed.mkdir()
    for item in Path(models["other_tokenizer"]).iterdir():
        if not item.name.startswith("tokenizer"):
            (mixed / item.name).write_bytes(item.read_bytes())
    for item in Path(models["base0"]).iterdir():
        if item.name.startswith("tokenizer"):
            (mixed / item.name).write_bytes(item.read_bytes())
    wrong = runner.invoke(
        app, [*base[:4], str(mixed), *base[5:], "--members", members, "--nonmembers", nonmembers]
    )
    assert "does not belong to the model" in _one_error(wrong)


@pytest.mark.slow
def test_smollm2_fine_tuned_comes_out_high_and_the_control_at_chance(tmp_path):
    """The SmolLM2 experiment (Q4_1, benchmarks/experiments/reference_mia_smollm2.py) at 50 + 50 records:
    fine-tuned 4 epochs from SmolLM2, the reference attack with SmolLM2 as the reference >= 0.9 and above
    the loss attack; the control (fine-tuned the same way on other records) covers 0.5. 4 epochs because 2
    gave 0.912 and 0.863 on two seeds; at 4 epochs the experiment measured 0.942 (this seed) and 0.931
    (seed 1), docs/results.md."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "experiments"))
    import reference_mia_smollm2

    out = tmp_path / "r.json"
    reference_mia_smollm2.main(
        ["--n", "50", "--epochs", "4", "--work", str(tmp_path / "w"), "--out", str(out)]
    )
    audits = json.loads(out.read_text())["audits"]
    tuned, control = audits["fine_tuned"]["attacks"], audits["control"]["attacks"]
    assert tuned["reference"]["auc"] >= 0.9 and tuned["reference"]["auc"] > tuned["loss"]["auc"]
    low, high = control["reference"]["auc_ci"]
    assert low <= 0.5 <= high
    assert audits["control"]["cache_hits"]["reference_0"]  # the reference was scored once, for both
