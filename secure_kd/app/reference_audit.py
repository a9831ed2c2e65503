"""`secure-kd audit --model DIR --reference DIR --members FILE --nonmembers FILE`: reference-based
membership inference on any causal LM the user brings.

The reference is the teacher, the base model the target was fine-tuned from, or any local Hugging Face
model that never trained on the records (`--reference` repeats for several). Every attack of
`attacks.membership.reference_attacks` (loss, reference loss ratio, zlib ratio, Min-K%, Min-K%++,
offline RMIA) reads one forward pass per model per record: the per-token statistics are cached on disk
(`<out>/scores`, or `cache_dir`) by model hash + data hash + max length, so a resumed or repeated audit
runs no model at all. Records: the files `secure_kd.data.load_records` reads (.jsonl/.json/.csv/.parquet
with a `text` field, or prompt/completion, or chat `messages`; .txt one record per line), each cut to
its first `max_length` tokens, every token scored.

A reference with another tokenizer: losses are compared per byte. Each record's text is cut where the
target's first `max_length` tokens end; each model scores that text from its own start token (bos,
else eos), so every byte is predicted, and the per-byte loss is the total NLL / the UTF-8 bytes its
tokens cover. This needs plain-text records. The result says which comparison was made.

Offline RMIA's `a` defaults to 1 here, not the 0.3 of the shadow-model audit: a record's probability
p(x) = exp(-mean NLL) of a language model is small (about e^-3 at 3 nats per token), so for a < 1 the
constant (1 - a)/2 swamps Pr(x) = (1 + a)/2 p_ref(x) + (1 - a)/2 and RMIA ranks records like the loss
attack (measured on a tiny fine-tuned Llama: a = 0.3 and 0.9 gave AUC 0.71 and 0.72, the loss attack
0.70, a = 1 gave 0.83 like the loss ratio's 0.84).

Options beyond the four flags are `--set key=value` (`ReferenceAuditConfig`). Nothing of a record is
printed or written: results.json holds AUCs, TPRs, counts, paths and fingerprints.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from secure_kd.config import Strict

SAME_TOKENIZER_NOTE = "the reference shares the target's tokenizer: per-token mean losses are compared"
PER_BYTE_NOTE = (
    "the reference has another tokenizer: the reference and RMIA attacks compare per-byte losses (total "
    "NLL of the text each model's tokens cover / its UTF-8 bytes, every byte predicted from a start token)"
)


class ReferenceAuditConfig(Strict):
    """`secure-kd audit --model --reference --members --nonmembers` (other fields: `--set key=value`)."""

    model: str
    references: list[str] = Field(min_length=1)
    members: str
    nonmembers: str
    out: str = "runs/audit"
    max_length: int = Field(64, ge=2, description="tokens scored per record (its first ones)")
    batch_size: int = Field(16, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    text_field: str = "text"
    max_records: int | None = Field(None, gt=0, description="at most this many records of each file")
    k: float = Field(0.2, gt=0, le=1, description="Min-K% and Min-K%++: fraction of tokens kept")
    rmia_a: float = Field(
        1.0, ge=0, le=1, description="offline RMIA: Pr_IN ~ a Pr_OUT + (1 - a); see the module docstring"
    )
    rmia_gamma: float = Field(1.0, gt=0)
    n_bootstrap: int = Field(1000, ge=10)
    seed: int = 0
    cache: bool = True
    cache_dir: str | None = Field(None, description="default: <out>/scores")
    tokenizers: Literal["auto", "same"] = Field(
        "auto", description="auto: per-byte losses when the reference's tokenizer differs; same: refuse"
    )
    progress: bool = True

    @field_validator("members", "nonmembers")
    @classmethod
    def _file(cls, value: str, info) -> str:
        path = Path(value)
        if not path.is_file():
            state = "is a directory" if path.is_dir() else "does not exist"
            raise ValueError(
                f"--{info.field_name} {value} {state}; give a .jsonl/.json/.csv/.parquet/.txt file"
            )
        return value


# --------------------------------------------------------------------------- records and sequences


def _records(path: str, flag: str, limit: int | None) -> list[dict[str, Any]]:
    from secure_kd.data import load_records

    try:
        records = [dict(r) for r in load_records(path)]
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"{flag}: {exc}") from None
    return records[:limit] if limit else records


def _token_sequences(records, tokenizer, cfg: ReferenceAuditConfig, flag: str) -> tuple[list[list[int]], int]:
    from secure_kd.data import tokenize_records

    try:
        examples = tokenize_records(
            records, tokenizer, max_length=cfg.max_length, text_field=cfg.text_field, mask_prompt=False
        )
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None
    kept = {e.record_index for e in examples}
    missing = [i for i in range(len(records)) if i not in kept]
    short = [e.record_index for e in examples if len(e.input_ids) < 2]
    if missing or short:
        raise ValueError(
            f"{flag}: record {(missing or short)[0]} has fewer than 2 tokens to score; remove it"
        )
    return [list(e.input_ids) for e in examples], sum(e.truncated for e in examples)


def _start_id(tokenizer) -> int:
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError(
            "a tokenizer has neither a bos nor an eos token: per-byte scoring needs a start token"
        )
    return int(start)


def _byte_sequences(texts: list[str], tokenizer, limit: int) -> tuple[list[list[int]], list[int], list[str]]:
    """Start token + the text's first `limit` tokens; the bytes and the text those tokens cover."""
    start = _start_id(tokenizer)
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    sequences, n_bytes, covered = [], [], []
    for text, ids, offsets in zip(texts, encoded["input_ids"], encoded["offset_mapping"], strict=True):
        ids, offsets = ids[:limit], offsets[:limit]
        end = max((b for _, b in offsets), default=0)
        sequences.append([start, *ids])
        covered.append(text[:end])
        n_bytes.append(len(text[:end].encode("utf-8")))
    return sequences, n_bytes, covered


