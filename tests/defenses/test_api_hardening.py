"""API hardening: hand-computed rounding/truncation, noise statistics, refusals, the detector, attacks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from typer.testing import CliRunner

from apparatus.hardened_api import (
    ApiDefenseConfig,
    DetectorConfig,
    ExtractionRefused,
    HardenedModelAPI,
    build_api,
)
from attacks.logit_leak import estimate_hidden_size, random_prompts
from defenses import get_defense
from defenses.api_hardening import (
    ApiHardeningConfig,
    answer_distribution,
    ordinary_client,
    sampled_sequences,
    utility,
)
from secure_kd.api import APIViewError, ModelAPI, QueryBudgetExceeded
from secure_kd.config import TinyModelConfig
from secure_kd.models import build_tiny

FIXED = [2.345, -1.0, 0.5, 3.0]


class FixedLM(nn.Module):
    """Answers the same next-token logits after every prefix (a model whose output is known by hand)."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.lm_head = nn.Linear(1, len(logits), bias=False)
        self.fixed = torch.tensor(logits)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.fixed.expand(*input_ids.shape, -1).clone())


@pytest.fixture(scope="module")
def sharp_victim():
    """A tiny random Llama whose output layer is scaled x30, so its own samples are far from uniform."""
    model = build_tiny(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2), 256, seed=0)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    return model


def test_rounding_changes_full_logits_as_by_hand():
    api = HardenedModelAPI(
        FixedLM(FIXED), defense=ApiDefenseConfig(round_decimals=1), view="full_logits", top_k=2
    )
    assert api.full_logits([1, 2]).tolist() == pytest.approx([2.3, -1.0, 0.5, 3.0], abs=1e-6)


def test_topk_truncation_and_rounding_of_logprobs_by_hand():
    api = HardenedModelAPI(FixedLM(FIXED), defense=ApiDefenseConfig(top_k=2), view="full_logits", top_k=4)
    assert api.view == "topk_logprobs" and api.top_k == 2
    with pytest.raises(APIViewError, match="full_logits"):
        api.full_logits([1])
    log_z = math.log(sum(math.exp(v) for v in FIXED))
    values, indices = api.topk_logprobs([1])
    assert indices.tolist() == [3, 0]
    assert values.tolist() == pytest.approx([3.0 - log_z, 2.345 - log_z], abs=1e-6)
    rounded = HardenedModelAPI(FixedLM(FIXED), defense=ApiDefenseConfig(top_k=2, round_decimals=2), top_k=2)
    assert rounded.topk_logprobs([1])[0].tolist() == pytest.approx(
        [round(3.0 - log_z, 2), round(2.345 - log_z, 2)]
    )


def test_truncated_answer_describes_topk_plus_uniform_tail():
    api = HardenedModelAPI(FixedLM(FIXED), defense=ApiDefenseConfig(top_k=2), top_k=2)
    exp = [math.exp(v) for v in FIXED]
    p3, p0 = exp[3] / sum(exp), exp[0] / sum(exp)
    tail = (1 - p3 - p0) / 2
    assert answer_distribution(api, (1,)).tolist() == pytest.approx([p0, tail, tail, p3], abs=1e-7)


def test_noise_has_the_configured_std_and_is_fresh_per_context():
    vocab, sigma = 4000, 0.5
    clean = torch.linspace(-3, 3, vocab)
    model = FixedLM(clean.tolist())
    api = HardenedModelAPI(model, defense=ApiDefenseConfig(noise_sigma=sigma, seed=3), view="full_logits")
    first, second = api.full_logits([1]) - clean, api.full_logits([2]) - clean
    for noise in (first, second):
        # sd of the sample std is about sigma / sqrt(2n) = 0.0056; 5 sd tolerance
        assert float(noise.std()) == pytest.approx(sigma, abs=0.03)
        assert abs(float(noise.mean())) < 5 * sigma / math.sqrt(vocab)
    assert abs(float(torch.corrcoef(torch.stack([first, second]))[0, 1])) < 0.1
    assert torch.equal(api.full_logits([1]) - clean, first)  # a cached context repeats its answer


def test_logit_bias_is_refused_and_not_charged():
    api = HardenedModelAPI(
        FixedLM(FIXED), defense=ApiDefenseConfig(allow_logit_bias=False), view="topk_logprobs_bias", top_k=2
    )
    assert api.view == "topk_logprobs"
    with pytest.raises(APIViewError, match="logit_bias"):
        api.topk_logprobs([1], logit_bias={1: 50.0})
    assert api.queries == 0
    assert api.topk_logprobs([1])[1].tolist() == [3, 0]
    allowed = HardenedModelAPI(FixedLM(FIXED), defense=ApiDefenseConfig(), view="topk_logprobs_bias", top_k=2)
    assert allowed.topk_logprobs([1], logit_bias={1: 50.0})[1].tolist()[0] == 1


def test_budget_refuses_query_n_plus_one():
    api = build_api(
        FixedLM(FIXED), defense=ApiDefenseConfig(max_queries=3), view="full_logits", max_queries=10, top_k=2
    )
    assert api.max_queries == 3
    for prompt in ([1], [2], [3]):
        api.full_logits(prompt)
    with pytest.raises(QueryBudgetExceeded):
        api.full_logits([0, 1])
    assert api.queries == 3


