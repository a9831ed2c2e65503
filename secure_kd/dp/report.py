"""`<out>/privacy.json`: what a DP run guarantees, in numbers a compliance report can quote."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from secure_kd.dp.accounting import History, epsilon, epsilons

PRIVACY_SCHEMA_VERSION = 1

CAVEATS = [
    "the unit is one record of the training set: a record present k times is protected at about k*epsilon",
    "the teacher is assumed public or trained on other data; its own training data is not covered",
    "a teacher logit cache built over the private records is private data itself (not covered)",
    "training losses in results.json and evaluation on held-out private text are not covered",
    "checkpoints hold the run's sampling/noise secret: keep them as private as the data",
]
SHUFFLE_CAVEAT = (
    "poisson_sampling was off: the accountants assume Poisson sampling, so for shuffled batches the "
    "epsilon above is an estimate, not a proven guarantee"
)
USER_CAVEATS = [
    "the unit is one user as named by data.user_field: one person under two user ids is two users, and "
    "is protected only at about 2*epsilon; records with no link to their person are not grouped",
    "a user is protected for all their records, however many; each step trains on at most "
    "max_records_per_user of a sampled user's records",
]
LEDGER_SHUFFLE_CAVEAT = (
    "an earlier stretch in this dataset's ledger used shuffled batches (poisson_sampling: false): the "
    "composed epsilon is an estimate, not a proven guarantee"
)


class PrivacyReport(BaseModel):
    schema_version: int = PRIVACY_SCHEMA_VERSION
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon: float
    accountant: str
    epsilons: dict[str, float | None]
    run_epsilon: float
    budget_accountant: str
    target_epsilon: float | None
    max_grad_norm: float
    expected_batch_size: int
    max_physical_batch_size: int
    n_records: int
    sampling: Literal["poisson", "shuffle"]
    guarantee_proven: bool
    grad_sample_mode: str
    unit: Literal["record", "user"] = "record"
    n_users: int | None = None
    max_records_per_user: int | None = None
    user_field: str | None = None
    stopped_by_budget: bool
    stop_reason: str | None
    ledger: dict
    history: list[tuple[float, float, int]]
    guarantee: str
    caveats: list[str]


def build_report(
    *,
    ledger_history: History,
    run_history: History,
    delta: float,
    budget_accountant: str,
    target_epsilon: float | None,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    max_grad_norm: float,
    expected_batch_size: int,
    max_physical_batch_size: int,
    n_records: int,
    poisson: bool,
    ledger_shuffled: bool = False,
    grad_sample_mode: str,
    stop_reason: str | None,
    ledger: dict,
    extra_caveats: list[str] | None = None,
    unit: Literal["record", "user"] = "record",
    n_users: int | None = None,
    max_records_per_user: int | None = None,
    user_field: str | None = None,
) -> PrivacyReport:
    """The claim is the smallest epsilon among the sound accountants (RDP, PRV upper bound) for the ledger.

    Under shuffled batches (this run's, or `ledger_shuffled`: another stretch in the ledger) no proven
    bound exists: the guarantee says so and gives the number as an estimate that assumes Poisson."""
    by_accountant = epsilons(ledger_history, delta)
    usable = {name: value for name, value in by_accountant.items() if value is not None}
    if not usable:  # PRV can fail on extreme histories; never claim what was not computed
        usable = {budget_accountant: epsilon(ledger_history, delta, budget_accountant)}
    claim_by = min(usable, key=lambda name: usable[name])
    claim = usable[claim_by]
    n_runs = len(ledger_history)
    proven = poisson and not ledger_shuffled
    if proven and unit == "user":
        guarantee = (
            f"({claim:.4g}, {delta:g})-differential privacy for each user of the training set (add or "
            f"remove every record of one user, users named by data.user_field {user_field!r}; {n_users} "
            f"users), for the released student and every checkpoint, composed over all {n_runs} DP "
            f"stretch(es) recorded for this dataset; Opacus {claim_by.upper()} accountant, "
            f"Poisson-subsampled users, at most {max_records_per_user} records per sampled user per step, "
            f"the sum of a user's per-record gradients clipped at {max_grad_norm:g}, Gaussian noise"
        )
    elif proven:
        guarantee = (
            f"({claim:.4g}, {delta:g})-differential privacy for each record of the training set (add or "
            f"remove one record), for the released student and every checkpoint, composed over all {n_runs} "
            f"DP stretch(es) recorded for this dataset; Opacus {claim_by.upper()} accountant, "
            f"Poisson-subsampled Gaussian mechanism with per-example clipping at {max_grad_norm:g}"
        )
    else:
        who = "this run" if not poisson else "an earlier stretch in this dataset's ledger"
        guarantee = (
            f"no proven differential privacy bound is claimed: {who} trained on shuffled fixed-size batches "
            "(poisson_sampling: false), which the accountants do not analyse, and shuffling can be markedly "
            f"worse than Poisson sampling. Estimate only, computed as if every batch were Poisson-sampled: "
            f"({claim:.4g}, {delta:g}) per record over all {n_runs} DP stretch(es) recorded for this "
            f"dataset; Opacus {claim_by.upper()} accountant, Gaussian noise, per-example clipping at "
            f"{max_grad_norm:g}"
        )
    return PrivacyReport(
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        epsilon=claim,
        accountant=claim_by,
        epsilons=by_accountant,
        run_epsilon=epsilon(run_history, delta, claim_by),
        budget_accountant=budget_accountant,
        target_epsilon=target_epsilon,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        max_physical_batch_size=max_physical_batch_size,
        n_records=n_records,
        sampling="poisson" if poisson else "shuffle",
        guarantee_proven=proven,
        grad_sample_mode=grad_sample_mode,
        unit=unit,
        n_users=n_users,
        max_records_per_user=max_records_per_user,
        user_field=user_field,
        stopped_by_budget=stop_reason is not None,
        stop_reason=stop_reason,
        ledger=ledger,
        history=[(float(s), float(q), int(n)) for s, q, n in ledger_history],
        guarantee=guarantee,
        caveats=(CAVEATS if unit == "record" else USER_CAVEATS + CAVEATS[1:])
        + ([] if poisson else [SHUFFLE_CAVEAT])
        + ([LEDGER_SHUFFLE_CAVEAT] if poisson and ledger_shuffled else [])
        + list(extra_caveats or []),
    )


def run_report(run: Any) -> PrivacyReport:
    """privacy.json of a finished `secure_kd.dp.trainer.DPDistiller` run (read from its ledger entry)."""
    entries = run.ledger.entries()
    own = next(e for e in entries if e.entry_id == run.entry_id)
    report = build_report(
        ledger_history=[(e.noise_multiplier, e.sample_rate, e.steps) for e in entries if e.steps > 0],
        run_history=[(run.noise_multiplier, run.sample_rate, own.steps)],
        delta=run.delta,
        budget_accountant=run.privacy.accountant,
        target_epsilon=run.privacy.target_epsilon,
        noise_multiplier=run.noise_multiplier,
        sample_rate=run.sample_rate,
        steps=own.steps,
        max_grad_norm=run.privacy.max_grad_norm,
        expected_batch_size=run.expected_batch_size,
        max_physical_batch_size=run.physical_batch_size,
        n_records=run.n_records,
        poisson=run.privacy.poisson_sampling,
        ledger_shuffled=any(
            e.sampling == "shuffle" and e.steps > 0 and e.entry_id != run.entry_id for e in entries
        ),
        grad_sample_mode=run.privacy.grad_sample_mode,
        stop_reason=run.stop_reason,
        extra_caveats=run.extra_caveats,
        unit=run.privacy.unit,
        n_users=None if run.users is None else run.users.n_users,
        max_records_per_user=run.privacy.max_records_per_user,
        user_field=run.user_field,
        ledger={
            "path": str(run.ledger.path),
            "key": run.ledger.key,
            "entry_id": run.entry_id,
            "entries": len(entries),
            "total_steps": sum(e.steps for e in entries),
        },
    )
    return report