def _plain_texts(records, cfg: ReferenceAuditConfig, flag: str) -> list[str]:
    texts = []
    for i, record in enumerate(records):
        value = record.get(cfg.text_field)
        if not isinstance(value, str):
            raise ValueError(
                f"{flag}: record {i} has no string field {cfg.text_field!r}; a reference with another "
                "tokenizer is compared per byte, which needs plain-text records"
            )
        texts.append(value)
    return texts


# --------------------------------------------------------------------------- models


class _Model:
    """A model directory: its tokenizer now, its weights only if the cache misses."""

    def __init__(self, source: str, flag: str) -> None:
        from secure_kd.fingerprint import model_dir_fingerprint, tokenizer_fingerprint
        from secure_kd.model_files import ModelLoadError, load_tokenizer, resolve_source

        self.source, self.flag = source, flag
        try:
            self.path = resolve_source(source)
            self.tokenizer = load_tokenizer(self.path)
        except ModelLoadError as exc:
            raise ValueError(f"{flag}: {exc}") from None
        self.fingerprint = model_dir_fingerprint(self.path)
        self.tokenizer_fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.pad_id = next(
            (int(t) for t in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if t is not None), 0
        )

    def vocab_size(self) -> int:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.path)
        size = getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", None)
        return int(size)

    def check_ids(self, sequences: list[list[int]]) -> None:
        top, size = max(max(s) for s in sequences), self.vocab_size()
        if top >= size:
            raise ValueError(
                f"{self.flag} {self.source}: its tokenizer gives token id {top} but the model's vocabulary "
                f"has {size} entries: the tokenizer in the directory does not belong to the model"
            )


def _score(model: _Model, sequences, cfg: ReferenceAuditConfig, cache, progress, task):
    import torch

    from attacks.membership.score_cache import cached_stats
    from attacks.membership.token_scores import score_sequences
    from secure_kd.model_files import ModelLoadError, load_pretrained
    from secure_kd.models import resolve_device

    def compute():
        device = resolve_device(cfg.device)
        try:
            loaded = load_pretrained(model.path, dtype=cfg.dtype).to(device)
        except ModelLoadError as exc:
            raise ValueError(f"{model.flag}: {exc}") from None
        try:
            return score_sequences(
                loaded, sequences, pad_id=model.pad_id, device=device, batch_size=cfg.batch_size,
                on_batch=lambda n: progress.advance(task, n),
            )  # fmt: skip
        finally:
            del loaded
            if device.type == "cuda":
                torch.cuda.empty_cache()

    stats, hit = cached_stats(cache, model.fingerprint, sequences, cfg.max_length, compute)
    if hit:
        progress.advance(task, len(sequences))
    return stats, hit


# --------------------------------------------------------------------------- the audit


