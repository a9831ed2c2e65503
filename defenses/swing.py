"""Swing distillation: knowledge distillation that gives private tokens softer, noisier teacher targets.

After Li et al. 2023, "Swing Distillation: A Privacy-Preserving Knowledge Distillation Framework":
tokens likely to hold private information get a higher distillation temperature, and noise is added
to the soft targets the student receives there, so the teacher's memorized private continuations are
not copied into the student. The paper gives no exact formula; this module is secure-kd's own
formulation:

1. Private-token scores s_i in [0, 1] (`secure_kd.swing_targets`): regex detectors (emails, phones,
   card-like numbers, IBAN-like strings, SSN-like numbers, URLs with secrets, digit runs), optionally
   the corpus' known PII/canary spans (`use_known_spans`, off by default: an oracle that no real
   dataset provides, so a result with it is an upper bound and is labelled so), and an optional NER
   hook, mapped onto tokens through the offset mapping.
2. Alignment: a causal LM's logits at position t predict token t+1, so position t takes token t+1's
   score: the distribution that would reveal a private token is the one that predicts it.
3. Per position, with the objective (forward KL) called at the base temperature T_base for both
   models, the teacher's target becomes softmax(z_i / T_i + sigma * s_i * eps_i) with
   T_i = T_base + (T_max - T_base) * s_i and eps_i ~ N(0, I) over the vocabulary. The student stays
   at T_base: dividing both sides by T_i would let the student match the teacher exactly (a shared
   temperature cancels at T=1), so only the teacher's side is softened.
4. Noise choice: Gaussian noise on the (tempered) logits rather than mixing with the uniform
   distribution. Mixing with uniform, like a temperature, is a monotone map that keeps the teacher's
   ranking of candidates, and exposure is a ranking measure; only noise can reorder the secret among
   its alternatives. The noise of a training example is drawn once from (seed, example) and reused
   every epoch: fresh noise each epoch would average out, and the student would learn the expectation,
   which again keeps the teacher's ranking.
5. Non-private positions (s_i = 0) get the teacher's logits unchanged, bit for bit: there swing is
   plain KD. No hard-label (CE) term is used, since it would teach the private tokens directly.

Swing gives NO formal differential-privacy guarantee: the detectors miss what they do not match, the
noise is not calibrated to any sensitivity, and nothing is accounted. It is a heuristic that lowers
measured memorization (canary exposure); use DP-SGD (`train.privacy`) when a guarantee is needed.

`run(config)`: fine-tunes a tiny teacher on a synthetic canary corpus, distils a tiny student with
swing (and, for comparison, with plain KD), and reports canary exposure over the whole enumerable
secret space and perplexity on held-out clean records.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field, field_validator, model_validator
from torch import nn

from apparatus.canaries import CanaryCorpus, exact_exposures
from apparatus.tiny_lm import (
    LMRecipe,
    build_model,
    distil,
    heldout_perplexity,
    pad_token_id,
    public_tokenizer,
    tokenize_texts,
    train_causal_lm,
)
from defenses import DEFENSES
from secure_kd.config import Strict
from secure_kd.data import SyntheticCorpus, TokenizedExample
from secure_kd.models import resolve_device
from secure_kd.plugins import Plugin, PluginConfig, write_result
from secure_kd.swing_targets import DETECTORS, SwingTargets, content_keys, detect_spans, token_privacy_scores
from secure_kd.teacher_targets import LiveTeacher

NO_DP_NOTE = (
    "swing distillation gives NO formal differential-privacy guarantee: it is a heuristic that lowers "
    "measured memorization of the tokens its detectors find; use DP-SGD (train.privacy) for a guarantee"
)


class SwingSettings(Strict):
    base_temperature: float = Field(1.0, gt=0, description="T_base: both models at non-private positions")
    max_temperature: float = Field(10.0, gt=0, description="T_max: the teacher's temperature where s = 1")
    noise_std: float = Field(2.0, ge=0, description="sigma: std of the noise on tempered logits where s = 1")
    detectors: list[str] = Field(default_factory=lambda: list(DETECTORS))
    use_known_spans: bool = Field(
        False,
        description="also score the corpus' own PII/canary spans: an oracle no real dataset provides "
        "(results with it are an upper bound for the detectors, and say so)",
    )

    @field_validator("detectors")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in DETECTORS]
        if unknown:
            raise ValueError(f"unknown detectors {unknown}; available: {', '.join(DETECTORS)}")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> SwingSettings:
        if self.max_temperature < self.base_temperature:
            raise ValueError(
                f"max_temperature ({self.max_temperature}) must be >= "
                f"base_temperature ({self.base_temperature})"
            )
        return self


class SwingConfig(PluginConfig):
    """`secure-kd defend swing`: swing distillation on a synthetic canary corpus."""

    out: str = "runs/defenses/swing"
    corpus: CanaryCorpus = CanaryCorpus()
    teacher: LMRecipe = LMRecipe(epochs=30)
    student: LMRecipe = LMRecipe(epochs=30)
    swing: SwingSettings = SwingSettings()
    compare_plain_kd: bool = Field(True, description="also distil a plain-KD student for the comparison")


class CanaryReport(BaseModel):
    secret: str
    repeats: int
    teacher_exposure: float
    plain_kd_exposure: float | None
    swing_exposure: float


class SwingResult(BaseModel):
    kind: str = "swing"
    formal_dp_guarantee: bool = False
    guarantee_note: str = NO_DP_NOTE
    private_spans: str = Field(
        ..., description="what marked the private tokens: detectors, or detectors + oracle"
    )
    settings: dict[str, Any]
    n_train_records: int
    n_heldout_records: int
    private_token_fraction: float
    detector_matches: dict[str, int]
    max_exposure: float
    canaries: list[CanaryReport]
    mean_exposure: dict[str, float]
    exposure_reduction_vs_plain: float | None
    heldout_perplexity: dict[str, float]
    seconds: float


@dataclass
class SwingSetting:
    """Everything a swing run (or an experiment) distils from: data, scores and the trained teacher."""

    tokenizer: Any
    train: SyntheticCorpus
    heldout: SyntheticCorpus
    train_examples: list[TokenizedExample]
    token_scores: list[list[float]]
    heldout_examples: list[TokenizedExample]
    teacher: nn.Module
    device: torch.device


def span_source(settings: SwingSettings) -> str:
    """How a run found its private tokens, for its result: oracle spans inflate the measured effect."""
    if settings.use_known_spans:
        return "detectors + known spans (oracle: the corpus' true PII spans, unavailable on real data)"
    return "detectors only"


def scored_examples(
    records: list[dict], tokenizer: Any, settings: SwingSettings, max_length: int
) -> tuple[list[TokenizedExample], list[list[float]]]:
    """One example per record (tokens + eos, truncated) and the privacy score of each token (eos: 0)."""
    examples, scores = [], []
    for index, record in enumerate(records):
        known = (
            [(s["start"], s["end"], 1.0) for s in record.get("pii_spans", [])]
            if settings.use_known_spans
            else []
        )
        ids, token_scores = token_privacy_scores(
            record["text"], tokenizer, detectors=settings.detectors, known_spans=known
        )
        ids, token_scores = (ids + [tokenizer.eos_token_id])[:max_length], (token_scores + [0.0])[:max_length]
        examples.append(TokenizedExample(ids, list(ids), index, truncated=len(ids) == max_length))
        scores.append(token_scores)
    return examples, scores


def build_setting(config: SwingConfig) -> SwingSetting:
    """The corpus, its split, the tokenizer (trained on public text), scores, and the fine-tuned teacher."""
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    c = config.corpus
    train, heldout = c.build(config.seed)
    tokenizer = public_tokenizer(config.seed, c.tokenizer_vocab)
    pad_id = pad_token_id(tokenizer)
    train_examples, token_scores = scored_examples(train.records, tokenizer, config.swing, c.max_length)
    heldout_examples = tokenize_texts(heldout.texts(), tokenizer, c.max_length)
    teacher = build_model(config.teacher, len(tokenizer), seed=config.seed + 1, pad_id=pad_id)
    train_causal_lm(teacher, train_examples, config.teacher, pad_id=pad_id, seed=config.seed, device=device)
    return SwingSetting(
        tokenizer, train, heldout, train_examples, token_scores, heldout_examples, teacher, device
    )


def distil_student(
    setting: SwingSetting, config: SwingConfig, swing: SwingSettings | None, *, seed_offset: int = 2
) -> nn.Module:
    """A fresh student distilled from the teacher: with swing when `swing` is given, else plain KD
    (forward KL at `config.swing.base_temperature`)."""
    pad_id = pad_token_id(setting.tokenizer)
    student = build_model(
        config.student, len(setting.tokenizer), seed=config.seed + seed_offset, pad_id=pad_id
    )
    base = LiveTeacher(setting.teacher, None)
    temperature = (swing or config.swing).base_temperature
    targets = base
    if swing is not None:
        targets = SwingTargets(
            base,
            setting.token_scores,
            base_temperature=swing.base_temperature,
            max_temperature=swing.max_temperature,
            noise_std=swing.noise_std,
            seed=config.seed,
            noise_keys=content_keys(example.input_ids for example in setting.train_examples),
        )
    distil(
        student,
        targets,
        setting.train_examples,
        config.student,
        temperature=temperature,
        pad_id=pad_id,
        seed=config.seed,
        device=setting.device,
    )
    return student


def run(config: SwingConfig) -> SwingResult:
    started = time.perf_counter()
    setting = build_setting(config)
    digits = config.corpus.secret_digits
    canaries = setting.train.canaries
    models = {"teacher": setting.teacher, "swing_kd": distil_student(setting, config, config.swing)}
    if config.compare_plain_kd:
        models["plain_kd"] = distil_student(setting, config, None)
    exposure = {
        name: exact_exposures(m, setting.tokenizer, canaries, digits, device=setting.device)
        for name, m in models.items()
    }
    plain = exposure.get("plain_kd")
    reports = [
        CanaryReport(
            secret=canary.secret,
            repeats=canary.repeats,
            teacher_exposure=exposure["teacher"][i],
            plain_kd_exposure=None if plain is None else plain[i],
            swing_exposure=exposure["swing_kd"][i],
        )
        for i, canary in enumerate(canaries)
    ]
    means = {name: sum(values) / len(values) for name, values in exposure.items()}
    reduction = None
    if plain is not None and means["plain_kd"] > 0:
        reduction = (means["plain_kd"] - means["swing_kd"]) / means["plain_kd"]
    all_scores = [s for row in setting.token_scores for s in row]
    matches: dict[str, int] = {name: 0 for name in config.swing.detectors}
    for record in setting.train.records:
        for name, found in detect_spans(record["text"], config.swing.detectors).items():
            matches[name] += len(found)
    result = SwingResult(
        private_spans=span_source(config.swing),
        settings=config.swing.model_dump(mode="json"),
        n_train_records=len(setting.train),
        n_heldout_records=len(setting.heldout),
        private_token_fraction=sum(1 for s in all_scores if s > 0) / len(all_scores),
        detector_matches=matches,
        max_exposure=math.log2(10**digits),
        canaries=reports,
        mean_exposure=means,
        exposure_reduction_vs_plain=reduction,
        heldout_perplexity={
            name: heldout_perplexity(
                m, setting.heldout_examples, pad_id=pad_token_id(setting.tokenizer), device=setting.device
            )
            for name, m in models.items()
        },
        seconds=time.perf_counter() - started,
    )
    Path(config.out).mkdir(parents=True, exist_ok=True)
    write_result(config.out, result)
    return result


PLUGIN = DEFENSES.register(
    "swing",
    Plugin(
        name="swing",
        Config=SwingConfig,
        Result=SwingResult,
        run=run,
        summary="swing distillation: hotter, noised teacher targets on private tokens (heuristic, not DP)",
    ),
)
