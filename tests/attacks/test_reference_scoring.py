"""Per-token statistics, the record-level reference attacks and the score cache, against hand computations."""

from __future__ import annotations

import math
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from attacks.membership.reference_attacks import (
    min_k_plus_plus_scores,
    min_k_scores,
    per_byte_nll,
    reference_scores,
    rmia_offline_scores,
    zlib_scores,
)
from attacks.membership.score_cache import ScoreCache, cache_key, cached_stats
from attacks.membership.token_scores import TokenStats, batch_stats, position_block, score_sequences
from secure_kd.fingerprint import model_dir_fingerprint

# Logits the fake model returns at each position of the one sequence [0, 2, 1, 2] (vocab 3).
LOGITS = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.1], [-0.3, 0.2, 1.5], [0.0, 0.0, 0.0]]
SEQUENCE = [0, 2, 1, 2]


class FixedLogits(nn.Module):
    """Returns LOGITS (batch 1) whatever the input; counts its forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        batch, width = input_ids.shape
        return SimpleNamespace(logits=torch.tensor(LOGITS[:width]).expand(batch, width, 3))


def _hand_position(logits: list[float], token: int) -> tuple[float, float, float]:
    z = sum(math.exp(v) for v in logits)
    p = [math.exp(v) / z for v in logits]
    logp = [math.log(q) for q in p]
    mu = sum(q * lq for q, lq in zip(p, logp, strict=True))
    var = sum(q * (lq - mu) ** 2 for q, lq in zip(p, logp, strict=True))
    return logp[token], mu, var


def _hand() -> list[tuple[float, float, float]]:
    # position t predicts token t+1 from the logits at t
    return [_hand_position(LOGITS[t], SEQUENCE[t + 1]) for t in range(len(SEQUENCE) - 1)]


def test_token_stats_equal_a_hand_computation():
    stats = score_sequences(FixedLogits(), [SEQUENCE], pad_id=0)
    hand = np.array(_hand())
    np.testing.assert_allclose(stats.logprob, hand[:, 0], rtol=1e-5)
    np.testing.assert_allclose(stats.mu, hand[:, 1], rtol=1e-5)
    np.testing.assert_allclose(stats.sigma2, hand[:, 2], rtol=1e-4, atol=1e-6)
    assert stats.mean_nll()[0] == pytest.approx(-hand[:, 0].mean(), rel=1e-6)


def test_cache_sized_blocks_cover_every_position_as_one_float64_pass_does():
    # SmolLM2's vocabulary: 5 positions per CPU block, so 3 x 7 = 21 positions end in a partial block
    vocab = 49_152
    assert position_block(vocab, torch.device("cpu")) == 5
    assert position_block(vocab, torch.device("meta")) == 512
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, vocab, generator=generator) * 4
    ids = torch.randint(0, vocab, (3, 7), generator=generator)
    logprob, mu, sigma2 = batch_stats(logits, ids)
    logp = torch.log_softmax(logits.double(), dim=-1)
    targets = torch.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    p = logp.exp()
    ref_mu = (p * logp).sum(-1)
    np.testing.assert_allclose(logprob, logp.gather(-1, targets[..., None]).squeeze(-1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(mu, ref_mu.numpy(), rtol=1e-5)
    np.testing.assert_allclose(sigma2, (p * (logp - ref_mu[..., None]) ** 2).sum(-1).numpy(), rtol=1e-4)


def test_min_k_plus_plus_equals_a_hand_computation():
    stats = score_sequences(FixedLogits(), [SEQUENCE], pad_id=0)
    z = sorted((lp - mu) / math.sqrt(var) for lp, mu, var in _hand())
    # k = 0.5 of 3 tokens keeps floor(1.5) = 1 token, k = 0.7 keeps 2, k = 1 keeps all three
    assert min_k_plus_plus_scores(stats, 0.5)[0] == pytest.approx(z[0], rel=1e-5)
    assert min_k_plus_plus_scores(stats, 0.7)[0] == pytest.approx((z[0] + z[1]) / 2, rel=1e-5)
    assert min_k_plus_plus_scores(stats, 1.0)[0] == pytest.approx(sum(z) / 3, rel=1e-5)
    logps = sorted(lp for lp, _, _ in _hand())
    assert min_k_scores(stats, 0.7)[0] == pytest.approx((logps[0] + logps[1]) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="k"):
        min_k_plus_plus_scores(stats, 0.0)


def test_zlib_ratio_equals_the_direct_computation():
    texts = ["aaaa aaaa aaaa aaaa", "The quick brown fox jumps over the lazy dog; 7 wizards."]
    nll = np.array([1.5, 2.5])
    expected = [-1.5 / len(zlib.compress(texts[0].encode())), -2.5 / len(zlib.compress(texts[1].encode()))]
    np.testing.assert_allclose(zlib_scores(nll, texts), expected)


def test_per_byte_and_reference_ratio():
    stats = TokenStats(
        np.array([-1.0, -2.0, -3.0], np.float32), np.zeros(3, np.float32), np.ones(3, np.float32),
        np.array([0, 1, 3]),
    )  # fmt: skip
    np.testing.assert_allclose(per_byte_nll(stats, [2, 10]), [0.5, 0.5])
    np.testing.assert_allclose(reference_scores([1.0, 2.0], [[3.0, 1.0], [2.0, 2.0]]), [1.0, 0.0])


def test_rmia_offline_ranks_like_the_probability_ratio_and_never_uses_a_record_as_its_own_z():
    rng = np.random.default_rng(0)
    target, reference = rng.uniform(0.5, 3, 400), rng.uniform(0.5, 3, 400)
    member = np.arange(400) < 200
    scores = rmia_offline_scores(target, reference, member, a=1.0)
    # a = 1: Pr(x) = p_ref(x); within a fold the score is monotone in p_target / p_ref
    ratio = np.exp(reference - target)
    folds = np.random.default_rng([0, 0x5A1]).integers(0, 2, size=400)
    for fold in (0, 1):
        rows = folds == fold
        population = ratio[~member & (folds != fold)]
        expected = np.searchsorted(np.sort(population), ratio[rows], side="right") / population.size
        np.testing.assert_allclose(scores[rows], expected)


def test_second_run_reads_the_cache_and_does_no_forward(tmp_path):
    cache = ScoreCache(tmp_path / "scores")
    model = FixedLogits()
    sequences = [SEQUENCE, SEQUENCE[:3]]

    def compute():
        return score_sequences(model, sequences, pad_id=0)

    first, hit1 = cached_stats(cache, "model-a", sequences, 64, compute)
    calls = model.calls
    second, hit2 = cached_stats(cache, "model-a", sequences, 64, compute)
    assert (hit1, hit2) == (False, True) and calls >= 1
    assert model.calls == calls  # zero forwards on the second run
    np.testing.assert_array_equal(first.logprob, second.logprob)
    np.testing.assert_array_equal(first.offsets, second.offsets)
    assert oct(cache.path(cache_key("model-a", sequences, 64)).stat().st_mode & 0o777) == "0o600"
    # another model, other data or another max length: a miss
    for key in (("model-b", sequences, 64), ("model-a", [SEQUENCE], 64), ("model-a", sequences, 32)):
        _, hit = cached_stats(cache, *key, compute)
        assert not hit
    # a corrupt file is ignored and rewritten, not trusted
    path = cache.path(cache_key("model-a", sequences, 64))
    path.write_bytes(path.read_bytes()[:-8])
    _, hit = cached_stats(cache, "model-a", sequences, 64, compute)
    assert not hit and cached_stats(cache, "model-a", sequences, 64, compute)[1]


def test_model_fingerprint_changes_with_any_byte(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    first = model_dir_fingerprint(tmp_path)
    assert model_dir_fingerprint(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 63 + b"\x01")
    assert model_dir_fingerprint(tmp_path) != first


def test_summary_auc_matches_sklearn_and_the_low_fpr_headline_needs_10000_nonmembers():
    from sklearn.metrics import roc_auc_score

    from secure_kd.app.reference_summary import low_fpr_note, summarize

    rng = np.random.default_rng(0)
    for n_nonmembers, headline in ((10_000, True), (9_999, False)):
        members = np.r_[np.ones(200, bool), np.zeros(n_nonmembers, bool)]
        scores = rng.normal(size=members.size) + 0.8 * members
        found = summarize("loss", scores, members, n_bootstrap=20)
        assert found.auc == pytest.approx(roc_auc_score(members, scores), abs=1e-12)
        assert found.auc_ci[0] <= found.auc <= found.auc_ci[1]
        assert found.tpr_at_0_1pct_fpr_headline is headline
        assert (low_fpr_note(n_nonmembers) is None) is headline
    # TPR at 1% FPR: the best TPR with at most 1% of non-members above the threshold
    threshold = np.sort(scores[~members])[::-1][int(0.01 * (~members).sum())]
    assert found.tpr_at_1pct_fpr == pytest.approx((scores[members] > threshold).mean())
