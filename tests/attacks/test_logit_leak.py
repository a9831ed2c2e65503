"""Logit leak: exact hidden sizes on random models, the projection up to a linear map, the bias trick."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from attacks import get_attack
from attacks.logit_leak import (
    bias_queries_per_prompt,
    estimate_hidden_size,
    hidden_size_report,
    logprobs_to_logit_differences,
    projection_error,
    query_until_rank_found,
    random_prompts,
    recover_logits_with_bias,
    recover_output_projection,
    subspace_geometry,
)
from secure_kd.api import ModelAPI

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "attacks" / "logit_leak.yaml"
VOCAB = 384


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy shared CPU spinning threads cost a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("hidden", [16, 32, 48])
def test_hidden_size_is_exact_for_rmsnorm_models(tiny_llama, hidden):
    model = tiny_llama(vocab=VOCAB, hidden=hidden, layers=1, heads=2, seed=hidden)
    api = ModelAPI(model)
    logits = api.full_logits_batch(random_prompts(hidden + 20, 6, VOCAB, seed=hidden))
    assert estimate_hidden_size(logits) == hidden
    logprobs = torch.log_softmax(logits, dim=-1)
    assert estimate_hidden_size(logprobs_to_logit_differences(logprobs, ref_token=7)) == hidden
    # Raw log-probs carry -log Z on every token: the all-ones direction adds one dimension.
    assert estimate_hidden_size(logprobs) == hidden + 1
    report = hidden_size_report(logits)
    assert report["gap_index"] == hidden - 1 and len(report["singular_values"]) == hidden + 20
    assert report["gap_size"] > 3  # float32 noise sits several decades below the signal


class NormHeadLM(nn.Module):
    """Embedding -> causal mixing MLP blocks -> final LayerNorm -> bias-free output projection."""

    def __init__(self, vocab: int, hidden: int, *, norm_bias: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
            for _ in range(2)
        )
        self.norm = nn.LayerNorm(hidden, bias=norm_bias)
        self.head = nn.Linear(hidden, vocab, bias=False)
        with torch.no_grad():  # a non-trivial gain (and bias), as a trained model would have
            self.norm.weight.uniform_(0.5, 1.5)
            if norm_bias:
                self.norm.bias.normal_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            prefix_mean = x.cumsum(1) / torch.arange(1, x.shape[1] + 1).view(1, -1, 1)
            x = x + block(prefix_mean)
        return self.head(self.norm(x))[:, -1]


@torch.no_grad()
def test_layernorm_without_bias_gives_h_minus_one():
    hidden, vocab = 24, 256
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (hidden + 20, 5))
    # LayerNorm subtracts the mean of x before the gain: every normalized x is orthogonal to the
    # all-ones vector, so the hidden states (and the logits W (g * x)) span only h - 1 dimensions.
    assert estimate_hidden_size(NormHeadLM(vocab, hidden, norm_bias=False)(ids)) == hidden - 1
    # A bias adds back one fixed direction W b: the span is h again.
    assert estimate_hidden_size(NormHeadLM(vocab, hidden, norm_bias=True)(ids)) == hidden


def test_recovered_projection_spans_the_true_output_layer(tiny_llama):
    model = tiny_llama(vocab=VOCAB, hidden=32, layers=2, heads=2, seed=5)
    logits = ModelAPI(model).full_logits_batch(random_prompts(52, 6, VOCAB, seed=1))
    recovered = recover_output_projection(logits)
    true_weight = model.lm_head.weight
    assert recovered.shape == (VOCAB, 32)
    assert projection_error(recovered, true_weight) < 1e-3
    random_matrix = torch.randn(VOCAB, 32, generator=torch.Generator().manual_seed(0))
    assert projection_error(random_matrix, true_weight) > 0.5
    geometry = subspace_geometry(recovered, true_weight)
    assert geometry["max_principal_angle_deg"] < 0.5
    assert geometry["mean_cos2"] == pytest.approx(1.0, abs=1e-6)


def test_projection_error_and_geometry_on_hand_computed_cases():
    # recovered = e1 in R^3, W = (1, 1, 0): the best multiple of e1 leaves (0, 1, 0): error 1/sqrt(2).
    e1 = torch.tensor([[1.0], [0.0], [0.0]])
    w = torch.tensor([[1.0], [1.0], [0.0]])
    assert projection_error(e1, w) == pytest.approx(1 / math.sqrt(2))
    geometry = subspace_geometry(e1, w)
    assert geometry["principal_angles_deg"] == pytest.approx([45.0])
    # Any invertible map of W has the same column space: zero error, zero angles.
    g = torch.randn(6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 3 * torch.eye(6)
    big = torch.randn(40, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert projection_error(big @ g, big) < 1e-10
    assert subspace_geometry(big @ g, big)["max_principal_angle_deg"] < 1e-5
    # Linear CKA is invariant to an orthogonal map, not to a general one.
    q = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)).Q
    assert subspace_geometry(big @ q, big)["linear_cka"] == pytest.approx(1.0)
    assert subspace_geometry(big @ g, big)["linear_cka"] < 0.999
    with pytest.raises(ValueError, match="same vocabulary"):
        projection_error(big, torch.randn(41, 6))


@pytest.mark.parametrize(("vocab", "top_k", "expected"), [(97, 5, 24), (64, 4, 21), (64, 2, 63)])
def test_bias_trick_recovers_exact_differences_with_the_formula_count(tiny_llama, vocab, top_k, expected):
    model = tiny_llama(vocab=vocab, hidden=16, layers=1, heads=2, seed=vocab)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # a peaked distribution: most tokens far outside the top-k
    api = ModelAPI(model, view="topk_logprobs_bias", top_k=top_k)
    prompt = [3, 14, 15, 9]
    recovered = recover_logits_with_bias(api, prompt, vocab, ref_token=11)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
    torch.testing.assert_close(recovered.double(), logits - logits[11], atol=1e-4, rtol=0)
    assert api.queries == expected == bias_queries_per_prompt(vocab, top_k)
    with pytest.raises(RuntimeError, match="did not bring"):
        recover_logits_with_bias(api, prompt, vocab, ref_token=11, bias=0.01)


def test_bias_trick_differences_give_the_hidden_size(tiny_llama):
    model = tiny_llama(vocab=96, hidden=16, layers=1, heads=2, seed=4)
    api = ModelAPI(model, view="topk_logprobs_bias", top_k=6)
    logits, report = query_until_rank_found(api, random_prompts(200, 5, 96, seed=0), step=4, margin=4)
    assert report["h"] == 16
    assert 20 <= logits.shape[0] <= 24  # stops within one step of h + margin
    assert api.queries == logits.shape[0] * math.ceil(95 / 5)


def test_bad_inputs_are_rejected_with_the_fix():
    with pytest.raises(ValueError, match=r"\[n_queries, vocab\]"):
        estimate_hidden_size(torch.randn(10))
    with pytest.raises(ValueError, match="NaN"):
        estimate_hidden_size(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="ref_token"):
        logprobs_to_logit_differences(torch.randn(3, 5), ref_token=5)
    with pytest.raises(ValueError, match="h must be"):
        recover_output_projection(torch.randn(4, 10), h=5)
    with pytest.raises(ValueError, match="top_k >= 2"):
        bias_queries_per_prompt(100, 1)


def test_plugin_runs_from_the_example_config(tmp_path):
    plugin = get_attack("logit_leak")
    data = yaml.safe_load(CONFIG.read_text())
    data["out"] = str(tmp_path / "full")
    result = plugin.run(plugin.Config.model_validate(data))
    assert result.estimated_hidden_size == result.true_hidden_size == 48
    assert result.correct and result.projection_error < 1e-3 < 0.5 < result.random_projection_error
    assert 48 + data["margin"] <= result.prompts_used <= 48 + data["margin"] + data["step"]
    assert result.queries_used == result.prompts_used
    written = json.loads((tmp_path / "full" / "results.json").read_text())
    assert written["estimated_hidden_size"] == 48 and "schema_version" in written

    data.update(
        out=str(tmp_path / "bias"),
        view="topk_logprobs_bias",
        top_k=8,
        n_queries=60,
        victim={
            "source": "tiny",
            "tiny": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "vocab_size": 120},
        },
    )
    result = plugin.run(plugin.Config.model_validate(data))
    assert result.estimated_hidden_size == 16
    assert result.queries_per_prompt == 17 and result.queries_used == 60 * 17


def test_logit_bias_recovery_is_scored_against_the_span_of_logit_differences(tmp_path):
    """The bias view returns logit[t] - logit[ref]: it spans W - 1 w_ref^T, and an exact recovery of it
    scores ~0 degrees there (scored against W itself it read as a large-angle failure)."""
    plugin = get_attack("logit_leak")
    tiny = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "vocab_size": 96}
    config = plugin.Config(
        out=str(tmp_path),
        device="cpu",
        view="topk_logprobs_bias",
        top_k=6,
        n_queries=40,
        ref_token=3,
        victim={"source": "tiny", "tiny": tiny},
    )
    result = plugin.run(config)
    assert result.estimated_hidden_size == 16
    assert result.geometry["max_principal_angle_deg"] < 0.5
    assert result.projection_error < 1e-3 < 0.5 < result.random_projection_error
    assert "ref_token 3" in result.scored_against
    # independent check of the target: rebuild the victim, form W - 1 w_ref^T by hand, and compare the
    # recovered span of a fresh set of exact differences (the model's own logits) with it
    from apparatus.victims import load_victim

    model, _ = load_victim(config.victim, seed=0, device=torch.device("cpu"))
    weight = model.lm_head.weight.detach().double()
    by_hand = weight - weight[3]
    with torch.no_grad():
        logits = ModelAPI(model).full_logits_batch(random_prompts(40, 8, 96, seed=9)).double()
    exact = recover_output_projection(logits - logits[:, 3:4], 16)
    assert subspace_geometry(exact, by_hand)["max_principal_angle_deg"] < 1e-3
    assert subspace_geometry(exact, weight)["max_principal_angle_deg"] > 30  # the wrong target
    random_matrix = torch.randn(96, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert subspace_geometry(random_matrix, by_hand)["max_principal_angle_deg"] > 60
