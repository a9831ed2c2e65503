"""FIRST calibration (hand-computed ECE, fitted T) and the teacher-hacking monitor."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from defenses.trustworthy_students import (
    TrustworthyConfig,
    calibration_report,
    fit_temperature,
    renormalized_topk,
    temperature_nll,
)
from secure_kd.teacher_hacking import TeacherHackingMonitor


def test_ece_before_and_after_temperature_by_hand():
    # binary: p(class 1) = 0.9, 0.9, 0.6, 0.6; correct, wrong, correct, correct
    logits = torch.tensor(
        [[0.0, math.log(9)], [0.0, math.log(9)], [0.0, math.log(1.5)], [0.0, math.log(1.5)]]
    )
    labels = torch.tensor([1, 0, 1, 1])
    # bins of width 0.1: {0.9, 0.9} accuracy 0.5, {0.6, 0.6} accuracy 1 -> (0.4 + 0.4) / 2
    assert calibration_report(logits, labels, 1.0, n_bins=10)["ece"] == pytest.approx(0.4)
    # T = 2: 0.9 -> sigmoid(ln 9 / 2) = 0.75, 0.6 -> sqrt(1.5) / (1 + sqrt(1.5)) = 0.55051
    low = math.sqrt(1.5) / (1 + math.sqrt(1.5))
    expected = 0.5 * abs(0.5 - 0.75) + 0.5 * abs(1.0 - low)
    assert calibration_report(logits, labels, 2.0, n_bins=10)["ece"] == pytest.approx(expected)


def _loop_ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> float:
    """Reference ECE written as a per-example loop (Guo et al. 2017)."""
    sums = [[0.0, 0.0, 0] for _ in range(n_bins)]
    for row, label in zip(probs.tolist(), labels.tolist(), strict=True):
        confidence = max(row)
        m = min(max(math.ceil(confidence * n_bins) - 1, 0), n_bins - 1)
        sums[m][0] += confidence
        sums[m][1] += float(row.index(confidence) == label)
        sums[m][2] += 1
    return sum(abs(c - a) for c, a, n in sums if n) / len(labels)


def test_temperature_scaling_fixes_an_overconfident_model():
    g = torch.Generator().manual_seed(0)
    true_logits = 1.5 * torch.randn(4000, 10, generator=g)
    labels = torch.multinomial(torch.softmax(true_logits, -1), 1, generator=g).squeeze(1)
    overconfident = 3.0 * true_logits
    t = fit_temperature(overconfident[:2000], labels[:2000])
    assert t > 1 and t == pytest.approx(3.0, rel=0.1)
    nll = temperature_nll(overconfident[:2000], labels[:2000], t)
    assert nll <= temperature_nll(overconfident[:2000], labels[:2000], t * 1.05)
    assert nll <= temperature_nll(overconfident[:2000], labels[:2000], t / 1.05)
    before = calibration_report(overconfident[2000:], labels[2000:], 1.0)
    after = calibration_report(overconfident[2000:], labels[2000:], t)
    assert after["ece"] < before["ece"] / 3
    probs = torch.softmax(overconfident[2000:].double() / t, -1)
    assert after["ece"] == pytest.approx(_loop_ece(probs, labels[2000:], 15), abs=1e-9)


def test_renormalized_topk_by_hand():
    top = renormalized_topk(torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0]), k=2, temperature=2.0)
    assert top.indices.tolist() == [3, 2]
    norm = math.log(math.exp(2.0) + math.exp(1.5))
    assert top.values.tolist() == pytest.approx([2.0 - norm, 1.5 - norm])
    assert float(top.values.exp().sum()) == pytest.approx(1.0)


def _feed(monitor, proxies, goldens):
    for i, (p, g) in enumerate(zip(proxies, goldens, strict=True)):
        monitor.update(10 * i, p, g)
    return monitor


def test_monitor_flags_at_the_third_consecutive_hacking_evaluation():
    proxy = [5, 4, 3, 2, 1, 0.5, 0.4, 0.3]
    golden = [3, 2, 1.5, 1.4, 1.6, 1.8, 2.0, 2.2]  # worsens from evaluation 4 (step 40) on
    monitor = _feed(TeacherHackingMonitor(patience=3), proxy, golden)
    assert [p.hacking for p in monitor.history] == [False] * 4 + [True] * 4
    assert monitor.flagged and monitor.flagged_at_step == 60


def test_monitor_never_flags_improving_or_interrupted_curves():
    improving = _feed(TeacherHackingMonitor(patience=1), [5, 4, 3, 2, 1], [3, 2.5, 2, 1.9, 1.8])
    assert not improving.flagged
    # hacking, hacking, pause (proxy flat), hacking, hacking: never 3 in a row
    interrupted = _feed(TeacherHackingMonitor(patience=3), [5, 4, 3, 3, 2, 1], [1, 2, 3, 4, 5, 6])
    assert not interrupted.flagged
    # a worsening smaller than min_delta does not count
    small = _feed(TeacherHackingMonitor(patience=1, min_delta=0.5), [5, 4, 3], [1, 1.1, 1.2])
    assert not small.flagged


def test_monitor_hook_evaluates_every_n_steps():
    monitor = TeacherHackingMonitor(patience=2)
    values = iter(range(100))
    hook = monitor.on_step(5, lambda: -next(values), lambda: next(values))
    for step in range(1, 21):
        hook(step, 0.0)
    assert [p.step for p in monitor.history] == [5, 10, 15, 20]
    assert monitor.flagged_at_step == 15


def test_bad_inputs_are_clear():
    with pytest.raises(ValueError, match="patience"):
        TeacherHackingMonitor(patience=0)
    with pytest.raises(ValueError, match="finite"):
        TeacherHackingMonitor().update(0, math.nan, 1.0)
    with pytest.raises(ValidationError, match="teacher_overconfidence"):
        TrustworthyConfig(teacher_overconfidence=0)


def test_defend_trustworthy_students_cli(tmp_path):
    from secure_kd.app.cli import app

    overrides = ["steps=40", "eval_every=10", "n_calibration=32", "n_test=32"]
    result = CliRunner().invoke(
        app,
        [
            "defend",
            "trustworthy_students",
            "--config",
            "configs/defenses/trustworthy_students.yaml",
            "--out",
            str(tmp_path),
            *[arg for o in overrides for arg in ("--set", o)],
        ],
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["teacher_temperature"] > 1.5  # the teacher is the oracle x3: over-confident
    assert saved["teacher_after"]["ece"] < saved["teacher_before"]["ece"]
    assert [p["step"] for p in saved["monitor_history"]] == [0, 10, 20, 30, 40]
