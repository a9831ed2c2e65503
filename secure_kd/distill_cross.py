"""`secure-kd distill` with a student whose tokenizer differs from the teacher's, or whose logits differ
in width from the teacher's over one tokenizer: the steps `distill_job.run_distill` delegates here.

- `is_cross_tokenizer`: the tokenizers differ (their fingerprints), or the objective needs the
  alignment even over one tokenizer (`span_aligned`). What such a job cannot do is refused with the
  fix (`config.cross_tokenizer_problems`), at validate time when the specs alone prove it, else here.
- `model_vocabularies`: the `VocabPair` of the two models (real sizes, shared tokens), refusing a
  tokenizer with an id past its model's logits; one tokenizer in two widths is padding, trimmed.
- `cross_targets`: the live teacher on its own tokenization, or the top-k cache that stores the
  teacher's tokens and byte spans (`secure_kd.cache`) and trains the student without the teacher.
- `cross_evaluation`: bits per byte of a model on the held-out shared text (comparable across
  tokenizers) and top-1 agreement on one-to-one aligned groups (`secure_kd.evaluate.cross_agreement`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from secure_kd.config import ConfigError, DistillJob, cross_tokenizer_problems
from secure_kd.cross_teacher import (
    CachedCrossTeacher,
    LiveCrossTeacher,
    TrimmedLiveTeacher,
    padded_to_other_width,
)
from secure_kd.cross_tokenizer.vocab import VocabPair
from secure_kd.data.paired import PairedData
from secure_kd.evaluate import bits_per_byte, cross_tokenizer_agreement, paired_batches
from secure_kd.fingerprint import token_dataset_fingerprint, tokenizer_fingerprint
from secure_kd.losses import loss_info
from secure_kd.models import ModelLoadError, vocab_size_of
from secure_kd.teacher_targets import LiveTeacher

AGREEMENT_DEFINITION = (
    "top-1 agreement across tokenizers: at each one-to-one aligned group (the next token is a single "
    "token covering the same bytes after the same text on both sides), the student's and the teacher's "
    "most likely next tokens stand for the same bytes"
)


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def is_cross_tokenizer(job: DistillJob, student_tokenizer, teacher_tokenizer) -> bool:
    """Whether the job distils across tokenizers; refuses, with every fix, what that cannot do."""
    differ = tokenizer_fingerprint(student_tokenizer) != tokenizer_fingerprint(teacher_tokenizer)
    needs_alignment = job.kd.kd_weight > 0 and loss_info(job.kd.loss).cross_tokenizer == "required"
    if differ or needs_alignment:
        problems = cross_tokenizer_problems(job)
        if problems:
            raise ConfigError([("student.tokenizer" if differ else "kd.loss", p) for p in problems])
    return differ or needs_alignment


def model_vocabularies(
    student_tokenizer, teacher_tokenizer, student: nn.Module, teacher: nn.Module
) -> VocabPair:
    """The `VocabPair` of the loaded models; a ModelLoadError names a tokenizer that does not fit."""
    try:
        return VocabPair.from_tokenizers(
            student_tokenizer,
            teacher_tokenizer,
            student_width=vocab_size_of(student),
            teacher_width=vocab_size_of(teacher),
        )
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None


def same_tokenizer_targets(job: DistillJob, teacher: nn.Module, vocab: VocabPair):
    """Live targets over one tokenizer: trimmed to the real vocabulary when the widths differ."""
    if padded_to_other_width(vocab):
        return TrimmedLiveTeacher(teacher, job.kd.top_k, vocab.teacher.real_size)
    return LiveTeacher(teacher, job.kd.top_k)


def cross_targets(
    job: DistillJob,
    teacher: nn.Module,
    paired: PairedData,
    vocab: VocabPair,
    teacher_tokenizer,
    device,
    progress: bool,
) -> tuple[Any, dict[str, Any] | None]:
    """(targets, cache info) for a cross-tokenizer run: `LiveCrossTeacher` or `CachedCrossTeacher`."""
    if job.kd.teacher_targets == "live":
        pad = pad_id_of(teacher_tokenizer)
        return LiveCrossTeacher(teacher, paired.pairs, top_k=job.kd.top_k, vocab=vocab, pad_id=pad), None
    from secure_kd.cache import LogitCache, build_cache
    from secure_kd.distributed import current as current_distributed

    cache_dir = Path(job.cache_dir) if job.cache_dir else Path(job.out) / "teacher-cache"
    sequences = [pair.teacher.input_ids for pair in paired.pairs]
    tok_fp, data_fp = tokenizer_fingerprint(teacher_tokenizer), token_dataset_fingerprint(sequences)
    padded = vocab.teacher.padding > 0
    if current_distributed().is_main:  # data parallel: rank 0 builds, the others read (distill_job)
        build_cache(
            teacher,
            sequences,
            cache_dir,
            k=job.kd.top_k,
            teacher_id=job.teacher.source,
            tokenizer_fingerprint=tok_fp,
            dataset_fingerprint=data_fp,
            batch_size=job.train.batch_size,
            device=str(device),
            progress=progress,
            byte_spans=[pair.teacher_spans for pair in paired.pairs],
            text_fingerprint=paired.text_fingerprint,
            vocab_size=vocab.teacher.real_size if padded else None,
        )
    cache = LogitCache.open(
        cache_dir,
        expect_tokenizer=tok_fp,
        expect_dataset=data_fp,
        expect_k=job.kd.top_k,
        expect_text=paired.text_fingerprint,
    )
    info = {
        "dir": str(cache.directory),
        "bytes_per_token": cache.bytes_per_token,
        "k": job.kd.top_k,
        "teacher_tokenization": True,
    }
    return CachedCrossTeacher(cache, [pair.student_spans for pair in paired.pairs], device), info


def cross_evaluation(
    student: nn.Module,
    teacher: nn.Module,
    heldout: PairedData,
    *,
    student_tokenizer,
    teacher_tokenizer,
    vocab: VocabPair,
    batch_size: int,
    limit: int,
    device,
    with_teacher_bytes: bool = False,
) -> dict[str, Any]:
    """Bits per byte of the student (and of the teacher) on the held-out shared text, and agreement."""
    s_pad, t_pad = pad_id_of(student_tokenizer), pad_id_of(teacher_tokenizer)
    batches = paired_batches(heldout.pairs, "student", pad_id=s_pad, batch_size=batch_size, limit=limit)
    out: dict[str, Any] = {
        "student": bits_per_byte(student, batches, eos_id=student_tokenizer.eos_token_id, device=device),
        "agreement": cross_tokenizer_agreement(
            student,
            teacher,
            heldout.pairs,
            student_tokenizer=student_tokenizer,
            teacher_tokenizer=teacher_tokenizer,
            vocab=vocab,
            student_pad_id=s_pad,
            teacher_pad_id=t_pad,
            batch_size=batch_size,
            limit=limit,
            device=device,
        ),
    }
    if with_teacher_bytes:
        t_batches = paired_batches(heldout.pairs, "teacher", pad_id=t_pad, batch_size=batch_size, limit=limit)
        out["teacher"] = bits_per_byte(teacher, t_batches, eos_id=teacher_tokenizer.eos_token_id)
    return out
