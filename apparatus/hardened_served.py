"""API hardening for a served model: `HardenedServedAPI`, the transforms of `ApiDefenseConfig` on a
`ServedModelAPI` (an OpenAI-compatible server: llama.cpp, vLLM), for a model owner who exposes a query
API over their own served teacher, or an attack measured against such an API.

A server returns top-k log-probabilities, never logit vectors, so the transforms act on its answers
(`apparatus.hardened_api.HardenedModelAPI` does the same for an in-process model, before any view):

- `top_k`: the server is asked for at most k log-probabilities (min of the API's and the defense's k),
  also for a teacher's `topk_logprobs_positions_batch(k=...)`.
- `noise_sigma`: N(0, sigma^2) added to each returned log-probability, drawn from (seed, the context's
  token ids, the token id): the same context always gets the same noise (repeats cannot average it
  away, unlike a per-query draw), and the answer is re-sorted and renormalized so its mass stays <= 1.
  A heuristic perturbation of what a client sees, not differential privacy.
- `round_decimals`: returned log-probabilities rounded to d decimals (after the noise).
- `allow_logit_bias: false`: `logit_bias` refused with `APIViewError`; a `topk_logprobs_bias` view
  becomes `topk_logprobs`.
- `max_queries`: the smaller of this, the API's and `served.max_queries`; checked before sending.
- `detector`: only its logit-bias sweep signal (distinct biased tokens per prompt) can run: the spectral
  coverage and the prompt surprisal need the logit vectors a server does not return. With `action:
  refuse`, the flagging query (refused before it is sent or counted) and all after raise
  `ExtractionRefused`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

from apparatus.extraction_detector import ExtractionDetector, ExtractionRefused
from apparatus.hardened_api import ApiDefenseConfig
from secure_kd.api import APIViewError, _as_prompt
from secure_kd.served.api import ServedModelAPI
from secure_kd.served.config import ServedConfig
from secure_kd.topk import TopKLogits


class HardenedServedAPI(ServedModelAPI):
    """A `ServedModelAPI` whose answers pass through `defense` (see the module docstring)."""

    def __init__(self, cfg: ServedConfig, tokenizer, *, defense: ApiDefenseConfig, **api_kwargs) -> None:
        view = api_kwargs.pop("view", "topk_logprobs")
        if not defense.allow_logit_bias and view == "topk_logprobs_bias":
            view = "topk_logprobs"
        top_k = api_kwargs.pop("top_k", 5)
        if defense.top_k is not None:
            top_k = min(top_k, defense.top_k)
        budgets = [b for b in (api_kwargs.pop("max_queries", None), defense.max_queries) if b is not None]
        super().__init__(
            cfg,
            tokenizer,
            view=view,
            top_k=top_k,
            max_queries=min(budgets) if budgets else None,
            **api_kwargs,
        )
        self.defense = defense
        self.detector = None if defense.detector is None else ExtractionDetector(defense.detector)

    # -- transforms ---------------------------------------------------------------------------------
    def _check_bias(self, logit_bias: dict[int, float]) -> Tensor:
        if not self.defense.allow_logit_bias:
            raise APIViewError(
                "this API does not accept logit_bias (removed by API hardening); ask without it"
            )
        return super()._check_bias(logit_bias)

    def _noise(self, context: Sequence[int], indices: Tensor) -> Tensor:
        digest = hashlib.sha256(f"{self.defense.seed}:{','.join(map(str, context))}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)
        return torch.randn(self.vocab_size, generator=generator)[indices]

    def _transform(self, context: Sequence[int], values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        if self.defense.noise_sigma > 0:
            values = values + self.defense.noise_sigma * self._noise(context, indices)
            values = values - torch.logsumexp(values, -1).clamp_min(0.0)  # mass <= 1
            values, order = values.sort(descending=True)
            indices = indices[order]
        if self.defense.round_decimals is not None:
            values = torch.round(values, decimals=self.defense.round_decimals)
        return values, indices

    # -- the detector ---------------------------------------------------------------------------------
    def _guard(self) -> None:
        if self.detector is not None and self.detector.refusing:
            raise ExtractionRefused(self.detector.describe())

    # -- the answers ------------------------------------------------------------------------------------
    def topk_logprobs(
        self, prompt_ids: Sequence[int] | Tensor, *, logit_bias: dict[int, float] | None = None
    ) -> tuple[Tensor, Tensor]:
        self._guard()
        prompt = _as_prompt(prompt_ids, self.vocab_size)
        if self.detector is not None and logit_bias:
            self.detector.observe_bias(prompt, logit_bias, queries=self.queries + 1)
            self._guard()
        values, indices = super().topk_logprobs(prompt_ids, logit_bias=logit_bias)
        return self._transform(prompt, values, indices)

    def topk_logprobs_positions_batch(
        self, sequences: Sequence[Sequence[int] | Tensor], *, k: int | None = None
    ) -> list[TopKLogits]:
        self._guard()
        k = self.top_k if k is None else k
        if self.defense.top_k is not None and isinstance(k, int):
            k = min(k, self.defense.top_k)
        answers = super().topk_logprobs_positions_batch(sequences, k=k)
        out = []
        for sequence, answer in zip(sequences, answers, strict=True):
            ids = [int(t) for t in sequence]
            rows = [
                self._transform(ids[: t + 1], answer.values[t], answer.indices[t]) for t in range(len(ids))
            ]
            out.append(TopKLogits(torch.stack([v for v, _ in rows]), torch.stack([i for _, i in rows])))
        return out

    def sample_text_batch(self, prompts, max_new_tokens, temperature=1.0, seed=0) -> list[list[int]]:
        self._guard()
        return super().sample_text_batch(prompts, max_new_tokens, temperature, seed)