def run_reference_audit(cfg: ReferenceAuditConfig, *, console=None):
    """Score, attack, summarize; write `<out>/results.json`; return the ReferenceAuditResult."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from attacks.membership.reference_attacks import ATTACKS, all_scores
    from attacks.membership.score_cache import ScoreCache
    from secure_kd.app.reference_summary import ReferenceAuditResult, low_fpr_note, summarize
    from secure_kd.paths import private_dir
    from secure_kd.plugins import write_result

    started = time.perf_counter()
    members = _records(cfg.members, "--members", cfg.max_records)
    nonmembers = _records(cfg.nonmembers, "--nonmembers", cfg.max_records)
    is_member = np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)]
    target = _Model(cfg.model, "--model")
    references = [_Model(r, "--reference") for r in cfg.references]
    same = all(r.tokenizer_fingerprint == target.tokenizer_fingerprint for r in references)
    if not same and cfg.tokenizers == "same":
        other = next(r for r in references if r.tokenizer_fingerprint != target.tokenizer_fingerprint)
        raise ValueError(
            f"--reference {other.source} has another tokenizer than --model {cfg.model} and tokenizers=same "
            "was asked; give a reference with the target's tokenizer, or drop --set tokenizers=same"
        )
    if same:
        n_members = len(members)
        target_seqs = _token_sequences(members, target.tokenizer, cfg, "--members")
        other_seqs = _token_sequences(nonmembers, target.tokenizer, cfg, "--nonmembers")
        sequences, n_truncated = target_seqs[0] + other_seqs[0], target_seqs[1] + other_seqs[1]
        ref_sequences = [sequences] * len(references)
        texts = [target.tokenizer.decode(s, skip_special_tokens=True) for s in sequences]
        target_bytes = reference_bytes = None
    else:
        n_members = len(members)
        plain = _plain_texts(members, cfg, "--members") + _plain_texts(nonmembers, cfg, "--nonmembers")
        sequences, target_bytes, texts = _byte_sequences(plain, target.tokenizer, cfg.max_length - 1)
        n_truncated = sum(len(c) < len(t) for c, t in zip(texts, plain, strict=True))
        ref_sequences, reference_bytes = [], []
        for ref in references:  # the reference reads the text the target's tokens cover, up to 4x the tokens
            seqs, n_bytes, _ = _byte_sequences(texts, ref.tokenizer, 4 * cfg.max_length)
            ref_sequences.append(seqs)
            reference_bytes.append(n_bytes)
        empty = next((i for i, b in enumerate(target_bytes) if b == 0), None)
        if empty is not None:
            flag = "--members" if empty < n_members else "--nonmembers"
            index = empty if empty < n_members else empty - n_members
            raise ValueError(f"{flag}: record {index} has no text to score; remove it")
    if len(members) < 2 or len(nonmembers) < 2:
        raise ValueError("need at least 2 members and 2 non-members to measure an attack")
    target.check_ids(sequences)
    for ref, seqs in zip(references, ref_sequences, strict=True):
        ref.check_ids(seqs)

    out = private_dir(cfg.out)
    cache = ScoreCache(cfg.cache_dir or out / "scores") if cfg.cache else None
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    hits: dict[str, bool] = {}
    n_forwards = 0
    with Progress(*columns, console=console, disable=not cfg.progress, transient=False) as progress:
        task = progress.add_task("score target", total=len(sequences))
        target_stats, hits["target"] = _score(target, sequences, cfg, cache, progress, task)
        n_forwards += target_stats.n_forwards
        ref_stats = []
        for j, (ref, seqs) in enumerate(zip(references, ref_sequences, strict=True)):
            task = progress.add_task(f"score reference {j}", total=len(seqs))
            stats, hits[f"reference_{j}"] = _score(ref, seqs, cfg, cache, progress, task)
            n_forwards += stats.n_forwards
            ref_stats.append(stats)

    scores = all_scores(
        target_stats, ref_stats, texts, is_member, k=cfg.k, rmia_a=cfg.rmia_a, rmia_gamma=cfg.rmia_gamma,
        seed=cfg.seed, target_bytes=target_bytes, reference_bytes=reference_bytes,
    )  # fmt: skip
    summaries = [
        summarize(name, scores[name], is_member, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)
        for name in ATTACKS
    ]
    result = ReferenceAuditResult(
        model=cfg.model,
        model_fingerprint=target.fingerprint,
        references=list(cfg.references),
        reference_fingerprints=[r.fingerprint for r in references],
        comparison="per-token" if same else "per-byte",
        comparison_note=SAME_TOKENIZER_NOTE if same else PER_BYTE_NOTE,
        n_members=len(members),
        n_nonmembers=len(nonmembers),
        n_truncated=n_truncated,
        max_length=cfg.max_length,
        attacks=summaries,
        low_fpr_note=low_fpr_note(len(nonmembers)),
        cache_hits=hits,
        n_forwards=n_forwards,
        seconds=time.perf_counter() - started,
        config=cfg.model_dump(mode="json"),
    )
    write_result(out, result)
    return result


def run_from_cli(
    model: str | None,
    references: list[str],
    members: str | None,
    nonmembers: str | None,
    *,
    out: Path | None,
    overrides: list[str],
    progress: bool,
    console,
) -> None:
    """The `secure-kd audit --reference/--members/--nonmembers` branch: check the flags, run, print."""
    import typer

    from secure_kd.app.reference_summary import table
    from secure_kd.config import load_config

    given = {
        "--model": model,
        "--reference": references or None,
        "--members": members,
        "--nonmembers": nonmembers,
    }
    missing = [flag for flag, value in given.items() if value is None]
    if missing:
        raise ValueError(
            f"the reference audit needs {', '.join(missing)}: secure-kd audit --model DIR --reference DIR "
            "--members FILE --nonmembers FILE"
        )
    values: dict[str, Any] = {
        "model": model, "references": list(references), "members": members, "nonmembers": nonmembers,
        "progress": progress,
    }  # fmt: skip
    if out is not None:
        values["out"] = str(out)
    cfg = load_config(None, overrides, ReferenceAuditConfig, values=values)
    result = run_reference_audit(cfg, console=console)
    for line in table(result):
        typer.echo(line)
    typer.echo(f"results: {Path(cfg.out) / 'results.json'}")
