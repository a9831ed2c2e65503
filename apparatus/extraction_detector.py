"""A detector for the query patterns of hidden-size / output-layer extraction (secure-kd's own design).

Carlini et al. 2024 and Finlayson et al. 2024 recover a model's hidden size h from the spectrum of
n > h answered logit vectors; the cheapest way to fill all h directions is many unrelated prompts
(random token strings), and with top-k logprobs the logit-bias trick sweeps the whole vocabulary
through the bias, k - 1 tokens at a time, on one prompt. The papers give no detector; this one
watches three signals a server can see for free:

- Spectral coverage. The server keeps the clean next-token logit vectors of the last `window`
  distinct contexts it computed for the client, centers them (removing the shared direction) and
  computes the entropy effective rank of their singular values (Roy & Vetterli 2007:
  exp(-sum p_i log p_i), p_i = s_i / sum s). Divided by min(h, window - 1) it is the fraction of the
  hidden space the recent queries explore. Related prompts (a conversation, documents on a topic)
  explore few directions evenly; unrelated random prompts spread over all of them.
- Prompt surprisal. The forward pass that answers a query also scores the prompt: its mean
  per-token negative log-likelihood under the model, divided by log V (1.0 = as surprising as
  uniform random tokens). Language scores well below 1; random token strings near or above 1.
  Measured: the spectrum alone does not separate the two. On tiny random Llamas the coverage is
  0.73-0.89 for random prompts and model-sampled text alike; on SmolLM2-135M it is 0.56 for 96
  random prompts and 0.65 for 22 support-chat texts (window 21). Surprisal does: 1.45 vs 0.47 on
  SmolLM2, 1.9 vs 0.5 on a sharpened tiny victim (logit scale 30). On a near-uniform random
  model (scale 1) sampled text is as surprising as random tokens and the detector cannot tell.
  The API is flagged when, with at least `min_contexts` in the window, the coverage reaches
  `coverage_threshold` and the window's mean surprisal reaches `surprisal_threshold` (None: the
  spectrum alone decides).
- Bias sweeps. The number of distinct tokens the client has put a logit bias on for one prompt;
  ordinary use biases a handful (ban or force a few tokens), the extraction sweeps V - 1. Flagged
  at `bias_sweep_tokens`.

Limits, stated: the thresholds are heuristics calibrated on the traffic measured in
benchmarks/results/api_hardening.json (false positives are reported there); an attacker who
spreads queries over many accounts, or uses natural, topical prompts and patience, stays under the
spectral threshold, because any n > h logit vectors reveal h. It raises the cost, it does not
prevent the attack.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from secure_kd.config import Strict


class ExtractionRefused(PermissionError):
    """The API flagged this client's query pattern as model extraction and refuses to answer."""


class DetectorConfig(Strict):
    window: int = Field(64, ge=4, description="recent distinct contexts whose spectrum is tracked")
    min_contexts: int = Field(32, ge=3, description="contexts in the window before the spectrum is judged")
    coverage_threshold: float = Field(0.6, gt=0, le=1, description="effective rank / min(h, window-1)")
    surprisal_threshold: float | None = Field(
        0.8, gt=0, description="mean prompt NLL / log V that, with the coverage, flags; None: spectrum only"
    )
    check_every: int = Field(8, ge=1, description="judge the spectrum every this many new contexts")
    bias_sweep_tokens: int = Field(64, ge=2, description="distinct biased tokens on one prompt that flag")
    action: Literal["flag", "refuse"] = "flag"


def effective_rank(matrix: Tensor) -> float:
    """exp(entropy of the normalized singular values) of the row-centered matrix (Roy & Vetterli 2007)."""
    centered = matrix.double() - matrix.double().mean(0, keepdim=True)
    values = torch.linalg.svdvals(centered)
    total = float(values.sum())
    if total == 0.0:
        return 0.0
    p = values[values > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


class ExtractionDetector:
    """Stateful: feed it what the API computed and answered; read `flagged`, `reason`, `history`."""

    def __init__(self, config: DetectorConfig, *, hidden_size: int | None = None) -> None:
        if config.min_contexts > config.window:
            raise ValueError(
                f"detector.min_contexts ({config.min_contexts}) must be <= detector.window ({config.window})"
            )
        self.config, self.hidden_size = config, hidden_size
        self._window: deque[Tensor] = deque(maxlen=config.window)
        self._surprisal: deque[float] = deque(maxlen=config.window)
        self._since_check = 0
        self._biased: OrderedDict[tuple[int, ...], set[int]] = OrderedDict()
        self.contexts_seen = 0
        self.flagged = False
        self.reason: str | None = None
        self.flagged_at_query: int | None = None
        self.history: list[tuple[int, float, float]] = []  # (contexts seen, coverage, surprisal) per check

    @property
    def refusing(self) -> bool:
        return self.flagged and self.config.action == "refuse"

    def describe(self) -> str:
        return (
            f"this client's queries were flagged as model extraction ({self.reason}) at query "
            f"{self.flagged_at_query}; the API refuses further queries"
        )

    def _flag(self, reason: str, queries: int | None) -> None:
        if not self.flagged:
            self.flagged, self.reason, self.flagged_at_query = True, reason, queries

    def coverage(self) -> float:
        """Effective rank of the window over min(h, window - 1) (h unknown: window - 1)."""
        n = len(self._window)
        if n < 3:
            return 0.0
        reference = n - 1 if self.hidden_size is None else min(self.hidden_size, n - 1)
        return effective_rank(torch.stack(list(self._window))) / reference

    def mean_surprisal(self) -> float:
        """Mean prompt surprisal over the window (NaN when no prompt had two or more tokens)."""
        known = [v for v in self._surprisal if not math.isnan(v)]
        return sum(known) / len(known) if known else math.nan

    def observe_contexts(
        self, logits: Tensor, surprisal: Tensor | None = None, *, queries: int | None = None
    ) -> None:
        """Clean next-token logits [n, V] of n contexts the API just computed for the client, and each
        prompt's surprisal [n] (mean NLL / log V; NaN for one-token prompts; None: unknown)."""
        if surprisal is None:
            surprisal = torch.full((logits.shape[0],), math.nan)
        threshold = self.config.surprisal_threshold
        for row, score in zip(logits.detach().to("cpu", torch.float64), surprisal.tolist(), strict=True):
            self._window.append(row)
            self._surprisal.append(float(score))
            self.contexts_seen += 1
            self._since_check += 1
            if len(self._window) >= self.config.min_contexts and self._since_check >= self.config.check_every:
                self._since_check = 0
                value, unnatural = self.coverage(), self.mean_surprisal()
                self.history.append((self.contexts_seen, value, unnatural))
                if value < self.config.coverage_threshold:
                    continue
                if threshold is None:
                    self._flag(f"spectral coverage {value:.2f} >= {self.config.coverage_threshold}", queries)
                elif unnatural >= threshold:  # NaN (no scores) never flags
                    self._flag(
                        f"spectral coverage {value:.2f} >= {self.config.coverage_threshold} with prompt "
                        f"surprisal {unnatural:.2f} >= {threshold}",
                        queries,
                    )

    def observe_bias(
        self, prompt: tuple[int, ...], logit_bias: dict[int, float], *, queries: int | None = None
    ) -> None:
        tokens = self._biased.setdefault(prompt, set())
        tokens.update(logit_bias)
        self._biased.move_to_end(prompt)
        while len(self._biased) > 256:
            self._biased.popitem(last=False)
        if len(tokens) >= self.config.bias_sweep_tokens:
            self._flag(f"logit-bias sweep over {len(tokens)} tokens of one prompt", queries)
