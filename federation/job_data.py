"""What every participant derives identically from the job alone: the public sets, the tokenizer, the
soft-label layout (with `transfer.reference`, from that public model's top-k on the transfer text; across
tokenizers, `organization_models`, the byte-aligned layout of `federation.byte_layout` built from every
organization's tokenizer). `organization_data(job, i)` is organization i's view: the same sets and layout,
tokenized with its own tokenizer.

Every organization and the server compute the same `JobData` from the same job (`job_data` caches it
per process, keyed by `job_digest`), so none of it ever travels in a message. Shared by the ClientApp
(its workspace), the ServerApp (its session), the export and the attack evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from federation.byte_layout import build_byte_layout
from federation.config import FederatedJob
from federation.cross_tokenizer_config import tokenizer_of, tokenizer_specs, uses_byte_layout
from federation.partition import FederatedSplit, federated_split
from federation.soft_labels import SoftLabelLayout, build_layout
from secure_kd.data import TokenizedExample, tokenize_records, train_tiny_tokenizer
from secure_kd.models import load_teacher, load_tokenizer
from secure_kd.trainer import config_hash


@dataclass(frozen=True)
class JobData:
    """What every organization derives identically from the job: public sets, tokenizer, layout."""

    split: FederatedSplit
    tokenizer: Any
    pad_id: int
    test: list[TokenizedExample]
    transfer: list[TokenizedExample]
    layout: SoftLabelLayout

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)


_JOB_DATA: dict[str, JobData] = {}


def job_digest(job: FederatedJob) -> str:
    return config_hash(job.model_dump(mode="json", exclude={"out", "simulate_faults", "rounds"}))


def record_text(record: dict[str, Any], field: str) -> str:
    return str(record.get(field, record.get("text", "")))


def _tokenizer(job: FederatedJob, split: FederatedSplit, spec: str | None = None):
    spec = job.tokenizer if spec is None else spec
    if spec.startswith("tiny:"):
        texts = [record_text(r, job.data.text_field) for r in split.test + split.transfer]
        return train_tiny_tokenizer(texts, vocab_size=int(spec.split(":", 1)[1]))
    if spec == "teacher":
        if job.teacher is None or job.teacher.source == "tiny":
            raise ValueError("tokenizer: teacher needs a teacher with a tokenizer (smollm2 or a directory)")
        return load_tokenizer(job.teacher.source, trust_remote_code=job.teacher.trust_remote_code)
    return load_tokenizer(spec)


def _layout(job: FederatedJob, transfer: list[TokenizedExample], vocab_size: int, pad_id: int):
    """The soft-label layout: the unigram index, or `transfer.reference`'s top-k (loaded for this only)."""
    k = min(job.transfer.index_k, vocab_size - 1)
    spec = job.transfer.reference
    if spec is None:
        return build_layout(transfer, k, vocab_size)
    reference = load_teacher(spec, vocab_size=vocab_size, seed=job.seed, pad_token_id=pad_id)
    try:
        return build_layout(transfer, k, vocab_size, reference=reference)
    finally:
        del reference


def _tokenized(job: FederatedJob, split: FederatedSplit, spec: str):
    """(tokenizer, pad id, test examples, transfer examples) with tokenizer `spec`."""
    tokenizer = _tokenizer(job, split, spec)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokenize = dict(
        max_length=job.data.max_length, text_field=job.data.text_field, mask_prompt=job.data.mask_prompt
    )
    test = tokenize_records(split.test, tokenizer, **tokenize)
    transfer = tokenize_records(split.transfer, tokenizer, **tokenize)
    return tokenizer, pad_id, test, transfer


def _build(job: FederatedJob) -> dict[str, JobData]:
    """JobData per tokenizer spec: the job's own, and every organization's across tokenizers."""
    split = federated_split(job)
    used = tokenizer_specs(job)
    sides = {spec: _tokenized(job, split, spec) for spec in dict.fromkeys([job.tokenizer, *used])}
    if uses_byte_layout(job):
        texts = [record_text(r, job.data.text_field) for r in split.transfer]
        layout = build_byte_layout(
            texts,
            {spec: sides[spec][0] for spec in used},
            {spec: sides[spec][3] for spec in used},
            job.transfer.index_k,
        )
    else:
        tokenizer, pad_id, _, transfer = sides[used[0]]
        layout = _layout(job, transfer, len(tokenizer), pad_id)
    return {spec: JobData(split, *side, layout) for spec, side in sides.items()}


def job_data(job: FederatedJob) -> JobData:
    """The public part of the job, computed once per process (with the job's `tokenizer`)."""
    key = job_digest(job)
    if key not in _JOB_DATA:
        built = _build(job)
        for spec, data in built.items():  # the job's own last: once it is there, every view is
            if spec != job.tokenizer:
                _JOB_DATA[f"{key}/{spec}"] = data
        _JOB_DATA[key] = built[job.tokenizer]
    return _JOB_DATA[key]


def organization_data(job: FederatedJob, index: int) -> JobData:
    """Organization `index`'s public data: `job_data`, tokenized with its own tokenizer
    (`organization_models`); the layout is the job's, shared by all."""
    spec = tokenizer_of(job, index)
    base = job_data(job)
    return base if spec == job.tokenizer else _JOB_DATA[f"{job_digest(job)}/{spec}"]
