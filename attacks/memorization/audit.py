"""`secure-kd attack memorization`: canary exposure and training-data extraction against a causal LM.

The records are the project's synthetic corpus (PII spans and canaries inserted a known number of
times), a `.jsonl` written by `SyntheticCorpus.to_jsonl` with its `.canaries.json` sidecar, or any
file of the user's own records (PII found by pattern); the secrets to rank are the sidecar's
canaries and/or a plain secrets file (`data.secrets`, see `attacks.memorization.secrets`). The model
is either trained here on the records (`model.source: train`, a tiny Llama) or a local Hugging Face
directory that was trained on them. What the result says about extracted PII is redacted
(`extraction.redact`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, field_validator, model_validator
from torch import nn

from apparatus.canaries import CanaryExposure, mean_exposure_by_repeats, measure_canary
from apparatus.tiny_lm import (
    TrainRecipe,
    build_model,
    pad_token_id,
    public_texts,
    resolve_tokenizer,
    tokenize_texts,
    train_causal_lm,
)
from attacks.memorization.extraction import (
    ExtractionReport,
    TrainingDataIndex,
    sample_generations,
    score_generations,
    summarize_extraction,
    targeted_canary_extraction,
)
from attacks.memorization.redaction import pii_findings, redact_report
from attacks.memorization.secrets import AuditCorpus, from_synthetic, load_records_corpus, load_secrets
from secure_kd.config import Strict, TinyModelConfig
from secure_kd.data import generate_corpus, load_records
from secure_kd.data.synthetic import sidecar_path
from secure_kd.models import load_pretrained, resolve_device
from secure_kd.plugins import PluginConfig, write_result

_DEFAULT_RECIPE = TrainRecipe(
    model=TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4), epochs=20, batch_size=16, lr=3e-3
)


class SyntheticCorpusSpec(Strict):
    n_records: int = Field(100, gt=0)
    n_canaries: int = Field(4, ge=1)
    canary_repeats: int | list[int] = [1, 2, 8, 16]
    secret_digits: int = Field(4, ge=1, le=12)
    canary_placement: Literal["record", "inline"] = "record"
    seed: int | None = Field(None, description="default: the job's seed")

    @model_validator(mode="after")
    def _repeats_match(self) -> SyntheticCorpusSpec:
        if isinstance(self.canary_repeats, list) and len(self.canary_repeats) != self.n_canaries:
            raise ValueError(
                f"canary_repeats lists {len(self.canary_repeats)} counts for n_canaries="
                f"{self.n_canaries}; give one count per canary or a single number"
            )
        return self


class CorpusConfig(Strict):
    source: str = Field(
        "synthetic",
        description="'synthetic', a .jsonl with its .canaries.json sidecar, or any records file "
        "(.jsonl/.json/.csv/.parquet/.txt) the model was trained on",
    )
    secrets: str | None = Field(
        None, description="a JSON-lines file of {prefix, secret[, suffix, alphabet]} to rank (docs/audit.md)"
    )
    text_field: str = "text"
    synthetic: SyntheticCorpusSpec = SyntheticCorpusSpec()
    max_length: int = Field(128, ge=8)

    @field_validator("source")
    @classmethod
    def _records_file(cls, value: str) -> str:
        if value != "synthetic" and not Path(value).is_file():
            raise ValueError(
                f"data.source {value!r} is neither 'synthetic' nor an existing records file (.jsonl, .json, "
                ".csv, .parquet, .txt; relative paths are from the current directory)"
            )
        return value

    @field_validator("secrets")
    @classmethod
    def _secrets_file(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"data.secrets file {value!r} does not exist")
        return value

    @property
    def has_canaries(self) -> bool:
        """Whether anything gives secrets to rank: the synthetic corpus, a sidecar, or a secrets file."""
        if self.source == "synthetic" or self.secrets is not None:
            return True
        return Path(self.source).suffix == ".jsonl" and sidecar_path(self.source).is_file()


class ModelSource(Strict):
    source: str = Field(
        "train", description="'train' (a tiny model trained on the corpus here) or a local HF dir"
    )
    recipe: TrainRecipe = _DEFAULT_RECIPE

    @field_validator("source")
    @classmethod
    def _known(cls, value: str) -> str:
        if value != "train" and not Path(value).is_dir():
            raise ValueError(f"model.source {value!r} is neither 'train' nor an existing model directory")
        return value


class ExposureSettings(Strict):
    enabled: bool = True
    max_enumerated_digits: int = Field(6, ge=1, le=7, description="larger spaces are only estimated")
    estimate_samples: int = Field(1000, ge=0, description="Secret Sharer estimate and histogram; 0 = off")
    batch_size: int = Field(512, gt=0)


class ExtractionSettings(Strict):
    enabled: bool = True
    n_samples: int = Field(200, gt=0)
    prompts: str = Field(
        "synthetic", description="'bos', 'synthetic' (fresh in-domain documents) or a text file"
    )
    prompt_tokens: int = Field(2, gt=0, description="tokens taken from each prompt document")
    max_new_tokens: int = Field(48, gt=0)
    top_k: int = Field(40, ge=0, description="0 = sample from the whole vocabulary")
    temperature: float = Field(1.0, gt=0)
    batch_size: int = Field(64, gt=0)
    reference: str | None = Field(
        "train", description="None, 'train' (on fresh data, like the model) or a dir"
    )
    top_n: list[int] = [10, 50]
    ngram: int = Field(8, gt=0)
    near_duplicate_threshold: float = Field(0.5, gt=0, le=1)
    max_record_frequency: int = Field(1, gt=0)
    min_pii_chars: int = Field(6, gt=0)
    canary_context_chars: int = Field(12, gt=0)
    canary_samples: int = Field(16, ge=0, description="sampled continuations of each canary prefix")
    redact: bool = Field(
        True, description="mask PII values and secrets in what the result keeps of the generations"
    )

    @field_validator("prompts")
    @classmethod
    def _prompt_source(cls, value: str) -> str:
        if value not in ("bos", "synthetic") and not Path(value).is_file():
            raise ValueError(f"extraction.prompts {value!r} is not 'bos', 'synthetic' or an existing file")
        return value


class MemorizationConfig(PluginConfig):
    """`secure-kd attack memorization`: canary exposure and extraction."""

    out: str = "runs/attacks/memorization"
    model: ModelSource = ModelSource()
    tokenizer: str | None = Field(
        None, description="default: tiny:512 for a trained model, else the model's own"
    )
    data: CorpusConfig = CorpusConfig()
    exposure: ExposureSettings = ExposureSettings()
    extraction: ExtractionSettings = ExtractionSettings()
    progress: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> MemorizationConfig:
        reference = self.extraction.reference
        if reference not in (None, "train") and not Path(reference).is_dir():
            raise ValueError(f"extraction.reference {reference!r} is not 'train', null or a model directory")
        if reference == "train" and self.model.source != "train":
            raise ValueError(
                "extraction.reference 'train' builds a reference like the trained model; with a model "
                "loaded from a directory give a reference directory (or null)"
            )
        if not (self.exposure.enabled or self.extraction.enabled):
            raise ValueError("exposure and extraction are both disabled: nothing to measure")
        if self.exposure.enabled and not self.extraction.enabled and not self.data.has_canaries:
            raise ValueError(
                "exposure needs secrets to rank: these records have no canary sidecar; give data.secrets "
                "(a JSON-lines file of {prefix, secret}, docs/audit.md) or enable extraction"
            )
        return self


class MemorizationResult(BaseModel):
    kind: str = "memorization"
    model_source: str
    n_records: int
    secret_digits: int | None
    secrets_file: str | None = None
    pii_detected: bool = Field(False, description="PII spans found by pattern (records without pii_spans)")
    notes: list[str] = []
    exposure_is_estimate: bool
    exposure: list[CanaryExposure]
    mean_exposure_by_repeats: dict[int, float]
    extraction: ExtractionReport | None
    final_train_loss: float | None
    seconds: float


def load_corpus(cfg: MemorizationConfig) -> AuditCorpus:
    """The records and the canaries to rank (the synthetic corpus's, a sidecar's, a secrets file's)."""
    if cfg.data.source != "synthetic":
        corpus = load_records_corpus(cfg.data.source, cfg.data.text_field)
    else:
        spec = cfg.data.synthetic
        corpus = from_synthetic(
            generate_corpus(
                spec.n_records,
                seed=cfg.seed if spec.seed is None else spec.seed,
                n_canaries=spec.n_canaries,
                canary_repeats=spec.canary_repeats,
                secret_digits=spec.secret_digits,
                canary_placement=spec.canary_placement,
            )
        )
    if cfg.data.secrets is not None:
        canaries, spaces = load_secrets(cfg.data.secrets, corpus.records)
        corpus.canaries += canaries
        corpus.spaces += spaces
    return corpus


def public_corpus(cfg: MemorizationConfig, n_records: int) -> list[str]:
    """Fresh synthetic records without canaries (a stand-in for public in-domain text)."""
    return public_texts(max(n_records, 100), cfg.seed)


def extraction_prompts(cfg: MemorizationConfig, tokenizer: Any) -> list[list[int]]:
    """`n_samples` prompts: one start token, or the first tokens of public in-domain documents."""
    e = cfg.extraction
    if e.prompts == "bos":
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [[int(start)]] * e.n_samples
    if e.prompts == "synthetic":
        texts = generate_corpus(e.n_samples, seed=cfg.seed + 7919, n_canaries=0).texts()
    else:
        records = load_records(e.prompts)
        if "text" not in records.column_names:
            raise ValueError(
                f"extraction.prompts file {e.prompts!r} has no 'text' field; fields: {records.column_names}"
            )
        texts = [str(t) for t in records["text"]]
    prompts = [ids[: e.prompt_tokens] for ids in (tokenizer(text)["input_ids"] for text in texts)]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"extraction.prompts {e.prompts!r} gives no prompt tokens")
    return [prompts[i % len(prompts)] for i in range(e.n_samples)]


