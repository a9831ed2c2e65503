"""The synthetic teacher used by the cache tests and benchmark behaves like a trained causal LM."""

from __future__ import annotations

import torch

from secure_kd.cache import SyntheticTeacher, synthetic_logits


def test_outputs_depend_only_on_the_prefix_not_on_batching_or_padding() -> None:
    teacher = SyntheticTeacher(300, seed=5)
    a, b = [5, 9, 2, 7], [1, 2]
    alone = teacher(torch.tensor([a]), torch.ones(1, 4, dtype=torch.long))[0]
    batch = torch.tensor([a, b + [0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    together = teacher(batch, mask)
    assert torch.equal(together[0], alone)
    assert torch.equal(together[1, :2], teacher(torch.tensor([b]), torch.ones(1, 2, dtype=torch.long))[0])
    # a causal model: changing a later token leaves earlier positions unchanged, changes later ones
    changed = teacher(torch.tensor([[5, 9, 3, 7]]), torch.ones(1, 4, dtype=torch.long))[0]
    assert torch.equal(changed[:2], alone[:2]) and not torch.equal(changed[2:], alone[2:])
    assert not torch.equal(SyntheticTeacher(300, seed=6)(torch.tensor([a]))[0], alone)


def test_distributions_are_peaked_with_frequent_low_ids() -> None:
    vocab = 4096
    logprobs = torch.log_softmax(synthetic_logits(400, vocab, generator=torch.Generator().manual_seed(0)), -1)
    top1 = logprobs.max(-1).values.exp()
    assert 0.3 < top1.mean() < 0.8  # trained-LM-like, far from a random model's ~1/vocab
    assert (top1 > 0.9).any() and (top1 < 0.2).any()  # both confident and uncertain positions
    top_ids = logprobs.topk(64, -1).indices
    low, high = (top_ids < vocab // 8).float().mean(), (top_ids >= vocab - vocab // 8).float().mean()
    assert low > 3 * high  # Zipf prior: frequent (low-id) tokens dominate the top-k, as in BPE vocabularies
