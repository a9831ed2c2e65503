"""Swing distillation's teacher-side pieces: per-token privacy scores and the swing target transform.

Private-token detection (three sources, combined by taking the maximum score per token):
- regex `DETECTORS` (emails, phone numbers, card-like digit groups, IBAN-like strings, SSN-like
  numbers, URLs carrying a secret in their query, and any run of 3+ digits), each with a score;
- known spans, e.g. the synthetic corpus' exact `pii_spans` (canary names and secrets included);
- an optional NER hook: any object with `spans(text) -> list[(start, end, score)]` (`NERHook`);
  secure-kd ships none and adds no dependency for one.
Character spans become token scores through the tokenizer's offset mapping: a token gets the
highest score of the spans its characters overlap, so every score lies in [0, 1].

The transform (`swing_teacher_logits`) is secure-kd's own formulation of Li et al. 2023 (the paper
gives no exact formula; see `defenses.swing` for the design and its limits). `SwingTargets` wraps any
`TeacherTargets`; `kd.swing` in a distillation config applies it to the user's own job
(`secure_kd.swing_job`). It lives in the engine so that the trainer can use it without importing
`defenses`; `defenses.swing` (the measured experiment) imports it from here.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from secure_kd.teacher_targets import TeacherTargets
from secure_kd.topk import TopKLogits

Span = tuple[int, int, float]  # (start, end) character offsets, end exclusive, and a score in [0, 1]


@dataclass(frozen=True)
class Detector:
    pattern: re.Pattern[str]
    score: float = 1.0


DETECTORS: dict[str, Detector] = {
    "email": Detector(re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")),
    "phone": Detector(
        re.compile(
            r"(?<!\d)(?:\+?\d{1,3}[\s.-])?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?:\s?(?:x|ext\.?)\s?\d{1,6})?(?!\d)"
        )
    ),
    "card": Detector(re.compile(r"(?<!\d)\d{4}(?:[ -]?\d{4}){2}[ -]?\d{1,7}(?!\d)")),
    "iban": Detector(re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){3,7}(?: ?[A-Z0-9]{1,4})?\b")),
    "ssn": Detector(re.compile(r"(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)")),
    "url_secret": Detector(
        re.compile(
            r"https?://\S*?[?&](?:token|key|api_key|secret|password|pwd|sig|access_token)=[^\s&#]+", re.I
        )
    ),
    "digits": Detector(re.compile(r"(?<!\d)\d{3,}(?!\d)")),
}


class NERHook(Protocol):
    """A named-entity recognizer: character spans of sensitive entities with a confidence in [0, 1]."""

    def spans(self, text: str) -> list[Span]: ...


def detect_spans(text: str, detectors: Iterable[str] | None = None) -> dict[str, list[Span]]:
    """{detector name: its matches in `text`}, for the named detectors (default: all of `DETECTORS`)."""
    names = list(DETECTORS) if detectors is None else list(detectors)
    unknown = [name for name in names if name not in DETECTORS]
    if unknown:
        raise ValueError(f"unknown detectors {unknown}; available: {', '.join(DETECTORS)}")
    return {
        name: [(m.start(), m.end(), DETECTORS[name].score) for m in DETECTORS[name].pattern.finditer(text)]
        for name in names
    }


def _check_spans(spans: Iterable[Span], text: str, source: str) -> list[Span]:
    checked = []
    for start, end, score in spans:
        if not (0 <= start <= end <= len(text)):
            raise ValueError(f"{source} span ({start}, {end}) is outside the text of length {len(text)}")
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"{source} span ({start}, {end}) has score {score}; scores must lie in [0, 1]")
        checked.append((int(start), int(end), float(score)))
    return checked


def private_spans(
    text: str,
    *,
    detectors: Iterable[str] | None = None,
    known_spans: Iterable[Span] = (),
    ner: NERHook | None = None,
) -> list[Span]:
    """Every sensitive character span of `text` from the regex detectors, the known spans and the NER hook."""
    spans = [span for found in detect_spans(text, detectors).values() for span in found]
    spans += _check_spans(known_spans, text, "known")
    if ner is not None:
        spans += _check_spans(ner.spans(text), text, "NER")
    return spans


def spans_to_token_scores(offsets: Sequence[tuple[int, int]], spans: Iterable[Span]) -> list[float]:
    """Score of each token (character `offsets[i] = (start, end)`): the highest score of the spans it
    overlaps, 0 for none. Zero-width tokens (special tokens) score 0."""
    scores = [0.0] * len(offsets)
    for start, end, score in spans:
        for i, (token_start, token_end) in enumerate(offsets):
            if token_start < end and token_end > start and token_end > token_start:
                scores[i] = max(scores[i], score)
    return scores


def token_privacy_scores(
    text: str,
    tokenizer: Any,
    *,
    detectors: Iterable[str] | None = None,
    known_spans: Iterable[Span] = (),
    ner: NERHook | None = None,
) -> tuple[list[int], list[float]]:
    """(token ids of `tokenizer(text)`, the privacy score in [0, 1] of each token)."""
    encoded = tokenizer(text, return_offsets_mapping=True)
    spans = private_spans(text, detectors=detectors, known_spans=known_spans, ner=ner)
    return list(encoded["input_ids"]), spans_to_token_scores(encoded["offset_mapping"], spans)


# --------------------------------------------------------------------------- the teacher-side transform


def position_scores(token_scores: Sequence[Sequence[float]], seq_len: int, device: Any = "cpu") -> Tensor:
    """[batch, seq_len] scores aligned with a causal LM's logits: position t predicts token t+1, so it
    gets token t+1's score (the distribution that would reveal a private token is the one before it);
    the last position and padding get 0."""
    out = torch.zeros(len(token_scores), seq_len, dtype=torch.float32)
    for row, scores in enumerate(token_scores):
        shifted = torch.as_tensor(list(scores)[1 : seq_len + 1], dtype=torch.float32)
        out[row, : shifted.numel()] = shifted
    return out.to(device)


def swing_teacher_logits(
    teacher_logits: Tensor,
    scores: Tensor,
    *,
    base_temperature: float,
    max_temperature: float,
    noise_std: float,
    noise: Tensor | None = None,
) -> Tensor:
    """Teacher logits such that an objective called at `base_temperature` sees, at each position i,

        softmax(teacher_i / T_i + noise_std * s_i * eps_i),   T_i = T_base + (T_max - T_base) * s_i,

    with eps_i ~ N(0, I) given in `noise` (same shape as the logits; required when noise_std > 0).
    Positions with s_i == 0 are returned unchanged, bit for bit. `teacher_logits` [b, s, v] (or
    [b, v] with scores [b]); `scores` in [0, 1].
    """
    if max_temperature < base_temperature or base_temperature <= 0:
        raise ValueError(
            f"need 0 < base_temperature <= max_temperature, got {base_temperature} and {max_temperature}"
        )
    if scores.shape != teacher_logits.shape[:-1]:
        raise ValueError(
            f"scores {tuple(scores.shape)} must match the logits' positions "
            f"{tuple(teacher_logits.shape[:-1])}"
        )
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    s = scores.to(teacher_logits.dtype).unsqueeze(-1)
    temperature = base_temperature + (max_temperature - base_temperature) * s
    swung = teacher_logits * (base_temperature / temperature)
    if noise_std > 0:
        if noise is None or noise.shape != teacher_logits.shape:
            raise ValueError("noise_std > 0 needs `noise` of the logits' shape (standard normal draws)")
        # the objective divides by T_base, so noise of std sigma after that division is sigma * T_base here
        swung = swung + (noise_std * base_temperature) * s * noise.to(swung.dtype)
    return torch.where(s > 0, swung, teacher_logits)


def content_keys(token_ids: Iterable[Sequence[int]]) -> list[int]:
    """A 63-bit key per token sequence from its content: equal sequences get equal keys."""
    keys = []
    for ids in token_ids:
        digest = hashlib.sha256(",".join(map(str, ids)).encode()).digest()
        keys.append(int.from_bytes(digest[:8], "big") >> 1)
    return keys


class SwingTargets:
    """A `TeacherTargets` wrapper for the engine's `Distiller`: the wrapped targets, swung per token.

    `token_scores[i]` holds the privacy score of every input token of training example i; the batch's
    `example_index` (set by the Distiller) selects the rows, so the scores travel with the batch.
    The noise of example i is drawn once from (seed, noise_keys[i]): the same draw every epoch and
    after a resume (see `defenses.swing` for why fresh noise per epoch would average out). Keys
    default to the example index; `content_keys(examples)` gives duplicates of one text one key, so
    a record repeated k times does not average k independent draws away either. Top-k targets
    (`TopKLogits`) need `vocab_size`, the width the objective compares on (`swing_topk_logprobs`).
    """

    def __init__(
        self,
        base: TeacherTargets,
        token_scores: Sequence[Sequence[float]],
        *,
        base_temperature: float,
        max_temperature: float,
        noise_std: float,
        seed: int,
        noise_keys: Sequence[int] | None = None,
        vocab_size: int | None = None,
    ) -> None:
        if noise_keys is not None and len(noise_keys) != len(token_scores):
            raise ValueError(f"noise_keys has {len(noise_keys)} keys for {len(token_scores)} examples")
        self.base, self.token_scores = base, [list(s) for s in token_scores]
        keys = range(len(token_scores)) if noise_keys is None else noise_keys
        self.noise_keys = [int(key) for key in keys]
        self.base_temperature, self.max_temperature = base_temperature, max_temperature
        self.noise_std, self.seed, self.vocab_size = noise_std, seed, vocab_size

    def _noise(self, indices: list[int], shape: torch.Size) -> Tensor:
        rows = []
        for index in indices:
            key = (self.seed * 1_000_003 + self.noise_keys[index]) % (1 << 63)
            generator = torch.Generator().manual_seed(key)
            rows.append(torch.randn(tuple(shape[1:]), generator=generator))
        return torch.stack(rows)

    def __call__(self, batch: dict[str, Tensor]) -> Tensor | TopKLogits:
        teacher = self.base(batch)
        indices = batch["example_index"].tolist()
        seq_len = batch["input_ids"].shape[1]
        values = teacher.values if isinstance(teacher, TopKLogits) else teacher
        scores = position_scores([self.token_scores[i] for i in indices], seq_len, values.device)
        noise = self._noise(indices, values.shape).to(values.device) if self.noise_std > 0 else None
        swung = swing_teacher_logits(
            values,
            scores,
            base_temperature=self.base_temperature,
            max_temperature=self.max_temperature,
            noise_std=self.noise_std,
            noise=noise,
        )
        if isinstance(teacher, TopKLogits):
            tail = self._tail(teacher, scores)
            return TopKLogits(renormalized_topk(swung, tail, teacher.k, self.vocab_size), teacher.indices)
        return swung

    def _tail(self, teacher: TopKLogits, scores: Tensor) -> Tensor | None:
        """The swung log-probability of each of the V - k tail tokens (tempered, not noised); None: k = V."""
        if self.vocab_size is None:
            raise ValueError(
                "swing on top-k teacher targets needs vocab_size (the vocabulary the objective compares on): "
                "the uniform tail over the other V - k tokens is tempered too"
            )
        if teacher.k >= self.vocab_size:
            return None
        missing = (1.0 - teacher.values.double().exp().sum(-1)).clamp_min(torch.finfo(torch.float32).tiny)
        tail = (missing.log() - math.log(self.vocab_size - teacher.k)).to(teacher.values.dtype)
        temperature = self.base_temperature + (self.max_temperature - self.base_temperature) * scores
        return torch.where(scores > 0, tail * (self.base_temperature / temperature), tail)


def renormalized_topk(swung: Tensor, tail: Tensor | None, k: int, vocab_size: int | None) -> Tensor:
    """Top-k log-probabilities of the full distribution [swung k values, V - k tail entries of `tail`]:
    an objective that rebuilds the uniform tail from the missing mass (tail="uniform") then sees exactly
    the swing transform of the distribution the top-k and its uniform tail describe; tail="zero" sees its
    restriction to the k kept tokens."""
    if tail is None:
        return torch.log_softmax(swung, dim=-1)
    extra = (tail + math.log(vocab_size - k)).unsqueeze(-1)
    return swung - torch.logsumexp(torch.cat([swung, extra], dim=-1), dim=-1, keepdim=True)
