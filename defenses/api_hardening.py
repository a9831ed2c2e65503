"""API hardening against logit leaks and cloning: what it costs, and whether its detector fires.

Against the attacks of Carlini et al. 2024 ("Stealing Part of a Production Language Model") and
Finlayson et al. 2024 ("Logits of API-Protected LLMs Leak Proprietary Information"), hosted APIs
truncated answers to the top few log-probabilities, dropped or restricted the logit-bias
parameter, and the papers discuss adding noise and rounding as mitigations. The transforms and the
extraction detector live in the shared apparatus (`apparatus.hardened_api.HardenedModelAPI`,
`apparatus.extraction_detector`) so that attacks can take the same `api_defense` config; this
plugin measures, without any attack code:

- utility: the defended API's answers against the undefended API's in the same view, on
  ordinary prompts (prefixes of text sampled from the victim): top-1 agreement and the mean
  KL(undefended || defended) of the next-token distributions the answers describe (a top-k answer
  describes its k probabilities plus the missing mass spread uniformly over the other tokens);
- the detector: the fraction of ordinary clients it flags (false positives) and whether, and at
  which query, it flags a client sending the extraction pattern (random-token prompts, plus a
  logit-bias sweep when the view offers the bias);
- that a removed logit bias is refused.

How much each setting slows the attacks is measured in benchmarks/experiments/api_hardening.py,
which runs the registered `logit_leak` and `clone` attacks against a hardened API.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Literal

import torch
from pydantic import BaseModel, Field

from apparatus.hardened_api import ApiDefenseConfig, DetectorConfig, ExtractionRefused, HardenedModelAPI
from apparatus.victims import load_victim
from defenses import DEFENSES
from secure_kd.api import APIViewError, ModelAPI, QueryBudgetExceeded
from secure_kd.config import ModelConfig, Strict, TinyModelConfig
from secure_kd.models import resolve_device, vocab_size_of
from secure_kd.plugins import Plugin, PluginConfig, write_result

AnswerView = Literal["full_logits", "topk_logprobs", "topk_logprobs_bias"]


def _tiny_victim() -> ModelConfig:
    return ModelConfig(
        source="tiny", tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, vocab_size=256)
    )


def _default_defense() -> ApiDefenseConfig:
    return ApiDefenseConfig(top_k=5, round_decimals=2, allow_logit_bias=False, detector=DetectorConfig())


class TrafficConfig(Strict):
    """Ordinary clients ask next-token questions on prefixes of text sampled from the victim."""

    ordinary_clients: int = Field(8, gt=0)
    queries_per_client: int = Field(128, gt=0)
    sequence_length: int = Field(16, ge=3)
    extraction_queries: int = Field(256, gt=1, description="random-token prompts the extraction client sends")
    prompt_length: int = Field(8, ge=2)
    utility_prompts: int = Field(128, gt=0)


class ApiHardeningConfig(PluginConfig):
    """`secure-kd defend api_hardening`: utility cost and detector behaviour of a hardened API."""

    out: str = "runs/defenses/api_hardening"
    victim: ModelConfig = Field(default_factory=_tiny_victim)
    victim_logit_scale: float = Field(
        30.0, gt=0, description="tiny victims: sharpen a random model's near-uniform outputs (1.0: as built)"
    )
    view: AnswerView = "topk_logprobs_bias"
    top_k: int = Field(5, ge=1, description="the undefended API's top-k")
    defense: ApiDefenseConfig = Field(default_factory=_default_defense)
    traffic: TrafficConfig = TrafficConfig()


class DetectorReport(BaseModel):
    ordinary_clients: int
    ordinary_flagged: int
    false_positive_rate: float
    ordinary_max_coverage: float | None
    ordinary_max_surprisal: float | None
    extraction_flagged: bool
    extraction_flagged_at_query: int | None
    extraction_queries_answered: int
    extraction_reason: str | None


class ApiHardeningResult(BaseModel):
    kind: str = "api_hardening"
    victim_source: str
    vocab_size: int
    hidden_size: int | None
    view: str
    answered_view: str
    answered_top_k: int
    defense: dict
    utility_top1_agreement: float
    utility_mean_kl: float
    utility_prompts: int
    logit_bias_refused: bool | None
    detector: DetectorReport | None
    seconds: float


def answer_distribution(api: ModelAPI, prompt: tuple[int, ...]) -> torch.Tensor:
    """Next-token distribution [V] an answer describes: softmax of full logits, or top-k + uniform tail."""
    if api.view == "full_logits":
        return torch.softmax(api.full_logits(prompt).double(), dim=-1)
    values, indices = api.topk_logprobs(prompt)
    kept = values.double().exp()
    missing = max(1.0 - float(kept.sum()), 1e-12)  # rounding can push the kept mass just above 1
    others = api.vocab_size - len(indices)
    probs = torch.full((api.vocab_size,), missing / max(others, 1), dtype=torch.float64)
    probs[indices] = kept
    return probs / probs.sum()


def utility(defended: ModelAPI, reference: ModelAPI, prompts: list[tuple[int, ...]]) -> tuple[float, float]:
    """(top-1 agreement, mean KL(reference || defended)) of the two APIs' answers on `prompts`."""
    agree, kl = 0, 0.0
    for prompt in prompts:
        p, q = answer_distribution(reference, prompt), answer_distribution(defended, prompt)
        agree += int(p.argmax() == q.argmax())
        kl += float((p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log())).sum())
    return agree / len(prompts), kl / len(prompts)


