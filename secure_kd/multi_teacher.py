"""Multi-teacher distillation: several teachers, one target per position, combined by a robust rule.

`TeacherEnsemble` wraps the teachers of a `teachers:` list (secure_kd.multi_teacher_config) as one
causal LM: at every position it takes each teacher's next-token distribution at temperature 1
(softmax of its logits), combines them with `kd.teacher_rule` (`secure_kd.robust_rules`:
mean, weighted_mean, median, trimmed_mean; renormalized) and returns `log p_combined` as its logits.
Everything the trainer does with one teacher then applies to the ensemble unchanged: `kd.temperature`
divides these logits as it would one teacher's, `kd.top_k` keeps the top-k of the combined distribution,
the objectives see one target. A list of one teacher gives that teacher's log-softmax, which differs
from its logits by a constant per position, so the loss equals the single-teacher loss.

`generate` samples from the combined distribution (seq_kd: the ensemble writes the answers; each token
is drawn from the rule's combination of the teachers' next-token distributions given the text so far),
with a key/value cache per teacher and positions that follow a left-padded attention mask.

Cost: every teacher runs on every batch, and the median and trimmed mean sort n values per vocabulary
entry: memory n x batch x seq x vocab floats for the stacked distributions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutput

from secure_kd.fingerprint import tokenizer_fingerprint
from secure_kd.models import ModelLoadError, load_teacher, load_tokenizer, vocab_size_of
from secure_kd.multi_teacher_config import teacher_seed
from secure_kd.robust_rules import RuleName, combine_distributions


class TeacherEnsemble(nn.Module):
    """Several causal LMs over one vocabulary as one teacher; see the module."""

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        rule: RuleName = "mean",
        *,
        weights: Sequence[float] | None = None,
        trim_fraction: float = 0.2,
    ) -> None:
        super().__init__()
        if not teachers:
            raise ValueError("a TeacherEnsemble needs at least one teacher")
        widths = [vocab_size_of(t) for t in teachers]
        if len(set(widths)) != 1:
            raise ValueError(f"the teachers' vocabularies differ ({widths}); they must share one tokenizer")
        self.teachers = nn.ModuleList(teachers)
        self.rule, self.trim_fraction = rule, trim_fraction
        self.weights = list(weights) if weights is not None else [1.0] * len(teachers)
        if len(self.weights) != len(teachers):
            raise ValueError(f"{len(teachers)} teachers but {len(self.weights)} weights")

    def get_output_embeddings(self) -> nn.Module:
        return self.teachers[0].get_output_embeddings()

    def combine(self, per_teacher_logits: Sequence[Tensor]) -> Tensor:
        """The combined distribution from each teacher's logits [..., vocab] (softmax at temperature 1)."""
        logits = [x if x.dtype == torch.float64 else x.float() for x in per_teacher_logits]
        probs = torch.stack([torch.softmax(x, dim=-1) for x in logits])
        return combine_distributions(probs, self.rule, weights=self.weights, trim_fraction=self.trim_fraction)

    @staticmethod
    def as_logits(probs: Tensor) -> Tensor:
        return torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any
    ) -> CausalLMOutput:
        kwargs.pop("labels", None)
        outputs = [
            t(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits for t in self.teachers
        ]
        return CausalLMOutput(logits=self.as_logits(self.combine(outputs)))

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        max_new_tokens: int,
        pad_token_id: int,
        eos_token_id: int | None = None,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_k: int = 0,
        **unused: Any,
    ) -> Tensor:
        """Prompt + up to `max_new_tokens` tokens drawn from the combined distribution (left padding)."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        pasts: list[Any] = [None] * len(self.teachers)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        ids, step_ids, step_positions = input_ids, input_ids, positions
        for _ in range(max_new_tokens):
            last = []
            for i, teacher in enumerate(self.teachers):
                out = teacher(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=step_positions,
                    past_key_values=pasts[i],
                    use_cache=True,
                )
                pasts[i] = out.past_key_values
                last.append(out.logits[:, -1])
            log_p = self.as_logits(self.combine(last))
            if do_sample:
                scores = log_p / temperature
                if top_k > 0:
                    kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
                    scores = scores.masked_fill(scores < kth, float("-inf"))
                token = torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(-1)
            else:
                token = log_p.argmax(dim=-1)
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            if eos_token_id is not None:
                done = done | (token == eos_token_id)
            ids = torch.cat([ids, token[:, None]], dim=-1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            step_ids, step_positions = token[:, None], step_positions[:, -1:] + 1
            if bool(done.all()):
                break
        return ids


def load_teacher_ensemble(
    job: Any, primary: nn.Module, tokenizer: Any, *, pad_token_id: int | None, device: torch.device
) -> TeacherEnsemble:
    """The job's `teachers:` as one `TeacherEnsemble`; `primary` is teachers[0], already loaded, and
    `tokenizer` the one the student and the primary share.

    A teacher whose vocabulary width differs from the primary's, or (a saved model with a tokenizer of
    its own) whose tokenizer is another, is refused, naming its index and source."""
    members = [primary]
    width, shared = vocab_size_of(primary), tokenizer_fingerprint(tokenizer)
    for i, entry in enumerate(job.teachers[1:], start=1):
        model = load_teacher(
            entry, vocab_size=len(tokenizer), seed=teacher_seed(job.seed, i), pad_token_id=pad_token_id
        ).to(device)
        own = _own_tokenizer_fingerprint(entry)
        if vocab_size_of(model) != width or own not in (None, shared):
            what = (
                f"a vocabulary of {vocab_size_of(model)} tokens (teachers[0]: {width})"
                if vocab_size_of(model) != width
                else "a tokenizer of its own that differs from the student's"
            )
            raise ModelLoadError(
                f"teachers[{i}] ({entry.source}) has {what}: every teacher of the list must share the "
                "student's tokenizer and vocabulary, since their distributions are combined token by "
                "token; use teachers trained with one tokenizer"
            )
        members.append(model)
    return TeacherEnsemble(
        members,
        job.kd.teacher_rule,
        weights=[entry.weight for entry in job.teachers],
        trim_fraction=job.kd.trim_fraction,
    )


def _own_tokenizer_fingerprint(entry: Any) -> str | None:
    """The fingerprint of the tokenizer saved with a teacher (None: a tiny teacher, or none saved)."""
    if entry.source == "tiny":
        return None
    try:
        return tokenizer_fingerprint(load_tokenizer(entry.source, trust_remote_code=entry.trust_remote_code))
    except (OSError, ValueError, ModelLoadError):
        return None


def ensemble_summary(job: Any, ensemble: TeacherEnsemble, perplexities: Sequence[float]) -> dict[str, Any]:
    """What results.json says of the teachers: the rule and each teacher's source, weight and perplexity."""
    return {
        "rule": job.kd.teacher_rule,
        "trim_fraction": job.kd.trim_fraction if job.kd.teacher_rule == "trimmed_mean" else None,
        "members": [
            {"source": entry.source, "weight": entry.weight, "perplexity": ppl}
            for entry, ppl in zip(job.teachers, perplexities, strict=True)
        ],
    }