def test_identity_defense_changes_nothing(sharp_victim):
    prompts = random_prompts(16, 6, 256, seed=1)
    plain = ModelAPI(sharp_victim, view="full_logits")
    hardened = build_api(sharp_victim, defense=ApiDefenseConfig(), view="full_logits")
    assert isinstance(hardened, HardenedModelAPI)
    assert torch.equal(hardened.full_logits_batch(prompts), plain.full_logits_batch(prompts))
    assert utility(hardened, plain, prompts) == (1.0, pytest.approx(0.0, abs=1e-12))
    noisy = build_api(sharp_victim, defense=ApiDefenseConfig(noise_sigma=5.0), view="full_logits")
    agreement, kl = utility(noisy, plain, prompts)
    assert kl > 0.1 and agreement < 1.0


def _detecting(victim, action="flag", **view):
    return HardenedModelAPI(victim, defense=ApiDefenseConfig(detector=DetectorConfig(action=action)), **view)


def test_detector_flags_extraction_stream_not_ordinary_traffic(sharp_victim):
    attacker = _detecting(sharp_victim, view="full_logits")
    attacker.full_logits_batch(random_prompts(64, 8, 256, seed=2))
    assert attacker.detector.flagged and attacker.detector.flagged_at_query <= 64
    sequences = sampled_sequences(ModelAPI(sharp_victim, view="text"), 48, 16, seed=3)
    for client in range(3):
        user = _detecting(sharp_victim, view="full_logits")
        ordinary_client(user, sequences[client * 16 : (client + 1) * 16], 200)
        assert user.queries == 200 and len(user.detector.history) > 10
        assert not user.detector.flagged, user.detector.history


def test_detector_refuses_after_flag_and_flags_bias_sweeps(sharp_victim):
    attacker = _detecting(sharp_victim, action="refuse", view="full_logits")
    with pytest.raises(ExtractionRefused, match="extraction"):
        for prompt in random_prompts(64, 8, 256, seed=2):
            attacker.full_logits(prompt)
    answered = attacker.queries
    with pytest.raises(ExtractionRefused):
        attacker.full_logits([1, 2, 3])
    assert attacker.queries == answered == 32  # flagged at the first check (min_contexts=32)
    sweeper = _detecting(sharp_victim, view="topk_logprobs_bias", top_k=5)
    for start in range(1, 100, 4):
        sweeper.topk_logprobs([5, 6], logit_bias=dict.fromkeys(range(start, start + 4), 100.0))
    assert sweeper.detector.flagged and "logit-bias sweep" in sweeper.detector.reason


def test_large_noise_hides_the_hidden_size(sharp_victim):
    prompts = random_prompts(96, 8, 256, seed=4)
    clean = build_api(sharp_victim, defense=ApiDefenseConfig(), view="full_logits").full_logits_batch(prompts)
    assert estimate_hidden_size(clean) == 32
    noisy_api = build_api(sharp_victim, defense=ApiDefenseConfig(noise_sigma=5.0), view="full_logits")
    assert estimate_hidden_size(noisy_api.full_logits_batch(prompts)) != 32


def test_attacks_take_the_api_defense(tmp_path):
    from attacks import get_attack

    leak = get_attack("logit_leak")
    base = {"out": str(tmp_path), "device": "cpu", "n_queries": 80}
    assert leak.run(leak.Config(**base)).correct
    noisy = leak.run(leak.Config(**base, api_defense={"noise_sigma": 5.0}))
    assert not noisy.correct
    with pytest.raises(ValueError, match="gives neither"):  # no bias, so no logit vectors to read
        leak.run(leak.Config(**base, view="topk_logprobs_bias", api_defense={"allow_logit_bias": False}))


def test_bad_config_names_the_field():
    with pytest.raises(ValidationError, match="noise_sigma"):
        ApiDefenseConfig(noise_sigma=-1)
    with pytest.raises(ValidationError, match="bogus"):
        ApiHardeningConfig(bogus=1)
    with pytest.raises(ValueError, match="min_contexts"):
        HardenedModelAPI(FixedLM(FIXED), defense=ApiDefenseConfig(detector=DetectorConfig(window=8)), top_k=2)


def test_a_served_victim_is_refused_before_anything_is_loaded(tmp_path):
    """The defense hardens an in-process API; a served victim (no server runs here: nothing may be asked
    of it) is refused with the fix, before its tokenizer or reference is loaded."""
    served = {"base_url": "http://127.0.0.1:9", "model": "m"}
    config = ApiHardeningConfig(out=str(tmp_path), victim={"source": "served", "served": served})
    with pytest.raises(ValueError, match="hardened \\(or not\\) by its server"):
        get_defense("api_hardening").run(config)
    assert not (tmp_path / "results.json").exists()


def test_defend_api_hardening_cli(tmp_path):
    import json

    from secure_kd.app.cli import app

    overrides = [
        "traffic.ordinary_clients=2",
        "traffic.queries_per_client=40",
        "traffic.utility_prompts=16",
        "traffic.extraction_queries=48",
    ]
    result = CliRunner().invoke(
        app,
        [
            "defend",
            "api_hardening",
            "--config",
            "configs/defenses/api_hardening.yaml",
            "--out",
            str(tmp_path),
            *[arg for o in overrides for arg in ("--set", o)],
        ],
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["logit_bias_refused"] is True and saved["answered_top_k"] == 5
    assert saved["detector"]["extraction_flagged"] and saved["detector"]["false_positive_rate"] == 0.0
    assert saved["utility_top1_agreement"] > 0.9