def sampled_sequences(api: ModelAPI, n: int, length: int, seed: int) -> list[tuple[int, ...]]:
    """`n` sequences of `length` tokens: a random first token, then the model's own continuation."""
    starts = torch.randint(0, api.vocab_size, (n, 1), generator=torch.Generator().manual_seed(seed)).tolist()
    texts = api.sample_text_batch(starts, length - 1, seed=seed)
    return [tuple(start + text) for start, text in zip(starts, texts, strict=True)]


def _ask(api: ModelAPI, prompt: tuple[int, ...]) -> None:
    if api.view == "full_logits":
        api.full_logits(prompt)
    else:
        api.topk_logprobs(prompt)


def ordinary_client(api: HardenedModelAPI, sequences: list[tuple[int, ...]], queries: int) -> None:
    """Next-token questions on the prefixes (2 tokens and longer) of a client's own sequences, in order."""
    asked = 0
    for sequence in sequences:
        for end in range(2, len(sequence) + 1):
            if asked == queries:
                return
            _ask(api, sequence[:end])
            asked += 1


def extraction_client(api: HardenedModelAPI, prompts: list[tuple[int, ...]]) -> None:
    """Random-token prompts, then a logit-bias sweep over the vocabulary on one prompt if the view allows."""
    try:
        for prompt in prompts:
            _ask(api, prompt)
        if api.view == "topk_logprobs_bias" and api.top_k >= 2:
            group = api.top_k - 1
            for start in range(1, api.vocab_size, group):
                tokens = range(start, min(start + group, api.vocab_size))
                api.topk_logprobs(prompts[0], logit_bias={0: 100.0, **dict.fromkeys(tokens, 100.0)})
    except (ExtractionRefused, QueryBudgetExceeded):
        return


