"""A hardened query API: a `ModelAPI` that truncates, rounds, adds noise, refuses and watches.

Attacks and defenses never import each other, yet an attack must be measurable against a hardened
API. So the transforms live in the apparatus, described by `ApiDefenseConfig`; an attack's Config
takes an optional `api_defense` and builds its API with `build_api`, and `defenses/api_hardening.py`
is the plugin that measures what the transforms cost in utility and how the detector behaves.

`HardenedModelAPI` presents exactly the `ModelAPI` interface (it is a subclass); what changes:

- `top_k`: no answer reveals more than k log-probabilities. A `full_logits` view becomes
  `topk_logprobs` (full logits would reveal everything), and `api.top_k` is min(asked, k), so a
  client reads the limit where it reads it on any ModelAPI.
- `noise_sigma`: Gaussian noise N(0, sigma^2) is added to every logit the model computes, before
  any view is derived (full logits, top-k logprobs, sampled text). The noise is drawn once per
  computed context: a prompt asked again while it is in the API's cache gets the same answer,
  so averaging repeats needs cache eviction (256 other prompts) first. This is a heuristic
  perturbation, not differential privacy: no sensitivity bound or accounting is claimed.
- `round_decimals`: returned logits and log-probabilities are rounded to d decimals
  (torch.round(x, decimals=d), half to even).
- `allow_logit_bias: false`: the `logit_bias` parameter is refused with `APIViewError`, as an
  API that removed it would; a `topk_logprobs_bias` view becomes `topk_logprobs`.
- `max_queries`: a budget on top of the API's own (the smaller wins); query N+1 raises
  `QueryBudgetExceeded` before anything is computed.
- `detector`: `ExtractionDetector` (apparatus/extraction_detector.py) watches the stream; with
  `action: refuse` a flagged API raises `ExtractionRefused` for the flagging query (counted, not
  returned) and all after. It sees one context per sequence the server computes for the client
  (cached repeats are not new contexts; a `*_positions` call is one context, its whole sequence)
  and every logit bias; sampled text is not watched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor, nn

from apparatus.extraction_detector import DetectorConfig, ExtractionDetector, ExtractionRefused
from secure_kd.api import APIViewError, ModelAPI, Prompt, _as_prompt
from secure_kd.config import Strict
from secure_kd.topk import TopKLogits

__all__ = [
    "ApiDefenseConfig",
    "DetectorConfig",
    "ExtractionDetector",
    "ExtractionRefused",
    "HardenedModelAPI",
    "build_api",
]


class ApiDefenseConfig(Strict):
    """What a hardened API changes; every field at its default changes nothing."""

    top_k: int | None = Field(None, ge=1, description="most logprobs an answer reveals; None: as the view")
    round_decimals: int | None = Field(None, ge=0, le=8, description="round answers to d decimals")
    noise_sigma: float = Field(0.0, ge=0, description="std of Gaussian noise added to every logit")
    allow_logit_bias: bool = True
    max_queries: int | None = Field(None, ge=0, description="budget; the smaller of this and the API's")
    seed: int = Field(0, description="seed of the noise generator")
    detector: DetectorConfig | None = None


def prompt_surprisal(rows: Tensor, sequence: Sequence[int]) -> float:
    """Mean NLL of sequence[1:] under the logits after each prefix, over log V (NaN for 1 token)."""
    if len(sequence) < 2:
        return math.nan
    targets = torch.tensor(sequence[1:], dtype=torch.long)[:, None]
    nll = -torch.log_softmax(rows[:-1].double(), dim=-1).gather(1, targets).mean()
    return float(nll) / math.log(rows.shape[-1])


class HardenedModelAPI(ModelAPI):
    """A `ModelAPI` with the transforms of `ApiDefenseConfig` (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer=None, *, defense: ApiDefenseConfig, **api_kwargs) -> None:
        budgets = [b for b in (api_kwargs.pop("max_queries", None), defense.max_queries) if b is not None]
        view = api_kwargs.pop("view", "full_logits")
        if defense.top_k is not None and view == "full_logits":
            view = "topk_logprobs"
        if not defense.allow_logit_bias and view == "topk_logprobs_bias":
            view = "topk_logprobs"
        super().__init__(
            model, tokenizer, view=view, max_queries=min(budgets) if budgets else None, **api_kwargs
        )
        if defense.top_k is not None:
            self.top_k = min(self.top_k, defense.top_k, self.vocab_size)
        self.defense = defense
        self._noise = torch.Generator().manual_seed(defense.seed)
        self.detector = None
        if defense.detector is not None:
            hidden = getattr(getattr(model, "config", None), "hidden_size", None)
            self.detector = ExtractionDetector(defense.detector, hidden_size=hidden)
        # clean next-token logits and prompt surprisal of the contexts computed since the last answer
        self._fresh: list[tuple[Tensor, float]] = []
        self._observing = True

    # -- transforms -----------------------------------------------------------------------------------
    def model_logits(self, sequences: Sequence[Prompt]) -> list[Tensor]:
        clean = super().model_logits(sequences)
        if self._observing and self.detector is not None:
            self._fresh.extend(
                (rows[-1], prompt_surprisal(rows, seq)) for rows, seq in zip(clean, sequences, strict=True)
            )
        if self.defense.noise_sigma == 0:
            return clean
        sigma = self.defense.noise_sigma
        return [rows + sigma * torch.randn(rows.shape, generator=self._noise) for rows in clean]

    def _round(self, values: Tensor) -> Tensor:
        d = self.defense.round_decimals
        return values if d is None else torch.round(values, decimals=d)

    def _check_bias(self, logit_bias: dict[int, float]) -> Tensor:
        if not self.defense.allow_logit_bias:
            raise APIViewError(
                "this API does not accept logit_bias (removed by API hardening); ask without it"
            )
        return super()._check_bias(logit_bias)

    # -- the detector ---------------------------------------------------------------------------------
    def _guard(self) -> None:
        if self.detector is not None and self.detector.refusing:
            raise ExtractionRefused(self.detector.describe())

    def _observe(self) -> None:
        fresh, self._fresh = self._fresh, []
        if self.detector is None:
            return
        if fresh:
            logits = torch.stack([row for row, _ in fresh])
            surprisal = torch.tensor([score for _, score in fresh], dtype=torch.float64)
            self.detector.observe_contexts(logits, surprisal, queries=self.queries)
        if self.detector.refusing:
            raise ExtractionRefused(self.detector.describe())

    # -- the answers ------------------------------------------------------------------------------------
    def full_logits_batch(self, prompts: Sequence[Sequence[int] | Tensor]) -> Tensor:
        self._guard()
        answer = super().full_logits_batch(prompts)
        self._observe()
        return self._round(answer)

    def full_logits_positions_batch(self, sequences: Sequence[Sequence[int] | Tensor]) -> list[Tensor]:
        self._guard()
        answers = super().full_logits_positions_batch(sequences)
        self._observe()
        return [self._round(rows) for rows in answers]

    def topk_logprobs(
        self, prompt_ids: Sequence[int] | Tensor, *, logit_bias: dict[int, float] | None = None
    ) -> tuple[Tensor, Tensor]:
        self._guard()
        values, indices = super().topk_logprobs(prompt_ids, logit_bias=logit_bias)
        if self.detector is not None and logit_bias:
            self.detector.observe_bias(
                _as_prompt(prompt_ids, self.vocab_size), logit_bias, queries=self.queries
            )
        self._observe()
        return self._round(values), indices

    def topk_logprobs_positions_batch(self, sequences: Sequence[Sequence[int] | Tensor]) -> list[TopKLogits]:
        self._guard()
        answers = super().topk_logprobs_positions_batch(sequences)
        self._observe()
        return [TopKLogits(self._round(a.values), a.indices) for a in answers]

    def sample_text_batch(self, prompts, max_new_tokens, temperature=1.0, seed=0) -> list[list[int]]:
        self._guard()
        self._observing = False  # sampling contexts are the server's own, not the client's queries
        try:
            return super().sample_text_batch(prompts, max_new_tokens, temperature, seed)
        finally:
            self._observing = True


def build_api(
    model: nn.Module, tokenizer=None, *, defense: ApiDefenseConfig | None = None, **api_kwargs
) -> ModelAPI:
    """A plain `ModelAPI`, or a `HardenedModelAPI` when `defense` is given (same interface)."""
    if defense is None:
        return ModelAPI(model, tokenizer, **api_kwargs)
    return HardenedModelAPI(model, tokenizer, defense=defense, **api_kwargs)
