"""API hardening around a served model: `HardenedServedAPI` over a `ServedModelAPI` whose client is a
stand-in server answering from a tiny torch model (as an OpenAI-compatible server that honours
logit_bias would), checked against the model's own log-softmax."""

from __future__ import annotations

import math

import pytest
import torch

from apparatus.extraction_detector import DetectorConfig, ExtractionRefused
from apparatus.hardened_api import ApiDefenseConfig
from apparatus.hardened_served import HardenedServedAPI
from apparatus.victims import victim_api
from secure_kd.api import APIViewError, QueryBudgetExceeded
from secure_kd.config import ModelConfig, TinyModelConfig
from secure_kd.models import build_tiny
from secure_kd.served.api import ServedModelAPI
from secure_kd.served.config import ServedConfig

VOCAB = 40
CFG = ServedConfig(base_url="http://127.0.0.1:9", model="tiny", dialect="vllm")


class Tok:
    eos_token_id, bos_token_id = 0, None

    def __len__(self) -> int:
        return VOCAB


class Stats:
    def as_dict(self) -> dict:
        return {}


class StandIn:
    """The server: top-k {id: logprob} from a tiny model; counts what it is asked."""

    pieces, stop_ids, stats = None, [0], Stats()

    def __init__(self, model) -> None:
        self.model, self.calls = model, 0

    def logprobs(self, ids, bias=None) -> torch.Tensor:
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([list(ids)])).logits[0].float()
        if bias:
            for t, b in bias.items():
                logits[:, t] += b
        return torch.log_softmax(logits, -1)

    def next_topk(self, ids, k, logit_bias=None):
        self.calls += 1
        row = self.logprobs(ids, logit_bias)[-1]
        v, i = row.topk(k)
        return dict(zip(i.tolist(), v.tolist(), strict=True))

    def prompt_topk(self, ids, k):
        self.calls += 1
        rows = self.logprobs(ids)
        return [dict(zip(*[x.tolist() for x in reversed(r.topk(k))], strict=True)) for r in rows]

    def sample(self, ids, n, temperature, seed):
        self.calls += 1
        return [1] * n

    def close(self):
        pass


@pytest.fixture()
def model():
    return build_tiny(TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2), VOCAB, seed=3)


def hardened(model, **defense) -> tuple[HardenedServedAPI, StandIn]:
    server = StandIn(model)
    api = HardenedServedAPI(CFG, Tok(), defense=ApiDefenseConfig(**defense), top_k=8, client=server)
    return api, server


PROMPT = [3, 7, 11, 5]


def test_truncation_and_rounding_equal_the_models_own_logprobs(model):
    api, _ = hardened(model, top_k=3, round_decimals=2)
    values, indices = api.topk_logprobs(PROMPT)
    expected_v, expected_i = StandIn(model).logprobs(PROMPT)[-1].topk(3)
    assert api.top_k == 3 and indices.tolist() == expected_i.tolist()
    assert torch.equal(values, torch.round(expected_v, decimals=2))
    # per position too, and a caller asking for more than the defense allows gets k = 3
    (rows,) = api.topk_logprobs_positions_batch([PROMPT], k=8)
    expected = StandIn(model).logprobs(PROMPT).topk(3)
    assert rows.values.shape == (4, 3) and torch.equal(rows.values, torch.round(expected.values, decimals=2))


def test_noise_is_fixed_per_context_and_keeps_a_distribution(model):
    api, _ = hardened(model, noise_sigma=0.5, seed=1)
    plain = ServedModelAPI(CFG, Tok(), top_k=8, client=StandIn(model))
    first, again, clean = api.topk_logprobs(PROMPT), api.topk_logprobs(PROMPT), plain.topk_logprobs(PROMPT)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])  # repeats do not average out
    clean_of = dict(zip(clean[1].tolist(), clean[0].tolist(), strict=True))
    pairs = zip(first[0].tolist(), first[1].tolist(), strict=True)
    moved = [abs(v - clean_of[i]) for v, i in pairs if i in clean_of]
    assert moved and max(moved) > 0.05  # the answer is not the clean one
    assert float(first[0].exp().sum()) <= 1 + 1e-6 and bool((first[0].diff() <= 0).all())
    other = hardened(model, noise_sigma=0.5, seed=2)[0].topk_logprobs(PROMPT)
    assert not torch.equal(first[0], other[0])  # another seed, another draw


def test_logit_bias_removed_and_budget_checked_before_sending(model):
    api, server = hardened(model, allow_logit_bias=False, max_queries=2)
    with pytest.raises(APIViewError, match="does not accept logit_bias"):
        api.topk_logprobs(PROMPT, logit_bias={5: 10.0})
    assert server.calls == 0
    biased_view = HardenedServedAPI(
        CFG, Tok(), defense=ApiDefenseConfig(allow_logit_bias=False), view="topk_logprobs_bias", client=server
    )
    assert biased_view.view == "topk_logprobs"
    api.topk_logprobs(PROMPT)
    api.topk_logprobs(PROMPT)
    with pytest.raises(QueryBudgetExceeded):
        api.topk_logprobs(PROMPT)
    assert server.calls == 2


def test_a_logit_bias_sweep_is_refused(model):
    detector = DetectorConfig(bias_sweep_tokens=12, action="refuse")
    api, server = hardened(model, detector=detector)
    api = HardenedServedAPI(
        CFG, Tok(), defense=api.defense, view="topk_logprobs_bias", top_k=4, client=server
    )
    answered = 0
    with pytest.raises(ExtractionRefused, match="logit-bias sweep"):
        for start in range(1, VOCAB, 3):  # the sweep: 3 new tokens per query, on one prompt
            api.topk_logprobs(PROMPT, logit_bias={t: 100.0 for t in range(start, start + 3)})
            answered += 1
    assert answered == 3  # 12 distinct biased tokens at the 4th query: refused before it is sent
    with pytest.raises(ExtractionRefused):
        api.topk_logprobs([1, 2])


def test_victim_api_hardens_a_served_victim():
    cfg = ModelConfig(
        source="served", served={"base_url": "http://127.0.0.1:9", "model": "m", "dialect": "vllm"}
    )
    api = victim_api(cfg, None, Tok(), defense=ApiDefenseConfig(top_k=2), view="topk_logprobs", top_k=5)
    assert isinstance(api, HardenedServedAPI) and api.top_k == 2
    assert not isinstance(victim_api(cfg, None, Tok(), defense=None, top_k=5), HardenedServedAPI)
    assert math.isfinite(api.max_logit_bias)
