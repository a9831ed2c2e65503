"""What an attacker or a client sees of a model: a query API with views, a counter and a budget.

`ModelAPI` wraps a causal LM and answers next-token queries the way a hosted API would, in one of
four views:

- `full_logits`:        the full next-token logit vector (also top-k logprobs and sampled text);
- `topk_logprobs`:      the k largest next-token log-probabilities (and sampled text);
- `topk_logprobs_bias`: the same, with a `logit_bias` the caller adds to chosen tokens first
                        (as OpenAI's API allowed), which is what the logit-bias attack needs;
- `text`:               sampled continuations only.

Every answered query is counted (`queries`, `cost`) and `max_queries` is a hard budget: a call that
would pass it raises `QueryBudgetExceeded` before anything is computed or returned. A call that the
view does not allow raises `APIViewError` (a `PermissionError`).

Accounting follows what a real API would charge, not what this process computes: with
`cache_forward=True` the logits after a prompt are computed once and reused (the logit-bias attack
asks hundreds of questions about one prompt), and the `*_positions` helpers answer the queries for
every prefix of a sequence from one forward pass; each answered query still counts.

For wrappers (API-hardening defenses): `model_logits` is the one method that touches the model;
every view is computed from its output, so a subclass that perturbs or rounds logits there changes
every view consistently. The view methods themselves can be overridden to post-process answers.
A wrapper whose answers must differ between repeated queries (fresh noise per query) builds the
API with `cache_forward=False`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from secure_kd.topk import TopKLogits

View = Literal["full_logits", "topk_logprobs", "topk_logprobs_bias", "text"]
VIEWS: tuple[str, ...] = get_args(View)

# The operations each view allows; a view that gives full logits lets a client compute top-k itself.
_ALLOWED: dict[str, frozenset[str]] = {
    "full_logits": frozenset({"full_logits", "topk_logprobs", "sample_text"}),
    "topk_logprobs": frozenset({"topk_logprobs", "sample_text"}),
    "topk_logprobs_bias": frozenset({"topk_logprobs", "logit_bias", "sample_text"}),
    "text": frozenset({"sample_text"}),
}
MAX_CACHED_PROMPTS = 256
Prompt = tuple[int, ...]


class APIViewError(PermissionError):
    """The API's view does not offer what was asked (e.g. full logits from a top-k API)."""


class QueryBudgetExceeded(RuntimeError):
    """The query budget would be passed; nothing was answered."""


def _as_prompts(prompts: Sequence[Sequence[int] | Tensor], vocab_size: int) -> list[Prompt]:
    if len(prompts) == 0:
        raise ValueError("no prompts were given; pass at least one sequence of token ids")
    return [_as_prompt(prompt, vocab_size) for prompt in prompts]


def _as_prompt(prompt_ids: Sequence[int] | Tensor, vocab_size: int) -> Prompt:
    if isinstance(prompt_ids, Tensor):
        if prompt_ids.dim() != 1:
            raise ValueError(
                f"prompt_ids must be a 1-D sequence of token ids, got shape {tuple(prompt_ids.shape)}"
            )
        prompt_ids = prompt_ids.tolist()
    prompt = tuple(int(token) for token in prompt_ids)
    if not prompt:
        raise ValueError("prompt_ids is empty; a query needs at least one token")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise ValueError(
            f"prompt_ids must be token ids in [0, {vocab_size}); got values in [{min(prompt)}, {max(prompt)}]"
        )
    return prompt


