"""FGSM, PGD and Carlini-Wagner L2: exact steps on a linear model, bounds, monotonicity, CW vs FGSM norms,
agreement with adversarial-robustness-toolbox (skipped without it), and the plugin from its config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError
from torch import nn

from apparatus.classifiers import train_classifier
from apparatus.digits import load_digits_data, make_digits_cnn
from attacks import get_attack
from attacks.adversarial import attack_stats, carlini_wagner_l2, fgsm, pgd

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "attacks" / "adversarial.yaml"
EPS = (0.03, 0.1, 0.2, 0.3)


@pytest.fixture(scope="module")
def setup():
    data = load_digits_data(0.25, seed=0)
    model = make_digits_cnn(16, seed=0)
    train_classifier(model, data.train, epochs=10, lr=3e-3, seed=0)
    return model, data.x_test[:120], data.y_test[:120]


def test_fgsm_on_a_linear_model_moves_each_pixel_by_eps_along_the_known_sign() -> None:
    # two classes, logits W x: for true class 0 the CE gradient is p_1 (W_1 - W_0), so its sign is
    # sign(W_1 - W_0) wherever the two rows differ
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2, bias=False))
    x, y = torch.full((1, 1, 8, 8), 0.5), torch.tensor([0])
    direction = torch.sign(model[1].weight[1] - model[1].weight[0]).detach().reshape(1, 1, 8, 8)
    torch.testing.assert_close(fgsm(model, x, y, 0.1), (0.5 + 0.1 * direction).float())
    # at the box edge the step is clipped: x = 0.95 can only go up to 1.0
    high = fgsm(model, torch.full((1, 1, 8, 8), 0.95), y, 0.1)
    assert float(high.max()) == 1.0
    torch.testing.assert_close(high[direction < 0], torch.full_like(high[direction < 0], 0.85))


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_perturbations_stay_in_the_eps_ball_and_the_box(setup, attack) -> None:
    model, x, y = setup
    for eps in EPS:
        x_adv = fgsm(model, x, y, eps) if attack == "fgsm" else pgd(model, x, y, eps, steps=10)
        assert bool((x_adv <= x + eps).all()) and bool((x_adv >= x - eps).all())
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
        assert float((x_adv.double() - x.double()).abs().max()) <= eps + 1e-6


def test_success_grows_with_eps_and_pgd_is_at_least_fgsm(setup) -> None:
    model, x, y = setup
    fgsm_rates = [attack_stats(model, x, y, fgsm(model, x, y, eps), "fgsm", eps).success_rate for eps in EPS]
    pgd_rates = [
        attack_stats(model, x, y, pgd(model, x, y, eps, steps=10), "pgd", eps).success_rate for eps in EPS
    ]
    for rates in (fgsm_rates, pgd_rates):
        assert rates == sorted(rates) and rates[-1] - rates[0] > 0.5, rates
    assert all(p >= f for p, f in zip(pgd_rates, fgsm_rates, strict=True)), (pgd_rates, fgsm_rates)
    assert pgd_rates[-1] > 0.95


def test_cw_finds_smaller_l2_perturbations_than_fgsm(setup) -> None:
    model, x, y = setup
    x, y = x[:30], y[:30]
    x_cw = carlini_wagner_l2(model, x, y, binary_search_steps=3, max_iter=30)
    cw = attack_stats(model, x, y, x_cw, "cw", None)
    fast = attack_stats(model, x, y, fgsm(model, x, y, 0.2), "fgsm", 0.2)
    assert cw.success_rate > 0.9
    assert cw.mean_l2 < fast.mean_l2, (cw.mean_l2, fast.mean_l2)
    assert float(x_cw.min()) >= 0.0 and float(x_cw.max()) <= 1.0
    # failed examples come back unchanged
    fooled = model(x_cw).argmax(-1) != y
    assert torch.equal(x_cw[~fooled], x[~fooled])


def test_attacks_reject_bad_input(setup) -> None:
    model, x, y = setup
    with pytest.raises(ValueError, match="eps must be"):
        fgsm(model, x, y, -0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pgd(model, x * 255, y, 0.1)
    with pytest.raises(ValueError, match="labels"):
        fgsm(model, x, y[:3], 0.1)
    with pytest.raises(ValueError, match="steps"):
        pgd(model, x, y, 0.1, steps=0)
    with pytest.raises(ValueError, match="initial_const"):
        carlini_wagner_l2(model, x, y, initial_const=0.0)


def test_agrees_with_adversarial_robustness_toolbox(setup) -> None:
    pytest.importorskip(
        "art",
        reason="adversarial-robustness-toolbox is not installed (pip install "
        "adversarial-robustness-toolbox, or the project's dev extras); the ART cross-check is skipped",
    )
    from art.attacks.evasion import CarliniL2Method, FastGradientMethod, ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    model, x, y = setup
    classifier = PyTorchClassifier(
        model=model, loss=nn.CrossEntropyLoss(), input_shape=(1, 8, 8), nb_classes=10, clip_values=(0.0, 1.0)
    )
    xn, yn = x.numpy(), y.numpy()

    def rate(x_adv, name) -> float:
        return attack_stats(model, x, y, torch.as_tensor(x_adv), name, None).success_rate

    for eps in (0.1, 0.2):
        ours_fgsm = fgsm(model, x, y, eps)
        art_fgsm = FastGradientMethod(classifier, eps=eps).generate(xn, y=yn)
        assert float(np.abs(ours_fgsm.numpy() - art_fgsm).max()) < 1e-6  # the same deterministic step
        art_pgd = ProjectedGradientDescent(
            classifier,
            norm=np.inf,
            eps=eps,
            eps_step=2.5 * eps / 10,
            max_iter=10,
            num_random_init=1,
            verbose=False,
        ).generate(xn, y=yn)
        assert abs(rate(pgd(model, x, y, eps, steps=10), "pgd") - rate(art_pgd, "pgd")) <= 0.05
    # CW: ART's line-search solver is slow on CPU, so it gets few examples and iterations
    xs, ys = x[:12], y[:12]
    art_cw = CarliniL2Method(
        classifier,
        initial_const=1.0,
        binary_search_steps=2,
        max_iter=10,
        learning_rate=0.05,
        max_halving=3,
        max_doubling=3,
        batch_size=12,
        verbose=False,
    ).generate(xs.numpy(), y=ys.numpy())
    ours_cw = carlini_wagner_l2(model, xs, ys, binary_search_steps=3, max_iter=30)
    ours = attack_stats(model, xs, ys, ours_cw, "cw", None)
    theirs = attack_stats(model, xs, ys, torch.as_tensor(art_cw), "cw", None)
    assert abs(ours.success_rate - theirs.success_rate) <= 0.1, (ours, theirs)
    assert ours.mean_l2 <= 1.25 * theirs.mean_l2, (ours.mean_l2, theirs.mean_l2)


def _example_config(tmp_path: Path, **overrides):
    data = yaml.safe_load(CONFIG.read_text())
    data.update(out=str(tmp_path / "run"), device="cpu", epochs=8, n_examples=100, **overrides)
    return get_attack("adversarial").Config.model_validate(data)


def test_plugin_runs_from_the_example_config_and_reloads_its_model(tmp_path) -> None:
    plugin = get_attack("adversarial")
    result = plugin.run(_example_config(tmp_path))
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["attack"] == "pgd" and [r["eps"] for r in written["results"]] == [0.05, 0.1, 0.2]
    rates = [r.success_rate for r in result.results]
    assert rates == sorted(rates) and result.clean_accuracy > 0.9
    again = plugin.run(_example_config(tmp_path / "second", attack="fgsm", eps=0.1, model=result.model_dir))
    assert again.clean_accuracy == result.clean_accuracy and again.model_source == result.model_dir
    assert len(again.results) == 1 and again.results[0].eps == 0.1


def test_plugin_config_rejects_bad_values(tmp_path) -> None:
    with pytest.raises(ValidationError, match="neither 'train' nor a directory"):
        _example_config(tmp_path, model=str(tmp_path / "nowhere"))
    with pytest.raises(ValidationError, match=r"eps values must be in \[0, 1\]"):
        _example_config(tmp_path, eps=[0.1, 2.0])
    with pytest.raises(ValidationError):
        _example_config(tmp_path, attack="deepfool")