def _trained_model(
    cfg: MemorizationConfig, texts: list[str], tokenizer: Any, seed: int, device: torch.device
) -> tuple[nn.Module, float]:
    recipe = cfg.model.recipe
    examples = tokenize_texts(texts, tokenizer, cfg.data.max_length)
    pad_id = pad_token_id(tokenizer)
    model = build_model(recipe, len(tokenizer), seed=seed, pad_id=pad_id)
    fit = train_causal_lm(
        model, examples, recipe, pad_id=pad_id, seed=seed, device=device, progress=cfg.progress
    )
    return model, fit.losses[-1]


def run_extraction(
    cfg: MemorizationConfig,
    model: nn.Module,
    reference: nn.Module | None,
    tokenizer: Any,
    corpus: AuditCorpus,
    device: torch.device,
) -> ExtractionReport:
    e = cfg.extraction
    pad_id = pad_token_id(tokenizer)
    sequences = sample_generations(
        model,
        extraction_prompts(cfg, tokenizer),
        max_new_tokens=e.max_new_tokens,
        top_k=e.top_k,
        temperature=e.temperature,
        seed=cfg.seed,
        eos_id=tokenizer.eos_token_id,
        pad_id=pad_id,
        batch_size=e.batch_size,
        device=device,
    )
    sequences = [s for s in sequences if len(s) >= 2]
    texts = [tokenizer.decode(s, skip_special_tokens=True) for s in sequences]
    index = TrainingDataIndex(
        corpus.records,
        corpus.canaries,
        ngram=e.ngram,
        threshold=e.near_duplicate_threshold,
        max_record_frequency=e.max_record_frequency,
        min_pii_chars=e.min_pii_chars,
        canary_context_chars=e.canary_context_chars,
    )
    scored = score_generations(
        sequences, texts, index, model=model, reference=reference, pad_id=pad_id, device=device
    )
    canaries = targeted_canary_extraction(
        model,
        tokenizer,
        corpus.canaries,
        n_samples=e.canary_samples,
        top_k=e.top_k,
        temperature=e.temperature,
        seed=cfg.seed,
        device=device,
    )
    report = summarize_extraction(scored, index, canaries, top_n=e.top_n)
    findings = pii_findings(scored, index, corpus.records)
    if e.redact:
        return redact_report(report, index, corpus.canaries, findings)
    return report.model_copy(update={"pii_findings": findings})


