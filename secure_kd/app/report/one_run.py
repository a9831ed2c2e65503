"""The one-run DP audit in an audit's results.json and report.html (`secure-kd audit --canaries RUN_DIR`).

The engine does the work (`secure_kd.audit_canaries.audit_canary_run`: score the run's canaries, guess,
bound); this module puts each run's bound next to the epsilon its privacy.json claims, in
`AuditResult.one_run` and in a report section. With `--canaries` and no suite (no --config, --data or
--secrets) the audit is this alone: a results.json with no attack entries and the privacy ledger of the
run. A bound above the claimed epsilon means the claim is false (or, at 95% confidence, one run in twenty
by chance); a bound of 0 proves nothing: it is a lower bound, never a certificate of privacy.
"""

from __future__ import annotations

import time
from html import escape
from pathlib import Path
from typing import Any

from secure_kd.app.report import provenance
from secure_kd.app.report.result import AuditResult

EXPLAIN = (
    "Steinke, Nasr & Jagielski (2023): each canary was inserted into the training data with probability "
    "1/2; the auditor guesses the canaries with the lowest loss as inserted and those with the highest as "
    "not, and the number of right guesses bounds epsilon from below at the stated confidence (the best of "
    "several guess counts, Bonferroni-corrected). A lower bound only: 0 proves nothing; above the claimed "
    "epsilon refutes the claim."
)


def standalone_result(config: dict[str, Any], run_dirs: list[str], utility_key: str) -> AuditResult:
    """An audit result with no attack entries (`--canaries` or `--predict` alone), `config` as given."""
    return AuditResult(
        model=None, teacher=None, data=None, entries=[], measurements=[], verdicts=[], overall=None,
        failed=[], config={**config, "utility_key": utility_key},
        provenance={"versions": provenance.package_versions(), "git_commit": provenance.git_commit()},
        privacy_ledger=provenance.privacy_ledger([Path(d) for d in run_dirs], utility_key), seconds=0.0,
    )  # fmt: skip


def attach_one_run(
    result: AuditResult,
    run_dirs: list[str],
    *,
    model: str | None = None,
    reference: str | None = None,
    confidence: float = 0.95,
) -> AuditResult:
    """`result` with each run's one-run audit added (the caller writes results.json and report.html)."""
    from secure_kd.audit_canaries import audit_canary_run

    started = time.perf_counter()
    audits: list[dict[str, Any]] = [
        audit_canary_run(run, model=model, reference=reference, confidence=confidence) for run in run_dirs
    ]
    seconds = result.seconds + time.perf_counter() - started
    return result.model_copy(update={"one_run": [*result.one_run, *audits], "seconds": seconds})


def summary_line(audit: dict[str, Any]) -> str:
    claimed = audit.get("claimed_epsilon")
    claim = f"claimed epsilon {claimed:.3g}" if claimed is not None else "no DP claim (non-private run)"
    return (
        f"one-run audit of {audit['run']}: epsilon >= {audit['epsilon_lower_bound']:.3g} at "
        f"{audit['confidence']:.0%} ({audit['n_correct']}/{audit['n_guesses']} guesses right on "
        f"{audit['n_canaries']} canaries); {claim}"
    )


def one_run_html(result: AuditResult) -> str:
    if not result.one_run:
        return ""
    rows = []
    for a in result.one_run:
        claimed = a.get("claimed_epsilon")
        verdict = (
            "no claim to test" if claimed is None
            else "<b class='failed'>refuted: bound above the claim</b>" if a["epsilon_lower_bound"] > claimed
            else "consistent"
        )  # fmt: skip
        rows.append(
            "<tr>" + "".join(f"<td>{c}</td>" for c in (
                escape(a["run"]), "-" if claimed is None else f"{claimed:.3g}",
                "-" if a.get("claimed_delta") is None else f"{a['claimed_delta']:.2g}",
                f"<b>{a['epsilon_lower_bound']:.3g}</b>", f"{a['confidence']:.0%}",
                f"{a['n_canaries']} ({a['n_inserted']} inserted)", f"{a['n_correct']}/{a['n_guesses']}",
                escape(a["score"]), verdict,
            )) + "</tr>"
        )  # fmt: skip
    head = "".join(
        f"<th>{h}</th>"
        for h in ("run", "claimed epsilon", "delta", "one-run lower bound", "confidence", "canaries",
                  "right guesses", "score", "claim")
    )  # fmt: skip
    return (
        f"<h2>One-run DP audit (canaries)</h2><p class='note'>{escape(EXPLAIN)}</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
