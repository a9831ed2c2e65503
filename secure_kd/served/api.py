"""The query API over a served model: the same `ModelAPI` surface, answered by an HTTP server.

`ServedModelAPI` is a `ModelAPI` whose answers come from an OpenAI-compatible server
(`ServedClient`) instead of an in-process model, so everything that speaks the query API (the
cache builder through `ServedTeacher`, the logit-leak and clone attacks) can use a served model,
with the same accounting: one query per answered position, `max_queries` checked before anything is
sent, and `provenance()` saying which server answered how much (never the API key).

What a server can show, and so which views exist here:

- `topk_logprobs`: yes (the point of a served teacher). Values are the server's log-probabilities
  of the whole-vocabulary distribution; ids the server's answer cannot name (see
  secure_kd/served/pieces.py) are left out, so an answer's top-k is the top-k of the ids it names,
  its missing mass exact.
- `topk_logprobs_bias`: only if the server's log-probabilities reflect the `logit_bias` it is sent.
  The first biased query checks that (2 extra counted queries: one unbiased, one giving a token
  from outside the top-k the largest allowed bias) and refuses with `APIViewError` unless that token
  then holds most of the mass. llama-cpp-python's server applies the bias to sampling only (it adds
  the sampled token to the answer with its unbiased log-probability) and is refused; a server that
  honours it (OpenAI's API did, as the logit-bias attack assumes) passes.
- `text`: sampled continuations.
- `full_logits`: refused; an OpenAI-compatible server returns log-probabilities of chosen tokens,
  not logit vectors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from secure_kd.api import APIViewError, ModelAPI, Prompt, View, _as_prompt, _as_prompts
from secure_kd.served.client import ServedClient
from secure_kd.served.config import ServedConfig
from secure_kd.topk import TopKLogits

# Asked beyond k so that a few ids the answer cannot name (llama-cpp-python keys entries by text)
# still leave k named ones; the answer is cut back to k.
TEXT_KEYED_SLACK = 16
PAD_LOGPROB = -50.0  # fills an answer that names fewer than k ids (probability e^-50, about 2e-22)


def pad_topk(answer: dict[int, float], k: int, vocab_size: int) -> tuple[Tensor, Tensor]:
    """(values [k], indices [k]) sorted by value; padded with unused ids at PAD_LOGPROB if short."""
    ranked = sorted(answer.items(), key=lambda kv: -kv[1])[:k]
    if len(ranked) < k:
        taken = {token for token, _ in ranked}
        fillers = (t for t in range(vocab_size) if t not in taken)
        ranked += [(next(fillers), PAD_LOGPROB) for _ in range(k - len(ranked))]
    values = torch.tensor([v for _, v in ranked], dtype=torch.float32)
    indices = torch.tensor([t for t, _ in ranked], dtype=torch.long)
    return values, indices


class ServedModelAPI(ModelAPI):
    """A counted, budgeted, view-restricted query interface over a served model.

    Args:
        cfg: the `served` block (URL, model, key variable, dialect, budget).
        tokenizer: the served model's tokenizer (ids in and out are its ids).
        view, top_k, cost_per_query, max_queries, max_logit_bias: as for `ModelAPI`; the budget is
            the smaller of `max_queries` and `cfg.max_queries`.
        client: an existing `ServedClient` (tests, or to share one connection).
    """

    backend = "served"

    def __init__(
        self,
        cfg: ServedConfig,
        tokenizer,
        *,
        view: View = "topk_logprobs",
        top_k: int = 5,
        cost_per_query: float = 1.0,
        max_queries: int | None = None,
        max_logit_bias: float = 100.0,
        client: ServedClient | None = None,
    ) -> None:
        if view == "full_logits":
            raise APIViewError(
                "a served model answers top-k log-probabilities, not full logit vectors; use the view "
                "topk_logprobs, topk_logprobs_bias or text"
            )
        budgets = [b for b in (max_queries, cfg.max_queries) if b is not None]
        self._init_accounting(
            vocab_size=len(tokenizer),
            view=view,
            top_k=top_k,
            cost_per_query=cost_per_query,
            max_queries=min(budgets) if budgets else None,
            max_logit_bias=max_logit_bias,
        )
        if cfg.max_top_k is not None and top_k > cfg.max_top_k:
            raise ValueError(f"top_k={top_k} exceeds served.max_top_k={cfg.max_top_k}, the server's limit")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.model = None
        self.cache_forward = False
        self.batch_size = 1
        self.forward_passes = 0
        self._cache = {}
        self.client = client or ServedClient(cfg, tokenizer)
        self.bias_honoured: bool | None = None

    # -- what the server is asked -------------------------------------------------------------------
    def server_k(self, k: int | None = None) -> int:
        k = self.top_k if k is None else k
        if self.cfg.dialect != "llama_cpp_python":
            return k
        asked = k + TEXT_KEYED_SLACK
        return asked if self.cfg.max_top_k is None else min(asked, self.cfg.max_top_k)

    def model_logits(self, sequences: Sequence[Prompt]) -> list[Tensor]:
        raise APIViewError("a served model does not give logit vectors; ask for top-k log-probabilities")

    def close(self) -> None:
        self.client.close()

    def provenance(self) -> dict:
        """What answered and how much: the server (no key), the view, queries, cost, client counters."""
        return {
            "backend": "served",
            **self.cfg.describe(),
            "view": self.view,
            "top_k": self.top_k,
            "queries": self.queries,
            "cost": self.cost,
            "max_queries": self.max_queries,
            "logit_bias_honoured": self.bias_honoured,
            "unnameable_ids": len(self.client.pieces.ambiguous_ids) if self.client.pieces else 0,
            **self.client.stats.as_dict(),
        }

    # -- top-k log-probabilities --------------------------------------------------------------------
    def topk_logprobs(
        self, prompt_ids: Sequence[int] | Tensor, *, logit_bias: dict[int, float] | None = None
    ) -> tuple[Tensor, Tensor]:
        """(values [k], indices [k]) after the prompt (1 query), with `logit_bias` if the view allows."""
        self._require("topk_logprobs")
        if logit_bias:
            self._check_bias(logit_bias)
        prompt = _as_prompt(prompt_ids, self.vocab_size)
        self._charge(1, "topk_logprobs")
        if logit_bias:
            self._ensure_bias_honoured(prompt)
        answer = self.client.next_topk(prompt, self.server_k(), logit_bias or None)
        return pad_topk(answer, self.top_k, self.vocab_size)

    def _ensure_bias_honoured(self, prompt: Prompt) -> None:
        if self.bias_honoured is None:
            self._charge(2, "the logit_bias check")
            plain = self.client.next_topk(prompt, self.server_k())
            unnameable = set(self.client.pieces.ambiguous_ids) if self.client.pieces else set()
            unnameable |= set(self.client.stop_ids)
            probe = next(
                t for t in range(self.vocab_size - 1, -1, -1) if t not in plain and t not in unnameable
            )
            biased = self.client.next_topk(prompt, self.server_k(), {probe: self.max_logit_bias})
            # honoured: +max_logit_bias makes the probe the likeliest token. llama-cpp-python instead
            # samples it and adds it to the answer with its unbiased (tiny) log-probability.
            self.bias_honoured = biased.get(probe, -math.inf) > math.log(0.5)
        if not self.bias_honoured:
            raise APIViewError(
                f"the server at {self.cfg.base_url} ignores logit_bias in the log-probabilities it returns "
                f"(a token given a bias of +{self.max_logit_bias:g} did not enter its top-k): "
                f"{self.cfg.dialect} applies the bias to sampling only. Attacks that need the view "
                "topk_logprobs_bias cannot run against it; use the view topk_logprobs or text"
            )

    def topk_logprobs_positions_batch(
        self, sequences: Sequence[Sequence[int] | Tensor], *, k: int | None = None
    ) -> list[TopKLogits]:
        """TopKLogits [L, k] per sequence: the top-k after every prefix (one query per position).

        `k` defaults to the API's `top_k`; a teacher (ServedTeacher) asks for the k its caller needs."""
        self._require("topk_logprobs")
        k = self.top_k if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.vocab_size:
            raise ValueError(f"k must be an int in [1, vocab={self.vocab_size}], got {k!r}")
        checked = _as_prompts(sequences, self.vocab_size)
        self._charge(sum(map(len, checked)), "topk_logprobs_positions")
        results = []
        for sequence in checked:
            answers = self.client.prompt_topk(sequence, self.server_k(k))
            rows = [pad_topk(a, k, self.vocab_size) for a in answers]
            results.append(TopKLogits(torch.stack([v for v, _ in rows]), torch.stack([i for _, i in rows])))
        return results

    # -- sampled text -------------------------------------------------------------------------------
    def sample_text_batch(
        self,
        prompts: Sequence[Sequence[int] | Tensor],
        max_new_tokens: int,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> list[list[int]]:
        """One sampled continuation per prompt (n queries), from the server's sampler."""
        self._require("sample_text")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
        checked = _as_prompts(prompts, self.vocab_size)
        self._charge(len(checked), "sample_text_batch")
        return [
            self.client.sample(prompt, max_new_tokens, temperature, seed + i)[:max_new_tokens]
            for i, prompt in enumerate(checked)
        ]