def run(config: MemorizationConfig) -> MemorizationResult:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    corpus = load_corpus(config)
    notes: list[str] = []
    if not corpus.canaries and config.exposure.enabled:
        notes.append(
            "exposure not measured: no secrets to rank (these records have no canary sidecar; give "
            "data.secrets, a JSON-lines file of {prefix, secret})"
        )
    if corpus.pii_detected:
        notes.append(
            "PII of the records found by pattern (emails, phones, IBANs, card numbers, SSNs, API keys); "
            "names and addresses are not found that way"
        )
    tokenizer_spec = config.tokenizer or (
        "tiny:512" if config.model.source == "train" else config.model.source
    )
    final_loss = None
    # Canary-free in-domain text trains a `tiny:` tokenizer (see the note in `apparatus.canaries` on
    # secrets as tokens) and the reference model of the extraction ranking.
    public = public_corpus(config, len(corpus))
    tokenizer = resolve_tokenizer(tokenizer_spec, public)
    if config.model.source == "train":
        model, final_loss = _trained_model(config, corpus.texts(), tokenizer, config.seed, device)
    else:
        model = load_pretrained(config.model.source).to(device).eval()

    reports: list[CanaryExposure] = []
    limit = 10**config.exposure.max_enumerated_digits
    enumerated = [len(space) <= limit for space in corpus.spaces]
    if config.exposure.enabled:
        for index, (canary, space) in enumerate(zip(corpus.canaries, corpus.spaces, strict=True)):
            reports.append(
                measure_canary(
                    model,
                    tokenizer,
                    canary,
                    space,
                    enumerate_space=enumerated[index],
                    estimate_samples=config.exposure.estimate_samples,
                    seed=config.seed + index,
                    batch_size=config.exposure.batch_size,
                    device=device,
                    progress=config.progress,
                )
            )

    extraction = None
    if config.extraction.enabled:
        reference = None
        if config.extraction.reference == "train":
            reference, _ = _trained_model(config, public, tokenizer, config.seed + 1, device)
        elif config.extraction.reference is not None:
            reference = load_pretrained(config.extraction.reference).to(device).eval()
        extraction = run_extraction(config, model, reference, tokenizer, corpus, device)

    result = MemorizationResult(
        model_source=config.model.source,
        n_records=len(corpus),
        secret_digits=corpus.secret_digits,
        secrets_file=config.data.secrets,
        pii_detected=corpus.pii_detected,
        notes=notes,
        exposure_is_estimate=bool(reports) and not all(enumerated),
        exposure=reports,
        mean_exposure_by_repeats=mean_exposure_by_repeats(reports) if reports else {},
        extraction=extraction,
        final_train_loss=final_loss,
        seconds=time.perf_counter() - started,
    )
    write_result(config.out, result)
    return result
