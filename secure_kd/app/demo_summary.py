"""The demo's summary: its rows, which comparisons are at matched utility, the privacy-utility plot, and
the printed table (`secure_kd.app.demo_story` runs the stages; this module only reads their results)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table


class DemoRow(BaseModel):
    model: str
    perplexity: float | None
    epsilon: float | None
    exposure_bits: float | None
    mia_auc: float | None
    clone_agreement: float | None
    canary_ranks: list[int] | None = None  # per canary, its secret's rank among the 1,000 candidates
    canaries_greedy_extracted: int | None = None  # canaries greedy decoding completes from their prefix
    canaries: str = ""  # the memorization headline, stated from the per-canary figures
    note: str = ""
    reference_auc: float | None = None  # loss-ratio membership attack, the teacher as reference
    reference_auc_ci: list[float] | None = None
    one_run_bound: float | None = None  # one-run DP audit: epsilon >= this at 95% (DP rows)


class DemoResult(BaseModel):
    rows: list[DemoRow]
    stage_seconds: dict[str, float]
    reports: dict[str, str]
    failed: list[str] = []  # "<audit>: <entry>" of every audit entry that failed (the CLI exits 4)
    matched: list[str] = []  # the pairs of models compared at matched utility, and those that are not
    plot: str | None = None  # the privacy-utility PNG


def matched_lines(rows: list[DemoRow]) -> list[str]:
    """Which pairs of the distilled models are at matched utility (held-out perplexity within 1.25x). The
    federated student is one of them: it shares the tokenizer and the held-out records."""
    from secure_kd.app.demo_tradeoff import MATCHED_RATIO, matched_pairs

    central = {r.model: r.perplexity for r in rows if not r.model.startswith("teacher")}
    lines = []
    for a, b, ratio, matched in matched_pairs(central):
        verdict = "matched utility" if matched else "NOT matched: a privacy gap may only mean less learned"
        lines.append(f"{a} vs {b}: perplexity ratio {ratio:.2f} ({verdict}, threshold {MATCHED_RATIO}x)")
    return lines


def plot(rows: list[DemoRow], out: Path) -> str | None:
    from secure_kd.app.demo_tradeoff import privacy_utility_png

    points = [
        {"label": r.model, "perplexity": r.perplexity, "exposure_bits": r.exposure_bits,
         "reference_auc": r.reference_auc, "teacher": r.model.startswith("teacher")}
        for r in rows
    ]  # fmt: skip
    path = privacy_utility_png(points, out / "privacy_utility.png")
    return str(path) if path else None


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.{digits}g}"


def print_summary(result: DemoResult, console: Console) -> None:
    table = Table(title="secure-kd demo: what the models leak and what protecting them costs")
    columns = (
        "model",
        "ppl",
        "epsilon",
        "one-run eps >=",
        "exposure bits",
        "MIA AUC",
        "ref. AUC",
        "clone agr.",
    )
    for column in columns:
        table.add_column(column)
    for row in result.rows:
        table.add_row(
            row.model,
            _fmt(row.perplexity),
            _fmt(row.epsilon),
            _fmt(row.one_run_bound),
            _fmt(row.exposure_bits),
            _fmt(row.mia_auc),
            _fmt(row.reference_auc),
            _fmt(row.clone_agreement),
        )
    console.print(table)
    teacher = next((r for r in result.rows if r.model.startswith("teacher")), None)
    student = next((r for r in result.rows if r.model.startswith("KD student")), None)
    if teacher and student and teacher.perplexity and student.perplexity:
        console.print(
            f"  KD student / teacher held-out perplexity: {student.perplexity / teacher.perplexity:.2f}x"
        )
    for row in result.rows:
        if row.note:
            console.print(f"  {row.model}: {row.note}")
    for row in result.rows:  # the memorization headline of each row, from its per-canary figures
        if row.canaries:
            console.print(f"  canaries, {row.model}: {row.canaries}")
    console.print(
        "  epsilon: each DP run's own; one-run eps >=: its lower bound at 95% from its audit canaries "
        "(0 proves nothing); ref. AUC: loss-ratio membership attack with the teacher as reference"
    )
    for line in result.matched:
        console.print(f"  {line}")
    if result.plot:
        console.print(f"  privacy-utility plot: {result.plot}")
    total = sum(result.stage_seconds.values())
    console.print(f"stages (s): {json.dumps(result.stage_seconds)}; total {total / 60:.1f} min")
    console.print(f"reports: {', '.join(result.reports.values())}")
