"""Membership inference: loss attack, LiRA and RMIA scores, shadow training and the `membership` plugin."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError
from sklearn.metrics import roc_auc_score

from apparatus.tiny_lm import (
    TrainRecipe,
    build_model,
    example_losses,
    resolve_tokenizer,
    tokenize_texts,
    train_causal_lm,
)
from attacks import get_attack
from attacks.membership import (
    MembershipConfig,
    balanced_membership,
    lira_scores,
    logit_confidence,
    loss_attack_scores,
    rmia_scores,
    train_shadows,
    tune_offline_a,
)
from secure_kd import metrics
from secure_kd.config import TinyModelConfig
from secure_kd.data import generate_corpus

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "attacks" / "membership.yaml"
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models run several times faster on one intra-op thread than on two contended ones.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _auc(scores: np.ndarray, is_member: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few non-members: the low-FPR warning is expected here
        return metrics.roc_metrics(scores, is_member)["auc"]


def _loss_from_confidence(phi: np.ndarray) -> np.ndarray:
    """The mean NLL whose logit-scaled confidence is phi: p = sigmoid(phi), loss = -log p."""
    return np.log1p(np.exp(-np.asarray(phi, dtype=np.float64)))


# --------------------------------------------------------------------------- score functions


def test_logit_confidence_is_log_odds_of_the_geometric_mean_probability():
    losses = np.array([0.05, 0.7, 3.0])
    p = np.exp(-losses)
    np.testing.assert_allclose(logit_confidence(losses), np.log(p) - np.log(1 - p), rtol=1e-12)
    np.testing.assert_allclose(logit_confidence(_loss_from_confidence([-2.0, 0.0, 4.0])), [-2.0, 0.0, 4.0])


def test_lira_matches_hand_computed_gaussian_tests():
    # One example; OUT shadows at phi 0 and 2 (mean 1, sample variance 2); IN shadows at 4 and 6
    # (mean 5, variance 2); the target's phi is 4.
    reference = _loss_from_confidence([[0.0, 2.0, 4.0, 6.0]])
    reference_in = np.array([[False, False, True, True]])
    target = _loss_from_confidence([4.0])
    offline = lira_scores(target, reference, reference_in, online=False, fixed_variance=False)
    assert offline[0] == pytest.approx((4.0 - 1.0) / math.sqrt(2.0))
    online = lira_scores(target, reference, reference_in, online=True, fixed_variance=False)
    # log N(4; 5, 2) - log N(4; 1, 2) = -(1)^2/4 + (3)^2/4 = 2
    assert online[0] == pytest.approx(2.0)


def test_lira_fixed_variance_pools_the_per_example_variances():
    reference = _loss_from_confidence([[0.0, 2.0, 9.0, 9.0], [1.0, 5.0, 9.0, 9.0]])
    reference_in = np.array([[False, False, True, True], [False, False, True, True]])
    target = _loss_from_confidence([3.0, 3.0])
    scores = lira_scores(target, reference, reference_in, online=False, fixed_variance=True)
    pooled_sigma = math.sqrt((2.0 + 8.0) / 2)  # sample variances 2 and 8
    np.testing.assert_allclose(scores, [(3.0 - 1.0) / pooled_sigma, (3.0 - 3.0) / pooled_sigma])


def test_rmia_matches_a_direct_pairwise_count():
    rng = np.random.default_rng(0)
    n, n_z, n_models = 7, 11, 4
    reference = rng.uniform(0.2, 3.0, (n, n_models))
    reference_in = balanced_membership(n, n_models, seed=1)
    target, z_target = rng.uniform(0.2, 3.0, n), rng.uniform(0.2, 3.0, n_z)
    z_reference = rng.uniform(0.2, 3.0, (n_z, n_models))
    a, gamma, k = 0.4, 1.3, 2
    scores = rmia_scores(
        target, reference, reference_in, z_target, z_reference, n_references=k, offline_a=a, gamma=gamma
    )
    expected = []
    for i in range(n):
        out_models = [j for j in range(n_models) if not reference_in[i, j]][:k]
        pr_x = (1 + a) / 2 * np.mean([math.exp(-reference[i, j]) for j in out_models]) + (1 - a) / 2
        wins = 0
        for z in range(n_z):
            pr_z = (1 + a) / 2 * np.mean(np.exp(-z_reference[z])) + (1 - a) / 2
            likelihood_ratio = (math.exp(-target[i]) / pr_x) / (math.exp(-z_target[z]) / pr_z)
            wins += likelihood_ratio >= gamma
        expected.append(wins / n_z)
    np.testing.assert_allclose(scores, expected)


def test_score_functions_refuse_bad_inputs():
    reference_in = np.array([[True, False], [False, True]])
    with pytest.raises(ValueError, match="non-negative"):
        loss_attack_scores(np.array([0.5, -1.0]))
    with pytest.raises(ValueError, match="boolean"):
        lira_scores(np.ones(2), np.ones((2, 2)), reference_in.astype(int), online=False, fixed_variance=False)
    with pytest.raises(ValueError, match="at least 2"):
        lira_scores(np.ones(2), np.ones((2, 2)), reference_in, online=False, fixed_variance=False)
    with pytest.raises(ValueError, match="n_references"):
        rmia_scores(np.ones(2), np.ones((2, 2)), reference_in, np.ones(3), np.ones((3, 2)), n_references=2)


def test_balanced_membership_puts_every_example_in_half_the_models():
    keep = balanced_membership(50, 8, seed=3)
    assert keep.shape == (50, 8) and (keep.sum(axis=1) == 4).all()
    assert not (keep == balanced_membership(50, 8, seed=4)).all()
    with pytest.raises(ValueError, match="even"):
        balanced_membership(10, 3, seed=0)


def test_config_refuses_too_few_shadows_for_online_lira():
    with pytest.raises(ValidationError, match="n_shadows >= 16"):
        MembershipConfig(attacks=["lira_online"], n_shadows=8)
    with pytest.raises(ValidationError, match="even"):
        MembershipConfig(attacks=["lira_offline"], n_shadows=5)


# --------------------------------------------------------------------------- real models


def test_loss_attack_is_at_chance_on_data_the_model_never_saw_and_matches_sklearn():
    texts = generate_corpus(1000, seed=21, n_canaries=0).texts()
    tokenizer = resolve_tokenizer("tiny:400", generate_corpus(100, seed=22, n_canaries=0).texts())
    examples = tokenize_texts(texts, tokenizer, 32)
    model = build_model(
        TrainRecipe(model=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2)),
        len(tokenizer),
        seed=0,
        pad_id=0,
    )
    losses = example_losses(model, examples, pad_id=0, device=CPU)
    is_member = np.arange(len(texts)) < 500  # an arbitrary half: the model saw neither half
    auc = _auc(loss_attack_scores(losses), is_member)
    assert auc == pytest.approx(roc_auc_score(is_member, -losses), abs=1e-12)
    assert abs(auc - 0.5) < 0.07


@pytest.fixture(scope="module")
def shadow_setting():
    """128 members + 128 non-members, 128 population samples, 8 shadows, and two targets trained like
    the shadows: one on the members (overfit), one on 128 other records (it never saw the pool)."""
    torch.set_num_threads(1)
    n = 128
    texts = generate_corpus(4 * n, seed=11, n_canaries=0).texts()
    tokenizer = resolve_tokenizer("tiny:512", generate_corpus(200, seed=99, n_canaries=0).texts())
    members, nonmembers, population, other = (
        tokenize_texts(texts[i * n : (i + 1) * n], tokenizer, 32) for i in range(4)
    )
    pool = members + nonmembers
    recipe = TrainRecipe(
        model=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2), epochs=10, batch_size=64, lr=1e-2
    )
    keep = balanced_membership(len(pool), 8, seed=0)
    shadow_losses, population_shadow = train_shadows(
        pool, population, keep, recipe, vocab_size=len(tokenizer), pad_id=0, seed=0, device=CPU
    )
    targets = {}
    for name, data in (("overfit", members), ("independent", other)):
        model = build_model(recipe, len(tokenizer), seed=77, pad_id=0)
        train_causal_lm(model, data, recipe, pad_id=0, seed=77, device=CPU)
        targets[name] = (
            example_losses(model, pool, pad_id=0, device=CPU),
            example_losses(model, population, pad_id=0, device=CPU),
        )
    is_member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    return keep, shadow_losses, population_shadow, targets, is_member


def _all_attack_aucs(setting, target: str) -> dict[str, float]:
    keep, shadow_losses, population_shadow, targets, is_member = setting
    losses, population_losses = targets[target]
    a, _ = tune_offline_a(shadow_losses, keep, population_shadow, n_references=2)
    scores = {
        "loss": loss_attack_scores(losses),
        "lira_offline": lira_scores(losses, shadow_losses, keep, online=False, fixed_variance=True),
        "lira_online": lira_scores(losses, shadow_losses, keep, online=True, fixed_variance=True),
        "rmia": rmia_scores(
            losses, shadow_losses, keep, population_losses, population_shadow, n_references=2, offline_a=a
        ),
        "rmia_online": rmia_scores(
            losses, shadow_losses, keep, population_losses, population_shadow, n_references=2, online=True
        ),
    }
    aucs = {name: _auc(values, is_member) for name, values in scores.items()}
    assert aucs["loss"] == pytest.approx(roc_auc_score(is_member, -losses), abs=1e-12)
    return aucs


def test_every_attack_detects_the_members_of_an_overfit_target(shadow_setting):
    aucs = _all_attack_aucs(shadow_setting, "overfit")
    assert min(aucs.values()) > 0.7, aucs


def test_shadow_attacks_are_at_chance_for_a_target_that_never_saw_the_pool(shadow_setting):
    aucs = _all_attack_aucs(shadow_setting, "independent")
    # 128 vs 128: the AUC of a score unrelated to membership has a standard deviation of about 0.036.
    assert all(abs(auc - 0.5) < 0.1 for auc in aucs.values()), aucs


def test_membership_plugin_runs_from_the_example_config(tmp_path):
    plugin = get_attack("membership")
    raw = yaml.safe_load(CONFIG.read_text())
    raw["out"] = str(tmp_path / "membership")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = plugin.run(plugin.Config.model_validate(raw))
    assert any("non-members" in str(w.message) for w in caught)  # 32 non-members are too few for 0.1% FPR
    written = json.loads((tmp_path / "membership" / "results.json").read_text())
    assert written["kind"] == "membership" and "schema_version" in written
    assert [a["attack"] for a in written["attacks"]] == [
        "loss",
        "lira_offline",
        "lira_online",
        "rmia",
        "rmia_online",
    ]
    assert result.mean_loss_members < result.mean_loss_nonmembers
    for report in result.attacks:
        assert report.auc > 0.7, report.attack
        assert report.roc_fpr[0] == 0.0 and report.roc_fpr[-1] == 1.0 and report.roc_tpr[-1] == 1.0
        assert set(report.tpr_at_fpr) == {0.001, 0.01}
