"""Forgetting a canary in a tiny LM by distilling the model into itself (see `defenses.forgetting`).

Safe target (secure-kd's choice, documented in `defenses.forgetting`): the original model's own
distribution, except at the positions that predict the forgotten canary's secret tokens, where the
true token's logit is replaced by the mean logit of the other tokens (all, or the `alternatives_k`
most likely). The secret then looks like an average alternative: not favoured (memorized), and not
pushed below every alternative, which would make it stand out again as the least likely candidate.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from apparatus.canaries import exact_exposures
from apparatus.tiny_lm import (
    LMRecipe,
    build_model,
    distil,
    example_losses,
    heldout_perplexity,
    pad_token_id,
    public_tokenizer,
    tokenize_texts,
    train_causal_lm,
)
from secure_kd.data import generate_corpus
from secure_kd.metrics import roc_metrics
from secure_kd.models import resolve_device
from secure_kd.swing_targets import position_scores, spans_to_token_scores
from secure_kd.teacher_targets import LiveTeacher


def suppress_true_tokens(logits: Tensor, next_tokens: Tensor, mask: Tensor, k: int | None) -> Tensor:
    """`logits` [b, s, v] with, where `mask` [b, s] is true, the logit of `next_tokens` [b, s] set to the
    mean logit of the k highest other tokens (k None: all v - 1 others); elsewhere unchanged."""
    k = logits.shape[-1] - 1 if k is None else k
    if not 1 <= k < logits.shape[-1]:
        raise ValueError(f"alternatives_k must be in [1, {logits.shape[-1] - 1}], got {k}")
    out = logits.clone()
    rows = out[mask]  # [n, v]
    if rows.numel() == 0:
        return out
    true = next_tokens[mask]
    others = rows.scatter(1, true[:, None], float("-inf"))
    replacement = others.topk(k, dim=-1).values.mean(-1)
    rows[torch.arange(rows.shape[0]), true] = replacement
    out[mask] = rows
    return out


class SafeTeacher:
    """Distiller targets: the frozen original's logits, except at the positions that predict a forgotten
    secret token, where they come from `reference` (a model that never saw the records) or, without
    one, from the original with the true token suppressed (`suppress_true_tokens`)."""

    def __init__(
        self,
        original: nn.Module,
        secret_token_flags: Sequence[Sequence[float]],
        *,
        k: int | None,
        reference: nn.Module | None = None,
    ) -> None:
        self.base = LiveTeacher(original, None)
        self.reference = None if reference is None else LiveTeacher(reference, None)
        self.flags, self.k = [list(f) for f in secret_token_flags], k

    def __call__(self, batch: dict[str, Tensor]) -> Tensor:
        logits = self.base(batch)
        ids = batch["input_ids"]
        rows = [self.flags[i] for i in batch["example_index"].tolist()]
        mask = position_scores(rows, ids.shape[1], logits.device) > 0
        if self.reference is not None:
            return torch.where(mask.unsqueeze(-1), self.reference(batch), logits)
        next_tokens = torch.zeros_like(ids)
        next_tokens[:, :-1] = ids[:, 1:]
        return suppress_true_tokens(logits, next_tokens, mask, self.k)


def secret_flags(text: str, secret_start: int, secret_end: int, tokenizer, max_length: int) -> list[float]:
    """1 for each token of `tokenizer(text) + eos` that overlaps the secret's characters, else 0."""
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    flags = spans_to_token_scores(offsets, [(secret_start, secret_end, 1.0)]) + [0.0]
    return flags[:max_length]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _mia_auc(forget_losses: list[float], nonmember_losses: list[float]) -> float:
    scores = [-x for x in forget_losses + nonmember_losses]
    members = [1] * len(forget_losses) + [0] * len(nonmember_losses)
    return float(roc_metrics(scores, members, fpr_levels=())["auc"])


