"""`secure-kd audit --inherit`: what a student inherits from its teacher's memorization.

For a teacher fine-tuned on private records and a student distilled from it, each record (`--data`) is
tested for discoverable memorization in both models (Carlini et al. 2023: greedy decoding from its first
`prefix_tokens` tokens gives exactly its next `suffix_tokens`; `attacks.memorization.discoverable`) and
put in one of four groups: memorized by the teacher only, by both, by the student only, by neither. The
inherited fraction is both / teacher-memorized, with a 95% Wilson interval: of what the teacher gives
away, how much the student gives away too. Records shorter than prefix + suffix are not eligible.
Templated text can be "memorized" by a model that only learned the template: the student-only group and
a held-out control tell how much of a rate is the template. Records are named by index, never content.
"""

from __future__ import annotations

from typing import Any


def run_inheritance(
    teacher: str,
    student: str,
    data: str,
    *,
    prefix_tokens: int = 16,
    suffix_tokens: int = 16,
    max_length: int = 128,
) -> dict[str, Any]:
    import numpy as np
    import torch

    from attacks.memorization.discoverable import discoverable_memorization
    from secure_kd.data import load_records, tokenize_records
    from secure_kd.fingerprint import tokenizer_fingerprint
    from secure_kd.model_files import load_pretrained, load_tokenizer
    from secure_kd.proportions import wilson_interval

    tokenizer = load_tokenizer(teacher)
    if tokenizer_fingerprint(load_tokenizer(student)) != tokenizer_fingerprint(tokenizer):
        raise ValueError(
            f"--model {student} has another tokenizer than --teacher {teacher}: per-record memorization is "
            "compared token by token here; give a student distilled over the teacher's tokenizer"
        )
    records = [dict(r) for r in load_records(data)]
    examples = tokenize_records(records, tokenizer, max_length=max_length, mask_prompt=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    probe = dict(
        prefix_tokens=prefix_tokens, suffix_tokens=suffix_tokens, pad_id=pad, device=torch.device("cpu")
    )
    by_teacher = discoverable_memorization(load_pretrained(teacher).eval(), examples, **probe)
    by_student = discoverable_memorization(load_pretrained(student).eval(), examples, **probe)
    eligible = ~np.isnan(by_teacher)
    t, s = by_teacher == 1.0, by_student == 1.0
    index = [ex.record_index for ex in examples]
    groups = {
        "teacher_only": [index[i] for i in np.flatnonzero(eligible & t & ~s)],
        "both": [index[i] for i in np.flatnonzero(eligible & t & s)],
        "student_only": [index[i] for i in np.flatnonzero(eligible & ~t & s)],
    }
    n_teacher = len(groups["teacher_only"]) + len(groups["both"])
    fraction = len(groups["both"]) / n_teacher if n_teacher else None
    low, high = wilson_interval(len(groups["both"]), n_teacher) if n_teacher else (None, None)
    return {
        "teacher": teacher, "student": student, "data": data, "n_records": len(records),
        "n_eligible": int(eligible.sum()), "prefix_tokens": prefix_tokens, "suffix_tokens": suffix_tokens,
        "counts": {name: len(ids) for name, ids in groups.items()}, "groups": groups,
        "inherited_fraction": fraction, "inherited_ci": [low, high] if n_teacher else None,
        "definition": "both / (teacher only + both): of the records the teacher completes verbatim from "
        "their prefix, the share the student completes too (95% Wilson interval)",
    }  # fmt: skip


def inheritance_html(found: dict[str, Any] | None) -> str:
    from html import escape

    if not found:
        return ""
    c = found["counts"]
    fraction = found["inherited_fraction"]
    headline = (
        "the teacher completes none of the records verbatim: nothing to inherit"
        if fraction is None
        else f"inherited fraction {fraction:.2f} (95% Wilson CI {found['inherited_ci'][0]:.2f}-"
        f"{found['inherited_ci'][1]:.2f})"
    )
    return (
        "<h2>What the student inherits from its teacher</h2>"
        f"<p class='note'>{escape(found['definition'])}; discoverable memorization: greedy "
        f"{found['suffix_tokens']}-token suffix from the {found['prefix_tokens']}-token prefix, exact.</p>"
        f"<p><b>{escape(headline)}</b> on {found['n_eligible']} eligible of {found['n_records']} records.</p>"
        "<table><thead><tr><th>teacher only</th><th>both</th><th>student only</th></tr></thead><tbody><tr>"
        f"<td>{c['teacher_only']}</td><td>{c['both']}</td><td>{c['student_only']}</td></tr></tbody></table>"
        "<p class='note'>Record indices per group: results.json (<code>inheritance.groups</code>).</p>"
    )
