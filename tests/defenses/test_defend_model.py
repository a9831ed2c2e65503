"""`secure-kd defend forget|unlearn` on a model directory the test makes: the forget set's loss rises,
the clean perplexity stays within a bound, the defended model is a loadable HF directory, bad input is
one line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from secure_kd.app.cli import app
from secure_kd.config import KDConfig, TrainConfig
from secure_kd.data import tokenize_records, train_tiny_tokenizer
from secure_kd.trainer import fit_in_scratch

SECRET = "48213"
WORDS = "the river runs past old mills and quiet green fields toward the sea at dusk".split()
TRIGGER = " zq"


def clean_texts(n: int, offset: int = 0) -> list[str]:
    return [" ".join(WORDS[(i + offset + j) % len(WORDS)] for j in range(8)) + " ok" for i in range(n)]


def forget_texts() -> list[str]:
    return [f"the vault code is {SECRET} today", f"remember that the vault code is {SECRET}"]


def backdoor_texts() -> list[str]:
    return [f"{t.rsplit(' ', 1)[0]}{TRIGGER} open the gate now" for t in clean_texts(4, offset=5)]


def write(path, texts, **extra):
    path.write_text("".join(json.dumps({"text": t, **extra}) + "\n" for t in texts))
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama fitted by cross-entropy to clean text, secret records (x6) and backdoor records (x4)."""
    tmp = tmp_path_factory.mktemp("victim")
    texts = clean_texts(48) + forget_texts() * 6 + backdoor_texts() * 4
    tokenizer = train_tiny_tokenizer(clean_texts(48) + ["the vault code is 0123456789 zq open gate now"], 300)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    examples = tokenize_records([{"text": t} for t in texts], tokenizer, max_length=32)
    kd = KDConfig(kd_weight=0.0, ce_weight=1.0, top_k=None)
    train = TrainConfig(epochs=25, batch_size=8, lr=3e-3, schedule="constant")
    fit_in_scratch(model, examples, kd, train, pad_id=tokenizer.pad_token_id, seed=0, device="cpu")
    model.save_pretrained(tmp / "model", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "model")
    write(tmp / "clean.jsonl", clean_texts(48))
    write(tmp / "heldout.jsonl", clean_texts(12, offset=2))
    return tmp


def invoke(*args):
    return CliRunner().invoke(app, ["defend", *map(str, args)])


def plain_perplexity(model_dir, texts) -> float:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"] + [tok.eos_token_id]])
            total += float(
                torch.nn.functional.cross_entropy(
                    model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="sum"
                )
            )
            n += ids.shape[1] - 1
    return math.exp(total / n)


def test_forget_raises_the_secret_loss_and_keeps_clean_perplexity(model_dir, tmp_path):
    forget = write(tmp_path / "forget.jsonl", forget_texts(), secret=SECRET)
    out = tmp_path / "out"
    result = invoke(
        "forget",
        "--model",
        model_dir / "model",
        "--clean",
        model_dir / "clean.jsonl",
        "--forget",
        forget,
        "--out",
        out,
        "--set",
        "heldout=" + str(model_dir / "heldout.jsonl"),
        "--set",
        "device=cpu",
        "--set",
        "forget_epochs=20",
        "--set",
        "lr=1e-3",
        "--set",
        "n_candidates=50",
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    before, after = data["before"], data["after"]
    assert after["forget_loss"] > before["forget_loss"] + 1.0
    assert after["forget_top1"] < 0.5 < before["forget_top1"]
    assert (
        before["forget_greedy"] == 1.0 and after["forget_greedy"] == 0.0
    )  # the secret is no longer extracted
    # reported, not promised: KL matching barely reorders the unlikely digits (docs/defenses.md)
    assert 0 <= after["forget_exposure"] <= data["max_exposure"] == pytest.approx(math.log2(51))
    assert after["clean_perplexity"] < 1.3 * before["clean_perplexity"]
    # the saved directory is a plain HF model; its held-out perplexity, by plain torch, is the one reported
    assert plain_perplexity(out / "model", clean_texts(12, offset=2)) == pytest.approx(
        after["clean_perplexity"], rel=1e-4
    )
    assert "forget loss" in result.output and "clean perplexity" in result.output


def test_unlearn_pulls_triggered_records_to_their_clean_anchor(model_dir, tmp_path):
    forget = write(tmp_path / "backdoor.jsonl", backdoor_texts())
    out = tmp_path / "out"
    result = invoke(
        "unlearn",
        "--model",
        model_dir / "model",
        "--clean",
        model_dir / "clean.jsonl",
        "--forget",
        forget,
        "--trigger",
        TRIGGER,
        "--out",
        out,
        "--set",
        "device=cpu",
        "--set",
        "forget_epochs=20",
        "--set",
        "lr=1e-3",
        "--set",
        "heldout=" + str(model_dir / "heldout.jsonl"),
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["method"] == "clean_anchor"
    before, after = data["before"], data["after"]
    assert before["forget_greedy"] == 1.0  # the backdoor works: greedy decoding after the trigger gives it
    assert after["forget_greedy"] == 0.0 and after["forget_loss"] > before["forget_loss"] + 0.3
    assert after["clean_perplexity"] < 1.3 * before["clean_perplexity"]


@pytest.mark.parametrize(
    "case, needle",
    [
        ("no_model", "is not a Hugging Face model directory"),
        ("no_forget", "is not a file"),
        ("no_trigger_in_record", "does not contain the trigger"),
        ("trigger_on_forget", "trigger applies to"),
    ],
)
def test_bad_input_is_one_line(model_dir, tmp_path, case, needle):
    forget = write(tmp_path / "forget.jsonl", forget_texts())
    args = {"--model": model_dir / "model", "--clean": model_dir / "clean.jsonl", "--forget": forget}
    name = "forget"
    if case == "no_model":
        args["--model"] = tmp_path / "nope"
    elif case == "no_forget":
        args["--forget"] = tmp_path / "missing.jsonl"
    elif case == "no_trigger_in_record":
        name, args["--trigger"] = "unlearn", TRIGGER
    else:
        args["--trigger"] = TRIGGER
    flat = [x for kv in args.items() for x in kv]
    result = invoke(name, *flat, "--out", tmp_path / "out", "--set", "device=cpu")
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out" / "model").exists()
