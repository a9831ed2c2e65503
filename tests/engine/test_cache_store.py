"""Building and reading the logit cache: exactness against the teacher, refusal, corruption, resume."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from secure_kd.cache import (
    CacheCorruptionError,
    CacheError,
    CacheIncompleteError,
    CacheMismatchError,
    CodecParams,
    LogitCache,
    build_cache,
    read_manifest,
)
from secure_kd.fingerprint import token_dataset_fingerprint

VOCAB = 500
K = 8
TOKENIZER = "tok-fingerprint-a"


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a random model is nearly uniform; sharpen it so top-1 ranges ~0.3-1.0
        model.lm_head.weight.mul_(25.0)
    return model


def sequences(n: int = 7, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 2, 13, 5, 21, 8, 3, 17, 9, 4][:n]
    return [torch.randint(0, VOCAB, (length,), generator=g).tolist() for length in lengths]


class CountingTeacher:
    """Wraps a model; counts calls and optionally fails on one call (to simulate an interruption)."""

    def __init__(self, model: torch.nn.Module, fail_on_call: int | None = None) -> None:
        self.model, self.calls, self.fail_on_call = model, 0, fail_on_call

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated interruption")
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def build(model, seqs, out: Path, **overrides):
    args = dict(k=K, teacher_id="tiny-llama", tokenizer_fingerprint=TOKENIZER, batch_size=3, progress=False)
    args.update(overrides)
    return build_cache(model, seqs, out, **args)


def open_cache(out: Path, seqs, **overrides) -> LogitCache:
    args = dict(expect_tokenizer=TOKENIZER, expect_dataset=token_dataset_fingerprint(seqs))
    args.update(overrides)
    return LogitCache.open(out, **args)


def quantizer_error_bound(p: np.ndarray, c: float, d: float) -> np.ndarray:
    knee_p = (c / d) ** 2  # hand-derived bound, see tests/engine/test_cache_codec.py
    return np.where(p >= 4 * knee_p, -2.0 * np.log1p(-c / (4.0 * np.sqrt(np.maximum(p, knee_p)))), d / 2)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama()


def test_round_trip_matches_exact_teacher_topk(model, tmp_path: Path) -> None:
    seqs = sequences()
    manifest = build(model, seqs, tmp_path / "cache", shard_tokens=20)
    assert len(manifest.shards) > 1 and manifest.complete
    cache = open_cache(tmp_path / "cache", seqs)
    assert len(cache) == len(seqs) and cache.vocab_size == VOCAB and cache.k == K
    params = CodecParams()
    kls = []
    for i, seq in enumerate(seqs):
        with torch.no_grad():  # independent reference: one unpadded sequence at a time, float64 softmax
            exact = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), -1)
        exact_top = exact.topk(K, -1)
        cached = cache[i]
        assert cached.values.shape == (len(seq), K) and cached.values.dtype == torch.float32
        assert cached.indices.dtype == torch.int64
        assert torch.equal(cached.indices.sort(-1).values, exact_top.indices.sort(-1).values)
        assert torch.all(cached.values[:, :-1] >= cached.values[:, 1:])  # sorted like torch.topk
        exact_at = exact.gather(-1, cached.indices)
        bound = quantizer_error_bound(exact_at.exp().numpy(), params.sqrt_step, params.max_log_step)
        assert np.all((cached.values.double() - exact_at).abs().numpy() <= bound + 0.03)
        p = torch.softmax(exact_at, -1)
        q = torch.softmax(cached.values.double(), -1)
        kls.append((p * (p.log() - q.log())).sum(-1))
        exact_missing = 1 - exact_top.values.exp().sum(-1)
        assert torch.allclose(cached.missing_mass().double(), exact_missing, rtol=0.1, atol=1e-3)
    assert torch.cat(kls).mean() < 1e-3


def test_padding_does_not_change_stored_values(model, tmp_path: Path) -> None:
    seqs = sequences()
    build(model, seqs, tmp_path / "one", batch_size=1)  # no padding at all
    build(model, seqs, tmp_path / "all", batch_size=len(seqs))  # one batch padded from 1 to 21 tokens
    unpadded, padded = open_cache(tmp_path / "one", seqs), open_cache(tmp_path / "all", seqs)
    for i in range(len(seqs)):
        assert torch.equal(unpadded[i].indices, padded[i].indices)
        assert torch.allclose(unpadded[i].values, padded[i].values, atol=1e-6)


def test_batch_pads_with_a_finite_uniform_distribution(model, tmp_path: Path) -> None:
    seqs = sequences()
    build(model, seqs, tmp_path / "cache")
    cache = open_cache(tmp_path / "cache", seqs)
    batch = cache.batch([4, 0, 2], pad_to=25)
    assert batch.values.shape == (3, 25, K) and batch.indices.shape == (3, 25, K)
    for row, index in enumerate([4, 0, 2]):
        length = len(seqs[index])
        assert cache.sequence_length(index) == length
        assert torch.equal(batch.values[row, :length], cache[index].values)
        assert torch.equal(batch.indices[row, :length], cache[index].indices)
        padding = batch.values[row, length:]
        assert torch.allclose(padding, torch.full_like(padding, -np.log(VOCAB)))
    assert torch.isfinite(batch.values).all()
    assert batch.indices.max() < VOCAB and batch.indices.min() >= 0
    with pytest.raises(ValueError, match="pad_to=5 is shorter"):
        cache.batch([4], pad_to=5)


def test_refuses_other_tokenizer_dataset_or_k(model, tmp_path: Path) -> None:
    seqs = sequences()
    build(model, seqs, tmp_path / "cache")
    with pytest.raises(CacheMismatchError) as info:
        open_cache(tmp_path / "cache", seqs, expect_tokenizer="tok-fingerprint-b")
    message = str(info.value)
    assert TOKENIZER in message and "tok-fingerprint-b" in message and "secure-kd distill" in message
    other_data = token_dataset_fingerprint(sequences(seed=2))
    with pytest.raises(CacheMismatchError) as info:
        open_cache(tmp_path / "cache", seqs, expect_dataset=other_data)
    message = str(info.value)
    assert other_data in message and token_dataset_fingerprint(seqs) in message and "dataset" in message
    with pytest.raises(CacheMismatchError, match="top_k to 8"):
        open_cache(tmp_path / "cache", seqs, expect_k=16)
    with pytest.raises(CacheMismatchError, match="other-teacher"):
        open_cache(tmp_path / "cache", seqs, expect_teacher="other-teacher")
    assert isinstance(CacheMismatchError("x"), ValueError)
    # building into the same directory with other settings is refused too
    with pytest.raises(CacheMismatchError, match="k=8.*k=16"):
        build(model, seqs, tmp_path / "cache", k=16)


def test_detects_a_flipped_byte_and_names_the_shard(model, tmp_path: Path) -> None:
    seqs = sequences()
    manifest = build(model, seqs, tmp_path / "cache", shard_tokens=20)
    victim = manifest.shards[1]
    path = tmp_path / "cache" / victim.file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    cache = open_cache(tmp_path / "cache", seqs)
    cache[0]  # other shards still load
    with pytest.raises(CacheCorruptionError, match=victim.file + ".*sha256"):
        cache[victim.first_sequence]
    with pytest.raises(CacheCorruptionError, match=victim.file):
        open_cache(tmp_path / "cache", seqs).verify()


def test_detects_a_truncated_shard(model, tmp_path: Path) -> None:
    seqs = sequences()
    manifest = build(model, seqs, tmp_path / "cache")
    path = tmp_path / "cache" / manifest.shards[0].file
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CacheCorruptionError, match="truncated"):
        open_cache(tmp_path / "cache", seqs)[0]


def test_refuses_a_manifest_with_unknown_keys_or_unsafe_paths(model, tmp_path: Path) -> None:
    seqs = sequences()
    build(model, seqs, tmp_path / "cache")
    manifest_file = tmp_path / "cache" / "manifest.json"
    original = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**original, "compression_hint": "fast"}))
    with pytest.raises(CacheCorruptionError, match="compression_hint.*Extra inputs are not permitted"):
        open_cache(tmp_path / "cache", seqs)
    escaped = json.loads(json.dumps(original))
    escaped["shards"][0]["file"] = "../../etc/passwd"
    manifest_file.write_text(json.dumps(escaped))
    with pytest.raises(CacheCorruptionError, match=r"shards\.0\.file"):
        open_cache(tmp_path / "cache", seqs)
    inflated = json.loads(json.dumps(original))
    inflated["shards"][0]["bytes"] = 10**12  # a hostile manifest cannot make the reader load a huge file
    manifest_file.write_text(json.dumps(inflated))
    with pytest.raises(CacheCorruptionError, match="more than"):
        open_cache(tmp_path / "cache", seqs)[0]
    manifest_file.write_text(json.dumps(original))
    with pytest.raises(CacheError, match="memory_budget_bytes=100"):
        open_cache(tmp_path / "cache", seqs, memory_budget_bytes=100)[0]
    manifest_file.write_text("{not json")
    with pytest.raises(CacheCorruptionError, match="not valid JSON"):
        open_cache(tmp_path / "cache", seqs)


def test_files_are_private_whatever_the_umask(model, tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        build(model, sequences(), tmp_path / "cache", shard_tokens=20)
    finally:
        os.umask(previous)
    directory = tmp_path / "cache"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = list(directory.iterdir())
    assert {f.name for f in files} >= {"manifest.json", "shard-00000.safetensors"}
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file.name


def test_resume_after_interruption_skips_finished_shards(model, tmp_path: Path) -> None:
    seqs = sequences(10)
    reference_teacher = CountingTeacher(model)
    reference = build(reference_teacher, seqs, tmp_path / "reference", shard_tokens=30, batch_size=2)
    assert len(reference.shards) >= 3
    shard0_sequences = reference.shards[0].n_sequences
    calls_shard0 = -(-shard0_sequences // 2)  # ceil: batches of 2 within the first shard

    failing = CountingTeacher(model, fail_on_call=calls_shard0 + 1)  # first batch of the second shard
    with pytest.raises(RuntimeError, match="simulated interruption"):
        build(failing, seqs, tmp_path / "cache", shard_tokens=30, batch_size=2)
    partial = read_manifest(tmp_path / "cache")
    assert not partial.complete and [s.file for s in partial.shards] == ["shard-00000.safetensors"]
    with pytest.raises(CacheIncompleteError, match="resume"):
        open_cache(tmp_path / "cache", seqs)

    resumed_teacher = CountingTeacher(model)
    resumed = build(resumed_teacher, seqs, tmp_path / "cache", shard_tokens=30, batch_size=2)
    assert resumed_teacher.calls == reference_teacher.calls - calls_shard0
    assert resumed == reference  # same shards, byte for byte (sha256), same manifest

    again = CountingTeacher(model)
    build(again, seqs, tmp_path / "cache", shard_tokens=30, batch_size=2)
    assert again.calls == 0  # a complete cache is not recomputed


def test_resume_recomputes_a_damaged_shard(model, tmp_path: Path) -> None:
    seqs = sequences(10)
    reference = build(model, seqs, tmp_path / "cache", shard_tokens=30, batch_size=2)
    path = tmp_path / "cache" / reference.shards[1].file
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    teacher = CountingTeacher(model)
    rebuilt = build(teacher, seqs, tmp_path / "cache", shard_tokens=30, batch_size=2)
    assert rebuilt == reference
    assert 0 < teacher.calls < -(-len(seqs) // 2)


def test_bad_input_is_refused_with_a_clear_message(model, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        build(model, [[1, 2], []], tmp_path / "a")
    with pytest.raises(ValueError, match="token id 500 .* tokenize with the teacher's tokenizer"):
        build(model, [[1, 500]], tmp_path / "e")
    with pytest.raises(ValueError, match="k=600 exceeds"):
        build(model, [[1, 2]], tmp_path / "b", k=600)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        build(model, [[1, 2]], tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="no logit cache"):
        LogitCache.open(tmp_path / "nothing", expect_tokenizer="t", expect_dataset="d")
    with pytest.raises(TypeError, match="logits tensor"):
        build(lambda input_ids, attention_mask: "oops", [[1, 2]], tmp_path / "d")
