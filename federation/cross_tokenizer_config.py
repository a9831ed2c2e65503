"""`organization_models`: a tokenizer and a student per organization, and what a job across tokenizers
may combine.

    organization_models:
      2: {tokenizer: "tiny:512", student: {source: tiny, tiny: {hidden_size: 32}}}
      3: {tokenizer: "tiny:512"}

An organization not listed uses the job's `tokenizer` and its student (`student`, or `students[i % n]`).
When two organizations end up with different tokenizers the job is *cross-tokenizer*: only `fed_distill`
federates it, with soft labels on the byte-aligned layout of the transfer text
(`federation.byte_layout`). Everything that shares token ids, weights over one vocabulary or a model
scoring the text with one tokenizer is refused with the field and the fix ("No anchor federates across
tokenizers"). `transfer.layout: bytes` puts a one-tokenizer fed_distill on the byte-aligned layout too
(to compare tokenizers with the layout held equal); `tokens` across tokenizers is refused. `problems`
takes the job duck-typed, so that `federation.config` can call it without an import cycle.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from secure_kd.config import ModelConfig, Strict

NO_ANCHOR = "No anchor federates across tokenizers"


class OrganizationModel(Strict):
    """One organization's own tokenizer and student (both default to the job's)."""

    tokenizer: str | None = Field(
        None,
        description="'tiny:<vocab>' (trained on the public records, like the job's) or a tokenizer "
        "directory / smollm2; none: the job's tokenizer",
    )
    student: ModelConfig | None = Field(None, description="this organization's student; none: the job's")


def tokenizer_of(job: Any, index: int) -> str:
    """The tokenizer spec organization `index` uses."""
    own = job.organization_models.get(index)
    return own.tokenizer if own is not None and own.tokenizer is not None else job.tokenizer


def tokenizer_specs(job: Any) -> list[str]:
    """The distinct tokenizers the organizations use, in organization order."""
    return list(dict.fromkeys(tokenizer_of(job, i) for i in range(job.n_organizations)))


def is_cross_tokenizer(job: Any) -> bool:
    return len(tokenizer_specs(job)) > 1


def uses_byte_layout(job: Any) -> bool:
    """Soft labels on the byte-aligned layout: across tokenizers, or where `transfer.layout` asks."""
    return job.transfer.layout == "bytes" or (job.transfer.layout == "auto" and is_cross_tokenizer(job))


_MODE_REASONS = {
    "fedavg": "averages weights whose embedding and output rows are one tokenizer's token ids",
    "pate": "counts votes for one tokenizer's token ids",
    "p2p": "sends a peer soft labels over one tokenizer's token ids",
}


def _spec_problem(spec: str, where: str) -> str | None:
    if spec.startswith("tiny:"):
        size = spec.split(":", 1)[1]
        if not size.isdigit() or int(size) < 259:
            return f"{where}={spec!r}: give 'tiny:<vocab>' with vocab >= 259 (256 bytes + 3 special tokens)"
    if spec == "teacher":
        return f"{where}: teacher is the job's teacher tokenizer; name the tokenizer itself (e.g. smollm2)"
    return None


def _byte_layout_problems(job: Any) -> list[str]:
    """transfer.layout: bytes with one tokenizer: what the byte-aligned layout cannot carry."""
    found = []
    if job.mode != "fed_distill":
        found.append(f"transfer.layout: bytes is a layout of fed_distill's soft labels; mode is {job.mode}")
    if job.transfer.reference is not None:
        found.append("transfer.layout: bytes needs no reference model; drop transfer.reference")
    if job.transfer.filtering is not None:
        found.append("transfer.filtering weights token positions; with transfer.layout: bytes drop it")
    if job.adversaries:
        found.append("adversaries are not supported on the byte-aligned layout yet; drop adversaries")
    return found


def problems(job: Any) -> list[str]:
    """Every inconsistency of `organization_models` with the rest of the job, each with its fix."""
    found: list[str] = []
    models = job.organization_models
    bad = sorted(i for i in models if not 0 <= i < job.n_organizations)
    if bad:
        found.append(
            f"organization_models names organizations {bad}, outside 0..{job.n_organizations - 1}: key it "
            "by organization index"
        )
    for index, own in sorted(models.items()):
        if own.tokenizer is not None:
            problem = _spec_problem(own.tokenizer, f"organization_models.{index}.tokenizer")
            if problem:
                found.append(problem)
        if own.student is not None and own.student.source == "teacher_layers":
            found.append(
                f"organization_models.{index}.student.source: teacher_layers copies the job's teacher with "
                "its vocabulary; give a tiny student, a model directory or smollm2"
            )
        if own.student is not None and job.mode == "fedavg" and own.student != job.student:
            found.append(
                f"organization_models.{index}.student: fedavg averages weights, so every organization needs "
                "the job's student; drop it or use mode fed_distill"
            )
    cross = is_cross_tokenizer(job)
    if not cross and uses_byte_layout(job):
        found.extend(_byte_layout_problems(job))
    if not cross:
        return found
    specs = ", ".join(tokenizer_specs(job))
    if job.transfer.layout == "tokens":
        found.append(
            f"{NO_ANCHOR}: transfer.layout: tokens puts one tokenizer's ids in the shared slots, and the "
            f"organizations use {specs}; set transfer.layout: bytes (or auto)"
        )
    if job.mode != "fed_distill":
        found.append(
            f"{NO_ANCHOR}: the organizations use tokenizers {specs}, and mode {job.mode} "
            f"{_MODE_REASONS.get(job.mode, 'shares one vocabulary')}. Use mode: fed_distill (soft labels "
            "on byte-aligned spans of the public transfer text), or give every organization the job's "
            "tokenizer (drop organization_models.<i>.tokenizer)"
        )
    if job.transfer.reference is not None:
        found.append(
            f"{NO_ANCHOR}: transfer.reference ranks one tokenizer's token ids at each position, and the "
            f"organizations use {specs}; drop transfer.reference (the byte-aligned layout needs no model)"
        )
    if job.transfer.filtering is not None:
        found.append(
            "transfer.filtering weights the positions of one tokenizer's layout; across tokenizers drop it"
        )
    if job.teacher is not None:
        found.append(
            "teacher: a local teacher is built with the job's tokenizer, and the organizations use "
            f"{specs}; across tokenizers drop teacher (local training is language modelling)"
        )
    if job.adversaries:
        found.append("adversaries are not supported across tokenizers yet; drop adversaries")
    if job.tokenizer == "teacher":
        found.append("tokenizer: teacher needs a teacher, which a job across tokenizers has not")
    return found
