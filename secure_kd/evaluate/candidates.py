"""Score every candidate of an enumerable secret space under one shared prefix, and the canary exposure
that follows (Carlini et al. 2019, "The Secret Sharer").

The prefix runs once; its KV cache is copied and repeated for each batch of equal-length candidate
suffixes, so scoring n candidates of one length takes 1 + ceil(n / batch_size) forward passes
(one-token candidates need only the prefix's pass), not n.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from secure_kd import metrics
from secure_kd.evaluate._model_io import evaluation_mode, resolve_device


def _repeat_cache(cache: Any, batch_size: int) -> Any:
    """A fresh batch_size-row copy of a 1-row KV cache; the forward pass appends to it, so never reuse one."""
    if not hasattr(cache, "batch_repeat_interleave"):
        raise TypeError(
            f"cannot batch a past_key_values of type {type(cache).__name__}; score_candidates needs a model "
            "that returns a transformers Cache (e.g. DynamicCache) when called with use_cache=True"
        )
    repeated = copy.deepcopy(cache)
    repeated.batch_repeat_interleave(batch_size)
    return repeated


def _group_by_length(candidates: list[list[int]] | Tensor) -> dict[int, tuple[list[int], Tensor]]:
    """{suffix length: (positions in the input, Tensor[count, length])}, checking every candidate."""
    if isinstance(candidates, Tensor):
        if candidates.ndim != 2 or candidates.shape[0] == 0 or candidates.shape[1] == 0:
            raise ValueError(f"candidates must be [n, m] with n, m >= 1, got {tuple(candidates.shape)}")
        if candidates.is_floating_point():
            raise ValueError("candidates must be integer token ids, got a floating-point tensor")
        return {candidates.shape[1]: (list(range(candidates.shape[0])), candidates.long().cpu())}
    if len(candidates) == 0:
        raise ValueError("candidates is empty; pass at least one candidate suffix")
    positions: dict[int, list[int]] = defaultdict(list)
    for position, candidate in enumerate(candidates):
        if len(candidate) == 0:
            raise ValueError(f"candidate {position} is empty; every candidate needs at least one token")
        positions[len(candidate)].append(position)
    return {
        length: (members, torch.tensor([list(candidates[i]) for i in members], dtype=torch.long))
        for length, members in positions.items()
    }


def score_candidates(
    model: nn.Module,
    prefix_ids: Sequence[int],
    candidates: list[list[int]] | Tensor,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Tensor:
    """Total NLL (nats, float64 Tensor[n]) of each candidate suffix given the shared prefix.

    Candidate i's score is -sum_j log p(candidate[i][j] | prefix, candidate[i][:j]). The prefix is
    run once with `use_cache=True`; the first suffix token is scored from the prefix's last logits
    and the rest by one batched forward over `candidate[:, :-1]` per batch of `batch_size`
    equal-length candidates (lists of mixed lengths are grouped by length), reusing a copy of the
    prefix's KV cache. `device` None/"auto" is the model's device.
    """
    prefix = [int(token) for token in prefix_ids]
    if not prefix:
        raise ValueError("prefix_ids is empty; scoring needs at least one prefix token (e.g. the BOS token)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size}")
    groups = _group_by_length(candidates)
    n_candidates = sum(len(members) for members, _ in groups.values())
    target = resolve_device(model, device)
    scores = torch.empty(n_candidates, dtype=torch.float64)

    with evaluation_mode(model):
        prefix_output = model(input_ids=torch.tensor([prefix], device=target), use_cache=True)
        vocab_size = prefix_output.logits.shape[-1]
        first_token_logprobs = torch.log_softmax(prefix_output.logits[0, -1].float(), dim=-1)
        prefix_cache = getattr(prefix_output, "past_key_values", None)
        for length, (_, suffixes) in groups.items():
            if suffixes.min() < 0 or suffixes.max() >= vocab_size:
                raise ValueError(f"candidate token ids must lie in [0, {vocab_size - 1}], the vocabulary")
            if length > 1 and prefix_cache is None:
                raise ValueError("the model returned no past_key_values; score_candidates needs use_cache")

        progress_bar = tqdm(total=n_candidates, desc="scoring candidates", unit="cand", disable=not progress)
        for length, (members, suffixes) in groups.items():
            member_positions = torch.tensor(members)
            for start in range(0, len(members), batch_size):
                batch = suffixes[start : start + batch_size].to(target)
                nll = -first_token_logprobs[batch[:, 0]].double()
                if length > 1:
                    output = model(
                        input_ids=batch[:, :-1],
                        past_key_values=_repeat_cache(prefix_cache, batch.shape[0]),
                        use_cache=True,
                    )
                    logprobs = torch.log_softmax(output.logits.float(), dim=-1)
                    next_tokens = batch[:, 1:].unsqueeze(-1)
                    nll = nll - logprobs.gather(-1, next_tokens).squeeze(-1).double().sum(dim=1)
                scores[member_positions[start : start + batch_size]] = nll.cpu()
                progress_bar.update(batch.shape[0])
        progress_bar.close()
    return scores


def _split_prefix_tokens(tokenizer: Any, prefix: str, candidate: str, prefix_ids: list[int]) -> list[int]:
    full_ids = list(tokenizer(prefix + candidate)["input_ids"])
    if full_ids[: len(prefix_ids)] != prefix_ids or len(full_ids) == len(prefix_ids):
        raise ValueError(
            f"tokenizing prefix {prefix!r} + candidate {candidate!r} does not keep the prefix's own tokens "
            f"{prefix_ids} followed by the candidate's (got {full_ids}): the tokenizer merges across the "
            "boundary (or appends a special token). End the prefix where a token must end, e.g. move a "
            "trailing space from the prefix into every candidate, or tokenize without end-of-text tokens."
        )
    return full_ids[len(prefix_ids) :]


def canary_exposure(
    model: nn.Module,
    tokenizer: Any,
    prefix: str,
    candidates: Sequence[str],
    canary: str,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, float | int]:
    """Exposure (bits) of `canary` among `candidates`, each completing the text `prefix`.

    Returns `exposure`, `rank` (1 = most likely), `n_candidates` and `canary_loss` (total NLL of the
    canary's tokens, nats). Example secret space: `[f"{i:04d}" for i in range(10_000)]` after a
    prefix "my PIN is".

    Tokenization: the prefix is tokenized once (with the tokenizer's special tokens, e.g. BOS) and
    each candidate's tokens are those of `tokenizer(prefix + candidate)` after the prefix's tokens.
    BPE may merge characters across the boundary (e.g. " 1234" becomes one token with the space),
    which would score a tokenization the model never sees for that text; this is detected by
    checking that prefix + candidate starts with exactly the prefix's tokens, and raises a
    ValueError. Put the boundary where tokens split, e.g. keep a trailing space in the candidates.
    """
    candidate_list = list(candidates)
    if len(set(candidate_list)) != len(candidate_list):
        raise ValueError("candidates contain duplicates; a duplicate of the canary would distort its rank")
    if canary not in candidate_list:
        raise ValueError(f"canary {canary!r} is not among the candidates; the secret space must contain it")
    prefix_ids = list(tokenizer(prefix)["input_ids"])
    if not prefix_ids:
        raise ValueError(f"prefix {prefix!r} tokenizes to nothing; give a non-empty prefix or a BOS token")
    suffixes = [_split_prefix_tokens(tokenizer, prefix, text, prefix_ids) for text in candidate_list]
    losses = score_candidates(
        model, prefix_ids, suffixes, batch_size=batch_size, device=device, progress=progress
    )
    canary_index = candidate_list.index(canary)
    return {
        "exposure": metrics.exposure(losses, canary_index),
        "rank": metrics.canary_rank(losses, canary_index),
        "n_candidates": len(candidate_list),
        "canary_loss": float(losses[canary_index]),
        "max_exposure": math.log2(len(candidate_list)),
    }