def forget_canary(config) -> dict:
    """Original (trained on everything), retrained (never saw the forgotten canary's records) and
    unlearned (the original distilled into itself with the safe target): one report per model."""
    lm = config.lm
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    c = lm.corpus
    train, heldout = c.build(config.seed)
    forgotten = train.canaries[lm.forget_canary]
    forget_ids = set(forgotten.record_ids)
    tokenizer = public_tokenizer(config.seed, c.tokenizer_vocab)
    pad_id = pad_token_id(tokenizer)
    examples = tokenize_texts(train.texts(), tokenizer, c.max_length)
    is_forget = [r["record_id"] in forget_ids for r in train.records]
    flags = []
    for record, forget in zip(train.records, is_forget, strict=True):
        secret = [s for s in record["pii_spans"] if s["type"] == "secret"] if forget else []
        start, end = (secret[0]["start"], secret[0]["end"]) if secret else (0, 0)
        flags.append(secret_flags(record["text"], start, end, tokenizer, c.max_length))
    retain = [e for e, f in zip(examples, is_forget, strict=True) if not f]
    forget = [e for e, f in zip(examples, is_forget, strict=True) if f]
    heldout_examples = tokenize_texts(heldout.texts(), tokenizer, c.max_length)
    # non-members for the loss attack: canaries of the same format that no model saw
    fresh = generate_corpus(
        1, seed=config.seed + 31337, n_canaries=lm.n_nonmember_canaries, secret_digits=c.secret_digits
    )
    nonmembers = tokenize_texts([canary.text for canary in fresh.canaries], tokenizer, c.max_length)

    def train_ce(model: nn.Module, data) -> None:
        train_causal_lm(model, data, lm.model, pad_id=pad_id, seed=config.seed, device=device)

    initial = build_model(lm.model, len(tokenizer), seed=config.seed + 1, pad_id=pad_id)
    original = copy.deepcopy(initial)
    train_ce(original, examples)
    retrained = copy.deepcopy(initial)
    train_ce(retrained, retain)
    unlearned = copy.deepcopy(original)
    reference = None
    if lm.safe_target == "reference":
        # a stand-in for a public base model: trained on fresh canary-free records of the same kind
        public = generate_corpus(len(train), seed=config.seed + 4242, n_canaries=0).texts()
        reference = build_model(lm.model, len(tokenizer), seed=config.seed + 3, pad_id=pad_id)
        train_ce(reference, tokenize_texts(public, tokenizer, c.max_length))
    frozen = copy.deepcopy(original).eval()
    # Two phases, as in SCRUB: the forget records alone (the few secret positions would be drowned by
    # the retain set in a mixed batch), then everything together, which repairs the retain set.
    forget_flags = [f for f, is_f in zip(flags, is_forget, strict=True) if is_f]
    forget_examples = [replace(e, record_index=i) for i, e in enumerate(forget)]
    phases = (
        (forget_examples, forget_flags, lm.forget_epochs),
        (examples, flags, lm.unlearn_epochs),
    )
    for phase, (data, phase_flags, epochs) in enumerate(phases):
        targets = SafeTeacher(frozen, phase_flags, k=lm.alternatives_k, reference=reference)
        recipe = LMRecipe(
            model=lm.model.model, epochs=epochs, batch_size=lm.model.batch_size, lr=lm.unlearn_lr
        )
        seed = config.seed + 7 + phase
        distil(unlearned, targets, data, recipe, temperature=1.0, pad_id=pad_id, seed=seed, device=device)

    def losses(model: nn.Module, data) -> list[float]:
        return example_losses(model, data, pad_id=pad_id, device=device, batch_size=32).tolist()

    reports = {}
    for name, model in (("original", original), ("unlearned", unlearned), ("retrained", retrained)):
        forget_losses = losses(model, forget)
        (forget_exposure,) = exact_exposures(model, tokenizer, [forgotten], c.secret_digits, device=device)
        reports[name] = {
            "forget_loss": _mean(forget_losses),
            "forget_exposure": forget_exposure,
            "retain_loss": _mean(losses(model, retain)),
            "heldout_perplexity": heldout_perplexity(model, heldout_examples, pad_id=pad_id, device=device),
            "mia_auc": _mia_auc(forget_losses, losses(model, nonmembers)),
        }
    return {"reports": reports, "n_forget": len(forget), "n_retain": len(retain), "secret": forgotten.secret}
