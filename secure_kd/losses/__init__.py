"""Distillation objectives.

Every entry of the registry `LOSSES` is found by name with `get_loss(name)`; `available_losses()`
lists the names. `loss_info(name)` (also `get_loss(name).loss_info`) says how to call an entry:

- `stateful=False` (a function): call it directly,
  `loss(student_logits, teacher_logits, labels=None, *, temperature=1.0, reduction="mean",
  tail=None, chunk_size=None, **params) -> Tensor`.
  Names: forward_kl, reverse_kl, jsd (beta), tvd, skew_forward_kl / skew_reverse_kl (alpha),
  token_selective (ratio), ce (teacher ignored, labels required).
- Teacher and student with different tokenizers (`loss_info(name).cross_tokenizer != "none"`): `uld`
  (Universal Logit Distillation) and `span_aligned` (beta, matched_weight, unmatched_weight,
  likelihood_weight), same call plus `alignment=`, `teacher_labels=`, `vocab=` (per-batch inputs
  the trainer supplies, listed in `CROSS_TOKENIZER_ARGUMENTS`); see `cross_inputs.py`.
- `stateful=True` (an `nn.Module` class): instantiate it once per run, keep it with the student
  (its `state_dict` goes into checkpoints, its parameters, if any, into the optimizer) and call the
  instance. `taid` -> `TAID(t_start=..., ...)`, same call as above, plus `update(loss, step,
  total_steps)` once per optimizer step; `hidden_mse` -> `HiddenMSE(student_dim, teacher_dim)`, called
  with hidden states (`inputs="hidden"`).

Parameters: each entry declares them as a typed pydantic model (`loss_info(name).params`, a
`LossParams`; see `params.py`), which checks them in a direct call, in `fused_linear_kd_loss` and in
the config's `kd.params`; `check_params(name, values)` validates a mapping.

A new objective: `@autograd_loss(name, params=...)` on a per-token function of the student's and the
teacher's log-probabilities (or of the logits) registers a full logit objective whose gradient comes
from autograd, chunk by chunk (`autograd.py`, docs/extending.md); the built-ins above have
hand-derived chunked gradients.

Conventions shared by all logit objectives: logits [batch, seq, vocab] or [batch, classes]; labels
-100 excluded, never shifted here; "mean" over kept tokens, "none" per-example means [batch], "sum";
logits divided by the temperature, never multiplied by temperature**2; `teacher_logits` may be a
`TopKLogits`, then `tail="uniform"` or `tail="zero"` is required. Memory: the kept tokens are
processed in chunks in forward and backward (see `chunked.py`); `fused_linear_kd_loss` also fuses
the output layer so the student's logits are never materialized.
"""

from secure_kd.losses.autograd import TokenDists, TokenLogits, autograd_loss
from secure_kd.losses.catalog import LOSSES, LossInfo, check_params, loss_info
from secure_kd.losses.ce import ce
from secure_kd.losses.cross_inputs import CROSS_TOKENIZER_ARGUMENTS
from secure_kd.losses.forward_kl import forward_kl
from secure_kd.losses.fused import fused_linear_kd_loss
from secure_kd.losses.hidden_mse import HiddenMSE
from secure_kd.losses.jsd import jsd
from secure_kd.losses.params import LossParams, LossParamsError, NoParams
from secure_kd.losses.reverse_kl import reverse_kl
from secure_kd.losses.skew_forward_kl import skew_forward_kl
from secure_kd.losses.skew_reverse_kl import skew_reverse_kl
from secure_kd.losses.span_aligned import span_aligned
from secure_kd.losses.taid import TAID
from secure_kd.losses.token_selective import token_selective
from secure_kd.losses.tvd import tvd
from secure_kd.losses.uld import uld
from secure_kd.topk import TopKLogits


def get_loss(name: str):
    """The registered objective: a function, or an `nn.Module` class to instantiate (see `loss_info`)."""
    return LOSSES.get(name)


def available_losses() -> list[str]:
    return LOSSES.names()


def is_stateful(name: str) -> bool:
    """True when `get_loss(name)` is an `nn.Module` class (TAID, hidden-state matching)."""
    return loss_info(name).stateful


__all__ = [
    "CROSS_TOKENIZER_ARGUMENTS",
    "LOSSES",
    "LossInfo",
    "LossParams",
    "LossParamsError",
    "NoParams",
    "TokenDists",
    "TokenLogits",
    "autograd_loss",
    "check_params",
    "TopKLogits",
    "available_losses",
    "get_loss",
    "is_stateful",
    "loss_info",
    "fused_linear_kd_loss",
    "ce",
    "forward_kl",
    "jsd",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "token_selective",
    "tvd",
    "uld",
    "span_aligned",
    "TAID",
    "HiddenMSE",
]