class ModelAPI:
    """A counted, budgeted, view-restricted query interface over a causal LM.

    Args:
        model: a causal LM returning `.logits` (Hugging Face style); it is put in eval mode.
        tokenizer: optional; gives `encode` and the end-of-sequence token for sampling.
        view: what the API shows (see the module docstring).
        top_k: how many log-probabilities a top-k answer holds.
        cost_per_query: price of one answered query; `cost = queries * cost_per_query`.
        max_queries: the budget; None for unlimited.
        cache_forward: reuse the logits after a prompt asked before (answers are identical, the
            count is not affected).
        batch_size: prompts per forward pass inside `model_logits`.
        max_logit_bias: the largest |bias| accepted per token (OpenAI's API used 100).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        *,
        view: View = "full_logits",
        top_k: int = 5,
        cost_per_query: float = 1.0,
        max_queries: int | None = None,
        cache_forward: bool = True,
        batch_size: int = 16,
        max_logit_bias: float = 100.0,
    ) -> None:
        output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if output_layer is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings; ModelAPI needs a causal LM")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._init_accounting(
            vocab_size=int(output_layer.weight.shape[0]),
            view=view,
            top_k=top_k,
            cost_per_query=cost_per_query,
            max_queries=max_queries,
            max_logit_bias=max_logit_bias,
        )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cache_forward = cache_forward
        self.batch_size = batch_size
        self.forward_passes = 0
        self._cache: OrderedDict[Prompt, Tensor] = OrderedDict()

    def _init_accounting(
        self,
        *,
        vocab_size: int,
        view: View,
        top_k: int,
        cost_per_query: float,
        max_queries: int | None,
        max_logit_bias: float,
    ) -> None:
        """Validate and set what every backend shares: the view, top-k, price, budget and counter
        (a served backend, secure_kd.served.api, calls this instead of loading a model)."""
        if view not in VIEWS:
            raise ValueError(f"view must be one of {', '.join(VIEWS)}; got {view!r}")
        self.vocab_size = int(vocab_size)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= self.vocab_size:
            raise ValueError(f"top_k must be an int in [1, vocab={self.vocab_size}], got {top_k!r}")
        if not (math.isfinite(cost_per_query) and cost_per_query >= 0):
            raise ValueError(f"cost_per_query must be a finite number >= 0, got {cost_per_query}")
        if max_queries is not None and (isinstance(max_queries, bool) or max_queries < 0):
            raise ValueError(f"max_queries must be None (unlimited) or an int >= 0, got {max_queries!r}")
        if not max_logit_bias > 0:
            raise ValueError(f"max_logit_bias must be > 0, got {max_logit_bias}")
        self.view: View = view
        self.top_k = top_k
        self.cost_per_query = float(cost_per_query)
        self.max_queries = max_queries
        self.max_logit_bias = float(max_logit_bias)
        self.queries = 0

    # -- accounting -----------------------------------------------------------------------------------
    @property
    def cost(self) -> float:
        return self.queries * self.cost_per_query

    @property
    def remaining(self) -> int | None:
        """Queries left in the budget (None when unlimited)."""
        return None if self.max_queries is None else self.max_queries - self.queries

    def reset_counter(self) -> None:
        self.queries = 0

    def _charge(self, n: int, what: str) -> None:
        """Count `n` queries, or raise before answering if the budget cannot cover all of them."""
        if self.max_queries is not None and self.queries + n > self.max_queries:
            left = self.max_queries - self.queries
            raise QueryBudgetExceeded(
                f"{what} needs {n} quer{'y' if n == 1 else 'ies'} but only {left} of the budget "
                f"max_queries={self.max_queries} remain; raise max_queries or ask for less"
            )
        self.queries += n

    def _require(self, operation: str) -> None:
        if operation not in _ALLOWED[self.view]:
            offered = ", ".join(sorted(_ALLOWED[self.view]))
            raise APIViewError(
                f"this API's view is {self.view!r}, which does not offer {operation!r} (it offers: {offered})"
            )

    # -- the model ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        parameter = next(self.model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    @torch.no_grad()
    def model_logits(self, sequences: Sequence[Prompt]) -> list[Tensor]:
        """Next-token logits after every prefix of each sequence: one float32 CPU Tensor[len_i, V] each.

        Row j of a sequence's tensor holds the logits after `sequence[:j + 1]`. Right padding with an
        attention mask leaves a causal model's logits at the real positions unchanged. This is the
        one method that runs the model; it neither counts nor checks the view.
        """
        answers: list[Tensor] = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            width = max(len(seq) for seq in chunk)
            input_ids = torch.zeros((len(chunk), width), dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, seq in enumerate(chunk):
                input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                attention_mask[row, : len(seq)] = 1
            logits = (
                self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
                .logits.float()
                .cpu()
            )
            self.forward_passes += 1
            answers.extend(logits[row, : len(seq)] for row, seq in enumerate(chunk))
        return answers

    def _next_logits(self, prompts: Sequence[Prompt]) -> Tensor:
        """[n, V] logits after each prompt, from the cache where possible (least recently used out)."""
        if not self.cache_forward:
            return torch.stack([rows[-1] for rows in self.model_logits(prompts)])
        found = {prompt: self._cache[prompt] for prompt in prompts if prompt in self._cache}
        missing = [prompt for prompt in dict.fromkeys(prompts) if prompt not in found]
        for prompt, rows in zip(missing, self.model_logits(missing), strict=True):
            found[prompt] = rows[-1].clone()  # a copy, so the batch's [B, L, V] tensor can be freed
        for prompt, logits in found.items():
            self._cache[prompt] = logits
            self._cache.move_to_end(prompt)
        while len(self._cache) > MAX_CACHED_PROMPTS:
            self._cache.popitem(last=False)
        return torch.stack([found[prompt] for prompt in prompts])

    def clear_cache(self) -> None:
        self._cache.clear()

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this ModelAPI has no tokenizer; pass token ids, or build it with tokenizer=...")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- full logits -------------------------------------------------------------------------------------
    def full_logits(self, prompt_ids: Sequence[int] | Tensor) -> Tensor:
        """Tensor[V]: the next-token logits after the prompt (1 query)."""
        return self.full_logits_batch([prompt_ids])[0]

    def full_logits_batch(self, prompts: Sequence[Sequence[int] | Tensor]) -> Tensor:
        """Tensor[n, V]: the next-token logits after each prompt (n queries)."""
        self._require("full_logits")
        checked = _as_prompts(prompts, self.vocab_size)
        self._charge(len(checked), "full_logits_batch")
        return self._next_logits(checked)

    def full_logits_positions(self, ids: Sequence[int] | Tensor) -> Tensor:
        """Tensor[L, V]: row j = logits after ids[:j + 1], for all L prefixes (L queries, one forward)."""
        return self.full_logits_positions_batch([ids])[0]

    def full_logits_positions_batch(self, sequences: Sequence[Sequence[int] | Tensor]) -> list[Tensor]:
        """`full_logits_positions` for each sequence, batched (one query per prefix of each)."""
        self._require("full_logits")
        checked = _as_prompts(sequences, self.vocab_size)
        self._charge(sum(map(len, checked)), "full_logits_positions")
        return self.model_logits(checked)

    # -- top-k log-probabilities ------------------------------------------------------------------------
    def _check_bias(self, logit_bias: dict[int, float]) -> Tensor:
        self._require("logit_bias")
        bias = torch.zeros(self.vocab_size)
        for token, value in logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < self.vocab_size:
                raise ValueError(f"logit_bias key {token!r} is not a token id in [0, {self.vocab_size})")
            if not (math.isfinite(value) and abs(value) <= self.max_logit_bias):
                raise ValueError(
                    f"logit_bias[{token}] = {value} must be finite with |bias| <= "
                    f"{self.max_logit_bias} (this API's limit)"
                )
            bias[token] = float(value)
        return bias

    def topk_logprobs(
        self, prompt_ids: Sequence[int] | Tensor, *, logit_bias: dict[int, float] | None = None
    ) -> tuple[Tensor, Tensor]:
        """(values [k], indices [k]): the top-k of log_softmax(logits + bias) after the prompt (1 query).

        `logit_bias` ({token id: bias}) is allowed only in the view `topk_logprobs_bias`.
        """
        self._require("topk_logprobs")
        bias = self._check_bias(logit_bias) if logit_bias else None
        prompt = _as_prompt(prompt_ids, self.vocab_size)
        self._charge(1, "topk_logprobs")
        logits = self._next_logits([prompt])[0]
        if bias is not None:
            logits = logits + bias
        return torch.log_softmax(logits, dim=-1).topk(self.top_k)

    def topk_logprobs_positions(self, ids: Sequence[int] | Tensor) -> TopKLogits:
        """TopKLogits with positions [L]: the top-k logprobs after every prefix of `ids` (L queries)."""
        return self.topk_logprobs_positions_batch([ids])[0]

    def topk_logprobs_positions_batch(self, sequences: Sequence[Sequence[int] | Tensor]) -> list[TopKLogits]:
        """`topk_logprobs_positions` for each sequence, batched (one query per prefix of each)."""
        self._require("topk_logprobs")
        checked = _as_prompts(sequences, self.vocab_size)
        self._charge(sum(map(len, checked)), "topk_logprobs_positions")
        return [TopKLogits.from_logits(rows, self.top_k) for rows in self.model_logits(checked)]

    # -- sampled text -------------------------------------------------------------------------------------
    def _eos_id(self) -> int | None:
        if self.tokenizer is not None and getattr(self.tokenizer, "eos_token_id", None) is not None:
            return int(self.tokenizer.eos_token_id)
        eos = getattr(getattr(self.model, "config", None), "eos_token_id", None)
        return eos if isinstance(eos, int) else None

    def sample_text(
        self, prompt_ids: Sequence[int] | Tensor, max_new_tokens: int, temperature: float = 1.0, seed: int = 0
    ) -> list[int]:
        """The sampled continuation's token ids (1 query), stopping after an end-of-sequence token."""
        return self.sample_text_batch([prompt_ids], max_new_tokens, temperature, seed)[0]

    def sample_text_batch(
        self,
        prompts: Sequence[Sequence[int] | Tensor],
        max_new_tokens: int,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> list[list[int]]:
        """One sampled continuation per prompt (n queries); same seed, same continuations.

        Sampling runs on `model_logits` token by token (without a KV cache), so a wrapper that
        changes logits also changes the text.
        """
        self._require("sample_text")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
        checked = _as_prompts(prompts, self.vocab_size)
        self._charge(len(checked), "sample_text_batch")
        generator = torch.Generator().manual_seed(seed)
        eos = self._eos_id()
        continuations: list[list[int]] = [[] for _ in checked]
        active = list(range(len(checked)))
        for _ in range(max_new_tokens):
            if not active:
                break
            rows = self.model_logits([checked[i] + tuple(continuations[i]) for i in active])
            probs = torch.softmax(torch.stack([r[-1] for r in rows]) / temperature, dim=-1)
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1).tolist()
            for i, token in zip(active, tokens, strict=True):
                continuations[i].append(token)
            active = [i for i in active if continuations[i][-1] != eos]
        return continuations
