"""Concurrent DP runs on one dataset, in real processes: the ledger's budget is never exceeded.

Each step is reserved in the ledger under its file lock, with the budget checked against what every
other run has reserved, before the step's noise is drawn. Checking outside the lock (read the
ledger, train the step, then record it) lets two runs that check at the same time both take the
last step that fits: each overshoots by a step.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import torch
from opacus.accountants import RDPAccountant

from secure_kd.config import KDConfig, TinyModelConfig, TrainConfig
from secure_kd.data import TokenizedExample
from secure_kd.dp.config import PrivacyConfig
from secure_kd.dp.ledger import Ledger
from secure_kd.dp.trainer import DPDistiller
from secure_kd.models import build_tiny

N_RECORDS, BATCH, SIGMA, TARGET, STEPS = 16, 4, 1.5, 2.0, 10
KEY = "shared-private-set"


def stepped(runs, delta: float) -> float:
    accountant = RDPAccountant()
    for sigma, q, steps in runs:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


def steps_that_fit(q: float, delta: float) -> int:
    allowed = 0
    while stepped([(SIGMA, q, allowed + 1)], delta) <= TARGET:
        allowed += 1
    return allowed


def _train(root: str, name: str, barrier) -> None:
    """One DP run in its own process (forked: the imports are the parent's), started with the other."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    examples = [
        TokenizedExample(input_ids=ids, labels=list(ids), record_index=i)
        for i, ids in enumerate(torch.randint(2, 64, (N_RECORDS, 6), generator=g).tolist())
    ]
    train = TrainConfig(
        max_steps=STEPS,
        batch_size=BATCH,
        lr=1e-2,
        checkpoint_every=100,
        privacy=PrivacyConfig(noise_multiplier=SIGMA, target_epsilon=TARGET, ledger_dir=f"{root}/ledgers"),
    )
    distiller = DPDistiller(
        dataset_key=KEY,
        student=build_tiny(TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2), 64, seed=2),
        examples=examples,
        kd=KDConfig(kd_weight=0.0, ce_weight=1.0),
        train=train,
        out=Path(root) / name,
        pad_id=0,
        eos_id=None,
        progress=False,
        log=lambda message: None,
    )
    barrier.wait()
    distiller.fit()


def test_two_processes_training_on_one_dataset_never_exceed_its_budget(tmp_path):
    context = multiprocessing.get_context("fork")  # the parent holds one torch thread: fork is safe
    barrier = context.Barrier(2)
    workers = [context.Process(target=_train, args=(str(tmp_path), n, barrier)) for n in ("a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert [w.exitcode for w in workers] == [0, 0]

    q, delta = BATCH / N_RECORDS, 1e-3  # default delta for N=16
    allowed = steps_that_fit(q, delta)
    assert allowed < STEPS  # alone, one run would stop here; together they must share it
    history = Ledger.open(KEY, tmp_path / "ledgers").history()
    # Both runs usually share the budget; on a loaded machine one may reserve every step before the other
    # takes its first (it then records no entry). Either way the total is exactly the budget.
    assert 1 <= len(history) <= 2 and all(s > 0 for _, _, s in history)
    assert sum(s for _, _, s in history) == allowed  # not one step more, and none left unused
    assert stepped(history, delta) <= TARGET
    for name in ("a", "b"):
        report = json.loads((tmp_path / name / "privacy.json").read_text())
        assert report["stopped_by_budget"] and report["epsilon"] <= TARGET


def _reserve(directory: str, entry: str, barrier, allowed: int, out) -> None:
    """Reserve steps one by one until the budget refuses; the budget: `allowed` steps in all."""
    ledger = Ledger.open(KEY, directory)
    ledger.record(entry_id=entry, kind="run", noise_multiplier=SIGMA, sample_rate=0.25, steps=0)
    barrier.wait()
    taken = 0
    # same sigma and q for every entry: the budget in epsilon is a budget in total steps
    while ledger.reserve(entry, taken + 1, fits=lambda others, n: sum(s for *_, s in others) + n <= allowed):
        taken += 1
    out.put((entry, taken))


def test_concurrent_reservations_never_exceed_the_budget(tmp_path):
    processes, q, delta = 4, 0.25, 1e-3
    allowed = steps_that_fit(q, delta)  # 6 steps at epsilon 2.0
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(target=_reserve, args=(str(tmp_path), f"run-{i}", barrier, allowed * 4, results))
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    taken = dict(results.get(timeout=300) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    assert [w.exitcode for w in workers] == [0] * processes
    history = Ledger.open(KEY, tmp_path).history()
    assert sum(taken.values()) == sum(s for *_, s in history) == allowed * 4  # exactly the budget
    assert sorted(taken) == [f"run-{i}" for i in range(processes)]
    assert Ledger.open(KEY, tmp_path).total_steps() == allowed * 4  # the chain intact after the race
