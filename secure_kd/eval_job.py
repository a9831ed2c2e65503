"""`secure-kd eval`: perplexity on held-out text, and top-1 agreement with a teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from secure_kd.config import SCHEMA_VERSION, EvalJob
from secure_kd.data import collate, generate_corpus, load_records, tokenize_records
from secure_kd.evaluate import perplexity, teacher_agreement
from secure_kd.models import load_pretrained, load_tokenizer, resolve_device
from secure_kd.paths import atomic_write_json


class EvalResult(BaseModel):
    schema_version: int = SCHEMA_VERSION
    kind: str = "eval"
    config: dict[str, Any]
    perplexity: float
    nll: float
    tokens: int
    top1_agreement: float | None = None
    mean_forward_kl: float | None = None


def _heldout_records(job: EvalJob) -> list[dict]:
    data = job.data
    if data.heldout is not None:
        return [dict(r) for r in load_records(data.heldout)]
    if data.train == "synthetic":
        syn = data.synthetic
        corpus = generate_corpus(
            syn.n_records,
            seed=job.seed if syn.seed is None else syn.seed,
            n_canaries=syn.n_canaries,
            canary_repeats=syn.canary_repeats,
            secret_digits=syn.secret_digits,
        )
        return list(corpus.split(data.heldout_fraction, seed=job.seed)[1].records)
    return [dict(r) for r in load_records(data.train)]


def run_eval(job: EvalJob, *, log=print) -> EvalResult:
    device = resolve_device(job.device)
    tokenizer = load_tokenizer(job.tokenizer or job.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = tokenize_records(
        _heldout_records(job),
        tokenizer,
        max_length=job.data.max_length,
        text_field=job.data.text_field,
        mask_prompt=job.data.mask_prompt,
    )
    chunks = [examples[i : i + job.batch_size] for i in range(0, len(examples), job.batch_size)]
    batches = [collate(c, pad_id=pad_id) for c in chunks[: job.max_batches]]
    model = load_pretrained(job.model).to(device).eval()
    log(f"evaluating {job.model} on {sum(len(b['input_ids']) for b in batches)} records ...")
    ppl = perplexity(model, batches, device=device)
    result = EvalResult(
        config=job.model_dump(mode="json"), perplexity=ppl["perplexity"], nll=ppl["nll"], tokens=ppl["tokens"]
    )
    if job.teacher is not None:
        teacher = load_pretrained(job.teacher).to(device).eval()
        agree = teacher_agreement(model, teacher, batches, device=device)
        result.top1_agreement, result.mean_forward_kl = agree["top1_agreement"], agree["mean_forward_kl"]
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        out / "results.json", result.model_dump(mode="json"), mode=0o600
    )  # held-out private text
    return result
