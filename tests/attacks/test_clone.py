"""Cloning through the API: the recovered unembedding helps, and every query is paid for."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from attacks import get_attack
from attacks.clone import text_chunks
from secure_kd.api import QueryBudgetExceeded
from secure_kd.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "attacks" / "clone.yaml"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy shared CPU spinning threads cost a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def example_config(tmp_path: Path, **changes) -> dict:
    data = yaml.safe_load(CONFIG.read_text())
    data.update(out=str(tmp_path), **changes)
    return data


def small_victim(hidden: int = 16, vocab: int = 64) -> dict:
    tiny = {"hidden_size": hidden, "num_layers": 1, "num_heads": 2, "vocab_size": vocab}
    return {"source": "tiny", "tiny": tiny}


def test_recovered_unembedding_beats_random_init_at_the_same_steps(tmp_path):
    plugin = get_attack("clone")
    config = plugin.Config.model_validate(example_config(tmp_path, compare_text_only=False))
    result = plugin.run(config)
    clone, random_init = result.variants
    assert (clone.name, random_init.name) == ("clone", "random_init")
    assert clone.recovered["estimated_hidden_size"] == result.victim_hidden_size == 32
    assert clone.recovered["projection_error"] < 1e-3
    assert clone.student_hidden_size == random_init.student_hidden_size == 32
    # Same data, same steps, same schedule: only the unembedding's start differs. Measured over
    # seeds 0-5: agreement 0.58-0.60 vs 0.47-0.51, held-out KL about 0.7 vs 2.0.
    assert clone.top1_agreement > random_init.top1_agreement + 0.03
    assert clone.mean_forward_kl < 0.6 * random_init.mean_forward_kl
    assert clone.perplexity_gap < random_init.perplexity_gap
    length = config.prompts.length
    for variant in (clone, random_init):
        assert variant.queries_for_distillation == variant.train_sequences * (length - 1)
        assert variant.queries_used == variant.queries_for_recovery + variant.queries_for_distillation
        assert variant.queries_used <= config.query_budget
    assert clone.queries_for_recovery == clone.recovered["prompts"] and random_init.queries_for_recovery == 0
    written = json.loads((tmp_path / "results.json").read_text())
    assert [v["name"] for v in written["variants"]] == ["clone", "random_init"]


def test_text_only_clone_pays_one_query_per_sample(tmp_path):
    plugin = get_attack("clone")
    data = example_config(
        tmp_path,
        victim=small_victim(),
        access="text",
        query_budget=20,
        cost_per_query=0.5,
        student={"hidden_size": 16, "num_layers": 1, "num_heads": 2, "init": "random"},
        prompts={"source": "random", "n_train": 8, "n_heldout": 4, "length": 8},
        train={"steps": 3, "batch_size": 8, "lr": 1e-3},
        compare_random_init=False,
        compare_text_only=False,
    )
    (variant,) = plugin.run(plugin.Config.model_validate(data)).variants
    assert variant.access == "text" and variant.recovered is None
    assert variant.queries_used == variant.train_sequences == 20  # the budget, below steps * batch_size
    assert variant.cost == pytest.approx(10.0)


def test_topk_with_logit_bias_recovers_then_distils_on_topk_answers(tmp_path):
    plugin = get_attack("clone")
    data = example_config(
        tmp_path,
        victim=small_victim(hidden=16, vocab=64),
        access="topk_logprobs_bias",
        top_k=8,
        query_budget=400,
        prompts={"source": "random", "n_train": 6, "n_heldout": 4, "length": 8},
        recovery={"max_prompts": 64, "step": 4, "margin": 4, "prompt_length": 6},
        train={"steps": 2, "batch_size": 4, "lr": 1e-3},
        compare_random_init=False,
        compare_text_only=False,
    )
    (variant,) = plugin.run(plugin.Config.model_validate(data)).variants
    assert variant.recovered["estimated_hidden_size"] == 16
    assert variant.queries_for_recovery == variant.recovered["prompts"] * 9  # ceil(63 / 7) per prompt
    assert variant.train_sequences == 6 and variant.queries_for_distillation == 6 * 7


def test_a_budget_below_the_recovery_cost_stops_the_attack(tmp_path):
    plugin = get_attack("clone")
    data = example_config(
        tmp_path,
        query_budget=20,
        compare_random_init=False,
        compare_text_only=False,
        prompts={"source": "random", "n_train": 4, "n_heldout": 4, "length": 8},
    )
    with pytest.raises(QueryBudgetExceeded, match="max_queries=20"):
        plugin.run(plugin.Config.model_validate(data))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"access": "text"}, "does not reveal the output layer"),
        ({"access": "topk_logprobs"}, "does not reveal the output layer"),
        ({"student": {"init": "random"}}, "student.hidden_size is required"),
        ({"loss": "kl_typo"}, "unknown loss"),
        ({"loss": "ce"}, "does not compare the student with teacher logits"),
        ({"text": {"prompt_tokens": 16}}, "must be below prompts.length"),
        ({"prompts": {"source": "no/such/file.jsonl"}}, "not 'victim_samples'"),
    ],
)
def test_inconsistent_configs_are_rejected(tmp_path, changes, message):
    with pytest.raises(ValidationError, match=message):
        get_attack("clone").Config.model_validate(example_config(tmp_path, **changes))


def test_the_smollm2_experiment_config_validates(monkeypatch):
    # Loaded from its file: the installed opacus ships a top-level package named `benchmarks`.
    path = ROOT / "benchmarks" / "experiments" / "clone_smollm2.py"
    spec = importlib.util.spec_from_file_location("clone_smollm2_experiment", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # pydantic resolves annotations through it
    spec.loader.exec_module(module)
    experiment = ROOT / "configs" / "experiments" / "clone_smollm2.yaml"
    config = load_config(experiment, model=module.ExperimentConfig)
    assert config.victim.source == "smollm2"
    assert 576 + 1 in config.hidden_size.sweep
    steps, batch = config.clone.train.steps, config.clone.train.batch_size
    assert steps * batch >= max(config.clone.budgets)  # text-only stays budget-limited


def test_text_prompt_sets_keep_heldout_records_apart():
    def char_tokenizer(text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) for c in text]}

    texts = [letter * 20 for letter in "abcdef"]  # 2 chunks of 8 tokens per record
    train, heldout = text_chunks(texts, char_tokenizer, 8, (3, 2), seed=0)
    assert len(train) == 3 and len(heldout) == 2
    assert all(len(chunk) == 8 and len(set(chunk)) == 1 for chunk in train + heldout)
    assert {chunk[0] for chunk in train}.isdisjoint({chunk[0] for chunk in heldout})
    with pytest.raises(ValueError, match="too few chunks"):
        text_chunks(texts, char_tokenizer, 8, (8, 8), seed=0)
