"""ModelAPI: answers match the model's own forward pass, queries are counted, budgets and views hold."""

from __future__ import annotations

import math
import re

import pytest
import torch

from secure_kd.api import MAX_CACHED_PROMPTS, APIViewError, ModelAPI, QueryBudgetExceeded

VOCAB = 48


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy shared CPU spinning threads cost a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def model(tiny_llama):
    return tiny_llama(vocab=VOCAB, hidden=16, layers=1, heads=2, seed=3).eval()


def forward_counter(model) -> list[int]:
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


@torch.no_grad()
def direct_next_logits(model, prompt: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([prompt])).logits[0, -1].float()


def test_full_logits_match_a_direct_forward_pass_and_are_counted(model):
    api = ModelAPI(model, cost_per_query=0.25)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]  # different lengths: right padding must not leak
    batch = api.full_logits_batch(prompts)
    single = api.full_logits([11, 12])
    for row, prompt in zip(batch, prompts, strict=True):
        torch.testing.assert_close(row, direct_next_logits(model, prompt), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single, direct_next_logits(model, [11, 12]), atol=1e-5, rtol=1e-5)
    assert api.queries == 4
    assert api.cost == pytest.approx(1.0)


def test_positions_answer_every_prefix_and_count_one_query_each(model):
    api = ModelAPI(model)
    ids = [5, 9, 2, 7, 30]
    rows = api.full_logits_positions(ids)
    for j in range(len(ids)):
        torch.testing.assert_close(rows[j], direct_next_logits(model, ids[: j + 1]), atol=1e-5, rtol=1e-5)
    assert api.queries == len(ids)


def test_topk_logprobs_with_bias_are_the_biased_distributions_top_k(model):
    api = ModelAPI(model, view="topk_logprobs_bias", top_k=4)
    prompt = [3, 1, 4]
    bias = {0: 7.5, 17: -2.0, 40: 3.0}
    values, indices = api.topk_logprobs(prompt, logit_bias=bias)
    logits = direct_next_logits(model, prompt).double()
    for token, b in bias.items():
        logits[token] += b
    probs = logits.exp() / logits.exp().sum()
    expected = sorted(range(VOCAB), key=lambda t: -float(probs[t]))[:4]
    assert indices.tolist() == expected
    assert indices[0].item() == 0  # the +7.5 bias makes token 0 the most likely
    torch.testing.assert_close(values.double(), probs[expected].log(), atol=1e-5, rtol=0)


def test_views_restrict_what_can_be_asked(model):
    topk = ModelAPI(model, view="topk_logprobs", top_k=3)
    with pytest.raises(APIViewError, match="full_logits"):
        topk.full_logits([1, 2])
    with pytest.raises(APIViewError, match="logit_bias"):
        topk.topk_logprobs([1, 2], logit_bias={3: 1.0})
    text = ModelAPI(model, view="text")
    with pytest.raises(APIViewError):
        text.topk_logprobs([1, 2])
    with pytest.raises(PermissionError):  # APIViewError is a PermissionError
        text.full_logits_positions([1, 2])
    assert topk.queries == 0 and text.queries == 0
    assert len(text.sample_text([1, 2], max_new_tokens=3)) <= 3


def test_budget_is_checked_before_answering(model):
    calls = forward_counter(model)
    api = ModelAPI(model, max_queries=3, cache_forward=False)
    api.full_logits_batch([[1], [2]])
    assert len(calls) == 1
    with pytest.raises(QueryBudgetExceeded, match="max_queries=3"):
        api.full_logits_batch([[3], [4]])  # needs 2, only 1 left: nothing answered
    assert api.queries == 2 and len(calls) == 1
    api.full_logits([5])
    with pytest.raises(QueryBudgetExceeded):
        api.full_logits([6])
    assert api.queries == 3 and api.remaining == 0 and len(calls) == 2


def test_bad_requests_raise_clear_errors_and_cost_nothing(model):
    api = ModelAPI(model, view="topk_logprobs_bias", top_k=3)
    with pytest.raises(ValueError, match="token id"):
        api.topk_logprobs([1], logit_bias={VOCAB: 1.0})
    with pytest.raises(ValueError, match=re.escape("|bias| <= 100")):
        api.topk_logprobs([1], logit_bias={2: 150.0})
    with pytest.raises(ValueError, match=r"\[0, 48\)"):
        api.topk_logprobs([1, VOCAB + 2])
    with pytest.raises(ValueError, match="empty"):
        api.topk_logprobs([])
    assert api.queries == 0
    with pytest.raises(ValueError, match="view"):
        ModelAPI(model, view="everything")
    with pytest.raises(ValueError, match="top_k"):
        ModelAPI(model, top_k=VOCAB + 1)


def test_cached_forward_counts_every_query_but_runs_the_model_once(model):
    calls = forward_counter(model)
    api = ModelAPI(model, view="topk_logprobs_bias", top_k=3)
    answers = [api.topk_logprobs([2, 4, 6], logit_bias={t: 50.0}) for t in range(10)]
    assert api.queries == 10
    assert len(calls) == 1
    assert [int(indices[0]) for _, indices in answers] == list(range(10))  # each bias took effect
    uncached = ModelAPI(model, view="topk_logprobs_bias", top_k=3, cache_forward=False)
    for t in range(10):
        uncached.topk_logprobs([2, 4, 6], logit_bias={t: 50.0})
    assert uncached.queries == 10 and len(calls) == 11


def test_batches_larger_than_the_cache_are_answered_in_full(model):
    prompts = [[a, b] for a in range(20) for b in range(15)]  # 300 distinct prompts
    assert len(prompts) > MAX_CACHED_PROMPTS
    cached = ModelAPI(model).full_logits_batch(prompts)
    uncached = ModelAPI(model, cache_forward=False).full_logits_batch(prompts)
    torch.testing.assert_close(cached, uncached)
    torch.testing.assert_close(cached[-1], direct_next_logits(model, prompts[-1]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no prompts"):
        ModelAPI(model).full_logits_batch([])


def test_sampling_is_seeded_counted_and_follows_the_model(model):
    api = ModelAPI(model, view="text")
    first = api.sample_text_batch([[1, 2], [3]], max_new_tokens=5, seed=7)
    again = api.sample_text_batch([[1, 2], [3]], max_new_tokens=5, seed=7)
    assert first == again
    assert api.queries == 4
    # At a vanishing temperature sampling is greedy decoding, computed here step by step.
    cold = api.sample_text([9, 8], max_new_tokens=4, temperature=1e-4, seed=0)
    greedy, prompt = [], [9, 8]
    for _ in range(4):
        token = int(direct_next_logits(model, prompt + greedy).argmax())
        greedy.append(token)
        if token == model.config.eos_token_id:
            break
    assert cold == greedy
    assert api.cost == pytest.approx(5 * api.cost_per_query)
    assert math.isclose(api.cost, 5.0)
