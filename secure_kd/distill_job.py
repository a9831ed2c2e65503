"""`secure-kd distill`: from a validated `DistillJob` to a trained student and `<out>/results.json`.

Steps: seed everything, build the data (local file or the synthetic corpus), the tokenizer, the
teacher and the student; evaluate both on held-out text; build the teacher's top-k cache once
when training from the cache; train with the Distiller; evaluate again; save the student and
the results.

A student with its own tokenizer (`student.tokenizer`) tokenizes the same text as the teacher with
byte offsets (`secure_kd.data.paired`) and distils by `uld` or `span_aligned`; the steps that differ
are in `secure_kd.distill_cross`, and results.json gains a `cross_tokenizer` section (bits per byte,
agreement on aligned groups). Over one tokenizer, logits padded to two widths are trimmed.

Launched by torchrun or accelerate launch (`secure_kd.distributed`), every process runs this job on
the same data (checked: the ranks' training data fingerprints must agree) and trains one share of
each global batch; rank 0 alone builds the teacher cache (the others wait, then read it) and writes
the tokenizer, checkpoints, the student, results.json and privacy.json. Every rank evaluates (on
its own device, at the same time: no wall-clock cost) and returns the same result.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from secure_kd.audit_canaries import SIDECAR_NAME, insert_canaries, make_canaries, write_sidecar
from secure_kd.audit_canaries import TOPIC as AUDIT_CANARY_TOPIC
from secure_kd.config import SCHEMA_VERSION, DistillJob, check_against_vocab
from secure_kd.data import (
    TokenizedExample,
    collate,
    fingerprint_examples,
    generate_corpus,
    load_records,
    pack_examples,
    tokenize_records,
    train_tiny_tokenizer,
)
from secure_kd.data.paired import tokenize_pairs
from secure_kd.data.tokenizer import load_tokenizer_dir
from secure_kd.data.users import assign_synthetic_users, grouping_fingerprint, user_ids
from secure_kd.distill_cross import (
    AGREEMENT_DEFINITION,
    cross_evaluation,
    cross_targets,
    is_cross_tokenizer,
    model_vocabularies,
    pad_id_of,
    same_tokenizer_targets,
)
from secure_kd.distributed import Distributed, launched
from secure_kd.evaluate import perplexity, teacher_agreement
from secure_kd.evaluate.teacher_logprobs import TeacherLogProbs, fits
from secure_kd.evaluate.teacher_logprobs import shared as shared_logprobs
from secure_kd.fingerprint import tokenizer_fingerprint
from secure_kd.hacking_callback import attach_to_job
from secure_kd.models import (
    count_parameters,
    load_student,
    load_teacher,
    load_tokenizer,
    resolve_device,
    vocab_size_of,
)
from secure_kd.multi_teacher import ensemble_summary, load_teacher_ensemble
from secure_kd.paths import atomic_write_json
from secure_kd.self_distill import ledger_texts, privileged_targets, self_teacher
from secure_kd.swing_job import swing_job_targets
from secure_kd.teacher_targets import CachedTeacher
from secure_kd.trainer import Distiller, config_hash

TOKENIZER_CAVEAT = (
    "the tokenizer was trained on the private training text (tokenizer: tiny:N): its vocabulary is "
    "outside the DP guarantee; train it on public text for a complete guarantee"
)


class EvalSummary(BaseModel):
    perplexity: float
    nll: float
    tokens: int


class DistillResult(BaseModel):
    schema_version: int = SCHEMA_VERSION
    kind: str = "distill"
    config: dict[str, Any]
    teacher: dict[str, Any]
    student: dict[str, Any]
    data: dict[str, Any]
    teacher_eval: EvalSummary
    student_before: EvalSummary
    student_after: EvalSummary
    agreement_before: float
    agreement_after: float
    steps: int
    train_tokens: int
    train_seconds: float
    tokens_per_second: float
    final_loss: float
    losses: list[float]
    resumed_from: int | None
    student_dir: str
    cache: dict[str, Any] | None = None
    privacy: dict[str, Any] | None = None
    cross_tokenizer: dict[str, Any] | None = None
    audit_canaries: dict[str, Any] | None = None
    teachers: dict[str, Any] | None = None
    swing: dict[str, Any] | None = None
    teacher_hacking: dict[str, Any] | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _records(job: DistillJob) -> tuple[list[dict], list[dict], dict[str, Any], list[dict]]:
    """(training records, held-out records, data info, every record of the training source).

    The last is the dataset before any seed-dependent split or truncation: the privacy ledger is
    keyed on it, so a new `seed`, `heldout_fraction` or `max_records` draws on the same budget."""
    data = job.data
    if data.train == "synthetic":
        syn = data.synthetic
        corpus = generate_corpus(
            syn.n_records,
            seed=job.seed if syn.seed is None else syn.seed,
            n_canaries=syn.n_canaries,
            canary_repeats=syn.canary_repeats,
            secret_digits=syn.secret_digits,
        )
        if syn.n_users is not None:
            records = assign_synthetic_users(
                corpus.records, [c.record_ids for c in corpus.canaries], syn.n_users, seed=corpus.seed or 0
            )
            corpus = dataclasses.replace(corpus, records=records)
        train, heldout = corpus.split(data.heldout_fraction, seed=job.seed)
        info = {"source": "synthetic", "canaries": [c.secret for c in corpus.canaries]}
        return list(train.records), list(heldout.records), info, list(corpus.records)
    train = [dict(r) for r in load_records(data.train)]
    source = list(train)
    if data.heldout is not None:
        heldout = [dict(r) for r in load_records(data.heldout)]
    else:
        order = np.random.default_rng(job.seed).permutation(len(train)).tolist()
        n_held = max(1, int(len(train) * data.heldout_fraction))
        heldout = [train[i] for i in order[:n_held]]
        train = [train[i] for i in sorted(order[n_held:])]
    if data.max_records is not None:
        train = train[: data.max_records]
    return train, heldout, {"source": data.train}, source


def record_text(record: dict, text_field: str) -> str:
    """All the text of a record, whatever its schema (for training a tokenizer on it)."""
    if text_field in record:
        return str(record[text_field])
    if "messages" in record:
        return "\n".join(str(m.get("content", "")) for m in record["messages"])
    return "\n".join(str(record.get(k, "")) for k in ("prompt", "completion"))


def _tokenizer(
    job: DistillJob, texts: list[str], out: Path, spec: str | None = None, name: str = "tokenizer"
):
    spec = job.tokenizer if spec is None else spec
    if spec == "teacher":
        if job.teacher.source == "tiny":
            raise ValueError(
                "tokenizer: teacher needs a teacher with a tokenizer; a tiny random teacher has none. "
                "Use tokenizer: tiny:512 (trained on the data) or a tokenizer directory."
            )
        return load_tokenizer(job.teacher.source, trust_remote_code=job.teacher.trust_remote_code)
    if spec.startswith("tiny:"):
        tok = train_tiny_tokenizer(texts, vocab_size=int(spec.split(":", 1)[1]))
        if _is_main_process():
            tok.save_pretrained(out / name)
        return tok
    if not (Path(spec) / "config.json").is_file():  # a tokenizer saved on its own
        return load_tokenizer_dir(spec)
    return load_tokenizer(spec)


def _eval_batches(examples: list[TokenizedExample], pad_id: int, batch_size: int, limit: int) -> list[dict]:
    chunks = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)][:limit]
    return [collate(chunk, pad_id=pad_id) for chunk in chunks]


def _evaluate(model, batches, device) -> EvalSummary:
    result = perplexity(model, batches, device=device)
    return EvalSummary(perplexity=result["perplexity"], nll=result["nll"], tokens=result["tokens"])


def _teacher_key(job: DistillJob, device, width: int) -> str | None:
    """What identifies the teacher's weights across runs of one process; None when nothing does (a
    served model, a directory without safetensors)."""
    blocks = [job.teacher, *(job.teachers or [])]
    parts = [str(device), str(job.seed), str(width)]
    for block in blocks:
        source = block.source
        if source == "served":
            return None
        if source not in ("smollm2", "tiny"):
            files = sorted(Path(source).glob("*.safetensors"))
            if not files:
                return None
            parts += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
        parts.append(json.dumps(block.model_dump(mode="json"), sort_keys=True))
    if job.teachers:
        parts.append(f"{job.kd.teacher_rule}:{job.kd.trim_fraction}")
    return "|".join(parts)


def _agreement(
    student, teacher, batches, device, fixed: TeacherLogProbs | None, vocab, padded: bool
) -> float:
    if fixed is not None:
        return fixed.agreement(student, device=device)["top1_agreement"]
    real = vocab.teacher.real_size if padded else None
    return teacher_agreement(student, teacher, batches, device=device, real_vocab=real)["top1_agreement"]


def _build_cache(
    job: DistillJob, teacher, examples, tok_fp: str, data_fp: str, device, progress: bool, vocab_size=None
):
    from secure_kd.cache import LogitCache, build_cache

    cache_dir = Path(job.cache_dir) if job.cache_dir else Path(job.out) / "teacher-cache"
    if _is_main_process():  # under data parallelism the others read it once rank 0 built it
        build_cache(
            teacher,
            [ex.input_ids for ex in examples],
            cache_dir,
            k=job.kd.top_k,
            teacher_id=job.teacher.source,
            tokenizer_fingerprint=tok_fp,
            dataset_fingerprint=data_fp,
            batch_size=job.train.batch_size,
            device=str(device),
            progress=progress,
            vocab_size=vocab_size,
        )
    return LogitCache.open(cache_dir, expect_tokenizer=tok_fp, expect_dataset=data_fp, expect_k=job.kd.top_k)


def _is_main_process() -> bool:
    from secure_kd.distributed import current

    return current().is_main


def _silent(message: str) -> None:
    pass


def _check_same_data(dist: Distributed, data_fp: str) -> None:
    """Every rank must train on the same sequences, or the shards of a global batch mean nothing."""
    if not dist.enabled:
        return
    main_fp = dist.broadcast_str(data_fp)
    (differ,) = dist.sum([int(main_fp != data_fp)], dtype=torch.int64)
    if differ:
        raise ValueError(
            f"the {dist.world_size} processes do not have the same training data ({differ} of them differ "
            "from rank 0 after tokenization): every process must read the same data files with the same "
            "config and tokenizer; a tokenizer trained per process (tokenizer: tiny:N) must come out "
            "identical on each, else train it once and give its directory"
        )


def _with_audit_canaries(
    job: DistillJob, train_records: list[dict], source_records: list[dict], dist: Distributed
) -> tuple[list[dict], dict[str, Any]]:
    """The training records with the inserted audit canaries, and what results.json says of them (how
    many, not which: that is in the private sidecar, written by rank 0)."""
    spec = job.audit.canaries
    texts = [record_text(r, job.data.text_field) for r in source_records]
    canaries = make_canaries(spec.n, spec.seed, avoid=texts)
    records = insert_canaries(train_records, canaries, text_field=job.data.text_field, seed=spec.seed)
    sidecar = Path(job.out) / SIDECAR_NAME
    if dist.is_main:
        write_sidecar(job.out, canaries, n=spec.n, seed=spec.seed)
    n_in = sum(c.inserted for c in canaries)
    return records, {"n": spec.n, "seed": spec.seed, "n_inserted": n_in, "sidecar": str(sidecar)}


def _users(job: DistillJob, source_records: list[dict], train_records: list[dict], train: list) -> dict:
    """User-level DP: the user of each training example, and the grouping fingerprint of the source.

    Every record of the source must name its user (checked there, so the error gives the record's
    position in data.train); an audit canary is a user of its own."""
    field = job.data.user_field
    source_keys = user_ids(source_records, field)
    texts = [record_text(r, job.data.text_field) for r in source_records]
    grouping = grouping_fingerprint(texts, source_keys)
    keys = []
    for index, record in enumerate(train_records):
        if record.get("topic") == AUDIT_CANARY_TOPIC:
            keys.append(("audit-canary", index))
        else:
            keys.append(user_ids([record], field, source="the training records")[0])
    return {
        "user_of_example": [keys[example.record_index] for example in train],
        "user_field": field,
        "user_grouping": grouping,
    }


def run_distill(job: DistillJob, *, resume: bool = False, progress: bool = True, log=print) -> DistillResult:
    """Run the job (data parallel when launched by torchrun or accelerate launch); see the module."""
    with launched(resolve_device(job.device)) as (dist, device):
        return _run_distill(
            job,
            dist,
            device,
            resume=resume,
            progress=progress and dist.is_main,
            log=log if dist.is_main else _silent,
        )


def _run_distill(
    job: DistillJob, dist: Distributed, device: torch.device, *, resume: bool, progress: bool, log
) -> DistillResult:
    out = Path(job.out)
    if dist.is_main:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new run directory: its owner's only
    seed_everything(job.seed)

    train_records, heldout_records, data_info, source_records = _records(job)
    canary_info = None
    if job.audit.canaries is not None:  # one-run DP audit: after the split, so none is held out
        train_records, canary_info = _with_audit_canaries(job, train_records, source_records, dist)
    # A tokenizer trained on the canaries can learn a secret as one token and fake high exposure.
    tokenizer_texts = [
        record_text(r, job.data.text_field)
        for r in train_records
        if r.get("topic") not in ("canary", AUDIT_CANARY_TOPIC)
    ]
    teacher_tok = _tokenizer(job, tokenizer_texts, out, job.teacher_tokenizer)
    tokenizer = teacher_tok  # the student's
    if job.student_tokenizer != job.teacher_tokenizer:
        tokenizer = _tokenizer(job, tokenizer_texts, out, job.student_tokenizer, "student-tokenizer")
    cross = is_cross_tokenizer(job, tokenizer, teacher_tok)
    pad_id, teacher_pad = pad_id_of(tokenizer), pad_id_of(teacher_tok)
    tokenize = dict(
        max_length=job.data.max_length, text_field=job.data.text_field, mask_prompt=job.data.mask_prompt
    )
    paired = paired_heldout = None
    if cross:
        pair_args = dict(tokenize, teacher_max_length=job.kd.teacher_max_length)
        paired = tokenize_pairs(train_records, tokenizer, teacher_tok, **pair_args)
        paired_heldout = tokenize_pairs(heldout_records, tokenizer, teacher_tok, **pair_args)
        train, heldout = paired.students, paired_heldout.students
    else:
        train = tokenize_records(train_records, tokenizer, **tokenize)
        heldout = tokenize_records(heldout_records, tokenizer, **tokenize)
    if job.data.packing:
        train = pack_examples(train, job.data.max_length, eos_id=tokenizer.eos_token_id)
    if not train or not heldout:
        raise ValueError(
            f"after tokenization there are {len(train)} training and {len(heldout)} held-out sequences; "
            "give more records or a larger data.max_length"
        )

    teacher = load_teacher(
        job.teacher, vocab_size=len(teacher_tok), seed=job.seed, pad_token_id=teacher_pad
    ).to(device)
    student_width = len(tokenizer) if cross else vocab_size_of(teacher)
    student = load_student(
        job.student, teacher=teacher, vocab_size=student_width, seed=job.seed, pad_token_id=pad_id
    ).to(device)
    if job.kd.mode == "self_privileged":  # the teacher is the student's own weights
        teacher = self_teacher(student, job.kd.self_teacher)
    if job.teachers:  # several teachers, combined per position by kd.teacher_rule (secure_kd.multi_teacher)
        teacher = load_teacher_ensemble(job, teacher, teacher_tok, pad_token_id=teacher_pad, device=device)
    vocab = model_vocabularies(tokenizer, teacher_tok, student, teacher)
    padded = not cross and vocab.student.width != vocab.teacher.width
    if padded:  # one tokenizer in two widths: padding, trimmed (anything else is refused here)
        same_tokenizer_targets(job, teacher, vocab)
    check_against_vocab(job, vocab.teacher.real_size)

    eval_batches = _eval_batches(heldout, pad_id, job.train.batch_size, job.train.eval_batches)
    teacher_batches = eval_batches
    if cross:
        teacher_batches = _eval_batches(
            paired_heldout.teachers, teacher_pad, job.train.batch_size, job.train.eval_batches
        )
    log(
        f"evaluating teacher and student on {sum(len(b['input_ids']) for b in eval_batches)} "
        "held-out records ..."
    )
    cross_eval = dict(
        heldout=paired_heldout,
        student_tokenizer=tokenizer,
        teacher_tokenizer=teacher_tok,
        vocab=vocab,
        batch_size=job.train.batch_size,
        limit=job.train.eval_batches,
        device=device,
    )
    # one teacher pass serves its perplexity and both agreements (a self-teacher changes as it trains)
    fixed = None
    fixed_teacher = job.kd.mode != "self_privileged"
    if not cross and not padded and fixed_teacher and fits(eval_batches, vocab.teacher.width):
        fixed = shared_logprobs(teacher, eval_batches, _teacher_key(job, device, vocab.teacher.width))
    if fixed is not None:
        found = fixed.perplexity()
        teacher_eval = EvalSummary(perplexity=found["perplexity"], nll=found["nll"], tokens=found["tokens"])
    else:
        teacher_eval = _evaluate(teacher, teacher_batches, device)
    teachers_info = None
    if job.teachers:
        each = [_evaluate(member, teacher_batches, device).perplexity for member in teacher.teachers]
        teachers_info = ensemble_summary(job, teacher, each)
    student_before = _evaluate(student, eval_batches, device)
    if cross:
        cross_before = cross_evaluation(student, teacher, with_teacher_bytes=True, **cross_eval)
        agreement_before = cross_before["agreement"]["top1_agreement"]
    else:
        agreement_before = _agreement(student, teacher, eval_batches, device, fixed, vocab, padded)

    tok_fp, data_fp = tokenizer_fingerprint(tokenizer), fingerprint_examples(train)
    _check_same_data(dist, data_fp)
    cache_info = None
    if cross:
        with dist.main_first():  # rank 0 builds a cache, the others then read it
            targets, cache_info = cross_targets(job, teacher, paired, vocab, teacher_tok, device, progress)
    elif job.kd.teacher_targets == "cache":
        real_size = vocab.teacher.real_size if padded else None
        with dist.main_first():
            cache = _build_cache(job, teacher, train, tok_fp, data_fp, device, progress, real_size)
        targets = CachedTeacher(cache, device)
        cache_info = {
            "dir": str(cache.directory),
            "bytes_per_token": cache.bytes_per_token,
            "k": job.kd.top_k,
        }
    else:
        targets = same_tokenizer_targets(job, teacher, vocab)
    if job.kd.mode == "self_privileged":
        targets = privileged_targets(job, teacher, tokenizer, train_records, train)
    swing_info = None
    if job.kd.swing is not None:  # hotter, noised targets where the next token is flagged private
        width = vocab.teacher.real_size if padded else vocab.student.width
        targets, swing_info = swing_job_targets(job, targets, tokenizer, train, cross=cross, vocab_size=width)
        log(f"swing: {swing_info['flagged_tokens']} of {swing_info['train_tokens']} training tokens flagged")

    run_hash = config_hash(
        {
            **job.model_dump(
                exclude={"out": True, "train": {"max_steps", "epochs", "checkpoint_every", "log_every"}}
            ),
            "data_fingerprint": data_fp,
            "text_fingerprint": paired.text_fingerprint if paired is not None else None,
        }
    )
    trainer_args = dict(
        student=student,
        teacher=teacher,
        targets=targets,
        examples=train,
        kd=job.kd,
        train=job.train,
        out=out,
        pad_id=pad_id,
        eos_id=tokenizer.eos_token_id,
        seed=job.seed,
        device=device,
        run_hash=run_hash,
        progress=progress,
        vocab=vocab,
    )
    if job.train.privacy is not None:
        from secure_kd.dp.ledger import dataset_key
        from secure_kd.dp.trainer import DPDistiller

        # every record of the source, before the seed-dependent split: one budget per dataset. Audit
        # canaries are not in the key (another canary seed must not open a fresh budget on the same
        # records); they are trained, sampled and counted in the sample rate like any record.
        texts = [record_text(r, job.data.text_field) for r in source_records]
        key = dataset_key(ledger_texts(source_records, texts, job.data.privileged_field))
        caveats = []
        if job.teacher_tokenizer.startswith("tiny:") or job.student_tokenizer.startswith("tiny:"):
            caveats.append(TOKENIZER_CAVEAT)
            log(f"warning: {TOKENIZER_CAVEAT}")
        users = _users(job, source_records, train_records, train) if job.train.privacy.unit == "user" else {}
        distiller = DPDistiller(dataset_key=key, log=log, caveats=caveats, **users, **trainer_args)
    else:
        distiller = Distiller(**trainer_args)
    hacking = None
    if job.train.teacher_hacking is not None:  # proxy and golden every N steps; warn or stop
        hacking = attach_to_job(job, distiller, eval_batches, device, log)
    log(
        f"training {count_parameters(student, trainable_only=True):,} parameters "
        f"for {distiller.total_steps} steps "
        f"on {len(train)} sequences ({job.kd.loss}, targets: {job.kd.teacher_targets}) ..."
    )
    started = time.perf_counter()
    fit = distiller.fit(resume=resume)
    train_seconds = time.perf_counter() - started

    student.eval()
    student_after = _evaluate(student, eval_batches, device)
    cross_info = None
    if cross:
        cross_after = cross_evaluation(student, teacher, **cross_eval)
        agreement_after = cross_after["agreement"]["top1_agreement"]
        cross_info = {
            "teacher_tokenizer": tokenizer_fingerprint(teacher_tok),
            "student_vocab": vocab.student.real_size,
            "teacher_vocab": vocab.teacher.real_size,
            "shared_tokens": vocab.n_shared,
            "text_fingerprint": paired.text_fingerprint,
            "teacher_bits_per_byte": cross_before["teacher"],
            "student_bits_per_byte_before": cross_before["student"],
            "student_bits_per_byte_after": cross_after["student"],
            "agreement_before": cross_before["agreement"],
            "agreement_after": cross_after["agreement"],
            "agreement_definition": AGREEMENT_DEFINITION,
            "note": "teacher_eval perplexity is per teacher token, student_* per student token: compare "
            "the models by bits per byte",
        }
    else:
        agreement_after = _agreement(student, teacher, eval_batches, device, fixed, vocab, padded)

    student_dir = out / "student"
    to_save = student.merge_and_unload() if hasattr(student, "merge_and_unload") else student
    if dist.is_main:
        to_save.save_pretrained(student_dir, safe_serialization=True)
        tokenizer.save_pretrained(student_dir)

    result = DistillResult(
        config=job.model_dump(mode="json"),
        teacher={
            "source": job.teacher.source,
            "parameters": count_parameters(teacher),
            "quantization": "Q4_1 (dequantized)" if job.teacher.source == "smollm2" else None,
        },
        student={
            "source": job.student.source,
            "parameters": count_parameters(student),
            "trainable_parameters": count_parameters(student, trainable_only=True),
        },
        data={
            **data_info,
            "train_sequences": len(train),
            "heldout_sequences": len(heldout),
            "train_tokens": sum(len(e) for e in train),
            "fingerprint": data_fp,
            "tokenizer": tok_fp,
        },
        teacher_eval=teacher_eval,
        student_before=student_before,
        student_after=student_after,
        agreement_before=agreement_before,
        agreement_after=agreement_after,
        steps=fit.steps,
        train_tokens=fit.tokens,
        train_seconds=train_seconds,
        tokens_per_second=fit.tokens_per_second,
        final_loss=fit.losses[-1] if fit.losses else float("nan"),
        losses=fit.losses,
        resumed_from=fit.resumed_from,
        student_dir=str(student_dir),
        cache=cache_info,
        swing=swing_info,
        teacher_hacking=hacking.summary(fit.stopped_at) if hacking is not None else None,
        privacy=distiller.report.model_dump(mode="json") if getattr(distiller, "report", None) else None,
        cross_tokenizer=cross_info,
        audit_canaries=canary_info,
        teachers=teachers_info,
    )
    # private: losses and evaluations on private text are not covered by DP (docs/privacy.md)
    if dist.is_main:
        atomic_write_json(out / "results.json", result.model_dump(mode="json"), mode=0o600)
    return result
