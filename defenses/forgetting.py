"""Forgetting by distillation: unlearn a class, a set of records or a canary by distilling a model into
itself, with the forget set's targets replaced by a "safe" target and the original's outputs kept on
the retain set.

Related work: teacher-student unlearning (Chundawat et al. 2023, "Can Bad Teaching Induce Forgetting?",
AAAI; Kurmanji et al. 2023, SCRUB, "Towards Unbounded Machine Unlearning", NeurIPS). The evaluation
follows the gold standard of the field, a model retrained from scratch without the forget set, and
U-LiRA's warning (Hayes et al. 2024, "Inexact Unlearning Needs More Careful Evaluations to Avoid a
False Sense of Privacy"): a forget set whose loss ends up much higher than under the retrained model
is itself a membership signal ("over-forgetting"), so the Result flags it.

Safe targets (secure-kd's own choices; the papers use other ones):
- `class` (digits CNN, `apparatus.digits`): the original's output with the forgotten class removed
  (its logit set to -inf, i.e. the distribution renormalized over the other classes), on every
  training example: a model retrained without the class never predicts it anywhere.
- `records` (digits CNN): on the forget records the original's distribution softened to
  `forget_temperature` (its logits divided by it); a heuristic that lowers the forget records'
  confidence towards what a non-member gets. Too high a temperature over-forgets, which the flag shows.
- `canary` (tiny LM): the original's own distribution with the canary's continuation suppressed: at
  the positions predicting the secret's tokens the true token's logit becomes the mean logit of the
  other tokens (all of them by default, or the k most likely), `defenses._forgetting_lm`. No
  reference model is needed. Measured here: with the top-10 mean the secret stayed the 3rd most
  likely of 1,000 (the alternatives a tiny model ranks high are mostly not digits); a reference model
  trained on public text only (`safe_target: reference`) did no better, because that reference
  itself ranks this secret high (a tokenization prior), so the vocabulary mean is the default.
  Unlearning runs in two phases, as in SCRUB: the forget records alone (in mixed batches their few
  secret positions are drowned by the retain set), then a short pass over everything to repair.
The student starts as a copy of the original and is trained with forward KL on all training data
(retain examples keep the original's outputs as targets). This is approximate unlearning: it gives
no certified removal guarantee; the retrained comparison is how it is judged.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Literal

import torch
from pydantic import BaseModel, Field, model_validator
from torch import Tensor, nn

from apparatus.canaries import CanaryCorpus
from apparatus.classifiers import evaluate_classifier, predict_logits, train_classifier
from apparatus.digits import load_digits_data, make_digits_cnn
from apparatus.tiny_lm import LMRecipe
from defenses import DEFENSES
from defenses._forgetting_lm import forget_canary
from secure_kd.config import Strict
from secure_kd.losses import forward_kl
from secure_kd.metrics import roc_metrics
from secure_kd.plugins import Plugin, PluginConfig, write_result


class ClassifierSettings(Strict):
    """The digits CNN: training from scratch (original, retrained) and the unlearning distillation."""

    width: int = Field(8, gt=0)
    epochs: int = Field(15, gt=0)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(64, gt=0)
    forget_class: int = Field(3, ge=0, le=9)
    n_forget_records: int = Field(60, gt=0, description="records mode: training examples to forget")
    forget_temperature: float = Field(2.0, gt=0, description="records mode: softening of their targets")
    unlearn_epochs: int = Field(5, gt=0)
    unlearn_lr: float = Field(1e-3, gt=0)


class LMSettings(Strict):
    """The tiny LM of canary mode: corpus, training (original and retrained) and unlearning."""

    corpus: CanaryCorpus = CanaryCorpus(n_records=30, n_canaries=2, canary_repeats=8, max_length=48)
    model: LMRecipe = LMRecipe(epochs=25)
    forget_canary: int = Field(0, ge=0, description="index of the canary to forget")
    safe_target: Literal["suppress", "reference"] = Field(
        "suppress",
        description="suppress: the original with the secret's tokens suppressed; reference: "
        "a model trained on public text only gives the targets at the secret's positions",
    )
    alternatives_k: int | None = Field(
        None, gt=0, description="suppress: the secret's logit -> mean of the top-k others (null: all others)"
    )
    forget_epochs: float = Field(200.0, gt=0, description="phase 1: epochs over the forget records alone")
    unlearn_epochs: float = Field(2.0, gt=0, description="phase 2: epochs over all training records")
    unlearn_lr: float = Field(3e-3, gt=0)
    n_nonmember_canaries: int = Field(
        32, ge=2, description="fresh canaries of the same format: the loss attack's non-members"
    )


class ForgettingConfig(PluginConfig):
    """`secure-kd defend forgetting`: unlearning by self-distillation, judged against retraining."""

    out: str = "runs/defenses/forgetting"
    target: Literal["class", "records", "canary"] = "class"
    classifier: ClassifierSettings = ClassifierSettings()
    lm: LMSettings = LMSettings()
    over_forgetting_ratio: float = Field(
        2.0, ge=1, description="flag when the unlearned forget-set loss > ratio * retrained loss + margin"
    )
    over_forgetting_margin: float = Field(0.1, ge=0, description="nats, added to the ratio test")
    over_forgetting_auc_drop: float = Field(
        0.15, gt=0, le=1, description="flag when the unlearned MIA AUC is this far below the retrained one"
    )

    @model_validator(mode="after")
    def _canary_exists(self) -> ForgettingConfig:
        if self.target == "canary" and self.lm.forget_canary >= self.lm.corpus.n_canaries:
            raise ValueError(
                f"lm.forget_canary={self.lm.forget_canary} but the corpus has {self.lm.corpus.n_canaries} "
                "canaries; pick an index below lm.corpus.n_canaries"
            )
        return self


class ModelReport(BaseModel):
    forget_loss: float = Field(description="mean loss (nats) on the forget set")
    mia_auc: float = Field(description="loss attack: forget set vs non-members (0.5 = indistinguishable)")
    forget_accuracy: float | None = None
    retain_accuracy: float | None = None
    forget_exposure: float | None = None
    retain_loss: float | None = None
    heldout_perplexity: float | None = None


class ForgettingResult(BaseModel):
    kind: str = "forgetting"
    target: str
    safe_target: str
    n_forget: int
    n_retain: int
    original: ModelReport
    unlearned: ModelReport
    retrained: ModelReport
    forget_loss_gap: float = Field(description="unlearned minus retrained forget-set loss (nats)")
    over_forgetting: bool = Field(description="the forget set now stands out as forgotten (U-LiRA's concern)")
    over_forgetting_reasons: list[str]
    notes: list[str]
    seconds: float


SAFE_TARGETS = {
    "class": "original's output with the forgotten class removed (renormalized over the other classes)",
    "records": "original's output on the forget records softened to forget_temperature",
    "canary": "original's own distribution with the secret's true tokens set to the mean logit of the others",
    "canary/reference": "original's own distribution; a public-text reference model's at the secret",
}


def _per_example_ce(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return torch.nn.functional.cross_entropy(predict_logits(model, x), y, reduction="none")


def self_distil(model: nn.Module, x: Tensor, targets: Tensor, s: ClassifierSettings, seed: int) -> None:
    """Train `model` in place with forward KL towards fixed target logits, one row per input."""
    optimizer = torch.optim.Adam(model.parameters(), lr=s.unlearn_lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(s.unlearn_epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], s.batch_size):
            index = order[start : start + s.batch_size]
            loss = forward_kl(model(x[index]), targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()


def _classifier(config: ForgettingConfig) -> dict:
    s = config.classifier
    data = load_digits_data(seed=config.seed)
    x, y = data.train
    if config.target == "class":
        forget_mask = y == s.forget_class
    else:
        if s.n_forget_records >= x.shape[0]:
            raise ValueError(f"classifier.n_forget_records must be below {x.shape[0]}, the training set size")
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(config.seed + 5))
        forget_mask = torch.zeros(x.shape[0], dtype=torch.bool)
        forget_mask[order[: s.n_forget_records]] = True
    initial = make_digits_cnn(width=s.width, seed=config.seed)
    original, retrained = copy.deepcopy(initial), copy.deepcopy(initial)
    train = dict(epochs=s.epochs, lr=s.lr, seed=config.seed, batch_size=s.batch_size)
    train_classifier(original, (x, y), **train)
    train_classifier(retrained, (x[~forget_mask], y[~forget_mask]), **train)

    targets = predict_logits(original, x)
    if config.target == "class":
        targets[:, s.forget_class] = float("-inf")
    else:
        targets[forget_mask] = targets[forget_mask] / s.forget_temperature
    unlearned = copy.deepcopy(original)
    self_distil(unlearned, x, targets, s, config.seed + 7)

    x_test, y_test = data.test
    test_forget = (
        y_test == s.forget_class if config.target == "class" else torch.zeros_like(y_test, dtype=torch.bool)
    )
    reports = {}
    for name, model in (("original", original), ("unlearned", unlearned), ("retrained", retrained)):
        forget_losses = _per_example_ce(model, x[forget_mask], y[forget_mask])
        # non-members: test examples of the same kind (the forgotten class, or any class for records)
        nonmember_x = x_test[test_forget] if config.target == "class" else x_test
        nonmember_y = y_test[test_forget] if config.target == "class" else y_test
        nonmember_losses = _per_example_ce(model, nonmember_x, nonmember_y)
        scores = torch.cat([-forget_losses, -nonmember_losses])
        members = [1] * len(forget_losses) + [0] * len(nonmember_losses)
        reports[name] = {
            "forget_loss": float(forget_losses.mean()),
            "mia_auc": float(roc_metrics(scores.numpy(), members, fpr_levels=())["auc"]),
            "forget_accuracy": evaluate_classifier(model, x_test[test_forget], y_test[test_forget])
            if config.target == "class"
            else evaluate_classifier(model, x[forget_mask], y[forget_mask]),
            "retain_accuracy": evaluate_classifier(model, x_test[~test_forget], y_test[~test_forget]),
        }
    return {"reports": reports, "n_forget": int(forget_mask.sum()), "n_retain": int((~forget_mask).sum())}


def over_forgetting_reasons(
    unlearned: ModelReport, retrained: ModelReport, config: ForgettingConfig
) -> list[str]:
    """Why the unlearned model's forget set looks *more* forgotten than under retraining (empty: it does not).

    A forget set whose loss is far above the retrained model's, or whose loss-attack AUC falls far
    below it, is recognizable as the set that was unlearned (Hayes et al. 2024)."""
    reasons = []
    limit = config.over_forgetting_ratio * retrained.forget_loss + config.over_forgetting_margin
    if unlearned.forget_loss > limit:
        reasons.append(
            f"forget-set loss {unlearned.forget_loss:.3f} > {config.over_forgetting_ratio:g} x retrained "
            f"{retrained.forget_loss:.3f} + {config.over_forgetting_margin:g}"
        )
    if unlearned.mia_auc < retrained.mia_auc - config.over_forgetting_auc_drop:
        reasons.append(
            f"loss-attack AUC {unlearned.mia_auc:.3f} < retrained {retrained.mia_auc:.3f} - "
            f"{config.over_forgetting_auc_drop:g}: the forget set has become easier to single out"
        )
    return reasons


def run(config: ForgettingConfig) -> ForgettingResult:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    outcome = forget_canary(config) if config.target == "canary" else _classifier(config)
    reports = {name: ModelReport(**values) for name, values in outcome["reports"].items()}
    gap = reports["unlearned"].forget_loss - reports["retrained"].forget_loss
    notes = [
        "approximate unlearning by self-distillation: no certified removal; judged against a model "
        "retrained without the forget set",
    ]
    if config.target == "class":
        notes.append("forget_accuracy: test accuracy on the forgotten class; retain_accuracy: on the others")
    elif config.target == "records":
        notes.append("forget_accuracy: accuracy on the forget records themselves; retain_accuracy: test set")
    if config.target == "canary":
        notes.append(
            "only the secret's tokens get safe targets: the rest of the canary record (its prefix, the name) "
            "keeps the original's targets, so the record's loss and MIA score can stay member-like"
        )
    if not math.isfinite(gap):
        notes.append("a forget-set loss is infinite: the gap and the flag compare infinities")
    reasons = over_forgetting_reasons(reports["unlearned"], reports["retrained"], config)
    result = ForgettingResult(
        target=config.target,
        safe_target=SAFE_TARGETS[
            "canary/reference"
            if config.target == "canary" and config.lm.safe_target == "reference"
            else config.target
        ],
        n_forget=outcome["n_forget"],
        n_retain=outcome["n_retain"],
        **reports,
        forget_loss_gap=gap,
        over_forgetting=bool(reasons),
        over_forgetting_reasons=reasons,
        notes=notes,
        seconds=time.perf_counter() - started,
    )
    write_result(config.out, result)
    return result


PLUGIN = DEFENSES.register(
    "forgetting",
    Plugin(
        name="forgetting",
        Config=ForgettingConfig,
        Result=ForgettingResult,
        run=run,
        summary="unlearning by self-distillation with safe forget-set targets, judged against retraining",
    ),
)
