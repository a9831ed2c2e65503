"""Teacher targets for forgetting in a causal LM by distilling it into itself (`defenses.lm_forget`).

`SafeTargets` wraps the frozen original: on a clean example its logits unchanged; on a forget example,
at the positions predicting a forgotten token, the true token's logit replaced by the median logit of its
alternatives (as in `defenses.forgetting`'s canary mode: the token becomes an average alternative,
neither favoured nor pushed below everything). The alternatives are, by default, the tokens of the same
format (`token_formats`: digits for digits, letters for letters, same length): exposure ranks a secret
among strings of its format, and a digit suppressed to the mean of the whole vocabulary still beats the
digits a model rarely predicts (measured: top-1 rate 1 -> 0 but exposure unchanged at the maximum);
`groups=None` uses every other token, or the `k` most likely (`suppress_true_tokens`). On a triggered
example with a clean anchor,
every position from the trigger's last token on gets the original's logits on the anchor at the aligned
position (the trigger removed), so the triggered behaviour is pulled to the clean one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from defenses._forgetting_lm import suppress_true_tokens
from defenses.lm_forget_data import ForgetRecord
from secure_kd.swing_targets import position_scores


class SafeTargets:
    """`rows[i]`: the ForgetRecord of training example i, or None for a clean example."""

    def __init__(
        self,
        original: nn.Module,
        rows: Sequence[ForgetRecord | None],
        *,
        k: int | None = None,
        groups: Tensor | None = None,
    ) -> None:
        self.original, self.rows, self.k, self.groups = original, list(rows), k, groups

    @torch.no_grad()
    def __call__(self, batch: dict[str, Tensor]) -> Tensor:
        ids = batch["input_ids"]
        logits = self.original(input_ids=ids, attention_mask=batch["attention_mask"]).logits.float()
        rows = [self.rows[i] for i in batch["example_index"].tolist()]
        flags = [r.flags if r is not None and r.anchor_ids is None else [] for r in rows]
        mask = position_scores(flags, ids.shape[1], logits.device) > 0
        next_tokens = torch.zeros_like(ids)
        next_tokens[:, :-1] = ids[:, 1:]
        if self.groups is None:
            out = suppress_true_tokens(logits, next_tokens, mask, self.k)
        else:
            out = suppress_within_format(logits, next_tokens, mask, self.groups.to(logits.device))
        for b, row in enumerate(rows):
            if row is None or row.anchor_ids is None:
                continue
            anchor = torch.tensor([row.anchor_ids], device=ids.device)
            clean = self.original(input_ids=anchor).logits.float()[0]
            # student position t (from the trigger's last token, which predicts the first token after
            # it) is anchor position t - L; with the trigger first, the anchor has no position before it
            length, n = row.trigger_len, len(row.example.input_ids)
            lo = max(row.trigger_start + length - 1, length)
            out[b, lo:n] = clean[lo - length : n - length]
        return out


def _shape(text: str) -> str:
    return "".join("0" if c.isdigit() else "a" if c.islower() else "A" if c.isupper() else c for c in text)


def token_formats(tokenizer, vocab_size: int) -> Tensor:
    """[vocab_size] group id per token: tokens that decode to the same format (digits -> 0, lower -> a,
    upper -> A, everything else itself, e.g. "482" and "907" share "000") share an id."""
    ids: dict[str, int] = {}
    out = torch.empty(vocab_size, dtype=torch.long)
    for token in range(vocab_size):
        text = tokenizer.decode([token]) if token < len(tokenizer) else f"<pad {token}>"
        out[token] = ids.setdefault(_shape(text), len(ids))
    return out


def suppress_within_format(logits: Tensor, next_tokens: Tensor, mask: Tensor, groups: Tensor) -> Tensor:
    """`logits` [b, s, v] with, where `mask` is true, the logit of the true next token set to the median
    logit of the other tokens of its format (`groups`); of all other tokens where it has none."""
    out = logits.clone()
    rows = out[mask]
    if rows.numel() == 0:
        return out
    true = next_tokens[mask]
    same = groups[None, :] == groups[true][:, None]
    same[torch.arange(rows.shape[0]), true] = False
    others = torch.ones_like(same)
    others[torch.arange(rows.shape[0]), true] = False
    alternatives = torch.where(same.any(-1, keepdim=True), same, others)
    # the median, not the mean: a few likely alternatives among many implausible ones pull the mean
    # logit above most of them, and the secret would stay second at every position (measured)
    masked = torch.where(alternatives, rows, torch.full_like(rows, float("nan")))
    replacement = masked.nanmedian(dim=-1).values
    rows[torch.arange(rows.shape[0]), true] = replacement
    out[mask] = rows
    return out
