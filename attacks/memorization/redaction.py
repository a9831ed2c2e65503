"""What the memorization result keeps of extracted PII: redacted findings, masked generations.

An audit's result and report are shared (attached to a ticket, read by a reviewer), so they must not
become a second copy of the PII they found. `pii_findings` lists each PII value of the training
records that a generation reproduced, by type, redacted (`attacks.memorization.pii.redact`), with the
number of generations that hold it and the records it came from; `redact_report` masks the PII values,
the secrets and anything pattern-found in every text the report keeps (the top generations and the
greedy continuations of the canary prefixes).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from attacks.memorization.extraction import ExtractionReport, PIIFinding, ScoredGeneration, TrainingDataIndex
from attacks.memorization.pii import redact, redact_text
from secure_kd.data import Canary


def pii_findings(
    scored: Sequence[ScoredGeneration], index: TrainingDataIndex, records: Sequence[dict[str, Any]]
) -> list[PIIFinding]:
    counts = Counter(value for generation in scored for value in set(generation.flags.exact_pii))
    findings = []
    for value, n in counts.most_common():
        holders = [int(r.get("record_id", i)) for i, r in enumerate(records) if value in r["text"]]
        findings.append(
            PIIFinding(
                type=index.pii_values.get(value, "pii"), redacted=redact(value), n_chars=len(value),
                n_generations=n, record_ids=holders[:20],
            )
        )  # fmt: skip
    return findings


def redact_report(
    report: ExtractionReport, index: TrainingDataIndex, canaries: Sequence[Canary], findings: list[PIIFinding]
) -> ExtractionReport:
    values = [*index.pii_values, *(c.secret for c in canaries)]
    top = [
        generation.model_copy(
            update={
                "text": redact_text(generation.text, values),
                "flags": generation.flags.model_copy(
                    update={"exact_pii": [redact(v) for v in generation.flags.exact_pii]}
                ),
            }
        )
        for generation in report.top_by_zlib
    ]
    greedy = [
        c.model_copy(update={"greedy_continuation": redact_text(c.greedy_continuation, values)})
        for c in report.canary_extraction
    ]
    return report.model_copy(
        update={"top_by_zlib": top, "canary_extraction": greedy, "pii_findings": findings, "redacted": True}
    )
