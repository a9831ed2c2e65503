"""`kd.swing` in a distillation job: score the tokens of the user's own training sequences and wrap the
job's teacher targets (live, cached or padded-vocabulary) in `SwingTargets`.

The sequences are already tokenized (prompts, chat templates, packing), so the detectors run on the text
the tokens decode to: each token's character span comes from decoding it after a few tokens of context
(incremental detokenization, as streaming servers do), which keeps the leading spaces a sentencepiece
tokenizer drops when a token is decoded alone; special tokens get empty spans (score 0). A token's score
is the highest score of the detected spans it overlaps; position t of the targets takes token t+1's
score (the distribution that would reveal a private token is the one that predicts it).

The objective's temperature is `kd.temperature` (T_base); the noise of a sequence is drawn once from
(seed, its content), so a text repeated k times gets one draw, not k that average out. What results.json
records: how many tokens were flagged per detector (counts only, never the text) and that swing gives no
formal differential-privacy guarantee.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from secure_kd.data import TokenizedExample
from secure_kd.swing_targets import SwingTargets, content_keys, detect_spans, spans_to_token_scores
from secure_kd.teacher_targets import TeacherTargets

CONTEXT_TOKENS = 6
NO_DP_NOTE = (
    "swing distillation gives NO formal differential-privacy guarantee: it is a heuristic that lowers "
    "measured memorization of the tokens its detectors find; use DP-SGD (train.privacy) for a guarantee"
)


def decoded_offsets(ids: Sequence[int], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """(the text `ids` decode to, the character span of each token in it); special tokens span nothing.

    A token's text is decode(context + token) minus decode(context), the context being the previous
    `CONTEXT_TOKENS` non-special tokens. Where a byte-level token completes a character that the previous
    decode showed as U+FFFD, that character is given to the completing token."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    text, offsets, plain = "", [], []
    for token in ids:
        token = int(token)
        if token in special:
            offsets.append((len(text), len(text)))
            continue
        context = plain[-CONTEXT_TOKENS:]
        before = tokenizer.decode(context, clean_up_tokenization_spaces=False) if context else ""
        after = tokenizer.decode(context + [token], clean_up_tokenization_spaces=False)
        common = len(os.path.commonprefix([before, after]))
        text = text[: len(text) - (len(before) - common)]
        start = len(text)
        text += after[common:]
        offsets.append((start, len(text)))
        plain.append(token)
    return text, offsets


def example_token_scores(
    ids: Sequence[int], tokenizer: Any, detectors: Sequence[str]
) -> tuple[list[float], dict[str, int]]:
    """(the privacy score in [0, 1] of each token of `ids`, the number of tokens each detector flags)."""
    text, offsets = decoded_offsets(ids, tokenizer)
    found = detect_spans(text, detectors)
    scores = spans_to_token_scores(offsets, [span for spans in found.values() for span in spans])
    counts = {
        name: sum(1 for s in spans_to_token_scores(offsets, spans) if s > 0) for name, spans in found.items()
    }
    return scores, counts


def swing_job_targets(
    job: Any,
    base: TeacherTargets,
    tokenizer: Any,
    train: list[TokenizedExample],
    *,
    cross: bool,
    vocab_size: int | None,
) -> tuple[SwingTargets, dict[str, Any]]:
    """The job's targets with swing applied (job: a `DistillJob` with `kd.swing`), and its results.json
    section. `vocab_size`: the vocabulary the objective compares on (top-k targets temper their tail).
    A teacher with another tokenizer is refused: its positions are not the student's tokens."""
    kd, swing = job.kd, job.kd.swing
    if cross:
        raise ValueError(
            "kd.swing scores the student's tokens, but the teacher has another tokenizer (its targets sit on "
            "its own tokens); remove kd.swing or use one tokenizer for both models"
        )
    scores, per_detector = [], {name: 0 for name in swing.detectors}
    for example in train:
        row, counts = example_token_scores(example.input_ids, tokenizer, swing.detectors)
        scores.append(row)
        for name, n in counts.items():
            per_detector[name] += n
    targets = SwingTargets(
        base,
        scores,
        base_temperature=kd.temperature,
        max_temperature=swing.max_temperature,
        noise_std=swing.noise_std,
        seed=job.seed,
        noise_keys=content_keys(example.input_ids for example in train),
        vocab_size=vocab_size,
    )
    total = sum(len(row) for row in scores)
    flagged = sum(1 for row in scores for s in row if s > 0)
    info = {
        **swing.model_dump(mode="json"),
        "base_temperature": kd.temperature,
        "flagged_tokens": flagged,
        "train_tokens": total,
        "flagged_fraction": flagged / total if total else 0.0,
        "flagged_tokens_per_detector": per_detector,
        "formal_dp_guarantee": False,
        "note": NO_DP_NOTE,
    }
    return targets, info
