"""DPDistiller accounting: privacy.json vs Opacus, budget stop, resume, a shared ledger, refusals."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from secure_kd.checkpoint import ResumeError, latest_checkpoint
from secure_kd.config import KDConfig, TrainConfig
from secure_kd.dp.accounting import PrivacyBudgetExhausted
from secure_kd.dp.config import PrivacyConfig
from secure_kd.dp.ledger import Ledger
from secure_kd.dp.trainer import DPDistiller

N_RECORDS, BATCH = 16, 4
KEY = "tiny-private-set"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and far faster on a machine shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make(tmp_path, tiny_llama, token_examples):
    examples = token_examples(n=N_RECORDS, vocab=64, min_len=5, max_len=9)

    def build(out: str, *, max_steps: int = 4, checkpoint_every: int = 50, on_step=None, log=None, **privacy):
        privacy.setdefault("ledger_dir", str(tmp_path / "ledgers"))
        train = TrainConfig(
            max_steps=max_steps,
            batch_size=BATCH,
            lr=1e-2,
            checkpoint_every=checkpoint_every,
            privacy=PrivacyConfig(**privacy),
        )
        return DPDistiller(
            dataset_key=KEY,
            student=tiny_llama(vocab=64, hidden=16, seed=2),
            examples=examples,
            kd=KDConfig(kd_weight=0.0, ce_weight=1.0),
            train=train,
            out=tmp_path / out,
            pad_id=0,
            eos_id=None,
            progress=False,
            on_step=on_step,
            log=log or (lambda message: None),
        )

    return build


def stepped(accountant_class, runs, delta):
    accountant = accountant_class()
    for sigma, q, steps in runs:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


def read_privacy(distiller: DPDistiller) -> dict:
    return json.loads((distiller.out / "privacy.json").read_text())


def test_privacy_json_epsilon_is_what_opacus_computes_from_its_parameters(make):
    distiller = make("run", target_epsilon=3.0)
    distiller.fit()
    report = read_privacy(distiller)
    assert report["steps"] == 4 and report["sample_rate"] == BATCH / N_RECORDS
    assert report["delta"] == 1e-3 and report["budget_accountant"] == "rdp"  # default delta for N=16
    runs = [(report["noise_multiplier"], report["sample_rate"], report["steps"])]
    rdp, prv = stepped(RDPAccountant, runs, report["delta"]), stepped(PRVAccountant, runs, report["delta"])
    assert report["epsilons"]["rdp"] == pytest.approx(rdp, rel=1e-9)
    assert report["epsilons"]["prv"] == pytest.approx(prv, rel=1e-9)
    assert report["epsilon"] == pytest.approx(min(rdp, prv), rel=1e-9)  # both sound: the tighter is the claim
    assert report["accountant"] == ("prv" if prv < rdp else "rdp")
    assert 3.0 - 0.011 <= rdp <= 3.0  # calibrated to end at the target
    assert report["history"] == [list(runs[0])] and report["ledger"]["entries"] == 1
    assert report["stopped_by_budget"] is False and report["sampling"] == "poisson"


def test_budget_stop_takes_the_last_step_that_fits_saves_and_says_so(make):
    sigma, target = 1.5, 2.0
    q = BATCH / N_RECORDS
    allowed = 0
    while stepped(RDPAccountant, [(sigma, q, allowed + 1)], 1e-3) <= target:
        allowed += 1
    assert 0 < allowed < 12
    messages: list[str] = []
    distiller = make("run", max_steps=12, noise_multiplier=sigma, target_epsilon=target, log=messages.append)
    result = distiller.fit()
    assert result.steps == allowed and len(result.losses) == allowed
    assert latest_checkpoint(distiller.out).name == f"step-{allowed:06d}"
    report = read_privacy(distiller)
    assert report["stopped_by_budget"] and report["steps"] == allowed
    assert report["epsilons"]["rdp"] <= target and "above target_epsilon=2.0" in report["stop_reason"]
    assert any(f"stops after step {allowed} of 12" in m for m in messages)


def test_resume_after_a_crash_spends_what_an_uninterrupted_run_spends(make, tmp_path):
    uninterrupted = make("straight", max_steps=6, target_epsilon=3.0, ledger_dir=str(tmp_path / "a"))
    uninterrupted.fit()

    def power_cut(step: int, loss: float) -> None:
        if step == 5:
            raise RuntimeError("power cut")

    crashed = make(
        "crashed",
        max_steps=6,
        checkpoint_every=3,
        on_step=power_cut,
        target_epsilon=3.0,
        ledger_dir=str(tmp_path / "b"),
    )
    with pytest.raises(RuntimeError, match="power cut"):
        crashed.fit()
    ledger = Ledger.open(KEY, tmp_path / "b")
    assert ledger.history() == [(crashed.noise_multiplier, BATCH / N_RECORDS, 5)]  # ahead of checkpoint 3

    resumed = make(
        "crashed", max_steps=6, checkpoint_every=3, target_epsilon=3.0, ledger_dir=str(tmp_path / "b")
    )
    result = resumed.fit(resume=True)
    assert result.resumed_from == 3 and result.steps == 6
    assert ledger.history() == [(uninterrupted.noise_multiplier, BATCH / N_RECORDS, 6)]
    assert read_privacy(resumed)["epsilon"] == pytest.approx(
        read_privacy(uninterrupted)["epsilon"], rel=1e-12
    )


def test_a_second_run_on_the_same_dataset_adds_to_its_ledger(make):
    first = make("first", max_steps=3, noise_multiplier=1.0)
    first.fit()
    second = make("second", max_steps=5, noise_multiplier=1.3)
    second.fit()
    report = read_privacy(second)
    q = BATCH / N_RECORDS
    both = stepped(RDPAccountant, [(1.0, q, 3), (1.3, q, 5)], 1e-3)
    assert report["ledger"]["entries"] == 2 and report["epsilons"]["rdp"] == pytest.approx(both, rel=1e-9)
    assert report["run_epsilon"] < report["epsilon"]
    assert read_privacy(first)["epsilons"]["rdp"] < report["epsilons"]["rdp"]

    # a budget already spent by the earlier runs stops the next one before its first step
    with pytest.raises(PrivacyBudgetExhausted, match="already spent epsilon="):
        make("third", target_epsilon=report["epsilons"]["rdp"] * 0.9).fit()
    assert Ledger.open(KEY, second.ledger.path.parent).total_steps() == 8


def test_resuming_with_a_changed_privacy_config_is_refused(make):
    make("run", max_steps=4, checkpoint_every=2, noise_multiplier=1.0).fit()
    changed = make("run", max_steps=6, checkpoint_every=2, noise_multiplier=1.0, max_grad_norm=0.5)
    with pytest.raises(ResumeError, match=r"privacy.max_grad_norm: 1.0 -> 0.5"):
        changed.fit(resume=True)
    # only the physical batch size (memory, not privacy) may change
    same = make("run", max_steps=6, checkpoint_every=2, noise_multiplier=1.0, max_physical_batch_size=2)
    assert same.fit(resume=True).resumed_from == 4


def test_budget_spent_by_another_run_meanwhile_stops_before_overshooting(make, tmp_path):
    ledger = Ledger.open(KEY, tmp_path / "ledgers")

    def another_run_spends(step: int, loss: float) -> None:
        if step == 2:  # a concurrent job on the same dataset takes most of what is left
            ledger.record(noise_multiplier=1.0, sample_rate=BATCH / N_RECORDS, steps=6, kind="run")

    messages: list[str] = []
    distiller = make(
        "run",
        max_steps=8,
        noise_multiplier=1.5,
        target_epsilon=4.0,
        on_step=another_run_spends,
        log=messages.append,
    )
    result = distiller.fit()
    report = read_privacy(distiller)
    assert 2 <= result.steps < 8 and report["stopped_by_budget"] and "another run" in report["stop_reason"]
    assert latest_checkpoint(distiller.out).name == f"step-{result.steps:06d}"
    assert report["steps"] == result.steps and report["ledger"]["entries"] == 2
    q = BATCH / N_RECORDS
    assert stepped(RDPAccountant, [(1.5, q, result.steps), (1.0, q, 6)], 1e-3) <= 4.0
    assert stepped(RDPAccountant, [(1.5, q, result.steps + 1), (1.0, q, 6)], 1e-3) > 4.0  # one more: over
    assert any("another run" in m for m in messages)


def test_the_checkpoint_holding_the_noise_secret_and_privacy_json_are_private(make):
    umask = os.umask(0o022)
    try:
        distiller = make("run", max_steps=2, checkpoint_every=1, noise_multiplier=1.0)
        distiller.fit()
    finally:
        os.umask(umask)
    state = distiller.out / "checkpoints" / "step-000001" / "state.pt"
    assert "privacy_secret" in torch.load(state, weights_only=True)["extra"]  # the secret is in there
    for path in (state, distiller.out / "privacy.json", *state.parent.iterdir()):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in (state.parent, state.parent.parent):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
