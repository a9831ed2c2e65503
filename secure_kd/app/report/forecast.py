"""`secure-kd audit --predict`: before a distillation run, which training records will the student
memorize? The forecast of `secure_kd.memorization_forecast` in an audit's results.json and report.html.

It reads the teacher (`--teacher DIR`), the training records (`--data FILE`) and, optionally, the initial
student (`--model DIR`, for the teacher-student KL; it must share the teacher's tokenizer), runs one
forward pass of each model per record and lists the records to drop or deduplicate, by index and
`record_id`, never by content (the report is meant to be shared; the records are not).
"""

from __future__ import annotations

import time
from html import escape
from typing import Any

from secure_kd.app.report.result import AuditResult


def run_forecast(
    teacher: str, data: str, *, student: str | None = None, max_length: int = 128, drop_fraction: float = 0.05
) -> dict[str, Any]:
    from secure_kd.data import load_records, tokenize_records
    from secure_kd.fingerprint import tokenizer_fingerprint
    from secure_kd.memorization_forecast import forecast
    from secure_kd.model_files import load_pretrained, load_tokenizer

    started = time.perf_counter()
    records = [dict(r) for r in load_records(data)]
    tokenizer = load_tokenizer(teacher)
    examples = tokenize_records(records, tokenizer, max_length=max_length, mask_prompt=False)
    if len(examples) != len(records):
        raise ValueError(
            f"{data}: {len(records) - len(examples)} records have no token to score; remove empty records"
        )
    teacher_model = load_pretrained(teacher)
    student_model, note = None, None
    if student is not None:
        if tokenizer_fingerprint(load_tokenizer(student)) != tokenizer_fingerprint(tokenizer):
            note = f"{student} has another tokenizer than the teacher: teacher_student_kl not computed"
        else:
            student_model = load_pretrained(student)
    texts = [_text(r) for r in records]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result = forecast(
        texts,
        [ex.input_ids for ex in examples],
        teacher_model,
        student_model,
        record_ids=[r.get("record_id") for r in records],
        drop_fraction=drop_fraction,
        pad_id=pad,
    )
    return {
        "teacher": teacher, "student": student, "data": data, "max_length": max_length, "note": note,
        "seconds": time.perf_counter() - started, **result,
    }  # fmt: skip


def _text(record: dict) -> str:
    if "text" in record:
        return str(record["text"])
    if "messages" in record:
        return "\n".join(str(m.get("content", "")) for m in record["messages"])
    return "\n".join(str(record.get(k, "")) for k in ("prompt", "completion"))


def forecast_html(result: AuditResult) -> str:
    f = result.forecast
    if not f:
        return ""
    rows = "".join(
        f"<tr><td>{d['index']}</td><td>{escape(str(d['record_id']))}</td><td>{d['combined']:.3f}</td></tr>"
        for d in f["drop"]
    )
    dups = "; ".join(", ".join(str(i) for i in g) for g in f["duplicates"]) or "none"
    note = f"<p class='note'>{escape(f['note'])}</p>" if f.get("note") else ""
    return (
        "<h2>Forecast: records the student is likely to memorize</h2>"
        f"<p class='note'>From the teacher{' and the initial student' if f.get('student') else ''} alone, "
        f"before distillation; {escape(f['combined'])}. Features per record in results.json "
        "(<code>forecast.records</code>). Records by index in the data file, never by content.</p>"
        f"{note}<p>Drop or review these {len(f['drop'])} of {f['n_records']} records "
        f"(the top {f['drop_fraction']:.0%}):</p>"
        f"<table><thead><tr><th>index</th><th>record_id</th><th>combined score</th></tr></thead>"
        f"<tbody>{rows}</tbody></table><p>Duplicate groups to deduplicate (indices): {escape(dups)}</p>"
    )
