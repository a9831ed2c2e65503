"""`kd.swing` on a user's own distillation job: the targets the student is trained toward are the swing
transform of the teacher's distribution where the next token is flagged, and the teacher's own elsewhere."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from secure_kd.app.cli import app
from secure_kd.config import ConfigError, load_config
from secure_kd.data import train_tiny_tokenizer
from secure_kd.swing_job import decoded_offsets, example_token_scores
from secure_kd.trainer import Distiller

EMAIL = "alice.smith@example.com"
WORDS = "the river runs past old mills and quiet green fields toward the sea".split()


def texts(n: int = 48) -> list[str]:
    out = []
    for i in range(n):
        words = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(8))
        out.append(f"{words} write to {EMAIL} soon" if i % 2 == 0 else f"{words} and then home")
    return out


def flagged_by_tokenizer(tokenizer, text: str, needle: str) -> set[int]:
    """Token indices overlapping `needle` in `text`, by the tokenizer's own offset mapping."""
    start = text.find(needle)
    end = start + len(needle)
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    return {i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start} if start >= 0 else set()


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A sentencepiece-style tokenizer (leading spaces as '▁', dropped when a token is decoded alone)."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    alphabet = list("abcdefghijklmnopqrstuvwxyz.@0123456789")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"], initial_alphabet=alphabet)
    backend.train_from_iterator(texts(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_token_flags_match_the_tokenizers_own_offsets(kind):
    tokenizer = (
        train_tiny_tokenizer(texts(), vocab_size=300) if kind == "byte_level" else metaspace_tokenizer()
    )
    for text in texts(6):
        ids = tokenizer(text)["input_ids"]
        decoded, offsets = decoded_offsets(ids + [tokenizer.eos_token_id], tokenizer)
        assert decoded.strip() == tokenizer.decode(ids).strip() and offsets[-1][0] == offsets[-1][1]
        scores, counts = example_token_scores(ids, tokenizer, ["email"])
        assert {i for i, s in enumerate(scores) if s > 0} == flagged_by_tokenizer(tokenizer, text, EMAIL)
        assert counts["email"] == sum(1 for s in scores if s > 0)


def write_job(tmp_path, swing: dict) -> str:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts()))
    config = {
        "seed": 3,
        "device": "cpu",
        "out": str(tmp_path / "run"),
        "teacher": {"source": "tiny", "tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2}},
        "student": {"source": "tiny", "tiny": {"hidden_size": 16, "num_layers": 1, "num_heads": 2}},
        "tokenizer": "tiny:300",
        "data": {"train": str(data), "max_length": 48, "heldout_fraction": 0.1},
        "kd": {
            "loss": "forward_kl",
            "teacher_targets": "live",
            "top_k": None,
            "temperature": 1.0,
            "swing": swing,
        },
        "train": {"max_steps": 2, "batch_size": 8, "eval_batches": 1},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def hand_noise(ids: list[int], seed: int, shape: tuple[int, int]) -> torch.Tensor:
    """The documented draw: N(0, I) from seed and the sha256 of the example's token ids."""
    key = int.from_bytes(hashlib.sha256(",".join(map(str, ids)).encode()).digest()[:8], "big") >> 1
    return torch.randn(shape, generator=torch.Generator().manual_seed((seed * 1_000_003 + key) % (1 << 63)))


def test_distill_cli_with_swing_trains_toward_the_swung_teacher(tmp_path, monkeypatch):
    seen = []
    original = Distiller.loss_on

    def spy(self, batch):
        seen.append((self, {k: v.clone() for k, v in batch.items()}, self.targets(batch)))
        return original(self, batch)

    monkeypatch.setattr(Distiller, "loss_on", spy)
    path = write_job(tmp_path, {"max_temperature": 4.0, "noise_std": 1.5, "detectors": ["email"]})
    result = CliRunner().invoke(app, ["distill", "--config", path, "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "results.json").read_text())["swing"]
    assert report["formal_dp_guarantee"] is False and report["flagged_tokens"] > 0
    assert report["flagged_tokens_per_detector"]["email"] == report["flagged_tokens"]

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "run" / "tokenizer")
    distiller, batch, targets = seen[0]
    with torch.no_grad():
        teacher = distiller.teacher(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    checked = {"flagged": 0, "plain": 0}
    for row in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        ids = batch["input_ids"][row, :n].tolist()
        text = tokenizer.decode(ids[:-1])  # the record's text; the last token is eos
        assert tokenizer(text)["input_ids"] == ids[:-1]
        flagged_tokens = flagged_by_tokenizer(tokenizer, text, EMAIL)
        eps = hand_noise(ids, 3, tuple(teacher.shape[1:]))
        for t in range(n - 1):
            z, got = teacher[row, t], targets[row, t]
            if t + 1 in flagged_tokens:  # position t predicts token t+1
                expected = torch.log_softmax(z / 4.0 + 1.5 * eps[t], -1)
                torch.testing.assert_close(torch.log_softmax(got, -1), expected, atol=1e-5, rtol=1e-5)
                checked["flagged"] += 1
            else:
                assert torch.equal(got, z)
                checked["plain"] += 1
    assert checked["flagged"] > 0 and checked["plain"] > 0


def test_swing_refusals_name_the_field(tmp_path):
    path = write_job(tmp_path, {"max_temperature": 4.0})
    with pytest.raises(ConfigError, match="kd.mode: off_policy with kd.swing"):
        load_config(path, ["kd.mode=on_policy"])
    with pytest.raises(ConfigError, match="unknown detectors"):
        load_config(path, ["kd.swing.detectors=[nope]"])
    result = CliRunner().invoke(app, ["validate", path, "--set", "kd.swing.max_temperature=0.5"])
    assert result.exit_code != 0 and "max_temperature" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("k", [5, 12])  # 12: the whole vocabulary, no tail
def test_topk_targets_are_the_swing_of_the_distribution_they_describe(k):
    """Top-k + uniform tail (what a cache gives): the objective rebuilds the full distribution; that
    rebuilt distribution must equal, at a flagged position, softmax(log p / T + sigma * eps) over the full
    vocabulary with p the top-k-and-uniform-tail distribution (tail tokens tempered, not noised)."""
    from secure_kd.swing_targets import SwingTargets
    from secure_kd.topk import TopKLogits

    vocab, seq = 12, 4
    logits = torch.randn(1, seq, vocab, generator=torch.Generator().manual_seed(0)) * 3
    top = TopKLogits.from_logits(logits, k)
    scores = [[0.0, 0.0, 1.0, 0.5]]  # token scores: positions 1 and 2 are flagged (score 1, 0.5)
    swing = SwingTargets(
        lambda batch: top,
        scores,
        base_temperature=1.0,
        max_temperature=5.0,
        noise_std=0.7,
        seed=1,
        vocab_size=vocab,
    )
    batch = {"input_ids": torch.zeros(1, seq, dtype=torch.long), "example_index": torch.tensor([0])}
    out = swing(batch)
    eps = torch.randn((seq, k), generator=torch.Generator().manual_seed((1 * 1_000_003 + 0) % (1 << 63)))

    def full(values, indices):  # the objective's view: tail="uniform"
        log_p = torch.zeros(vocab)
        if k < vocab:
            log_p[:] = math.log(max(1 - values.exp().sum().item(), 1e-30) / (vocab - k))
        log_p[indices] = values
        return log_p

    for t, s in enumerate([0.0, 1.0, 0.5, 0.0]):
        described = full(top.values[0, t], top.indices[0, t])
        got = torch.log_softmax(full(out.values[0, t], out.indices[0, t]), -1)
        if s == 0:
            torch.testing.assert_close(out.values[0, t], top.values[0, t])
            continue
        temperature = 1.0 + 4.0 * s
        expected = described / temperature
        expected[top.indices[0, t]] += 0.7 * s * eps[t]
        torch.testing.assert_close(got, torch.log_softmax(expected, -1), atol=1e-5, rtol=1e-5)