def detector_report(
    config: ApiHardeningConfig, victim, tokenizer, ordinary: list[tuple[int, ...]]
) -> DetectorReport:
    t = config.traffic
    api_args = {"view": config.view, "top_k": config.top_k}
    per_client = max(1, len(ordinary) // t.ordinary_clients)
    flagged, coverages, surprisals = 0, [], []
    for client in range(t.ordinary_clients):
        api = HardenedModelAPI(victim, tokenizer, defense=config.defense, **api_args)
        # a refusal ends this client's traffic; whether it was flagged is read below
        with contextlib.suppress(ExtractionRefused, QueryBudgetExceeded):
            ordinary_client(
                api, ordinary[client * per_client : (client + 1) * per_client], t.queries_per_client
            )
        flagged += int(api.detector.flagged)
        coverages += [c for _, c, _ in api.detector.history]
        surprisals += [s for _, _, s in api.detector.history if not math.isnan(s)]
    attacker = HardenedModelAPI(victim, tokenizer, defense=config.defense, **api_args)
    generator = torch.Generator().manual_seed(config.seed + 5)
    random_ids = torch.randint(
        0, attacker.vocab_size, (t.extraction_queries, t.prompt_length), generator=generator
    )
    extraction_client(attacker, [tuple(row) for row in random_ids.tolist()])
    return DetectorReport(
        ordinary_clients=t.ordinary_clients,
        ordinary_flagged=flagged,
        false_positive_rate=flagged / t.ordinary_clients,
        ordinary_max_coverage=max(coverages) if coverages else None,
        ordinary_max_surprisal=max(surprisals) if surprisals else None,
        extraction_flagged=attacker.detector.flagged,
        extraction_flagged_at_query=attacker.detector.flagged_at_query,
        extraction_queries_answered=attacker.queries,
        extraction_reason=attacker.detector.reason,
    )


def bias_refused(api: ModelAPI) -> bool | None:
    """True when the API refuses a logit bias, False when it accepts one, None when its view has none."""
    if api.view == "full_logits":
        return None
    try:
        api.topk_logprobs((0,), logit_bias={0: 1.0})
    except APIViewError:
        return True
    return False


def run(config: ApiHardeningConfig) -> ApiHardeningResult:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    if config.victim.source == "served":
        raise ValueError(
            "victim.source: served is hardened (or not) by its server; api_hardening measures the hardening "
            "of an in-process model's API: give a tiny victim, a model directory or smollm2"
        )
    victim, tokenizer = load_victim(
        config.victim,
        seed=config.seed,
        device=resolve_device(config.device),
        logit_scale=config.victim_logit_scale,
    )
    vocab = vocab_size_of(victim)
    if config.top_k > vocab:
        raise ValueError(f"top_k={config.top_k} exceeds the victim's vocabulary ({vocab}); lower top_k")
    t = config.traffic
    sampler = ModelAPI(victim, tokenizer, view="text")
    n_sequences = t.ordinary_clients * math.ceil(t.queries_per_client / (t.sequence_length - 1))
    ordinary = sampled_sequences(sampler, n_sequences + t.utility_prompts, t.sequence_length, config.seed + 3)
    generator = torch.Generator().manual_seed(config.seed + 4)
    utility_prompts = [
        seq[: int(torch.randint(2, len(seq) + 1, (1,), generator=generator))]
        for seq in ordinary[n_sequences:]
    ]
    api_args = {"view": config.view, "top_k": config.top_k}
    quiet = config.defense.model_copy(update={"detector": None, "max_queries": None})
    defended = HardenedModelAPI(victim, tokenizer, defense=quiet, **api_args)
    reference = ModelAPI(victim, tokenizer, **api_args)
    agreement, kl = utility(defended, reference, utility_prompts)
    refused = bias_refused(HardenedModelAPI(victim, tokenizer, defense=quiet, **api_args))
    detector = None
    if config.defense.detector is not None:
        detector = detector_report(config, victim, tokenizer, ordinary[:n_sequences])
    hidden = getattr(getattr(victim, "config", None), "hidden_size", None)
    result = ApiHardeningResult(
        victim_source=config.victim.source if config.victim.source != "smollm2" else "smollm2 (Q4_1)",
        vocab_size=vocab,
        hidden_size=hidden,
        view=config.view,
        answered_view=defended.view,
        answered_top_k=defended.top_k,
        defense=config.defense.model_dump(mode="json"),
        utility_top1_agreement=agreement,
        utility_mean_kl=kl,
        utility_prompts=len(utility_prompts),
        logit_bias_refused=refused,
        detector=detector,
        seconds=time.perf_counter() - started,
    )
    write_result(config.out, result)
    return result


PLUGIN = DEFENSES.register(
    "api_hardening",
    Plugin(
        name="api_hardening",
        Config=ApiHardeningConfig,
        Result=ApiHardeningResult,
        run=run,
        summary="top-k truncation, rounding, logit noise, no logit bias, budgets, extraction detector",
    ),
)
