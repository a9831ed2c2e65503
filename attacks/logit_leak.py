"""Logit leak: the hidden size and the output projection of a model behind an API.

Carlini et al. 2024 ("Stealing Part of a Production Language Model") and Finlayson et al. 2024
("Logits of API-Protected LLMs Leak Proprietary Information"): a decoder's logits are z = W x with
W the [V, h] output projection and x the final hidden state, so n > h logit vectors stacked as an
[n, V] matrix have rank h. Its singular values drop sharply after the h-th; the drop gives h and
the top right singular vectors span W's columns, which recovers W up to an h x h linear map.

Details that matter:
- No centering. For RMSNorm models (Llama, SmolLM2) the logits lie in the *linear* h-dim column
  space of W (there is no output bias), so the raw matrix has rank h. Subtracting the mean row
  would turn an affine subspace into a linear one and could hide one dimension; we keep the raw
  matrix, so "rank" means the dimension of the linear span of what the API returned.
- Log-probabilities are logits minus log Z (one number per query), which adds the all-ones
  direction: rank h + 1. `logprobs_to_logit_differences` subtracts a reference token's value and
  removes it (the differences lie in the span of W - 1 w_ref^T, rank h).
- LayerNorm without bias centers x before the gain, so x lies in an (h-1)-dim subspace and the
  estimate is h - 1.
- With top-k logprobs and a logit bias only, the full vector of differences to a reference token
  is recovered by biasing k-1 tokens at a time (plus the reference) into the top-k
  (`recover_logits_with_bias`, Carlini et al. Section 5): ceil((V-1)/(k-1)) queries per prompt.
  Those differences span W - 1 w_ref^T, not W, so a recovery from them is scored against that
  matrix (`recovery_target`); against W an exact recovery would read as a large angle.
- A served victim (`victim.source: served`, an OpenAI-compatible server) is queried through the
  engine's `ServedModelAPI`, counted and budgeted the same way. Such a server gives no full logits,
  and the bias view runs only if its log-probabilities honour `logit_bias` (checked on the first
  biased query; llama-cpp-python's server does not, and is refused). `served.reference`, the same
  weights loaded here, is what the recovery is scored against; without it the spectrum is reported
  unscored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, model_validator
from torch import Tensor, nn

from apparatus.hardened_api import ApiDefenseConfig
from apparatus.victims import load_victim, victim_api
from attacks import ATTACKS
from secure_kd.api import ModelAPI, Prompt
from secure_kd.config import ModelConfig, TinyModelConfig
from secure_kd.models import resolve_device
from secure_kd.plugins import Input, Metric, Plugin, PluginConfig, write_result
from secure_kd.readings import Reading

RecoveryView = Literal["full_logits", "topk_logprobs_bias"]


# --------------------------------------------------------------------------- spectrum and hidden size


def _logit_matrix(logits: Tensor, name: str = "logits") -> Tensor:
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"{name} must be a 2-D tensor [n_queries, vocab], got {shape}")
    n, vocab = logits.shape
    if n < 2 or vocab < 2:
        raise ValueError(
            f"{name} has shape {(n, vocab)}; the spectrum needs at least 2 queries and 2 tokens "
            "(and more queries than the hidden size to show it)"
        )
    if not torch.isfinite(logits).all():
        raise ValueError(f"{name} has NaN or infinite entries; pass finite logits (or logit differences)")
    return logits.detach().to(device="cpu", dtype=torch.float64)


def hidden_size_report(logits: Tensor) -> dict:
    """The hidden size with the spectrum behind it (for plots and for judging the estimate).

    Returns `h` (the estimate), `singular_values` (all min(n, V) of them, descending), `gap_index`
    (0-based index of the last value before the drop, = h - 1), `gap_size` (log10 of
    s[h-1] / s[h], in decades), `n_queries` and `vocab_size`.

    The SVD runs in float64. Float32 logits leave a noise floor about 1e-7 below the largest
    singular value instead of exact zeros; exact zeros (float64 inputs) are floored at
    s[0] * 1e-300 so their logarithm stays finite. With n <= h there is no drop to find and the
    result says little: query more prompts than the hidden size you expect.
    """
    matrix = _logit_matrix(logits)
    values = torch.linalg.svdvals(matrix)
    if float(values[0]) == 0.0:
        raise ValueError("every logit is zero: the matrix has no spectrum to read a hidden size from")
    log_values = torch.log10(values.clamp_min(float(values[0]) * 1e-300))
    gaps = log_values[:-1] - log_values[1:]
    gap_index = int(torch.argmax(gaps))
    return {
        "h": gap_index + 1,
        "singular_values": values.tolist(),
        "gap_index": gap_index,
        "gap_size": float(gaps[gap_index]),
        "n_queries": int(matrix.shape[0]),
        "vocab_size": int(matrix.shape[1]),
    }


def estimate_hidden_size(logits: Tensor) -> int:
    """h from n > h full logit vectors [n, V]: where the log singular values drop the most."""
    return hidden_size_report(logits)["h"]


def logprobs_to_logit_differences(logprobs: Tensor, ref_token: int) -> Tensor:
    """logprobs[..., t] - logprobs[..., ref_token]: removes the per-query normalization (rank one)."""
    if not isinstance(logprobs, Tensor) or logprobs.dim() < 1:
        raise ValueError("logprobs must be a tensor [..., vocab]")
    vocab = logprobs.shape[-1]
    if isinstance(ref_token, bool) or not isinstance(ref_token, int) or not 0 <= ref_token < vocab:
        raise ValueError(f"ref_token must be a token id in [0, {vocab}), got {ref_token!r}")
    return logprobs - logprobs[..., ref_token : ref_token + 1]


# --------------------------------------------------------------------------- the output projection


def recover_output_projection(logits: Tensor, h: int | None = None) -> Tensor:
    """Tensor[V, h] spanning the output projection's columns: W G for some invertible h x h G.

    With logits [n, V] = U S Vt, the result is Vt[:h].T * S[:h] / sqrt(n): the top-h directions
    of the observed logits scaled by their root-mean-square size, so it does not grow with n and
    maps hidden states of unit second moment to logits of the observed scale (a ready-made
    unembedding for a clone). `h` defaults to `estimate_hidden_size(logits)`.
    """
    matrix = _logit_matrix(logits)
    n, vocab = matrix.shape
    if h is None:
        h = estimate_hidden_size(matrix)
    if isinstance(h, bool) or not isinstance(h, int) or not 1 <= h <= min(n, vocab):
        raise ValueError(f"h must be an int in [1, min(n_queries, vocab) = {min(n, vocab)}], got {h!r}")
    _, singular, right = torch.linalg.svd(matrix, full_matrices=False)
    recovered = right[:h].T * (singular[:h] / math.sqrt(n))
    return recovered if logits.dtype == torch.float64 else recovered.float()


def _pair(recovered: Tensor, true_weight: Tensor) -> tuple[Tensor, Tensor]:
    for name, matrix in (("recovered", recovered), ("true_weight", true_weight)):
        if not isinstance(matrix, Tensor) or matrix.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor [vocab, width]")
    if recovered.shape[0] != true_weight.shape[0]:
        raise ValueError(
            f"recovered has {recovered.shape[0]} rows but true_weight has {true_weight.shape[0]}; "
            "both must be [vocab, width] over the same vocabulary"
        )
    return (recovered.detach().to("cpu", torch.float64), true_weight.detach().to("cpu", torch.float64))


def projection_error(recovered: Tensor, true_weight: Tensor) -> float:
    """min over G of ||recovered @ G - W||_F / ||W||_F (least squares): 0 when the column spaces match."""
    r, w = _pair(recovered, true_weight)
    g = torch.linalg.lstsq(r, w, driver="gelsd").solution
    return float(torch.linalg.matrix_norm(r @ g - w) / torch.linalg.matrix_norm(w))


def recovery_target(true_weight: Tensor, view: str, ref_token: int = 0) -> Tensor:
    """The [V, h] matrix whose column space the view's answers span: what a recovery is scored against.

    Full logits are W x, so the target is W. Through `topk_logprobs_bias` the attacker sees the
    differences logit[t] - logit[ref_token] = (w_t - w_ref) . x: the span of W - 1 w_ref^T, a
    different subspace of R^V (it has a zero at `ref_token`). Scoring an exact recovery of the
    differences against W itself would read as a large principal angle although nothing is wrong.
    """
    if not isinstance(true_weight, Tensor) or true_weight.dim() != 2:
        raise ValueError("true_weight must be a 2-D tensor [vocab, hidden]")
    if view == "full_logits":
        return true_weight
    if view == "topk_logprobs_bias":
        vocab = true_weight.shape[0]
        if isinstance(ref_token, bool) or not isinstance(ref_token, int) or not 0 <= ref_token < vocab:
            raise ValueError(f"ref_token must be a token id in [0, {vocab}), got {ref_token!r}")
        return true_weight - true_weight[ref_token : ref_token + 1]
    raise ValueError(
        f"view {view!r} gives no logit vectors to recover from; use full_logits or topk_logprobs_bias"
    )


def subspace_geometry(recovered: Tensor, true_weight: Tensor) -> dict:
    """How the column spaces of two [V, *] matrices relate.

    Principal angles (degrees, ascending) between the spaces: all 0 when one contains the other.
    `linear_cka`: linear CKA of the two as representations of the V tokens (columns centered over
    tokens). CKA is invariant to rotations and scale but not to a general linear map, so a
    recovered W G scores below 1 even when its column space is exact; the angles are the measure
    of the subspace, CKA of the geometry inside it.
    """
    r, w = _pair(recovered, true_weight)
    basis_r, basis_w = torch.linalg.qr(r).Q, torch.linalg.qr(w).Q
    cosines = torch.linalg.svdvals(basis_r.T @ basis_w).clamp(0.0, 1.0)
    angles = torch.rad2deg(torch.arccos(cosines)).flip(0)
    r_c, w_c = r - r.mean(0), w - w.mean(0)
    cross = torch.linalg.matrix_norm(w_c.T @ r_c) ** 2
    cka = cross / (torch.linalg.matrix_norm(r_c.T @ r_c) * torch.linalg.matrix_norm(w_c.T @ w_c))
    return {
        "principal_angles_deg": angles.tolist(),
        "max_principal_angle_deg": float(angles.max()),
        "mean_cos2": float((cosines**2).mean()),
        "linear_cka": float(cka),
    }


# --------------------------------------------------------------------------- querying an API


def bias_queries_per_prompt(vocab_size: int, top_k: int) -> int:
    """Queries the logit-bias trick needs for one prompt: ceil((V - 1) / (k - 1))."""
    if top_k < 2:
        raise ValueError(
            f"the logit-bias trick needs top_k >= 2 (one slot is the reference token), got {top_k}"
        )
    return math.ceil((vocab_size - 1) / (top_k - 1))


def recover_logits_with_bias(
    api: ModelAPI,
    prompt_ids: Sequence[int] | Tensor,
    vocab_size: int,
    *,
    ref_token: int = 0,
    bias: float | None = None,
) -> Tensor:
    """Tensor[V]: logit[t] - logit[ref_token] for every token, from top-k logprobs with a logit bias.

    Each query adds `bias` (default: the API's largest allowed) to the reference token and to k-1
    target tokens; when the bias exceeds the logits' range those k tokens fill the top-k, and for
    any two of them logprob_a - logprob_b = logit_a - logit_b (the bias and log Z cancel).
    Costs `bias_queries_per_prompt(vocab_size, k)` queries.
    """
    if not 0 <= ref_token < vocab_size:
        raise ValueError(f"ref_token must be a token id in [0, {vocab_size}), got {ref_token}")
    bias = api.max_logit_bias if bias is None else float(bias)
    group = api.top_k - 1
    bias_queries_per_prompt(vocab_size, api.top_k)  # validates top_k
    others = [t for t in range(vocab_size) if t != ref_token]
    differences = torch.zeros(vocab_size)
    for start in range(0, len(others), group):
        targets = others[start : start + group]
        values, indices = api.topk_logprobs(
            prompt_ids, logit_bias={ref_token: bias, **dict.fromkeys(targets, bias)}
        )
        answer = dict(zip(indices.tolist(), values.tolist(), strict=True))
        if ref_token not in answer or any(t not in answer for t in targets):
            raise RuntimeError(
                f"a logit bias of {bias} did not bring tokens {targets} and the reference {ref_token} into "
                "the top-k: the model's logits span more than the bias; use a larger bias if the API allows"
            )
        for t in targets:
            differences[t] = answer[t] - answer[ref_token]
    return differences


def query_logit_vectors(api: ModelAPI, prompts: Sequence[Sequence[int]], *, ref_token: int = 0) -> Tensor:
    """[n, V] full logit vectors (view full_logits) or logit differences (view topk_logprobs_bias)."""
    if api.view == "full_logits":
        return api.full_logits_batch(prompts)
    if api.view == "topk_logprobs_bias":
        return torch.stack(
            [recover_logits_with_bias(api, p, api.vocab_size, ref_token=ref_token) for p in prompts]
        )
    raise ValueError(
        f"recovering the output layer needs full logits or top-k logprobs with a logit bias; "
        f"the API's view {api.view!r} gives neither"
    )


def query_until_rank_found(
    api: ModelAPI,
    prompts: Sequence[Sequence[int]],
    *,
    step: int = 16,
    margin: int = 8,
    min_gap_decades: float = 2.0,
    ref_token: int = 0,
) -> tuple[Tensor, dict]:
    """Query `step` prompts at a time until the spectrum shows a clear drop with room after it.

    Stops once n >= h + margin and the drop spans at least `min_gap_decades` decades: an attacker
    who does not know h learns it at a cost of about h + margin prompts. Returns the logit vectors
    and the final `hidden_size_report`.
    """
    if step < 1 or margin < 1:
        raise ValueError(f"step and margin must be >= 1 (got step={step}, margin={margin})")
    blocks: list[Tensor] = []
    report: dict = {}
    for start in range(0, len(prompts), step):
        blocks.append(query_logit_vectors(api, prompts[start : start + step], ref_token=ref_token))
        logits = torch.cat(blocks)
        if logits.shape[0] < 2:
            continue
        report = hidden_size_report(logits)
        if logits.shape[0] >= report["h"] + margin and report["gap_size"] >= min_gap_decades:
            return logits, report
    raise ValueError(
        f"no clear drop in the spectrum after all {len(prompts)} prompts (last estimate "
        f"h={report.get('h')}, drop {report.get('gap_size', 0.0):.2f} decades); give more prompts "
        "(max_prompts) than the hidden size"
    )


def random_prompts(n: int, length: int, vocab_size: int, seed: int) -> list[Prompt]:
    generator = torch.Generator().manual_seed(seed)
    return [tuple(row) for row in torch.randint(0, vocab_size, (n, length), generator=generator).tolist()]


# --------------------------------------------------------------------------- the victim


def tiny_victim_default() -> ModelConfig:
    return ModelConfig(
        source="tiny", tiny=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, vocab_size=256)
    )


def true_hidden_size(model: nn.Module | None) -> int | None:
    return getattr(getattr(model, "config", None), "hidden_size", None)


# --------------------------------------------------------------------------- plugin


class LogitLeakConfig(PluginConfig):
    """`secure-kd attack logit_leak`: recover a victim's hidden size and output projection."""

    out: str = "runs/attacks/logit_leak"
    victim: ModelConfig = Field(default_factory=tiny_victim_default)
    victim_logit_scale: float = Field(1.0, gt=0, description="tiny victims: sharpen a random model's outputs")
    view: RecoveryView = "full_logits"
    top_k: int = Field(5, ge=2, description="answers' top-k (view topk_logprobs_bias)")
    n_queries: int | Literal["auto"] = Field(
        "auto", description="prompts to query; 'auto' queries `step` at a time until the rank shows"
    )
    max_prompts: int = Field(2048, gt=1, description="'auto' gives up after this many prompts")
    step: int = Field(16, gt=0)
    margin: int = Field(8, gt=0)
    min_gap_decades: float = Field(2.0, gt=0)
    prompt_length: int = Field(8, gt=0)
    ref_token: int = Field(0, ge=0)
    cost_per_query: float = Field(1.0, ge=0)
    max_queries: int | None = Field(None, gt=0)
    api_defense: ApiDefenseConfig | None = Field(
        None, description="attack a hardened API (apparatus.hardened_api): truncation, rounding, noise, ..."
    )

    @model_validator(mode="after")
    def _enough_prompts(self) -> LogitLeakConfig:
        if self.n_queries != "auto" and self.n_queries < 2:
            raise ValueError(
                f"n_queries={self.n_queries}: use 'auto' or at least 2 (more than the hidden size)"
            )
        return self


class LogitLeakResult(BaseModel):
    kind: str = "logit_leak"
    view: str
    victim_source: str
    vocab_size: int
    estimated_hidden_size: int
    true_hidden_size: int | None
    correct: bool | None
    prompts_used: int
    queries_used: int
    queries_per_prompt: int
    cost: float
    gap_index: int
    gap_decades: float
    singular_values: list[float]
    projection_error: float | None
    random_projection_error: float | None
    geometry: dict | None
    scored_against: str = Field(
        "W", description="the target of projection_error/geometry: W, or W - 1 w_ref^T for logit differences"
    )
    served: dict | None = Field(None, description="a served victim: the server and what it answered (no key)")
    seconds: float


def run(config: LogitLeakConfig) -> LogitLeakResult:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    victim, tokenizer = load_victim(
        config.victim, seed=config.seed, device=device, logit_scale=config.victim_logit_scale
    )
    api = victim_api(
        config.victim,
        victim,
        tokenizer,
        defense=config.api_defense,
        view=config.view,
        top_k=config.top_k,
        cost_per_query=config.cost_per_query,
        max_queries=config.max_queries,
    )
    vocab = api.vocab_size
    if config.ref_token >= vocab:
        raise ValueError(f"ref_token={config.ref_token} is not a token id of the victim (vocab {vocab})")
    n_prompts = config.max_prompts if config.n_queries == "auto" else config.n_queries
    prompts = random_prompts(n_prompts, config.prompt_length, vocab, config.seed)
    if config.n_queries == "auto":
        logits, report = query_until_rank_found(
            api,
            prompts,
            step=config.step,
            margin=config.margin,
            min_gap_decades=config.min_gap_decades,
            ref_token=config.ref_token,
        )
    else:
        logits = query_logit_vectors(api, prompts, ref_token=config.ref_token)
        report = hidden_size_report(logits)
    h_true = true_hidden_size(victim)
    recovered = recover_output_projection(logits, report["h"])
    scores: dict = {"projection_error": None, "random_projection_error": None, "geometry": None}
    if victim is not None:  # the evaluator's copy (a served victim without served.reference has none)
        # the span the answers lie in: W for full logits, W - 1 w_ref^T for logit differences
        target = recovery_target(victim.get_output_embeddings().weight.detach(), api.view, config.ref_token)
        random_matrix = torch.randn(target.shape, generator=torch.Generator().manual_seed(config.seed))
        scores = {
            "projection_error": projection_error(recovered, target),
            "random_projection_error": projection_error(random_matrix, target),
            "geometry": subspace_geometry(recovered, target),
        }
    per_prompt = 1 if api.view == "full_logits" else bias_queries_per_prompt(vocab, api.top_k)
    result = LogitLeakResult(
        view=config.view,
        victim_source=config.victim.source if config.victim.source != "smollm2" else "smollm2 (Q4_1)",
        vocab_size=vocab,
        estimated_hidden_size=report["h"],
        true_hidden_size=h_true,
        correct=None if h_true is None else report["h"] == h_true,
        prompts_used=report["n_queries"],
        queries_used=api.queries,
        queries_per_prompt=per_prompt,
        cost=api.cost,
        gap_index=report["gap_index"],
        gap_decades=report["gap_size"],
        singular_values=report["singular_values"],
        **scores,
        scored_against="W" if api.view == "full_logits" else f"W - 1 w_ref^T (ref_token {config.ref_token})",
        served=api.provenance() if hasattr(api, "provenance") else None,
        seconds=time.perf_counter() - started,
    )
    write_result(config.out, result)
    return result


def readings(result: dict[str, Any], samples: int, confidence: float) -> dict[str, Reading]:
    """The drop of the logit spectrum at the hidden size, in decades (one run: no interval)."""
    return {"logit_leak_gap_decades": Reading(value=float(result["gap_decades"]))}


PLUGIN = ATTACKS.register(
    "logit_leak",
    Plugin(
        name="logit_leak",
        Config=LogitLeakConfig,
        Result=LogitLeakResult,
        run=run,
        summary="hidden size and output projection behind a logit or top-k + bias API (Carlini et al. 2024)",
        target="victim.source",
        kinds=("causal_lm",),
        own_target="a tiny random Llama",
        inputs={"budget": Input("max_queries")},
        metrics=(
            Metric(
                "logit_leak_gap_decades", risk="model_extraction", medium=1.0, high=2.0, unit="decades",
                why="drop of the logit spectrum at the hidden size; >= 2 decades recovers the width and the "
                "output projection (Carlini et al. 2024)",
            ),
        ),
        measure=readings,
    ),
)  # fmt: skip
